"""Choosing how ``classify`` mixes its routes (``IclSerConfig.route_weights``) on validation speakers.

The model can score a query three ways: the LM's answer likelihoods, the speaker-independent
(SI) route and the parameter-free prototype route (``modeling_icl_ser.IclSerSpeakerRoutes``,
``prototype_probabilities``). How far to trust each differs by corpus and by how well the LM
path trained, so the weights are not learned by gradient: train.py scores its validation
episodes once per route (``predict_episodes(..., return_routes=True)``) and picks, on a grid
over the simplex, the weights with the best mean UA over the validation K's.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from modeling_icl_ser.route_mixing import mix_routes

from .metrics import unweighted_accuracy

ROUTE_NAMES = ("lm", "si", "prototype")


def weight_grid(routes: Sequence[str], step: float = 0.1) -> list[dict[str, float]]:
    """Every weighting of ``routes`` on the simplex with the given step, the LM-heaviest first (so
    a tie keeps the more LM-like mixture)."""
    if not routes:
        raise ValueError("weight_grid needs at least one route.")
    if not 0 < step <= 1 or abs(round(1 / step) - 1 / step) > 1e-9:
        raise ValueError(f"step must divide 1 (0.1, 0.05, 0.25, ...), got {step}.")
    n = int(round(1 / step))
    grid = []
    for counts in itertools.product(range(n + 1), repeat=len(routes)):
        if sum(counts) == n:
            grid.append({name: round(c * step, 6) for name, c in zip(routes, counts)})
    return sorted(grid, key=lambda w: tuple(-w[name] for name in routes))


def mixed_predictions(routes: Mapping[str, Optional[np.ndarray]], weights: Mapping[str, float],
                      weights_without_enrollment: Optional[Mapping[str, float]] = None) -> np.ndarray:
    """Argmax of the mixture (as ``classify`` mixes) of per-route ``(n, n_labels)`` probabilities."""
    tensors = {name: (None if value is None else torch.as_tensor(value)) for name, value in routes.items()}
    without = None if weights_without_enrollment is None else dict(weights_without_enrollment)
    return mix_routes(tensors, dict(weights), without).argmax(-1).numpy()


def _best_weights(routes_by_k, truths_by_k, labels, step) -> tuple[dict[str, float], dict[int, float]]:
    available = [name for name in ROUTE_NAMES
                 if any(routes.get(name) is not None for routes in routes_by_k.values())]
    best, best_scores, best_mean = None, None, -1.0
    for weights in weight_grid(available, step):
        scores = {}
        for k, routes in routes_by_k.items():
            predicted = mixed_predictions(routes, weights)
            scores[k] = unweighted_accuracy([labels[i] for i in predicted], list(truths_by_k[k]))
        mean = float(np.mean(list(scores.values())))
        if mean > best_mean + 1e-12:
            best, best_scores, best_mean = weights, scores, mean
    return best, best_scores


def choose_route_weights(
    routes_by_k: Mapping[int, Mapping[str, Optional[np.ndarray]]],
    truths_by_k: Mapping[int, Sequence[str]],
    labels: Sequence[str],
    step: float = 0.1,
) -> tuple[Optional[dict[str, float]], Optional[dict[str, float]], dict[int, float]]:
    """The route weights with the best validation UA: ``(weights for samples with enrollment,
    weights without enrollment, UA at each K)``.

    The first are chosen on the K >= 1 episodes (best mean UA over those K's), the second on the
    K = 0 episodes among the LM and SI routes (the prototype route needs enrollment); either is
    None when the validation has no such K.

    Args:
        routes_by_k: per K, ``{"lm", "si", "prototype"}`` → ``(n_episodes, len(labels))``
            probabilities (None for a route the model lacks; NaN rows where it cannot score).
        truths_by_k: per K, the episodes' true labels.
        labels: the columns' labels.

    Raises:
        ValueError: no K, or a K without its truths.
    """
    if not routes_by_k or set(routes_by_k) != set(truths_by_k):
        raise ValueError(f"routes_by_k and truths_by_k must cover the same K's, got {sorted(routes_by_k)} "
                         f"and {sorted(truths_by_k)}.")
    enrolled = {k: routes for k, routes in routes_by_k.items() if k > 0}
    weights, scores = (None, {})
    if enrolled:
        weights, scores = _best_weights(enrolled, {k: truths_by_k[k] for k in enrolled}, labels, step)
    without = None
    if 0 in routes_by_k:
        alone = {0: {name: value for name, value in routes_by_k[0].items() if name != "prototype"}}
        without, zero = _best_weights(alone, {0: truths_by_k[0]}, labels, step)
        scores = {0: zero[0], **scores}
    return weights, without, scores


def mixture_ua(routes: Mapping[str, Optional[np.ndarray]], truths: Sequence[str], labels: Sequence[str],
               weights: Mapping[str, float]) -> float:
    """UA of the routes mixed by ``weights`` (``{name: 1.0}``: one route alone) against ``truths``."""
    return unweighted_accuracy([labels[i] for i in mixed_predictions(routes, weights)], list(truths))


def choose_route_weights_per_k(
    folds: Sequence[tuple[Mapping[int, Mapping[str, Optional[np.ndarray]]], Mapping[int, Sequence[str]], Sequence[str]]],
    step: float = 0.1,
) -> tuple[dict[int, dict[str, float]], dict[int, float], dict[int, list[float]]]:
    """Route weights for each K, chosen where the routes are used: out of domain.

    Each fold is the route probabilities of a model on a corpus it never trained on (leave one
    training corpus out), ``(routes_by_k, truths_by_k, labels)`` as for
    :func:`choose_route_weights`. For each K that every fold has, the weights on the simplex grid
    with the best UA averaged over the folds (each held-out corpus counts once, however many
    speakers it has) are chosen; K = 0 mixes the LM and SI routes only.

    Returns:
        ``({k: weights}, {k: mean UA over the folds}, {k: UA of each fold})``.

    Raises:
        ValueError: no fold, or folds without a common K.
    """
    if not folds:
        raise ValueError("choose_route_weights_per_k needs at least one held-out fold.")
    ks = sorted(set.intersection(*(set(routes) for routes, _, _ in folds)))
    if not ks:
        raise ValueError("The held-out folds share no K; score every fold at the same --eval_k.")
    chosen, means, per_fold = {}, {}, {}
    for k in ks:
        available = [name for name in ROUTE_NAMES if (k > 0 or name != "prototype")
                     and all(routes[k].get(name) is not None for routes, _, _ in folds)]
        best, best_scores = None, None
        for weights in weight_grid(available, step):
            scores = [mixture_ua(routes[k], truths[k], labels, weights) for routes, truths, labels in folds]
            if best_scores is None or np.mean(scores) > np.mean(best_scores) + 1e-12:
                best, best_scores = weights, scores
        chosen[k], means[k], per_fold[k] = best, float(np.mean(best_scores)), [float(s) for s in best_scores]
    return chosen, means, per_fold
