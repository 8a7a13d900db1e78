"""Fitting the model's speaker-independent (SI) route as the SI baseline is fitted.

The SI route (``IclSerSpeakerRoutes``) maps an utterance's summary vector (mean and std of its
frozen-encoder frames) into the LM's embedding width and scores it against the candidates'
label-word embeddings. Both inputs are fixed once the encoder is frozen (the word embeddings
are never trained), so the route needs no LM pass: it is fitted here on every training
utterance's cached summary, with early stopping on the validation speakers, before the LM's
meta-training starts (which then leaves the route alone).

Two heads, as ``classify`` uses them:

* ``raw`` scores summaries as they are (no speaker statistics);
* ``normalized`` scores summaries standardized by the statistics of other utterances of the
  same speaker (``speaker_standardize``), drawn here as random subsets of the sizes the
  statistics have in use (K enrollment utterances plus U unlabelled ones), so the head sees
  statistics as noisy as the ones it will get.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from evaluation.episodic import utterance_summary
from modeling_icl_ser.speaker_routes import speaker_standardize

logger = logging.getLogger(__name__)


@dataclass
class SiRouteFitting:
    """How the SI route is fitted (train.py's ``--si_route_fit_*`` flags).

    Attributes:
        max_steps: Minibatch steps at most per head.
        batch_size: Utterances per minibatch.
        learning_rate, weight_decay: AdamW settings.
        eval_every: Validate every N steps; the best validation state is kept.
        patience: Stop after this many validations without a gain.
        statistics_sizes: Sizes of the random same-speaker subsets whose statistics normalize
            an utterance for the normalized head (K + U in use).
        validation_draws: Subsets per validation speaker and size when scoring the normalized head.
        seed: Seeds the minibatches and the subsets.
    """

    max_steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    eval_every: int = 100
    patience: int = 4
    statistics_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24)
    validation_draws: int = 2
    seed: int = 0
    report: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("SI route fitting needs max_steps, batch_size, eval_every and patience >= 1, got "
                             f"{self.max_steps}, {self.batch_size}, {self.eval_every}, {self.patience}.")
        if not self.statistics_sizes or min(self.statistics_sizes) < 1:
            raise ValueError(f"statistics_sizes must be sizes >= 1, got {self.statistics_sizes}.")


@dataclass
class Utterances:
    """Cached summaries of a split's utterances: ``summaries (N, F)``, label index ``targets (N,)``
    into the vocabulary, a ``(N, C)`` mask of each utterance's candidate labels, and speakers."""

    summaries: torch.Tensor
    targets: torch.Tensor
    candidates: torch.Tensor
    speakers: np.ndarray

    def by_speaker(self) -> dict[str, np.ndarray]:
        return {s: np.flatnonzero(self.speakers == s) for s in sorted(set(self.speakers.tolist()))}


def summarize_utterances(encoded, rows: Sequence[Mapping], labels: Sequence[str],
                         candidate_sets: Optional[Mapping[str, Sequence[str]]] = None) -> Utterances:
    """:class:`Utterances` from cached encoder frames (``encoded[id] -> (T, D)``) of ``rows`` (``id``,
    ``speaker``, ``emotion``; with ``candidate_sets``, a row's candidates are its corpus' labels,
    keyed by ``corpus_of(speaker)``, else every label)."""
    from dataset_builder.multi import corpus_of

    index = {label: i for i, label in enumerate(labels)}
    rows = [row for row in rows if row["emotion"] in index]
    if not rows:
        raise ValueError(f"No utterance has a label in {list(labels)}; the SI route has nothing to fit.")
    summaries = torch.stack([utterance_summary(encoded[row["id"]]) for row in rows])
    candidates = torch.zeros(len(rows), len(labels), dtype=torch.bool)
    for i, row in enumerate(rows):
        own = candidate_sets.get(corpus_of(row["speaker"])) if candidate_sets else None
        candidates[i, [index[label] for label in (own or labels) if label in index]] = True
    targets = torch.tensor([index[row["emotion"]] for row in rows])
    return Utterances(summaries, targets, candidates, np.array([row["speaker"] for row in rows], dtype=object))


def _normalized_draws(data: Utterances, sizes: Sequence[int], draws: int, floor: float,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each speaker's utterances standardized by the statistics of random subsets of its other
    utterances (``draws`` per size it can give): ``(summaries, targets, candidates)``."""
    xs, ys, cs = [], [], []
    for rows in data.by_speaker().values():
        for size in sizes:
            if len(rows) <= size:
                continue
            for _ in range(draws):
                chosen = rng.choice(rows, size=size, replace=False)
                others = np.setdiff1d(rows, chosen)
                xs.append(speaker_standardize(data.summaries[others], data.summaries[chosen], floor))
                ys.append(data.targets[others])
                cs.append(data.candidates[others])
    if not xs:
        raise ValueError(f"No speaker has more than {min(sizes)} utterances; the normalized SI head has nothing to fit.")
    return torch.cat(xs), torch.cat(ys), torch.cat(cs)


def _unweighted_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    predicted = logits.argmax(-1)
    recalls = [float((predicted[targets == c] == c).float().mean()) for c in targets.unique().tolist()]
    return float(np.mean(recalls))


class _HeadFitter:
    """Trains one head (LayerNorm -> Linear) against fixed unit label embeddings."""

    def __init__(self, head: nn.Module, label_embeds: torch.Tensor, settings: SiRouteFitting):
        self.head, self.settings = head, settings
        self.units = nn.functional.normalize(label_embeds.float(), dim=-1)

    def logits(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """`head(x) @ units.T` (as `IclSerSpeakerRoutes.logits`), computed as `LN(x) @ (Wᵀ unitsᵀ)`:
        the same values, but the batch never goes through the wide Linear (C << LM width)."""
        norm, linear = self.head[0], self.head[1]
        projected = linear.weight.float().T @ self.units.T  # (F, C)
        logits = norm(x.to(linear.weight.dtype)).float() @ projected + linear.bias.float() @ self.units.T
        return logits.masked_fill(~candidates, float("-inf"))

    def fit(self, batches, validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor], class_weights: torch.Tensor) -> dict:
        settings = self.settings
        self.head.requires_grad_(True)
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        best_ua, best_state, best_step, since = -1.0, copy.deepcopy(self.head.state_dict()), 0, 0
        vx, vy, vc = validation
        for step in range(1, settings.max_steps + 1):
            x, y, c = batches(step)
            self.head.train()
            loss = nn.functional.cross_entropy(self.logits(x, c), y, weight=class_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % settings.eval_every == 0 or step == settings.max_steps:
                self.head.eval()
                with torch.no_grad():
                    ua = _unweighted_accuracy(self.logits(vx, vc), vy)
                if ua > best_ua + 1e-9:
                    best_ua, best_state, best_step, since = ua, copy.deepcopy(self.head.state_dict()), step, 0
                else:
                    since += 1
                    if since >= settings.patience:
                        break
        self.head.load_state_dict(best_state)
        self.head.eval()
        return {"val_ua": round(best_ua, 4), "best_step": best_step, "steps": step}


def fit_si_route(routes: nn.Module, label_embeds: torch.Tensor, train: Utterances, validation: Utterances,
                 variance_floor: float, settings: Optional[SiRouteFitting] = None) -> dict:
    """Fit ``routes`` (an ``IclSerSpeakerRoutes``: its ``raw`` and, if present, ``normalized`` head)
    on the training utterances' summaries, keeping each head's best validation state.

    Args:
        routes: The model's SI route module (changed in place; left frozen and in eval mode).
        label_embeds: ``(C, W)`` the vocabulary's label-word embeddings (as ``classify`` embeds
            candidates).
        train, validation: :func:`summarize_utterances` of the training and validation speakers.
        variance_floor: The model's ``speaker_variance_floor``.

    Returns:
        ``{"raw": {"val_ua", "best_step", "steps"}, "normalized": {...}}`` (validation UA of each head).
    """
    settings = settings or SiRouteFitting()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread start-up costs more than it saves, and more so on busy cores
    try:
        return _fit(routes, label_embeds, train, validation, variance_floor, settings)
    finally:
        torch.set_num_threads(threads)


def _fit(routes, label_embeds, train, validation, variance_floor, settings) -> dict:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 7919])
    counts = torch.bincount(train.targets, minlength=len(label_embeds)).float()
    class_weights = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros(()))
    report = {}

    def minibatch(x, y, c):
        def draw(step):
            rows = torch.from_numpy(rng.integers(0, len(x), size=min(settings.batch_size, len(x))))
            return x[rows], y[rows], c[rows]
        return draw

    raw = _HeadFitter(routes.raw, label_embeds, settings)
    report["raw"] = raw.fit(minibatch(train.summaries, train.targets, train.candidates),
                            (validation.summaries, validation.targets, validation.candidates), class_weights)
    if getattr(routes, "normalized", None) is not None:
        sizes = settings.statistics_sizes
        # Fresh subsets every few hundred steps: the head sees many draws of each speaker's statistics.
        pool = {"data": None}

        def normalized_batches(step):
            if pool["data"] is None or step % 250 == 1:
                pool["data"] = _normalized_draws(train, sizes, 1, variance_floor, rng)
            return minibatch(*pool["data"])(step)

        fixed_rng = np.random.default_rng([settings.seed, 104729])
        held_out = _normalized_draws(validation, sizes, settings.validation_draws, variance_floor, fixed_rng)
        normalized = _HeadFitter(routes.normalized, label_embeds, settings)
        report["normalized"] = normalized.fit(normalized_batches, held_out, class_weights)
    routes.requires_grad_(False)
    logger.info("SI route fitted: %s", report)
    return report


__all__ = ["SiRouteFitting", "Utterances", "fit_si_route", "summarize_utterances"]
