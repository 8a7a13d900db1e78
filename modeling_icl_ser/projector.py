"""The projector: each utterance's encoder frames become `num_audio_tokens` tokens in the LM's width."""

from typing import Optional

import torch
from torch import nn

from .configuration_icl_ser import IclSerConfig


def masked_mean_std(hidden: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, use_std: bool = True) -> torch.Tensor:
    """(N, T, D) frames, (N, T) validity mask and (N, S, T) 0/1 frame weights → (N, S, D or 2D)
    mean (and std) over each group's frames, in float32."""
    counts = weights.sum(-1, keepdim=True)
    # Padded frames get weight 0; zero them too so non-finite padding cannot leak in.
    hidden = hidden.float().masked_fill(~mask.bool()[..., None], 0.0)
    mean = weights @ hidden / counts
    if not use_std:
        return mean
    var = (weights @ hidden.square() / counts - mean.square()).clamp_min(0.0)
    return torch.cat([mean, torch.sqrt(var + 1e-6)], dim=-1)  # eps keeps grads finite at var=0


class IclSerProjector(nn.Module):
    """Pools each utterance's valid frames into `num_audio_tokens` time segments and maps them to
    the LM width (LayerNorm → Linear → GELU → Linear → RMSNorm).

    The output has unit RMS per dimension; the model scales it to the LM's token-embedding RMS,
    so audio tokens enter the LM at the scale its text tokens have (a raw MLP output is about
    10× larger than SmolLM2's embeddings, and the LM then learns to ignore the audio).

    Segment `s` of an utterance with `n` valid frames covers frames `[floor(s·n/S), floor((s+1)·n/S))`,
    widened to at least one frame, so utterances shorter than `S` frames still give `S` tokens.
    """

    def __init__(self, config: IclSerConfig):
        super().__init__()
        self.num_audio_tokens = config.num_audio_tokens
        self.use_std = config.audio_pooling == "mean_std"
        audio_width = config.audio_config.hidden_size
        text_width = config.text_config.hidden_size
        hidden = config.projector_hidden_size or text_width
        pooled_width = audio_width * (2 if self.use_std else 1)
        self.input_norm = nn.LayerNorm(pooled_width)  # mean and std features differ in scale
        self.dropout = nn.Dropout(config.audio_token_dropout)
        self.linear_1 = nn.Linear(pooled_width, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, text_width)
        self.output_norm = nn.RMSNorm(text_width)

    def segment_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(n_audio, frames) validity mask → (n_audio, S, frames) 0/1 segment membership."""
        lengths = mask.long().sum(-1, keepdim=True)  # (N, 1)
        seg = torch.arange(self.num_audio_tokens, device=mask.device)[None, :]  # (1, S)
        start = torch.div(seg * lengths, self.num_audio_tokens, rounding_mode="floor")
        end = torch.div((seg + 1) * lengths, self.num_audio_tokens, rounding_mode="floor")
        end = torch.maximum(end, start + 1)  # short utterances: every segment keeps >= 1 frame
        frames = torch.arange(mask.shape[-1], device=mask.device)[None, None, :]
        return ((frames >= start[..., None]) & (frames < end[..., None])).float()

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean (and std) per segment: (N, T, D) → (N, S, D or 2D), in float32."""
        return masked_mean_std(hidden, mask, self.segment_weights(mask), self.use_std)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, shift: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, T, D) encoder frames + (N, T) mask → (N, num_audio_tokens, LM width). With `(N, 2D)`
        `shift` and `scale` (a speaker's statistics per audio, `speaker_normalized_audio_tokens`),
        each pooled segment is standardized by them first."""
        pooled = self.pool(hidden, mask)
        if shift is not None:
            width = pooled.shape[-1]  # mean-only pooling uses the mean half of the statistics
            pooled = (pooled - shift[:, None, :width].float()) / scale[:, None, :width].float()
        pooled = self.dropout(self.input_norm(pooled.to(self.linear_1.weight.dtype)))
        return self.output_norm(self.linear_2(self.act(self.linear_1(pooled))))


__all__ = ["IclSerProjector", "masked_mean_std"]
