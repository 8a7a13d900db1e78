"""bench/readout_trust.py: a tiny export's read-out is scored on validation and training episodes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--corpus", "synthetic", "--corpus_options", json.dumps({"n_speakers": 6, "utterances_per_emotion": 4}),
         "--tiny", "--virtual_speakers", "0", "--batch_size", "2", "--eval_episodes_per_speaker", "4", "--log_with", "none"]


@pytest.fixture(scope="module")
def trust():
    spec = importlib.util.spec_from_file_location("readout_trust", REPO / "bench" / "readout_trust.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export(tmp_path, *flags):
    sys.path.insert(0, str(REPO))
    import train

    train.main([*SMALL, "--max_steps", "2", "--eval_every", "0", "--checkpoint_every", "0", *flags,
                "--output_dir", str(tmp_path)])
    return str(tmp_path / "final")


def test_scores_each_k_on_both_splits(trust, tmp_path):
    results = trust.main(["--model", _export(tmp_path), *SMALL, "--eval_k", "0", "4"], training_episodes=10)
    assert set(results) == {4}  # K = 0 has nothing to read
    for split in ("validation", "training"):
        s = results[4][split]
        assert s["n"] > 0 and 0 <= s["n_eligible"] <= s["n"]
        assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["none_mass"] <= 1.0
    assert results[4]["training"]["n"] == 10


def test_bad_model_fails_before_work(trust, tmp_path):
    with pytest.raises(ValueError, match="Pass --model"):
        trust.main([*SMALL])
    with pytest.raises(ValueError, match="no model.safetensors"):
        trust.main(["--model", str(tmp_path), *SMALL])
    with pytest.raises(ValueError, match="no enrollment read-out"):
        trust.main(["--model", _export(tmp_path / "plain", "--context_readout_heads", "0"), *SMALL])
