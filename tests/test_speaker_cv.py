"""bench/speaker_cv.py (issue 24, G3): every speaker is a test speaker exactly once; the summary
averages the folds and compares ICL with the best conventional method."""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speaker_cv():
    spec = importlib.util.spec_from_file_location("speaker_cv", REPO / "bench" / "speaker_cv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_folds_cover_every_speaker_once(speaker_cv):
    speakers = [f"Actor_{i:02d}" for i in range(24, 0, -1)]
    folds = speaker_cv.fold_speakers(speakers, 3)
    assert [len(f) for f in folds] == [8, 8, 8]
    assert sorted(s for f in folds for s in f) == sorted(speakers)
    assert folds[0][:2] == ["Actor_01", "Actor_04"]  # sorted, then every third
    with pytest.raises(ValueError, match="2 speakers per fold"):
        speaker_cv.fold_speakers(speakers[:5], 3)
    validation = speaker_cv.validation_speakers(speakers, folds[0], 4)
    assert len(validation) == 4 and not set(validation) & set(folds[0])
    with pytest.raises(ValueError, match="--validation_per_fold"):
        speaker_cv.validation_speakers(speakers, folds[0], 16)


def test_summary_averages_folds_and_compares_with_the_best_conventional(speaker_cv):
    folds = [{("icl", 0): 0.2, ("icl", 8): 0.6, ("si", 0): 0.3, ("si", 8): 0.3, ("enroll_prototypes", 0): 0.1,
              ("enroll_prototypes", 8): 0.5},
             {("icl", 0): 0.4, ("icl", 8): 0.4, ("si", 0): 0.5, ("si", 8): 0.5, ("enroll_prototypes", 0): 0.1,
              ("enroll_prototypes", 8): 0.7}]
    text = speaker_cv.summary(folds, Namespace(k=[0, 8], corpus="ravdess", folds=2))
    assert "| icl | 30.0 | 50.0 |" in text and "| si | 40.0 | 40.0 |" in text
    assert "fold 0: ICL K=8 60.0, best conventional 50.0 (enroll_prototypes), ICL − best +10.0" in text
    assert "fold 1: ICL K=8 40.0, best conventional 70.0 (enroll_prototypes), ICL − best -30.0" in text
