"""bench/held_out_validation.py: each fold is scored with weights chosen on the other folds only."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from training.held_out_folds import FOLD_SCORES, save_fold_scores

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["angry", "happy", "neutral", "sad"]


def _bench():
    spec = importlib.util.spec_from_file_location("held_out_validation", ROOT / "bench" / "held_out_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_hot(indices) -> np.ndarray:
    out = np.full((len(indices), len(LABELS)), 0.01)
    out[np.arange(len(indices)), indices] = 0.97
    return out


def _fold(run: Path, corpus: str, right_route: str) -> None:
    """A fold whose `right_route` is always right and whose other routes are always wrong."""
    truth = np.arange(16) % len(LABELS)
    wrong = (truth + 1) % len(LABELS)
    routes, truths = {}, {}
    for k in (0, 4):
        routes[k] = {name: _one_hot(truth if name == right_route else wrong) for name in ("lm", "si", "prototype")}
        if k == 0:
            routes[k]["prototype"] = None
        truths[k] = [LABELS[i] for i in truth]
    save_fold_scores(_path(run, corpus), routes, truths, LABELS)


def _path(run: Path, corpus: str) -> Path:
    path = run / "folds" / corpus / FOLD_SCORES
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_fold_is_scored_with_the_weights_of_the_other_folds(tmp_path):
    bench = _bench()
    _fold(tmp_path, "a", "si")
    _fold(tmp_path, "b", "si")
    _fold(tmp_path, "c", "lm")  # the other folds choose the SI route, which is wrong here
    table = bench.nested_scores(bench.load_folds(tmp_path), step=0.1)
    assert table["c"][4]["lm"] == pytest.approx(100.0)
    assert table["c"][4]["mixture"] == pytest.approx(0.0)
    assert table["c"][0]["mixture"] == pytest.approx(0.0)  # K = 0 too: SI, from the other folds
    assert table["c"][0]["prototype"] is None  # no enrollment, no prototype
    text = bench.markdown({"run": table})
    assert "| run | c | mixture | 0.0 | 0.0 | 0.0 |" in text
    assert "| run | c | lm | 100.0 | 100.0 | 100.0 |" in text
    assert "| run | **mean of corpora** | si | 66.7 | 66.7 | 66.7 |" in text


def test_a_run_without_folds_is_refused(tmp_path):
    with pytest.raises(ValueError, match="route_weights_from held_out_corpora"):
        _bench().main([str(tmp_path)])
