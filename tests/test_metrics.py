"""Metric code against hand-computed values."""

import pytest

from evaluation.metrics import EmotionRecognitionMetrics, bootstrap_ci, per_speaker_ua, summarize, unweighted_accuracy


def test_ua_wa_f1_hand_computed():
    # anger: recall 1/2, precision 1/1 -> F1 2/3; fear: recall 1/1, precision 1/2 -> F1 2/3.
    scores = EmotionRecognitionMetrics().compute(
        predictions=["anger", "fear", "fear"], references=["anger", "anger", "fear"]
    )
    assert scores["ua"] == pytest.approx(0.75)
    assert scores["wa"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx(2 / 3)


def test_ua_ignores_classes_absent_from_references():
    # "sadness" is predicted but never a reference: UA averages over anger and fear only.
    scores = EmotionRecognitionMetrics().compute(
        predictions=["sadness", "fear", "anger", "anger"], references=["anger", "fear", "anger", "anger"]
    )
    assert scores["ua"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["wa"] == pytest.approx(0.75)


def test_bootstrap_ci_brackets_the_estimate_and_is_degenerate_when_perfect():
    predictions = ["a", "b", "a", "b", "a", "a", "b", "b"] * 5
    references = ["a", "b", "b", "b", "a", "a", "a", "b"] * 5
    intervals = bootstrap_ci(predictions, references, n_resamples=300, seed=1)
    point = EmotionRecognitionMetrics().compute(predictions=predictions, references=references)
    for name, (low, high) in intervals.items():
        assert low <= point[name] <= high
        assert high - low > 0.01
    assert bootstrap_ci(references, references, n_resamples=50)["ua"] == (1.0, 1.0)


def test_per_speaker_and_summary():
    by_speaker = per_speaker_ua(["a", "b", "a", "a"], ["a", "b", "b", "b"], ["s1", "s1", "s2", "s2"])
    assert by_speaker == {"s1": 1.0, "s2": 0.0}
    summary = summarize(["a", "b", "a", "a"], ["a", "b", "b", "b"], ["s1", "s1", "s2", "s2"], n_resamples=50)
    assert summary["speaker_ua_min"] == 0.0
    assert summary["speaker_ua_std"] == pytest.approx(0.5)
    assert summary["n_episodes"] == 4


def test_empty_references_raise():
    with pytest.raises(ValueError, match="at least one episode"):
        EmotionRecognitionMetrics().compute(predictions=[], references=[])


def test_paired_ua_difference_equals_the_ua_difference_and_its_ci_brackets_it():
    import numpy as np

    from evaluation.metrics import paired_ua_difference

    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"])
    references = labels[rng.integers(0, 3, 300)]
    worse = np.where(rng.random(300) < 0.5, references, labels[rng.integers(0, 3, 300)])
    better = np.where(rng.random(300) < 0.2, labels[rng.integers(0, 3, 300)], worse)  # mostly the same answers
    better = np.where(rng.random(300) < 0.3, references, better)
    result = paired_ua_difference(worse, better, references, n_resamples=300)
    assert result["difference"] == pytest.approx(unweighted_accuracy(better, references) - unweighted_accuracy(worse, references))
    low, high = result["ci"]
    assert low <= result["difference"] <= high and low > 0
    same = paired_ua_difference(worse, worse, references, n_resamples=50)
    assert same == {"difference": 0.0, "ci": (0.0, 0.0)}
    with pytest.raises(ValueError, match="aligned"):
        paired_ua_difference(worse[:5], better, references)


def test_bootstrap_resamples_score_exactly_as_the_metric():
    """The confusion-count path of the bootstrap gives the scikit-learn metric's numbers,
    including classes predicted but never referenced and single-class resamples."""
    import numpy as np

    from evaluation.metrics import _resampled_scores, _scores

    rng = np.random.default_rng(0)
    labels = np.array(["anger", "fear", "happiness", "sadness"])
    for trial in range(40):
        n = int(rng.integers(1, 30))
        references = labels[rng.integers(0, 1 + trial % 3, n)]
        predictions = labels[rng.integers(0, 4, n)]
        indices = [rng.integers(0, n, n) for _ in range(5)]
        for index, scores in zip(indices, _resampled_scores(predictions, references, indices)):
            expected = _scores(predictions[index], references[index])
            assert scores == pytest.approx(expected, abs=1e-12)
