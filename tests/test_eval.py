"""eval.py: bad inputs fail before work; a full tiny run (all 7 methods) writes every output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_multi_corpus import acted, corpora  # noqa: F401  (fixtures: ASED-/RAVDESS-layout folders, manifests)

REPO = Path(__file__).resolve().parents[1]
# Same small corpus as tests/test_train.py (6 speakers: 4 train, 1 validation, 1 test).
OPTIONS = json.dumps({"n_speakers": 6, "utterances_per_emotion": 4})
CORPUS = ["--corpus", "synthetic", "--corpus_options", OPTIONS]
FAST = [*CORPUS, "--n_bootstrap", "50", "--baseline_train_steps", "50"]


def run_eval(args):
    sys.path.insert(0, str(REPO))
    import eval as eval_script

    return eval_script.main(args)


def train_tiny(output_dir: Path, *extra) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "train.py"), *CORPUS, "--tiny", "--virtual_speakers", "0", "--batch_size", "2",
               "--max_steps", "2",
               "--eval_k", "0", "--eval_episodes_per_speaker", "2", "--log_with", "none",
               "--output_dir", str(output_dir), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return output_dir / "final"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"icl": train_tiny(root / "icl"), "no_icl": train_tiny(root / "no_icl", "--k_min", "0", "--k_max", "0")}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "knn"], "Unknown method"),
        (["--methods", "icl"], "needs --model"),
        (["--methods", "slm_no_icl"], "needs --baseline_model"),
        (["--mode", "random"], "Unknown enrollment mode"),
        (["--k", "-1"], "--k"),
        (["--model", "/nonexistent/model"], "not a folder"),
        (["--labels", "anger", "happiness"], "not in the label set"),
        (["--validation_speakers", "spk00"], "test split has no speaker"),
        (["--eval_split", "train"], "--eval_split must be test or validation"),
        (["--offline_encoder", "large"], "Unknown offline encoder 'large'; choose one of tiny.en, base"),
        (["--offline_encoder", "base"], "drop it with --model, --audio_encoder or --tiny"),
        (["--eval_split", "validation", "--model", str(REPO), "--update_model_card"], "drop it with --eval_split"),
        (["--content_disjoint"], "'synthetic' has no fixed sentences"),
    ],
)
def test_bad_inputs_fail_before_any_work(args, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_eval([*FAST, "--tiny", *args, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_model_folder_must_be_icl_ser(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not an icl_ser model"):
        run_eval([*FAST, "--model", str(tmp_path / "bert"), "--output_dir", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        run_eval([*FAST, "--baseline_model", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])


def test_full_tiny_run_writes_all_outputs(models, tmp_path):
    out = tmp_path / "eval"
    before = (models["icl"] / "README.md").read_text()
    # Cross-label: "boredom" is never seen in meta-training; it is only an extra candidate here.
    labels = ["anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"]
    report = run_eval([*FAST, "--model", str(models["icl"]), "--baseline_model", str(models["no_icl"]),
                       "--methods", "all", "--k", "0", "2", "--mode", "arbitrary", "balanced",
                       "--labels", *labels, "--episodes_per_speaker", "6",
                       "--update_model_card", "--output_dir", str(out)])
    # The meta-trained model has a read-out, so its routes are scored too and reported beside it.
    methods = ["si", "si_norm", "si_finetune", "prototypes", "speaker_embedding", "enroll_prototypes", "slm_no_icl", "icl",
               "icl_lm", "icl_prototype"]
    assert report["methods"] == methods

    saved = json.loads((out / "results.json").read_text())
    assert {"settings", "versions", "labels", "splits", "results", "baselines", "plots"} <= set(saved)
    assert saved["labels"] == labels and "torch" in saved["versions"] and saved["settings"]["k"] == [0, 2]
    assert not set(saved["splits"]["test"]) & set(saved["splits"]["train"])
    assert len(saved["results"]) == len(methods) * 2 * 2
    for row in saved["results"]:
        assert {"method", "mode", "k", "ua", "wa", "macro_f1", "ua_ci", "wa_ci", "macro_f1_ci", "n_episodes",
                "per_speaker_ua", "speaker_ua_min", "speaker_ua_std"} <= set(row)
        assert 0 <= row["ua_ci"][0] <= row["ua"] <= row["ua_ci"][1] <= 1
        assert row["n_episodes"] == 6 and set(row["per_speaker_ua"]) == set(saved["splits"]["test"])
    assert set(saved["baselines"]) == set(methods[:6])

    for row in saved["results"]:  # K=2 rows carry the paired gain over K=0 on the same queries
        if row["k"] == 2:
            low, high = row["ua_gain_ci"]
            assert row["ua_gain_base_k"] == 0 and low <= row["ua_gain"] <= high
            zero = next(r for r in saved["results"] if (r["method"], r["mode"], r["k"]) == (row["method"], row["mode"], 0))
            assert row["ua_gain"] == pytest.approx(row["ua"] - zero["ua"])
        else:
            assert "ua_gain" not in row
    table = (out / "results.md").read_text()
    assert "| method | K=0 | K=2 |" in table and "ICL (meta-trained, proposed)" in table and "±" in table
    assert "Paired UA gain over K=0" in table
    for name in ("ua_vs_k_arbitrary.png", "ua_vs_k_balanced.png", "per_speaker_ua_arbitrary.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(methods) * 2 * 2 * 6 and json.loads(lines[0])["prediction"] in labels

    card = (out / "README.md").read_text()
    assert "ICL (meta-trained, proposed)" in card and "library_name: transformers" in card
    updated = (models["icl"] / "README.md").read_text()
    assert updated == card and updated != before
    assert "Meta-trained with `train.py`" in updated  # the training summary is kept


def test_baselines_read_the_chosen_encoder_block(tmp_path):
    report = run_eval([*FAST, "--tiny", "--methods", "si", "--k", "0", "--audio_feature_layer", "1",
                       "--output_dir", str(tmp_path)])
    assert report["baseline_features"].startswith("tiny")
    with pytest.raises(ValueError, match="audio_feature_layer"):
        run_eval([*FAST, "--tiny", "--methods", "si", "--audio_feature_layer", "-1", "--output_dir", str(tmp_path / "x")])


def test_baselines_only_with_tiny_encoder(tmp_path):
    report = run_eval([*FAST, "--tiny", "--methods", "si", "prototypes", "--k", "0", "1",
                       "--output_dir", str(tmp_path)])
    assert report["methods"] == ["si", "prototypes"] and report["baseline_features"].startswith("tiny")
    assert {r["k"] for r in report["results"]} == {0, 1}
    assert (tmp_path / "results.md").is_file() and (tmp_path / "README.md").is_file()


def test_validation_split_evaluates_the_validation_speakers(tmp_path):
    report = run_eval([*FAST, "--tiny", "--methods", "si", "--k", "0", "2", "--eval_split", "validation",
                       "--output_dir", str(tmp_path)])
    assert report["eval_split"] == "validation"
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert {p["speaker"] for p in predictions} == set(report["splits"]["validation"])
    assert "validation speakers" in (tmp_path / "results.md").read_text()


# ----------------------------------------------------------------------------- cross-corpus
CROSS = ["--n_bootstrap", "20", "--baseline_train_steps", "20", "--tiny", "--k", "0", "2", "--episodes_per_speaker", "2"]


def test_cross_corpus_eval_tests_every_speaker_with_baselines_fitted_elsewhere(corpora, tmp_path):
    report = run_eval([*CROSS, "--corpus", "ased", "--data_dir", str(corpora["ased"]), "--test_speakers", "all",
                       "--methods", "baselines", "--baseline_corpus", "manifest", "--baseline_data_dir", str(corpora["manifest"]),
                       "--output_dir", str(tmp_path / "out")])
    assert report["splits"]["test"] == ["01", "02", "03", "04"] and report["splits"]["train"] == []
    assert report["labels"] == ["anger", "fear", "happiness", "neutral", "sadness"]
    assert report["baseline_labels"] == ["calm", "happiness", "pride"]
    assert {r["method"] for r in report["results"]} == {"si", "si_norm", "si_finetune", "prototypes", "speaker_embedding",
                                                        "enroll_prototypes"}
    # Only "happiness" is shared, so every trained baseline answers it, and UA is 1 / (emotions queried).
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    trained = [p for p in predictions if p["method"] != "enroll_prototypes"]
    assert {p["prediction"] for p in trained} == {"happiness"}
    queried = {p["emotion"] for p in predictions}
    assert all(r["ua"] == pytest.approx(1 / len(queried)) for r in report["results"] if r["method"] != "enroll_prototypes")
    # enroll_prototypes trains nothing: it answers over the test corpus' own labels, with the
    # classes its enrollment names (at K = 2 always one of them).
    own = [p for p in predictions if p["method"] == "enroll_prototypes"]
    assert own and {p["prediction"] for p in own} <= set(report["labels"])
    assert len({p["prediction"] for p in own if p["k"] == 2} - {"happiness"}) > 0


def test_restrict_to_labels():
    sys.path.insert(0, str(REPO))
    from eval import restrict_to_labels

    probabilities = np.array([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])
    out = restrict_to_labels(probabilities, ["anger", "calm", "surprise"], ["anger", "calm", "fear"])
    np.testing.assert_allclose(out, [[0.625, 0.375, 0.0], [0.5, 0.5, 0.0]])  # renormalized; no mass left: uniform
    assert restrict_to_labels(probabilities, ["a", "b", "c"], ["a", "b", "c"]) is probabilities
    with pytest.raises(ValueError, match="none of the test labels"):
        restrict_to_labels(probabilities, ["a", "b", "c"], ["x"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--test_speakers", "all", "--methods", "baselines"], "pass --baseline_corpus"),
        (["--test_speakers", "all", "01"], "stands alone"),
        (["--test_speakers", "all", "--validation_speakers", "01", "--methods", "si", "--baseline_corpus", "emodb"],
         "drop --validation_speakers"),
        (["--baseline_data_dir", "x"], "needs --baseline_corpus"),
        (["--baseline_corpus", "ased"], "repeats the test corpus"),
        (["--baseline_corpus", "emodb,esd", "--baseline_data_dir", "x"], "gives 1 folder"),
        (["--corpus", "ased,emodb"], "gives 1 folder"),
        (["--corpus", "ased,manifest", "--data_dir", "a,b", "--labels", "anger", "fear"], "drop --labels"),
    ],
)
def test_bad_cross_corpus_flags_fail_before_work(args, message, tmp_path):
    base = ["--corpus", "ased", "--data_dir", "/nonexistent/ased"]
    with pytest.raises(ValueError, match=message):
        run_eval([*CROSS, *base, *args, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_two_corpora_in_domain_scores_each_episode_over_its_own_labels(corpora, tmp_path):
    report = run_eval([*CROSS, "--corpus", "ased,manifest", "--data_dir", f"{corpora['ased']},{corpora['manifest']}",
                       "--methods", "si", "--output_dir", str(tmp_path / "out")])
    assert {s.split("/")[0] for s in report["splits"]["test"]} == {"ased", "manifest"}
    own = {"ased": {"anger", "fear", "happiness", "neutral", "sadness"}, "manifest": {"calm", "happiness", "pride"}}
    for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines():
        prediction = json.loads(line)
        assert prediction["prediction"] in own[prediction["speaker"].split("/")[0]]


def test_content_disjoint_test_episodes(acted, tmp_path):
    sys.path.insert(0, str(REPO))
    from eval import parse_arguments, prepare_data

    # 8 utterances per actor: 4 of the other statement, 3 of them outside the query's emotion.
    flags = ["--corpus", "ravdess", "--data_dir", str(acted["ravdess"]), "--k", "0", "3",
             "--mode", "arbitrary", "exclude_query_class", "--content_disjoint", "--tiny"]
    data = prepare_data(parse_arguments(flags))
    text_of = dict(zip(data["table"]["id"], data["table"]["text"]))
    assert {key: len(episodes) for key, episodes in data["episodes"].items()} == {
        (mode, k): 8 for mode in ("arbitrary", "exclude_query_class") for k in (0, 3)}  # one test actor
    for episodes in data["episodes"].values():
        for episode in episodes:
            assert all(text_of[i] != text_of[episode["query_id"]] for i in episode["enrollment_ids"])
    report = run_eval([*flags, "--methods", "prototypes", "--n_bootstrap", "20", "--baseline_train_steps", "20",
                       "--output_dir", str(tmp_path)])
    assert report["settings"]["content_disjoint"] is True
    assert "`arbitrary` content-disjoint enrollment" in (tmp_path / "results.md").read_text()


def test_model_card_keeps_one_block_per_evaluated_setting():
    import eval as eval_script

    def report(corpus, test_speakers, disjoint):
        return {"corpus": corpus, "settings": {"test_speakers": test_speakers, "content_disjoint": disjoint}}

    keys = {eval_script.evaluation_key(report("ased", ["all"], True)),
            eval_script.evaluation_key(report("ased", None, True)),
            eval_script.evaluation_key(report("ased", None, False)),
            eval_script.evaluation_key(report("ravdess", None, False))}
    assert len(keys) == 4 and "content-disjoint" in eval_script.evaluation_key(report("ased", ["all"], True))
    card = ("intro\n<!-- eval: a -->\n### a\n| t |\n<!-- /eval -->\n\n"
            "<!-- eval: b -->\n### b\n| u |\n<!-- /eval -->\nUA = ...")
    blocks = eval_script._card_blocks(card)
    assert [b.splitlines()[0] for b in blocks] == ["<!-- eval: a -->", "<!-- eval: b -->"]
    assert blocks[1].endswith("<!-- /eval -->") and "| t |" not in blocks[1]


def test_unlabelled_speech_reaches_si_norm_and_route_weights_file(models, tmp_path):
    common = [*FAST, "--methods", "si_norm", "icl", "--model", str(models["icl"]), "--k", "0", "1",
              "--episodes_per_speaker", "4"]
    weights = tmp_path / "nested.json"
    weights.write_text(json.dumps({"weights": {"0": {"lm": 1.0}, "1": {"lm": 0.5, "prototype": 0.5}}}))
    plain = run_eval([*common, "--output_dir", str(tmp_path / "u0")])
    with_u = run_eval([*common, "--unlabelled", "3", "--route_weights", str(weights), "--output_dir", str(tmp_path / "u3")])
    assert with_u["settings"]["unlabelled"] == 3 and with_u["route_weights_by_k"]["1"] == {"lm": 0.5, "prototype": 0.5}
    lines = [json.loads(line) for line in (tmp_path / "u3" / "predictions.jsonl").read_text().splitlines()]
    before = [json.loads(line) for line in (tmp_path / "u0" / "predictions.jsonl").read_text().splitlines()]
    # At K = 0 si_norm is the SI head without unlabelled speech, the normalized head with it.
    k0 = [(a["probabilities"], b["probabilities"]) for a, b in zip(before, lines) if a["method"] == "si_norm" and a["k"] == 0]
    assert k0 and any(a != b for a, b in k0)
    assert "3 unlabelled utterances" in (tmp_path / "u3" / "results.md").read_text()
    assert plain["route_weights_by_k"] is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weights": {"0": {"knn": 1.0}}}))
    with pytest.raises(ValueError, match="--route_weights"):
        run_eval([*common, "--route_weights", str(bad), "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--unlabelled must be >= 0"):
        run_eval([*common, "--unlabelled", "-1", "--output_dir", str(tmp_path / "bad")])
