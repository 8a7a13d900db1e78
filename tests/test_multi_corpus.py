"""Several corpora at once: namespaced speakers, per-corpus splits, per-episode label sets and
training on a mix (fixtures with each corpus' layout; cross-corpus eval in tests/test_eval.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dataset_builder import build_episodes, parse_corpora, read_corpora, split_corpora, split_episodes
from test_corpora import write_audio

REPO = Path(__file__).resolve().parents[1]
ASED_CODES = {"n1": "01Neutral", "f2": "02Fearful", "h3": "03Happy", "s4": "04Sad", "a5": "05Angry"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ASED-layout folder (speakers 01-04) and a manifest corpus whose speakers are also 01-04."""
    root = tmp_path_factory.mktemp("corpora")
    for speaker in range(1, 5):
        for code, folder in ASED_CODES.items():
            for repetition in (1, 2):
                seed = speaker * 10 + repetition
                write_audio(root / "ased" / folder / f"{code}-01-{repetition:02d}-01-{speaker:02d}.flac", seed=seed)
    lines = ["path,speaker,emotion"]
    for speaker in range(1, 5):
        for emotion in ("calm", "happiness", "pride"):
            for repetition in (1, 2):
                relative = f"{speaker:02d}/{emotion}_{repetition}.wav"
                write_audio(root / "other" / relative, seed=speaker + repetition)
                lines.append(f"{relative},{speaker:02d},{emotion}")
    (root / "other" / "manifest.csv").write_text("\n".join(lines) + "\n")
    return {"ased": root / "ased", "manifest": root / "other"}


def specs_of(corpora: dict[str, Path]):
    return parse_corpora("ased,manifest", f"{corpora['ased']},{corpora['manifest']}")


@pytest.mark.parametrize(
    "corpus, data_dir, message",
    [
        ("ravdess,ased", "a", "gives 1 folder"),
        ("ased,ased", "a,b", "more than once"),
        ("ased,,manifest", None, "empty name"),
        ("ased,nonsense", "a,b", "Unknown corpus"),
    ],
)
def test_parse_corpora_errors(corpus, data_dir, message):
    with pytest.raises(ValueError, match=message):
        parse_corpora(corpus, data_dir)


def test_parse_corpora_pairs_names_and_folders():
    assert parse_corpora("ravdess,synthetic,ased", "A,,C") == [("ravdess", "A"), ("synthetic", None), ("ased", "C")]
    assert parse_corpora("ased", "A") == [("ased", "A")]


def test_speakers_are_namespaced_only_when_mixed(corpora):
    mixed = read_corpora(specs_of(corpora))
    assert set(mixed["speaker"]) == {f"{c}/{s:02d}" for c in ("ased", "manifest") for s in range(1, 5)}
    assert mixed.num_rows == 40 + 24
    single = read_corpora(parse_corpora("ased", str(corpora["ased"])))
    assert set(single["speaker"]) == {"01", "02", "03", "04"}


def test_splits_are_drawn_within_each_corpus(corpora):
    specs = specs_of(corpora)
    table = read_corpora(specs)
    splits = split_corpora(table, specs, seed=3)
    for corpus in ("ased", "manifest"):
        members = [[s for s in splits[split] if s.startswith(corpus + "/")] for split in ("train", "validation", "test")]
        assert [len(m) for m in members] == [2, 1, 1]  # 4 speakers: 15 % rounds up to one each
    everyone = splits["train"] + splits["validation"] + splits["test"]
    assert sorted(everyone) == sorted(set(table["speaker"]))
    explicit = split_corpora(table, specs, validation_speakers=["ased/01"], test_speakers=["manifest/01"])
    assert explicit["validation"] == ["ased/01"] and explicit["test"] == ["manifest/01"]
    with pytest.raises(ValueError, match="not in the corpus"):
        split_corpora(table, specs, test_speakers=["01"])  # plain ids are ambiguous once mixed


def test_episodes_never_mix_corpora_and_carry_their_labels(corpora):
    specs = specs_of(corpora)
    table = read_corpora(specs)
    corpus_of_id = dict(zip(table["id"], table["corpus"]))
    splits = split_corpora(table, specs, seed=0)
    episodes = split_episodes(table, specs, splits["train"], "train", k=3, mode="arbitrary", seed=0, episodes_per_speaker=6)
    assert len(episodes) == 6 * len(splits["train"])
    expected = {"ased": ["anger", "fear", "happiness", "neutral", "sadness"], "manifest": ["calm", "happiness", "pride"]}
    for episode in episodes:
        corpus = episode["speaker"].split("/")[0]
        assert episode["corpus"] == corpus
        assert {corpus_of_id[i] for i in [episode["query_id"], *episode["enrollment_ids"]]} == {corpus}
        assert episode["labels"] == expected[corpus]
        assert {episode["emotion"], *episode["enrollment_labels"]} <= set(expected[corpus])


