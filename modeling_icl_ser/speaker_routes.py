"""Speaker normalization, the speaker-independent (SI) route and the prototype route
(docs/ARCHITECTURE.md, "Speaker normalization and the routes")."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .configuration_icl_ser import IclSerConfig


def speaker_statistics(enrollment: torch.Tensor, variance_floor: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """`(shift, scale)`, each `(F,)`, that `speaker_standardize` applies for these `(K, F)` summaries
    of one speaker: their mean, and (K >= 2) the floored standard deviation, else ones. None for K = 0."""
    if len(enrollment) == 0:
        return None
    enrollment = enrollment.float()
    if len(enrollment) < 2:
        return enrollment.mean(0), torch.ones_like(enrollment[0])
    var = enrollment.var(0, unbiased=False)
    return enrollment.mean(0), torch.sqrt(var + variance_floor * var.mean() + 1e-8)


def speaker_standardize(summaries: torch.Tensor, enrollment: torch.Tensor, variance_floor: float) -> torch.Tensor:
    """Label-free speaker normalization: `(N, F)` summaries standardized by the `(K, F)` summaries
    of the same speaker's enrollment utterances. K = 0 returns them unchanged; K = 1 subtracts the
    one utterance; K >= 2 also divides by the per-dimension standard deviation, whose variance is
    floored at `variance_floor` × its mean over dimensions."""
    statistics = speaker_statistics(enrollment, variance_floor)
    if statistics is None:
        return summaries
    shift, scale = statistics
    return (summaries.float() - shift) / scale


def match_labels(label_embeds: torch.Tensor, candidate_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(K, W)` enrollment label embeddings vs `(C, W)` candidate embeddings → `(index (K,), found
    (K,))`: the candidate each enrollment label is (same answer tokens give the same embedding)."""
    distance, index = torch.cdist(label_embeds.float(), candidate_embeds.float()).min(-1)
    return index, distance <= 1e-4 * candidate_embeds.float().norm(dim=-1).mean()


def prototype_probabilities(query: torch.Tensor, enrollment: torch.Tensor, enrollment_labels: torch.Tensor,
                            candidate_embeds: torch.Tensor, temperature: float) -> Optional[torch.Tensor]:
    """The parameter-free prototype route for one query: cosine of its `(F,)` summary to the mean
    of each enrolled label's unit-length `(K, F)` summaries, softmax over the enrolled candidates
    (temperature `temperature`); `(C,)` probabilities, 0 for candidates nobody enrolled. None when
    no enrollment label is among the candidates."""
    index, found = match_labels(enrollment_labels, candidate_embeds)
    if not bool(found.any()):
        return None
    units = nn.functional.normalize(enrollment[found].float(), dim=-1)
    classes = index[found]
    sums = torch.zeros(len(candidate_embeds), units.shape[-1], device=units.device).index_add_(0, classes, units)
    enrolled = torch.zeros(len(candidate_embeds), dtype=torch.bool, device=units.device)
    enrolled[classes] = True
    scores = nn.functional.normalize(sums, dim=-1) @ nn.functional.normalize(query.float(), dim=-1) / temperature
    return scores.masked_fill(~enrolled, float("-inf")).softmax(-1)


# The SI route's normalized head also trains on enrollment utterances once a row has this many.
NORMALIZED_ENROLLMENT_MIN_K = 4


@dataclass
class SpeakerRow:
    """One prompt row, as the read-out and the routes see it.

    Attributes:
        queries: indices (into the batch's audios) of the row's unlabelled audios.
        enrolled: indices of its labelled audios.
        last_query: True when the row's last audio is unlabelled (the query the answer is for).
        memory: `(K, F)` raw summaries of the row's enrollment (a profile's first), K >= 0.
        memory_labels: `(K, W)` their label embeddings.
        query_summaries: `(Q, F)` summaries of `queries`, speaker-normalized by the speaker's
            statistics (`memory` plus any unlabelled speech) when the config asks for it;
            `memory_summaries` likewise for `memory`.
        has_statistics: The row has speaker statistics (enrollment or unlabelled speech), so the
            SI route reads its normalized head.
        statistics: Those statistics as `speaker_statistics`' `(shift, scale)` (None without any).
    """

    queries: torch.Tensor
    enrolled: torch.Tensor
    last_query: bool
    memory: torch.Tensor
    memory_labels: torch.Tensor
    query_summaries: torch.Tensor
    memory_summaries: torch.Tensor
    has_statistics: bool = False
    statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class IclSerSpeakerRoutes(nn.Module):
    """The speaker-independent (SI) route: an utterance's summary vector (mean and std of its
    frames) mapped into the LM's embedding width and scored against each candidate's label-word
    embedding (unit length), so any label word can be scored (open vocabulary). Two heads: one
    for raw summaries (no enrollment), one for speaker-normalized ones (`speaker_normalization`
    and K >= 1), as the conventional "SI" and "SI + speaker norm." classifiers, inside the model.
    Trained by `loss` beside the LM loss; `classify` mixes it in by `config.route_weights`.
    """

    def __init__(self, config: IclSerConfig):
        super().__init__()
        width = config.audio_config.hidden_size * 2
        text_width = config.text_config.hidden_size
        self.raw = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, text_width))
        self.normalized = (nn.Sequential(nn.LayerNorm(width), nn.Linear(width, text_width))
                           if config.speaker_normalization else None)

    def logits(self, summaries: torch.Tensor, normalized: bool, candidate_embeds: torch.Tensor) -> torch.Tensor:
        """`(Q, F)` summaries (speaker-normalized when `normalized`) and `(C, W)` candidate label
        embeddings → `(Q, C)` logits."""
        head = self.normalized if normalized and self.normalized is not None else self.raw
        dtype = head[1].weight.dtype
        vectors = head(summaries.to(dtype)).float()
        return vectors @ nn.functional.normalize(candidate_embeds.float(), dim=-1).T


__all__ = ["NORMALIZED_ENROLLMENT_MIN_K", "IclSerSpeakerRoutes", "SpeakerRow", "match_labels",
           "prototype_probabilities", "speaker_standardize", "speaker_statistics"]
