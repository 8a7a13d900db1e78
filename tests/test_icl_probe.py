"""bench/icl_probe.py: bad flags fail before work; a few steps on the tiny model give a full learning curve."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Same small corpus as tests/test_eval.py (6 speakers: 4 train, 1 validation, 1 test).
CORPUS = ["--corpus", "synthetic", "--corpus_options", json.dumps({"n_speakers": 6, "utterances_per_emotion": 4})]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("icl_probe", REPO / "bench" / "icl_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--permuted_label_share", "1.5"], "--permuted_label_share"),
        (["--audio_feature_layer", "0"], "--audio_feature_layer"),
        (["--k", "-1"], "--k"),
        (["--steps", "0"], "--steps"),
        (["--d_model", "30", "--heads", "4"], "divisible"),
        (["--corpus", "ravdess"], "needs --data_dir"),
        (["--corpus", "nosuchcorpus"], "nosuchcorpus"),
    ],
)
def test_bad_flags_fail_before_any_work(probe, args, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        probe.main([*CORPUS, "--tiny", *args, "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_episode_layout_hides_each_label_from_its_own_prediction(probe):
    blocked, predict_at = probe.episode_layout(3, enrollment_loss=True)
    assert blocked.shape == (7, 7) and predict_at == [3, 4, 5, 6]
    # Unlabelled copy of enrollment i sees labelled tokens < i and itself, nothing else.
    assert np.flatnonzero(~blocked[5]).tolist() == [0, 1, 5]
    # Labelled tokens are causal; the query sees every labelled token and itself.
    assert np.flatnonzero(~blocked[1]).tolist() == [0, 1]
    assert np.flatnonzero(~blocked[6]).tolist() == [0, 1, 2, 6]
    blocked, predict_at = probe.episode_layout(3, enrollment_loss=False)  # query only
    assert blocked.shape == (4, 4) and predict_at == [3] and not blocked[3].any()
    blocked, predict_at = probe.episode_layout(0, enrollment_loss=True)
    assert blocked.shape == (1, 1) and not blocked[0, 0] and predict_at == [0]


def test_tiny_run_reports_a_learning_curve(probe, tmp_path):
    out = tmp_path / "probe.json"
    report = probe.main([*CORPUS, "--tiny", "--steps", "4", "--eval_every", "2", "--batch_size", "4",
                         "--permuted_label_share", "0.5", "--k", "0", "1", "2", "--k_max", "2",
                         "--d_model", "16", "--heads", "2", "--output", str(out)])
    assert set(report) == {"settings", "features", "labels", "n_validation_episodes", "curve", "final", "ua_ci",
                           "gain_base_k", "gain", "prototypes", "seconds"}
    assert [point["step"] for point in report["curve"]] == [2, 4]
    for point in report["curve"]:
        assert set(point["ua"]) == {0, 1, 2} and all(0.0 <= ua <= 1.0 for ua in point["ua"].values())
        assert np.isfinite(point["train_loss"])
    assert report["final"] == report["curve"][-1]["ua"]
    assert report["gain_base_k"] == 0 and set(report["gain"]) == {1, 2} and set(report["ua_ci"]) == {0, 1, 2}
    assert report["prototypes"][0] is None and 0.0 <= report["prototypes"][2] <= 1.0
    assert all(n > 0 for n in report["n_validation_episodes"].values())
    assert json.loads(out.read_text())["final"] == {str(k): v for k, v in report["final"].items()}