def test_single_corpus_episodes_equal_build_episodes(corpora, tmp_path):
    specs = parse_corpora("ased", str(corpora["ased"]))
    table = read_corpora(specs)
    splits = split_corpora(table, specs, seed=1)
    built = build_episodes("ased", corpora["ased"], k=2, mode="balanced", seed=1, episodes_per_speaker=5,
                           validation_speakers=splits["validation"], test_speakers=splits["test"], cache_dir=tmp_path)
    for split in ("train", "test"):
        mine = split_episodes(table, specs, splits[split], split, k=2, mode="balanced", seed=1, episodes_per_speaker=5)
        assert mine == built[split].to_list()
        assert all("labels" not in episode for episode in mine)


def test_predict_episodes_scores_each_episode_over_its_own_labels(corpora, tiny):
    from modeling_icl_ser import IclSerDataCollator
    from evaluation.episodic import episode_example, predict_episodes

    model, processor = tiny
    specs = specs_of(corpora)
    table = read_corpora(specs)
    labels = sorted(set(table["emotion"]))
    splits = split_corpora(table, specs, seed=0)
    episodes = split_episodes(table, specs, splits["test"], "test", k=2, mode="arbitrary", seed=0, episodes_per_speaker=3)
    paths = dict(zip(table["id"], table["path"]))
    collator = IclSerDataCollator(processor, labels=labels)
    probabilities = predict_episodes(model, collator, episodes, paths, labels, batch_size=4)
    assert probabilities.shape == (len(episodes), len(labels))
    for episode, row in zip(episodes, probabilities):
        outside = [j for j, label in enumerate(labels) if label not in episode["labels"]]
        assert np.all(row[outside] == 0) and row.sum() == pytest.approx(1.0, abs=1e-5)
    # A mixed training batch: each prompt lists its own corpus' labels.
    mixed = [next(e for e in episodes if e["corpus"] == c) for c in ("ased", "manifest")]
    batch = collator([episode_example(e, paths) for e in mixed])
    prompts = [processor.tokenizer.decode(ids) for ids in batch["input_ids"]]
    assert "fear" in prompts[0] and "pride" not in prompts[0]
    assert "pride" in prompts[1] and "fear" not in prompts[1]
    with pytest.raises(ValueError, match="candidate_labels"):
        collator([episode_example(mixed[0], paths), episode_example({**mixed[1], "labels": None}, paths)])


def test_train_on_two_corpora(corpora, tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    summary = train.main(["--corpus", "ased,manifest", "--data_dir", f"{corpora['ased']},{corpora['manifest']}",
                          "--tiny", "--virtual_speakers", "1", "--batch_size", "4", "--max_steps", "2", "--eval_k", "0", "2",
                          "--eval_episodes_per_speaker", "2", "--log_with", "none", "--output_dir", str(tmp_path)])
    assert summary["n_train_speakers"] == 4 and summary["n_validation_speakers"] == 2
    assert all(0.0 <= v <= 1.0 for v in summary["validation"].values())
    with pytest.raises(ValueError, match="drop --labels"):
        train.parse_arguments(["--corpus", "ased,manifest", "--data_dir", "a,b", "--labels", "anger", "fear"])
    with pytest.raises(ValueError, match="gives 1 folder"):
        train.parse_arguments(["--corpus", "ased,manifest", "--data_dir", "a"])


def test_corpus_lists_from_one_yaml_file(tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    settings = tmp_path / "settings.yaml"
    settings.write_text("corpus: ravdess,ased,emotiontts-ko\ndata_dir: A,B,C\n")
    args = train.parse_arguments([str(settings)])
    assert parse_corpora(args.corpus, args.data_dir) == [("ravdess", "A"), ("ased", "B"), ("emotiontts-ko", "C")]


def test_build_episodes_of_two_corpora(corpora):
    episodes = build_episodes("ased,manifest", f"{corpora['ased']},{corpora['manifest']}", k=2, mode="balanced",
                              episodes_per_speaker=3, seed=0)
    assert list(episodes) == ["train", "validation", "test"] and "labels" in episodes["test"].column_names
    for split in episodes:
        assert {s.split("/")[0] for s in episodes[split]["speaker"]} == {"ased", "manifest"}
    speakers = [set(episodes[split]["speaker"]) for split in episodes]
    assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])
    with pytest.raises(ValueError, match="mode"):
        build_episodes("ased,manifest", f"{corpora['ased']},{corpora['manifest']}", mode="random")


# ----------------------------------------------------------------------------- content-disjoint
RAVDESS_CODES = ("01", "03", "04", "05")  # neutral, happiness, sadness, anger


