"""Speaker splits, episode semantics, the sampler, the builder and its save/load paths."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile

from dataset_builder import EpisodeSampler, build_episodes, build_pools, read_corpus, split_speakers
from dataset_builder.episodes import fixed_episodes
from test_corpora import ravdess_root

EMOTIONS = ("anger", "happiness", "neutral", "sadness")
SEEDS = range(12)


def make_table(n_speakers: int = 8, per_emotion: int = 3, small_speaker: bool = False) -> list[dict]:
    """An in-memory utterance table (no audio needed for episode logic)."""
    rows = []
    for s in range(n_speakers):
        for e in EMOTIONS:
            for u in range(per_emotion):
                rows.append({"id": f"c/s{s}/{e}_{u}", "speaker": f"s{s}", "emotion": e})
    if small_speaker:
        rows += [{"id": f"c/tiny/{e}", "speaker": "tiny", "emotion": e} for e in EMOTIONS[:2]]
    return rows


@pytest.fixture(scope="module")
def manifest_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 speakers x 4 emotions x 3 tiny WAVs, plus one speaker with only 2 utterances."""
    root = tmp_path_factory.mktemp("manifest_corpus")
    lines = ["path,speaker,emotion"]
    samples = np.zeros(1600, dtype=np.float32)
    samples[::50] = 0.1
    for row in make_table(10, 3, small_speaker=True):
        relative = row["id"].split("/", 1)[1] + ".wav"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / relative, samples, 16000)
        lines.append(f"{relative},{row['speaker']},{row['emotion']}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- speaker splits
def test_split_speakers_counts_and_disjointness() -> None:
    speakers = [f"Actor_{i:02d}" for i in range(1, 25)]
    for seed in SEEDS:
        splits = split_speakers(speakers, seed=seed)
        assert [len(splits[s]) for s in ("train", "validation", "test")] == [16, 4, 4]
        assert sorted(splits["train"] + splits["validation"] + splits["test"]) == speakers
    assert split_speakers(speakers, seed=1) == split_speakers(list(reversed(speakers)) * 2, seed=1)
    assert split_speakers(speakers, seed=1) != split_speakers(speakers, seed=2)
    assert [len(v) for v in split_speakers(["a", "b", "c"]).values()] == [1, 1, 1]


def test_split_speakers_explicit_and_errors() -> None:
    splits = split_speakers("abcdef", validation_speakers=["a"], test_speakers=["b", "c"])
    assert splits == {"train": ["d", "e", "f"], "validation": ["a"], "test": ["b", "c"]}
    with pytest.raises(ValueError, match="not in the corpus"):
        split_speakers("abc", validation_speakers=["z"], test_speakers=["a"])
    with pytest.raises(ValueError, match="both validation and test"):
        split_speakers("abcd", validation_speakers=["a"], test_speakers=["a"])
    with pytest.raises(ValueError, match="validation split has no speaker"):
        split_speakers("abcd", test_speakers=["a"])
    with pytest.raises(ValueError, match="at least 3"):
        split_speakers("ab")
    with pytest.raises(ValueError, match="leave no training"):
        split_speakers("abcd", validation_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------------- episode properties
@pytest.mark.parametrize("mode", ["arbitrary", "balanced", "exclude_query_class"])
@pytest.mark.parametrize("k", [0, 1, 3, 4, 6, 8])
def test_episode_properties(mode: str, k: int) -> None:
    pools = build_pools(make_table())
    label_of = {row["id"]: row["emotion"] for row in make_table()}
    speaker_of = {row["id"]: row["speaker"] for row in make_table()}
    for seed in SEEDS:
        for episode in fixed_episodes(pools, k, mode, seed=seed, episodes_per_speaker=5):
            enrollment = episode["enrollment_ids"]
            assert len(enrollment) == len(set(enrollment)) == episode["k"] == k
            assert episode["query_id"] not in enrollment
            assert {speaker_of[i] for i in enrollment + [episode["query_id"]]} == {episode["speaker"]}
            assert episode["enrollment_labels"] == [label_of[i] for i in enrollment]
            assert episode["emotion"] == label_of[episode["query_id"]]
            if mode == "exclude_query_class":
                assert episode["emotion"] not in episode["enrollment_labels"]
            if mode == "balanced":
                counts = Counter(episode["enrollment_labels"])
                assert len(counts) == min(k, len(EMOTIONS))
                assert not counts or max(counts.values()) - min(counts.values()) <= 1


def test_arbitrary_need_not_cover_all_emotions() -> None:
    pools = build_pools(make_table(per_emotion=6))
    coverage = [len(set(e["enrollment_labels"])) for e in fixed_episodes(pools, 4, "arbitrary", seed=0)]
    assert min(coverage) < len(EMOTIONS)  # random draws sometimes repeat an emotion


def test_fixed_episodes_determinism_and_query_coverage() -> None:
    pools = build_pools(make_table())
    first = list(fixed_episodes(pools, 4, "balanced", seed=3))
    assert first == list(fixed_episodes(pools, 4, "balanced", seed=3))
    assert first != list(fixed_episodes(pools, 4, "balanced", seed=4))
    # Default: every utterance is the query exactly once.
    assert sorted(e["query_id"] for e in first) == sorted(row["id"] for row in make_table())
    # A speaker's episodes do not depend on which other speakers are present.
    alone = list(fixed_episodes({"s3": pools["s3"]}, 4, "balanced", seed=3))
    assert alone == [e for e in first if e["speaker"] == "s3"]


# ----------------------------------------------------------------------------- sampler
def test_sampler_state_round_trip() -> None:
    table = make_table()
    sampler = EpisodeSampler(table, speakers=["s0", "s1", "s2"], k=(0, 8), mode="arbitrary", seed=5)
    head = [next(sampler) for _ in range(7)]
    state = sampler.state_dict()
    tail = [next(sampler) for _ in range(20)]
    resumed = EpisodeSampler(table, speakers=["s2", "s1", "s0"], k=(0, 8), mode="arbitrary", seed=5)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(20)] == tail
    fresh = EpisodeSampler(table, speakers=["s0", "s1", "s2"], k=(0, 8), mode="arbitrary", seed=5)
    assert [next(fresh) for _ in range(7)] == head
    other_seed = EpisodeSampler(table, speakers=["s0", "s1", "s2"], k=(0, 8), mode="arbitrary", seed=6)
    assert [next(other_seed) for _ in range(7)] != head
    episodes = head + tail
    assert {e["speaker"] for e in episodes} <= {"s0", "s1", "s2"}
    assert all(0 <= e["k"] <= 8 for e in episodes) and len({e["k"] for e in episodes}) > 3
    assert all(e["query_id"] not in e["enrollment_ids"] for e in episodes)
    with pytest.raises(ValueError, match="seed"):
        EpisodeSampler(table, speakers=["s0", "s1", "s2"], k=(0, 8), seed=7).load_state_dict(state)


def test_sampler_permuted_label_share() -> None:
    table = make_table()
    plain = EpisodeSampler(table, k=(2, 8), seed=5)
    mixed = EpisodeSampler(table, k=(2, 8), seed=5, permuted_label_share=0.3)
    pairs = [(next(plain), next(mixed)) for _ in range(300)]
    permuted = [(p, m) for p, m in pairs if m.get("permuted")]
    solvable = [p for p, _ in pairs if p["emotion"] in p["enrollment_labels"]]
    assert 0.2 * len(solvable) <= len(permuted) <= 0.4 * len(solvable)  # ~30% of the solvable ones
    assert all(p["emotion"] in p["enrollment_labels"] for p, _ in permuted)  # never label noise
    for p, m in pairs:  # same utterances either way: only the label words change
        assert (p["query_id"], p["enrollment_ids"]) == (m["query_id"], m["enrollment_ids"])
        if not m.get("permuted"):
            assert m["emotion"] == p["emotion"] and m["enrollment_labels"] == p["enrollment_labels"]
    changed = 0
    for p, m in permuted:
        # One consistent mapping (a bijection) over the episode's enrollment and query labels.
        mapping = dict(zip(p["enrollment_labels"] + [p["emotion"]], m["enrollment_labels"] + [m["emotion"]]))
        assert all(mapping[a] == b
                   for a, b in zip(p["enrollment_labels"] + [p["emotion"]], m["enrollment_labels"] + [m["emotion"]]))
        assert len(set(mapping.values())) == len(mapping) and set(mapping.values()) <= set(EMOTIONS)
        changed += any(a != b for a, b in mapping.items())
    assert changed > len(permuted) // 2
    state = mixed.state_dict()
    with pytest.raises(ValueError, match="permuted_label_share"):
        EpisodeSampler(table, k=(2, 8), seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="permuted_label_share"):
        EpisodeSampler(table, permuted_label_share=1.5)


def test_sampler_modes_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    table = make_table(small_speaker=True)
    sampler = EpisodeSampler(table, k=3, mode="exclude_query_class", seed=0)
    for _ in range(50):
        episode = next(sampler)
        assert episode["emotion"] not in episode["enrollment_labels"] and episode["k"] == 3
    with caplog.at_level(logging.WARNING):
        sampler = EpisodeSampler(table, k=(0, 4), seed=0)
    assert "tiny" not in sampler.pools and "tiny" in caplog.text
    with pytest.raises(ValueError, match="Unknown enrollment mode"):
        EpisodeSampler(table, mode="random")
    with pytest.raises(ValueError, match="larger than any speaker"):
        EpisodeSampler(table, k=(0, 50))
    with pytest.raises(ValueError, match="no utterances"):
        EpisodeSampler(table, speakers=["nobody"])
    with pytest.raises(ValueError, match="range"):
        EpisodeSampler(table, k=(4, 2))


# ----------------------------------------------------------------------------- builder
def test_build_episodes(manifest_corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        episodes = build_episodes("manifest", manifest_corpus, k=4, mode="balanced", seed=0, cache_dir=tmp_path)
    assert "tiny" in caplog.text  # 2 utterances < k + 1: skipped with a warning
    assert isinstance(episodes, datasets.DatasetDict) and list(episodes) == ["train", "validation", "test"]
    table = read_corpus("manifest", manifest_corpus)
    label_of = dict(zip(table["id"], table["emotion"]))
    speakers = {split: set(episodes[split]["speaker"]) for split in episodes}
    assert not (speakers["train"] & speakers["validation"] or speakers["train"] & speakers["test"]
                or speakers["validation"] & speakers["test"])
    for split in episodes:
        for row in episodes[split]:
            assert row["k"] == 4 and row["mode"] == "balanced" and row["corpus"] == "manifest"
            assert row["query_id"] not in row["enrollment_ids"]
            assert [label_of[i] for i in row["enrollment_ids"]] == row["enrollment_labels"]
            assert label_of[row["query_id"]] == row["emotion"]
            assert len(set(row["enrollment_labels"])) == 4
    assert len(set(episodes["test"]["episode_id"])) == episodes["test"].num_rows
    # Deterministic across caches; the seed changes them.
    again = build_episodes("manifest", manifest_corpus, k=4, mode="balanced", seed=0, cache_dir=tmp_path / "other")
    assert again["test"].to_list() == episodes["test"].to_list()
    reseeded = build_episodes("manifest", manifest_corpus, k=4, mode="balanced", seed=1, cache_dir=tmp_path)
    assert reseeded["train"].to_list() != episodes["train"].to_list()


def test_build_episodes_counts_and_explicit_speakers(manifest_corpus: Path, tmp_path: Path) -> None:
    episodes = build_episodes(
        "manifest", manifest_corpus, k=2, mode="exclude_query_class", episodes_per_speaker=5,
        validation_speakers=["s1"], test_speakers=["s2", "s3"], cache_dir=tmp_path,
    )
    assert set(episodes["validation"]["speaker"]) == {"s1"} and set(episodes["test"]["speaker"]) == {"s2", "s3"}
    assert episodes["test"].num_rows == 10 and episodes["validation"].num_rows == 5
    assert all(r["emotion"] not in r["enrollment_labels"] for r in episodes["train"])


def test_save_load_and_parquet_round_trip(manifest_corpus: Path, tmp_path: Path) -> None:
    episodes = build_episodes("manifest", manifest_corpus, k=3, cache_dir=tmp_path / "cache")
    episodes.save_to_disk(str(tmp_path / "saved"))
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert loaded.keys() == episodes.keys()
    for split in episodes:
        assert loaded[split].features == episodes[split].features
        assert loaded[split].to_list() == episodes[split].to_list()
    # The Parquet files push_to_hub uploads, exported and read back locally.
    files = {}
    for split in episodes:
        files[split] = str(tmp_path / "parquet" / f"{split}.parquet")
        (tmp_path / "parquet").mkdir(exist_ok=True)
        episodes[split].to_parquet(files[split])
    reloaded = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    for split in episodes:
        assert reloaded[split].to_list() == episodes[split].to_list()
        assert reloaded[split].features["enrollment_ids"] == episodes[split].features["enrollment_ids"]


def test_build_episodes_bad_input(manifest_corpus: Path, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    # Settings are checked before the (missing) corpus is touched.
    with pytest.raises(ValueError, match="Unknown enrollment mode 'random'"):
        build_episodes("manifest", missing, mode="random")
    with pytest.raises(ValueError, match="Unknown corpus"):
        build_episodes("librispeech", missing)
    with pytest.raises(ValueError, match="k must be"):
        build_episodes("manifest", missing, k=-1)
    with pytest.raises(ValueError, match="needs data_dir"):
        build_episodes("ravdess")
    with pytest.raises(ValueError, match="does not exist"):
        build_episodes("manifest", missing)
    with pytest.raises(ValueError, match="larger than any speaker"):
        build_episodes("manifest", manifest_corpus, k=20, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="test split is empty"):
        build_episodes("manifest", manifest_corpus, k=4, validation_speakers=["s1"], test_speakers=["tiny"],
                       cache_dir=tmp_path)


def test_synthetic_episodes(tmp_path: Path) -> None:
    episodes = build_episodes("synthetic", tmp_path / "corpus", k=2, mode="balanced", cache_dir=tmp_path / "ep",
                              n_speakers=5, emotions=("neutral", "anger"), utterances_per_emotion=3)
    assert [len(set(episodes[s]["speaker"])) for s in episodes] == [3, 1, 1]
    assert all(set(r["enrollment_labels"]) == {"neutral", "anger"} for r in episodes["test"])


@pytest.mark.skipif(ravdess_root() is None, reason="real RAVDESS not found (set ICL_SER_RAVDESS)")
def test_real_ravdess_episodes(tmp_path: Path) -> None:
    episodes = build_episodes("ravdess", ravdess_root(), k=4, mode="balanced", cache_dir=tmp_path)
    assert [len(set(episodes[s]["speaker"])) for s in ("train", "validation", "test")] == [16, 4, 4]
    assert [episodes[s].num_rows for s in ("train", "validation", "test")] == [960, 240, 240]


def test_builder_class_directly(manifest_corpus: Path, tmp_path: Path) -> None:
    """The GeneratorBasedBuilder works on its own (it reads the corpus itself)."""
    from dataset_builder import IclSerEpisodes

    builder = IclSerEpisodes(cache_dir=str(tmp_path), corpus="manifest", data_dir=str(manifest_corpus), k=2,
                             mode="arbitrary", seed=0)
    builder.download_and_prepare()
    direct = builder.as_dataset()
    via_function = build_episodes("manifest", manifest_corpus, k=2, mode="arbitrary", seed=0, cache_dir=tmp_path / "f")
    for split in via_function:
        assert direct[split].to_list() == via_function[split].to_list()


# ----------------------------------------------------------------------------- content-disjoint
SENTENCES = ("s0", "s1", "s2", "s3")


def sentence_table(n_speakers: int = 4, one_sentence_speaker: bool = False) -> list[dict]:
    """Acted-corpus layout: every speaker says every sentence in every emotion."""
    rows = [
        {"id": f"c/s{s}/{e}_{t}", "speaker": f"s{s}", "emotion": e, "text": t, "corpus": "c"}
        for s in range(n_speakers) for e in EMOTIONS for t in SENTENCES
    ]
    if one_sentence_speaker:  # every utterance of the query's sentence: nothing is content-disjoint
        rows += [{"id": f"c/mono/{e}", "speaker": "mono", "emotion": e, "text": "s0", "corpus": "c"} for e in EMOTIONS]
    return rows


def assert_content_disjoint(episode: dict, text_of: dict, mode: str) -> None:
    assert all(text_of[i] != text_of[episode["query_id"]] for i in episode["enrollment_ids"]), episode
    assert episode["query_id"] not in episode["enrollment_ids"]
    if mode == "exclude_query_class":
        assert episode["emotion"] not in episode["enrollment_labels"]


@pytest.mark.parametrize("mode", ["arbitrary", "balanced", "exclude_query_class"])
def test_content_disjoint_enrollment_never_holds_the_query_sentence(mode: str) -> None:
    rows = sentence_table()
    text_of = {row["id"]: row["text"] for row in rows}
    pools = build_pools(rows)
    # 16 utterances: 12 of other sentences; outside the query's emotion too, 3 x 3 = 9.
    max_k = 9 if mode == "exclude_query_class" else 12
    assert {pool.max_k(mode, content_disjoint=True) for pool in pools.values()} == {max_k}
    for k in range(max_k + 1):
        fixed = list(fixed_episodes(pools, k, mode, seed=1, content_disjoint=True))
        assert len(fixed) == 4 * 16 and all(len(e["enrollment_ids"]) == k for e in fixed)
        sampler = EpisodeSampler(rows, k=k, mode=mode, seed=1, content_disjoint=True)
        for episode in fixed + [next(sampler) for _ in range(30)]:
            assert_content_disjoint(episode, text_of, mode)
        if mode == "balanced":  # still covers min(K, emotions) emotions
            assert all(len(set(e["enrollment_labels"])) == min(k, len(EMOTIONS)) for e in fixed)
    with pytest.raises(ValueError, match="content-disjoint"):
        list(EpisodeSampler(rows, k=max_k + 1, mode=mode, content_disjoint=True))
    sampler = EpisodeSampler(rows, k=(0, max_k), mode=mode, seed=2, content_disjoint=True)
    for _ in range(200):
        assert_content_disjoint(next(sampler), text_of, mode)


@pytest.mark.parametrize("mode", ["arbitrary", "balanced", "exclude_query_class"])
def test_content_disjoint_false_changes_nothing(mode: str) -> None:
    with_texts = sentence_table()
    without = [{key: value for key, value in row.items() if key != "text"} for row in with_texts]
    for k in (0, 2, 5):
        assert list(fixed_episodes(build_pools(with_texts), k, mode, seed=3)) == list(
            fixed_episodes(build_pools(without), k, mode, seed=3))
    a = EpisodeSampler(with_texts, k=(0, 8), mode=mode, seed=3)
    b = EpisodeSampler(without, k=(0, 8), mode=mode, seed=3, content_disjoint=False)
    assert [next(a) for _ in range(50)] == [next(b) for _ in range(50)]
    # And the acted table's episodes do share sentences without the option.
    text_of = {row["id"]: row["text"] for row in with_texts}
    assert any(text_of[i] == text_of[e["query_id"]] for e in fixed_episodes(build_pools(with_texts), 4, mode)
               for i in e["enrollment_ids"])


def test_content_disjoint_skips_speakers_and_needs_texts(caplog: pytest.LogCaptureFixture) -> None:
    rows = sentence_table(n_speakers=2, one_sentence_speaker=True)
    with caplog.at_level(logging.WARNING):
        sampler = EpisodeSampler(rows, k=(0, 4), content_disjoint=True)
    assert sorted(sampler.pools) == ["s0", "s1"]
    assert any("mono" in r.getMessage() and "content-disjoint" in r.getMessage() for r in caplog.records)
    assert sampler.state_dict()["content_disjoint"] is True
    plain = EpisodeSampler(rows, k=(0, 4))
    with pytest.raises(ValueError, match="content_disjoint"):
        plain.load_state_dict(sampler.state_dict())
    plain.load_state_dict({key: value for key, value in plain.state_dict().items() if key != "content_disjoint"})
    with pytest.raises(ValueError, match="larger than any speaker allows"):
        EpisodeSampler([r for r in rows if r["speaker"] == "mono"], k=1, content_disjoint=True)
    # No texts: a clear error naming the corpus and the way out.
    with pytest.raises(ValueError, match=r"corpus 'c' \(96 utterances\).*manifest add a `text` column"):
        EpisodeSampler([{**row, "text": None, "corpus": "c"} for row in make_table()], content_disjoint=True)
    with pytest.raises(ValueError, match="without text"):
        list(fixed_episodes(build_pools(make_table()), 1, "arbitrary", content_disjoint=True))


def test_build_episodes_content_disjoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'synthetic' has no fixed sentences.*ravdess"):
        build_episodes("synthetic", tmp_path / "corpus", k=2, content_disjoint=True, cache_dir=tmp_path / "ep")
    assert not (tmp_path / "corpus").exists()  # raised before the corpus was generated


@pytest.mark.skipif(ravdess_root() is None, reason="real RAVDESS not found (set ICL_SER_RAVDESS)")
def test_real_ravdess_content_disjoint_episodes() -> None:
    table = read_corpus("ravdess", ravdess_root())
    pools = build_pools(table)
    assert {len(set(pool.texts)) for pool in pools.values()} == {2}  # two statements per actor
    text_of = dict(zip(table["id"], table["text"]))
    episodes = list(fixed_episodes(pools, 8, "arbitrary", content_disjoint=True))
    assert {e["speaker"] for e in episodes} == set(pools) and len(episodes) == table.num_rows
    assert all(text_of[i] != text_of[e["query_id"]] for e in episodes for i in e["enrollment_ids"])
