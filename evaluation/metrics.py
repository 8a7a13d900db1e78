"""Emotion-recognition metrics: UA, WA and macro-F1 as an ``evaluate`` metric, plus bootstrap CIs.

UA (unweighted accuracy) is the mean over emotions of each emotion's recall, the field's
headline number because emotion classes are unbalanced; WA (weighted accuracy) is plain
accuracy. Classes are those present in the references, so a test set without an emotion
is not penalised for it. The definitions are scikit-learn's (``balanced_accuracy_score``,
``accuracy_score``, ``f1_score(average="macro", labels=...)``).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def _scores(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """UA, WA and macro-F1 over the classes present in ``references`` (scikit-learn's definitions)."""
    present = np.unique(references)
    with warnings.catch_warnings():
        # A class predicted but never a reference has no recall; balanced accuracy drops it
        # (UA over the classes present) and warns, which is the definition wanted here. A
        # resample or speaker with one class only warns about the confusion matrix's shape.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        ua = balanced_accuracy_score(references, predictions)
    return {
        "ua": float(ua),
        "wa": float(accuracy_score(references, predictions)),
        "macro_f1": float(f1_score(references, predictions, labels=present, average="macro", zero_division=0)),
    }


def _resampled_scores(predictions: np.ndarray, references: np.ndarray, indices) -> list[dict[str, float]]:
    """:func:`_scores` of each bootstrap resample (``indices``: one index array per resample).

    The same numbers as :func:`_scores` (tests/test_metrics.py pins it), read off each
    resample's confusion counts: scikit-learn's per-call input checks would make a
    1000-resample interval about 15x slower, and eval.py draws one per method and K.
    """
    classes, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    true, predicted, n = codes[: len(references)], codes[len(references):], len(classes)
    results = []
    for index in indices:
        confusion = np.bincount(true[index] * n + predicted[index], minlength=n * n).reshape(n, n)
        hits, support, chosen = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
        present = support > 0
        results.append({
            "ua": float(np.mean(hits[present] / support[present])),
            "wa": float(hits.sum() / len(index)),
            "macro_f1": float(np.mean(2 * hits[present] / (support[present] + chosen[present]))),
        })
    return results


class EmotionRecognitionMetrics(evaluate.Metric):
    """``evaluate`` metric returning ``{"ua", "wa", "macro_f1"}`` for string labels.

    Example:
        >>> metric = EmotionRecognitionMetrics()
        >>> metric.compute(predictions=["anger", "fear"], references=["anger", "anger"])
        {'ua': 0.5, 'wa': 0.5, 'macro_f1': 0.666...}
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Unweighted accuracy (macro recall), weighted accuracy and macro-F1.",
            citation="",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise ValueError("No references to score: evaluate at least one episode.")
        return _scores(predictions, references)


def unweighted_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """UA of one set of predictions (macro recall over the emotions in ``references``)."""
    return EmotionRecognitionMetrics().compute(predictions=list(predictions), references=list(references))["ua"]


def _resample_indices(n: int, n_resamples: int, seed: int):
    """The bootstrap's index draws: ``n_resamples`` arrays of ``n`` indices into ``range(n)``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield rng.integers(0, n, n)


def _percentile_interval(values, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap values (percentile method)."""
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    predictions: Sequence[str],
    references: Sequence[str],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of UA, WA and macro-F1 over episodes."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    resampled = _resampled_scores(predictions, references, _resample_indices(len(references), n_resamples, seed))
    return {name: _percentile_interval([r[name] for r in resampled], confidence) for name in ("ua", "wa", "macro_f1")}


def paired_ua_resamples(
    predictions_a: Sequence[str],
    predictions_b: Sequence[str],
    references: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """UA(b) - UA(a) on the same queries, and its value on each paired bootstrap resample.

    Each resample draws one set of episode indices and scores both prediction lists on it, so
    the spread reflects the difference between the two settings on shared queries (e.g. the
    same queries with K = 8 and K = 0 enrollment), not the spread of either alone.
    """
    predictions_a, predictions_b, references = map(np.asarray, (predictions_a, predictions_b, references))
    if not len(predictions_a) == len(predictions_b) == len(references) or len(references) == 0:
        raise ValueError("Paired UA needs two non-empty prediction lists aligned with the same references.")
    indices = list(_resample_indices(len(references), n_resamples, seed))
    differences = np.array([
        b["ua"] - a["ua"]
        for a, b in zip(_resampled_scores(predictions_a, references, indices),
                        _resampled_scores(predictions_b, references, indices))
    ])
    difference = _scores(predictions_b, references)["ua"] - _scores(predictions_a, references)["ua"]
    return float(difference), differences


def paired_ua_difference(
    predictions_a: Sequence[str],
    predictions_b: Sequence[str],
    references: Sequence[str],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """UA(b) - UA(a) on the same queries, with a paired percentile bootstrap CI
    (:func:`paired_ua_resamples`)."""
    difference, differences = paired_ua_resamples(predictions_a, predictions_b, references, n_resamples, seed)
    return {"difference": difference, "ci": _percentile_interval(differences, confidence)}


def per_speaker_ua(
    predictions: Sequence[str], references: Sequence[str], speakers: Sequence[str]
) -> dict[str, float]:
    """UA of each speaker's episodes, for the fairness view (min and spread across speakers)."""
    predictions, references, speakers = map(np.asarray, (predictions, references, speakers))
    return {
        str(speaker): _scores(predictions[speakers == speaker], references[speakers == speaker])["ua"]
        for speaker in np.unique(speakers)
    }


def summarize(
    predictions: Sequence[str],
    references: Sequence[str],
    speakers: Optional[Sequence[str]] = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """All numbers eval.py and train.py report for one method/setting, in one dict."""
    scores = EmotionRecognitionMetrics().compute(predictions=list(predictions), references=list(references))
    for name, interval in bootstrap_ci(predictions, references, n_resamples, seed=seed).items():
        scores[f"{name}_ci"] = interval
    scores["n_episodes"] = len(references)
    if speakers is not None:
        by_speaker = per_speaker_ua(predictions, references, speakers)
        values = np.asarray(list(by_speaker.values()))
        scores["per_speaker_ua"] = by_speaker
        scores["speaker_ua_min"] = float(values.min())
        scores["speaker_ua_std"] = float(values.std())
    return scores
