"""The enrollment read-out: a one-layer attention from a query utterance to its speaker's labelled
enrollment utterances, whose values are the LM's own label-word embeddings."""

import torch
from torch import nn

from .configuration_icl_ser import IclSerConfig
from .projector import masked_mean_std


class IclSerContextReadout(nn.Module):
    """The enrollment read-out: a one-layer attention from a query utterance to its speaker's
    labelled enrollment utterances, whose values are the LM's own label-word embeddings.
    docs/ARCHITECTURE.md ("Enrollment read-out") tells the same story at length.

    * Keys and queries: each utterance is one vector, the mean and standard deviation of its
      frames (of the encoder block the projector reads), layer-normalized (`summarize`).
    * Scores: each of `context_readout_heads` heads scores the query against every enrollment
      utterance by a learned distance, −τ_h·‖W_h(x_q − x_k)‖²/d (a metric, as in prototypical
      networks: a close utterance scores high whatever K is, so one enrollment utterance is
      already informative), and against a learned "none" slot (the query's emotion is not in
      the enrollment).
    * Values: each enrollment label's answer-token embeddings, averaged; labels are read from
      the words, so arbitrary (permuted, unseen) label words work as well as the trained ones.
      The head-weighted mix is the query's read-out vector (`forward`).
    * Use: the model adds the vector onto the query's audio tokens and the text after them,
      and, scaled by `output_gain`, onto the LM's final hidden states there, where the tied LM
      head turns it into higher logits for those label words (a copy route).
    * Training: `matching_loss`, the attention mass on the enrollment utterances with the
      query's label (or on "none"), beside the LM loss.

    Why: the LM alone would have to match the query against enrollment lines and copy the word
    that follows the match (an induction circuit, which LoRA meta-training did not learn;
    docs/HISTORY.md). The read-out gives that match one attention step.
    """

    def __init__(self, config: IclSerConfig):
        super().__init__()
        width = config.audio_config.hidden_size * 2  # mean and std
        heads, dim = int(config.context_readout_heads), int(config.context_readout_dim)
        self.heads, self.dim = heads, dim
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, heads * dim, bias=False)
        self.log_temperature = nn.Parameter(torch.zeros(heads))
        self.none_score = nn.Parameter(torch.zeros(heads))
        self.head_weight = nn.Parameter(torch.full((heads,), 1.0 / heads))
        # Scale of the read-out added to the LM's final hidden states (the copy route).
        self.output_gain = nn.Parameter(torch.tensor(1.0))

    @property
    def summary_width(self) -> int:
        """Width of an utterance's summary vector (mean and std of its frames)."""
        return self.norm.normalized_shape[0]

    @staticmethod
    def summarize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, D) frames + (N, T) mask → (N, 2D) mean and std over each utterance's valid frames
        (the projector's pooling with one segment)."""
        return masked_mean_std(hidden, mask, mask.float()[:, None, :])[:, 0]

    def forward(
        self, queries: torch.Tensor, enrollment: torch.Tensor, label_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, 2D) query summaries, (K >= 1, 2D) enrollment summaries and (K, W) their label
        embeddings → (Q, W) read-out vectors and (Q, heads, K + 1) attention weights (the last
        column is the "none" slot)."""
        dtype = self.proj.weight.dtype
        q = self.proj(self.norm(queries.to(dtype))).view(len(queries), self.heads, self.dim)
        k = self.proj(self.norm(enrollment.to(dtype))).view(len(enrollment), self.heads, self.dim)
        distance = (q[:, :, None, :] - k.transpose(0, 1)[None]).square().sum(-1) / self.dim  # (Q, H, K)
        scores = -self.log_temperature.exp().to(distance.dtype)[None, :, None] * distance
        none = self.none_score.to(scores.dtype)[None, :, None].expand(len(queries), -1, 1)
        weights = torch.cat([scores, none], dim=-1).softmax(-1)  # (Q, H, K + 1)
        mixed = torch.einsum("qhk,h->qk", weights[..., :-1], self.head_weight.to(weights.dtype))
        return mixed.to(label_embeds.dtype) @ label_embeds, weights

    @staticmethod
    def matching_loss(weights: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
        """−log of the attention mass (mean over heads) on the enrollment utterances with the
        query's label, or on "none" when no enrollment utterance has it: the read-out's own
        training signal, beside the LM loss (the LM cannot use an uninformed read-out).

        Args:
            weights: `(Q, H, K + 1)` attention weights from `forward`.
            matches: `(Q, K)` bool, enrollment utterance k has query q's label.
        """
        target = torch.cat([matches, ~matches.any(-1, keepdim=True)], dim=-1).to(weights.dtype)
        mass = (weights.mean(1) * target).sum(-1)
        return -torch.log(mass.float() + 1e-6).mean()


__all__ = ["IclSerContextReadout"]