@pytest.fixture(scope="module")
def acted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A RAVDESS-layout folder (3 actors x 4 emotions x 2 statements) and a manifest with a
    text column (3 speakers x 3 emotions x 2 sentences): each sentence in every emotion."""
    root = tmp_path_factory.mktemp("acted")
    for actor in range(1, 4):
        for emotion in RAVDESS_CODES:
            for statement in ("01", "02"):
                name = f"03-01-{emotion}-01-{statement}-01-{actor:02d}.wav"
                write_audio(root / "ravdess" / f"Actor_{actor:02d}" / name, seconds=0.1, seed=actor)
    lines = ["path,speaker,emotion,text"]
    for speaker in range(1, 4):
        for emotion in ("calm", "happiness", "pride"):
            for sentence in ("hello", "goodbye"):
                relative = f"{speaker:02d}/{emotion}_{sentence}.wav"
                write_audio(root / "other" / relative, seconds=0.1, seed=speaker)
                lines.append(f"{relative},{speaker:02d},{emotion},{sentence}")
    (root / "other" / "manifest.csv").write_text("\n".join(lines) + "\n")
    return {"ravdess": root / "ravdess", "manifest": root / "other"}


def test_content_disjoint_episodes_of_two_corpora(acted, corpora, tmp_path):
    names, folders = "ravdess,manifest", f"{acted['ravdess']},{acted['manifest']}"
    specs = parse_corpora(names, folders)
    table = read_corpora(specs)
    text_of = dict(zip(table["id"], table["text"]))
    splits = split_corpora(table, specs, seed=0)
    for mode, k in (("arbitrary", 3), ("balanced", 3), ("exclude_query_class", 2)):
        built = build_episodes(names, folders, k=k, mode=mode, content_disjoint=True, cache_dir=tmp_path)
        direct = {split: split_episodes(table, specs, splits[split], split, k, mode, content_disjoint=True)
                  for split in built}
        for split in built:
            assert built[split].to_list() == direct[split]
            for episode in direct[split]:
                assert all(text_of[i] != text_of[episode["query_id"]] for i in episode["enrollment_ids"])
        # The option keys the cache: the plain build is the one without the option.
        plain = build_episodes(names, folders, k=k, mode=mode, cache_dir=tmp_path)
        assert plain["test"].to_list() == build_episodes(names, folders, k=k, mode=mode, content_disjoint=False,
                                                         cache_dir=tmp_path / "other")["test"].to_list()
        assert plain["test"].to_list() != built["test"].to_list()
    with pytest.raises(ValueError, match="larger than any speaker allows in mode 'arbitrary', content-disjoint"):
        split_episodes(table, specs, splits["test"], "test", 5, "arbitrary", content_disjoint=True)
    # A manifest without a text column: named, with the fix, before any episode is made.
    mixed = parse_corpora("ravdess,manifest", f"{acted['ravdess']},{corpora['manifest']}")
    with pytest.raises(ValueError, match=r"corpus 'manifest' \(24 utterances\).*add a\s+`text` column"):
        build_episodes("ravdess,manifest", f"{acted['ravdess']},{corpora['manifest']}", k=1, content_disjoint=True,
                       cache_dir=tmp_path)
    mixed_table = read_corpora(mixed)
    with pytest.raises(ValueError, match="'manifest'"):
        split_episodes(mixed_table, mixed, ["ravdess/Actor_01"], "test", 1, "arbitrary", content_disjoint=True)
    with pytest.raises(ValueError, match="'iemocap' has no fixed sentences"):
        build_episodes("ravdess,iemocap", "a,b", content_disjoint=True)


def test_train_content_disjoint(acted, tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    with pytest.raises(ValueError, match="'synthetic' has no fixed sentences"):
        train.parse_arguments(["--corpus", "synthetic", "--content_disjoint"])
    summary = train.main(["--corpus", "ravdess", "--data_dir", str(acted["ravdess"]), "--content_disjoint",
                          "--tiny", "--virtual_speakers", "1", "--batch_size", "2", "--max_steps", "1",
                          "--k_max", "4", "--eval_k", "0", "4", "--eval_episodes_per_speaker", "2",
                          "--log_with", "none", "--output_dir", str(tmp_path)])
    assert {"val_ua_k0", "val_ua_k4"} <= set(summary["validation"])
    final = tmp_path / "final"
    assert '"content_disjoint": true' in (final / "training_args.json").read_text()
    assert "`arbitrary` content-disjoint enrollment" in (final / "README.md").read_text()
    # The training sampler gets the option: 4 utterances of the other statement allow K <= 4.
    with pytest.raises(ValueError, match=r"content-disjoint \(EpisodeSampler\)"):
        train.main(["--corpus", "ravdess", "--data_dir", str(acted["ravdess"]), "--content_disjoint", "--tiny",
                    "--virtual_speakers", "0", "--k_max", "5", "--log_with", "none", "--output_dir", str(tmp_path / "x")])
