"""icl-ser: a speech encoder, a pooling projector and a causal LM that labels a query utterance
from a speaker's enrollment (utterance, emotion) pairs given in context.

Transformers model-file idiom with relative imports only, so that a saved checkpoint runs with
``trust_remote_code=True`` where this package is not installed. One file, in four sections:

1. **Projector** (:class:`IclSerProjector`): each utterance's encoder frames -> ``num_audio_tokens``
   pooled segments -> LM-width audio tokens.
2. **Read-out** (:class:`IclSerContextReadout`): the enrollment read-out, a one-layer attention
   from the query utterance to the labelled enrollment utterances (docs/ARCHITECTURE.md,
   "Enrollment read-out").
3. **Model** (:class:`IclSerForConditionalGeneration`): encoder, projector, read-out and LM
   put together; audio features, saving, prompt embedding, ``forward`` and the loss.
4. **Scoring** (``classify``): closed-set label probabilities from the answer log-likelihoods,
   and ``generate``'s input preparation.

Before them: the checkpoint-identity helpers (fingerprints, the pipeline file copied on save).
"""

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_icl_ser import IclSerConfig

# ================================================================================================
# Checkpoint identity: fingerprints and the pipeline file a saved folder carries
# ================================================================================================
# Bumped whenever the encoder pass below changes what features it computes (feature-cache key).
_ENCODER_PASS_VERSION = "icl_ser-encoder-v1"
# Bumped whenever the model's prompt pass changes what a speaker profile's cache holds.
_MODEL_FINGERPRINT_VERSION = "icl_ser-model-v1"
# Config keys that do not change what the model computes.
_FINGERPRINT_IGNORED_KEYS = (
    "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "auto_map", "custom_pipelines",
)


# What `Pipeline.save_pretrained` writes for the "icl-speech-emotion" pipeline (pipeline_icl_ser.py);
# a plain `model.save_pretrained` writes it too, so the folder runs with `pipeline(...)`.
_PIPELINE_FILE = "pipeline_icl_ser.py"
_CUSTOM_PIPELINES = {
    "icl-speech-emotion": {"impl": "pipeline_icl_ser.IclSpeechEmotionPipeline", "pt": ["AutoModel"], "type": "multimodal"}
}


logger = logging.getLogger(__name__)


def _pipeline_file() -> Optional[Path]:
    """The pipeline code to copy into a checkpoint: beside this file (the package), else the
    loaded pipeline module's (remote code: transformers caches each file in its own folder)."""
    beside = Path(__file__).with_name(_PIPELINE_FILE)
    if beside.is_file():
        return beside
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.rsplit(".", 1)[-1] == _PIPELINE_FILE[:-3] and file and Path(file).is_file():
            return Path(file)
    return None


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy a file through a temporary file in the target folder, renamed into place."""
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".py", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(source.read_bytes())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _fingerprint(version: str, config, module: nn.Module) -> str:
    """sha256 over a version tag, a config's settings and a module's weights (names, dtypes, shapes, bytes)."""
    def settings_of(values: dict) -> dict:
        return {k: settings_of(v) if isinstance(v, dict) else v
                for k, v in values.items() if k not in _FINGERPRINT_IGNORED_KEYS}

    settings = settings_of(config.to_dict())
    digest = hashlib.sha256(version.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ================================================================================================
# 1. Projector: encoder frames -> audio tokens in the LM's width
# ================================================================================================


def _masked_mean_std(hidden: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, use_std: bool = True) -> torch.Tensor:
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
        return _masked_mean_std(hidden, mask, self.segment_weights(mask), self.use_std)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, D) encoder frames + (N, T) mask → (N, num_audio_tokens, LM width)."""
        pooled = self.dropout(self.input_norm(self.pool(hidden, mask).to(self.linear_1.weight.dtype)))
        return self.output_norm(self.linear_2(self.act(self.linear_1(pooled))))


# ================================================================================================
# 2. Read-out: the enrollment read-out (query utterance vs labelled enrollment utterances)
# ================================================================================================


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
      head turns it into higher logits for those label words (a copy route). `classify` can
      also use the attention as a pointer over the enrollment labels
      (`config.context_readout_pointer`, off by default).
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
        return _masked_mean_std(hidden, mask, mask.float()[:, None, :])[:, 0]

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


# ================================================================================================
# 2b. Speaker routes: speaker normalization, the SI route and the prototype route
# ================================================================================================


def speaker_standardize(summaries: torch.Tensor, enrollment: torch.Tensor, variance_floor: float) -> torch.Tensor:
    """Label-free speaker normalization: `(N, F)` summaries standardized by the `(K, F)` summaries
    of the same speaker's enrollment utterances. K = 0 returns them unchanged; K = 1 subtracts the
    one utterance; K >= 2 also divides by the per-dimension standard deviation, whose variance is
    floored at `variance_floor` × its mean over dimensions."""
    if len(enrollment) == 0:
        return summaries
    enrollment = enrollment.float()
    centered = summaries.float() - enrollment.mean(0)
    if len(enrollment) < 2:
        return centered
    var = enrollment.var(0, unbiased=False)
    return centered / torch.sqrt(var + variance_floor * var.mean() + 1e-8)


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


def mix_routes(routes: dict, weights: Optional[dict], weights_without_enrollment: Optional[dict] = None) -> torch.Tensor:
    """`classify`'s mixture: `routes` maps "lm", "si", "prototype" to `(B, C)` probabilities (the
    prototype's rows are NaN where a sample has no enrollment), `weights` to their weights
    (`IclSerConfig.route_weights`; None = the LM alone). Each row mixes the routes it has, with
    the weights renormalized over them; rows without enrollment use `weights_without_enrollment`
    instead when given (`IclSerConfig.route_weights_without_enrollment`)."""
    if weights_without_enrollment is not None:
        prototype = routes.get("prototype")
        enrolled = (torch.zeros(routes["lm"].shape[0], 1, dtype=torch.bool, device=routes["lm"].device)
                    if prototype is None else ~torch.isnan(prototype).any(-1, keepdim=True))
        return torch.where(enrolled, mix_routes(routes, weights), mix_routes(routes, weights_without_enrollment))
    if not weights:
        return routes["lm"]
    total = torch.zeros_like(routes["lm"], dtype=torch.float32)
    norm = torch.zeros(routes["lm"].shape[0], 1, device=total.device)
    for name, weight in weights.items():
        probs = routes.get(name)
        if probs is None or float(weight) == 0:
            continue
        has = ~torch.isnan(probs).any(-1, keepdim=True)
        total = total + float(weight) * torch.nan_to_num(probs.float()) * has
        norm = norm + float(weight) * has
    # A row with none of the weighted routes (e.g. prototype only, K = 0) falls back to the LM.
    return torch.where(norm > 0, total / norm.clamp_min(1e-12), routes["lm"].float())


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
        query_summaries: `(Q, F)` summaries of `queries`, speaker-normalized by `memory` when the
            config asks for it; `memory_summaries` likewise for `memory`.
        has_statistics: The row has speaker statistics (enrollment or unlabelled speech), so the
            SI route reads its normalized head.
    """

    queries: torch.Tensor
    enrolled: torch.Tensor
    last_query: bool
    memory: torch.Tensor
    memory_labels: torch.Tensor
    query_summaries: torch.Tensor
    memory_summaries: torch.Tensor
    has_statistics: bool = False  # unlabelled speech (issue 24): statistics without labels


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


# ================================================================================================
# 3. Model: encoder -> projector (+ read-out) -> causal LM
# ================================================================================================


@dataclass
class EmbeddedPrompt:
    """What `_embed_with_audio` gives the LM passes.

    Attributes:
        embeds: `(batch, seq, W)` prompt embeddings with the audio tokens in place.
        readout_loss: The read-out's matching loss (training, with a read-out), else None: the
            mean over `readout_loss_rows` rows.
        readout: `(batch, W)` each row's read-out vector (None without a read-out).
        readout_positions: `(batch, seq)` the positions after each row's last audio, which carry
            it (None without a read-out); anything appended to the prompt (candidates) too.
        pointers: Per row, `(mass (K,), label_embeds (K, W))`: the read-out's attention mass
            (mean over heads) on each enrollment utterance of the row's query and their label
            embeddings, or None (no read-out, no enrollment).
        speaker_rows: Per row, its `SpeakerRow` (what the SI and prototype routes read), or None
            for a model without read-out or SI route.
    """

    embeds: torch.Tensor
    readout_loss: Optional[torch.Tensor] = None
    readout: Optional[torch.Tensor] = None
    readout_positions: Optional[torch.Tensor] = None
    pointers: Optional[list] = None
    readout_loss_rows: int = 0
    speaker_rows: Optional[list] = None


class IclSerPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight init and capability flags of icl-ser models."""

    config_class = IclSerConfig
    config: IclSerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    # Sub-models (encoder, LM) add their own no-split layers when the model is built.
    _no_split_modules = []
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class IclSerForConditionalGeneration(IclSerPreTrainedModel, GenerationMixin):
    """Speech encoder → [`IclSerProjector`] → causal LM, for in-context emotion labelling.

    The processor writes `config.num_audio_tokens` placeholder tokens (`config.audio_token_id`)
    per utterance; `forward` replaces their embeddings with the projected audio tokens of the
    batch's audios, which are stacked sample after sample (each sample's enrollment audios, then
    its query) in the same order as the placeholders appear in `input_ids`.
    """

    def __init__(self, config: IclSerConfig):
        super().__init__(config)
        if config.is_whisper_encoder:
            self.audio_tower = WhisperEncoder(config.audio_config)  # encoder only, no decoder weights
        else:
            self.audio_tower = AutoModel.from_config(config.audio_config)
        self.projector = IclSerProjector(config)
        self.context_readout = IclSerContextReadout(config) if config.context_readout_heads else None
        self.speaker_routes = IclSerSpeakerRoutes(config) if config.si_route else None
        # Off only in the first stage of a two-stage schedule (see `feed_context_readout`).
        self.context_readout_feeds_lm = True
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @classmethod
    def from_backbones(cls, audio_encoder, language_model, labels: Optional[list[str]] = None, **config_kwargs):
        """Build `(model, processor)` from a pretrained speech encoder and causal LM.

        See `backbones.from_backbones`: Hub ids, local folders, a faster-whisper/CTranslate2
        Whisper folder for the encoder, a `.gguf` file for the LM. The projector is random.
        """
        from .backbones import from_backbones

        return from_backbones(audio_encoder, language_model, labels=labels, **config_kwargs)

    # ----------------------------------------------------------------- embeddings / plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # ----------------------------------------------------------------------------- audio
    def get_audio_features(
        self, input_features: torch.Tensor, feature_attention_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the speech encoder on a batch of utterances, at their own length.

        Args:
            input_features: Whisper log-mel features `(n_audio, n_mels, frames)`, or raw
                normalized waveforms `(n_audio, samples)` for wav2vec2-family encoders; padded
                at the end.
            feature_attention_mask: `(n_audio, frames or samples)`, 1 for valid input, 0 for
                padding (valid input must come first). Defaults to all valid.

        Returns:
            `(hidden, hidden_mask)`: encoder frames `(n_audio, T, D)` and their validity mask
            `(n_audio, T)` (bool). An utterance's valid frames do not depend on the others.
        """
        if feature_attention_mask is None:
            feature_attention_mask = torch.ones(
                input_features.shape[0], input_features.shape[-1], dtype=torch.long, device=input_features.device
            )
        if self.config.is_whisper_encoder:
            return self._whisper_features(input_features, feature_attention_mask)
        return self._wav2vec2_features(input_features, feature_attention_mask)

    def utterance_embeddings(
        self, input_features: torch.Tensor, feature_attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One vector per utterance: the pooled speech representation the model reads.

        The mean and standard deviation over each utterance's valid frames of the encoder block
        the projector reads (`config.audio_feature_layer`): what the enrollment read-out compares
        utterances by, and the projector's pooling with a single segment. Padding and batch
        companions do not change an utterance's vector.

        Args:
            input_features, feature_attention_mask: As for `get_audio_features` (the processor's
                `audio_inputs(...)` gives both).

        Returns:
            `(n_audio, 2 * encoder width)` float32.
        """
        hidden, mask = self.get_audio_features(input_features, feature_attention_mask)
        return IclSerContextReadout.summarize(hidden, mask.to(hidden.device))

    def _whisper_features(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.audio_tower
        max_frames = encoder.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        if features.shape[-1] > max_frames:
            raise ValueError(
                f"input_features have {features.shape[-1]} frames; this Whisper encoder takes at most "
                f"{max_frames} (30 s). Cut the audio into shorter utterances."
            )
        dtype = encoder.conv1.weight.dtype
        mel_mask = mask.to(device=features.device, dtype=dtype)[:, None, :]
        # Zeroing padding before each conv makes a padded batch see exactly the zeros that the
        # conv's own zero-padding gives an unpadded utterance, so valid frames are unchanged.
        hidden = features.to(dtype) * mel_mask
        hidden = nn.functional.gelu(encoder.conv1(hidden)) * mel_mask
        hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
        frame_mask = mask[:, ::2].to(hidden.device)  # conv2 (stride 2, pad 1) keeps ceil(L/2) frames
        # Positions are sliced to the utterance length: no padding to 30 s.
        hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]].to(dtype)
        hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=self.training)
        attention_mask = create_bidirectional_mask(
            config=encoder.config, inputs_embeds=hidden, attention_mask=frame_mask.bool()
        )
        n_blocks = self._feature_blocks(len(encoder.layers))
        for layer in encoder.layers[:n_blocks]:
            if self.training and encoder.layerdrop > 0 and torch.rand([]) < encoder.layerdrop:
                continue
            hidden = layer(hidden, attention_mask)
        if n_blocks == len(encoder.layers):  # the final layer norm belongs to the top of the stack
            hidden = encoder.layer_norm(hidden)
        return hidden, frame_mask.bool()

    def _feature_blocks(self, depth: int) -> int:
        """How many encoder blocks run: up to `config.audio_feature_layer` (all when None)."""
        layer = self.config.audio_feature_layer
        return depth if layer is None else min(int(layer), depth)

    def _wav2vec2_features(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = next(self.audio_tower.parameters()).dtype
        mask = mask.to(values.device).long()
        outputs = self.audio_tower(input_values=values.to(dtype), attention_mask=mask,
                                   output_hidden_states=self.config.audio_feature_layer is not None)
        if self.config.audio_feature_layer is None:
            hidden = outputs.last_hidden_state
        else:  # hidden_states[0] is the input to the first block
            hidden = outputs.hidden_states[self._feature_blocks(len(outputs.hidden_states) - 1)]
        hidden_mask = self.audio_tower._get_feature_vector_attention_mask(hidden.shape[1], mask)
        return hidden, hidden_mask.bool()

    def audio_encoder_fingerprint(self) -> str:
        """A stable hex digest of the audio encoder's config, weights and featurization code.

        The data layer keys its frozen-feature cache on it: equal fingerprints mean equal
        encoder outputs. Hashes every encoder weight, so it takes a moment for large encoders.
        """
        version = _ENCODER_PASS_VERSION
        if self.config.audio_feature_layer is not None:  # other blocks, other features
            version += f"-block{int(self.config.audio_feature_layer)}"
        return _fingerprint(version, self.config.audio_config, self.audio_tower)

    def fingerprint(self) -> str:
        """A stable hex digest of the whole model: its config and every weight (with dtypes).

        Anything computed from the model's hidden states (e.g. a speaker profile's key/value
        cache) is only valid for a model with the same fingerprint. Hashes every weight, so it
        takes a moment for large models; callers cache it.
        """
        return _fingerprint(_MODEL_FINGERPRINT_VERSION, self.config, self)

    # ---------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the `"icl-speech-emotion"` pipeline: its code
        file is copied next to the model code and config.json names it in `custom_pipelines`,
        so `pipeline("icl-speech-emotion", model=folder, trust_remote_code=True)` runs on a
        plain `model.save_pretrained` + `processor.save_pretrained` folder too.

        Skipped (with a warning, and any inherited `custom_pipelines` left out of the saved
        config) when the pipeline code is not at hand, e.g. a model loaded from remote code
        without its pipeline; the folder then still loads with `AutoModel`.
        """
        pipeline_file = _pipeline_file()
        registered = getattr(self, "_auto_class", None) is not None  # code files get copied
        copy = registered and pipeline_file is not None
        if registered and pipeline_file is None:
            logger.warning("The icl-speech-emotion pipeline code is not loaded; %s will load with AutoModel "
                           "but not with pipeline(...).", save_directory)
        # Changed while saving only, so the in-memory config stays as it was. Without the code
        # file, an inherited entry is left out: the folder must not name code it lacks.
        had = hasattr(self.config, "custom_pipelines")
        inherited = getattr(self.config, "custom_pipelines", None)
        if copy:
            self.config.custom_pipelines = inherited or json.loads(json.dumps(_CUSTOM_PIPELINES))
        elif had:
            del self.config.custom_pipelines
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had:
                self.config.custom_pipelines = inherited
            elif hasattr(self.config, "custom_pipelines"):
                del self.config.custom_pipelines
        if copy and kwargs.get("is_main_process", True):
            _copy_atomically(pipeline_file, Path(save_directory) / _PIPELINE_FILE)
            # The modules the pipeline imports (recordings: segmentation, speaker check, outputs, profiles).
            from transformers.dynamic_module_utils import get_relative_import_files

            for module in get_relative_import_files(str(pipeline_file)):
                target = Path(save_directory) / Path(module).name
                if not target.exists():
                    _copy_atomically(Path(module), target)
        return result

    # --------------------------------------------------------------------------- merging
    def _count_audios(
        self, input_features: Optional[torch.Tensor], audio_hidden_states: Optional[torch.Tensor]
    ) -> int:
        if input_features is not None and audio_hidden_states is not None:
            raise ValueError("Pass either input_features or audio_hidden_states, not both.")
        source = input_features if input_features is not None else audio_hidden_states
        return 0 if source is None else source.shape[0]

    def _check_placeholders(self, input_ids: torch.Tensor, n_audio: int) -> torch.Tensor:
        """Return the placeholder mask; raise before any encoder work if counts disagree."""
        audio_token_id = self.config.audio_token_id
        if audio_token_id is None:
            if n_audio:
                raise ValueError("config.audio_token_id is not set; build the model with its processor's token id.")
            return torch.zeros_like(input_ids, dtype=torch.bool)
        placeholders = input_ids == audio_token_id
        n_found, per_audio = int(placeholders.sum()), self.config.num_audio_tokens
        if n_found != n_audio * per_audio:
            raise ValueError(
                f"input_ids hold {n_found} audio placeholder tokens but {n_audio} audio(s) were given, which "
                f"need {n_audio * per_audio} ({per_audio} per audio). Build inputs with IclSerProcessor so "
                "each utterance gets exactly config.num_audio_tokens placeholders."
            )
        return placeholders

    def _embed_with_audio(
        self,
        input_ids: torch.Tensor,
        input_features: Optional[torch.Tensor],
        feature_attention_mask: Optional[torch.Tensor],
        audio_hidden_states: Optional[torch.Tensor],
        audio_hidden_mask: Optional[torch.Tensor],
        audio_label_ids: Optional[torch.Tensor] = None,
        enrollment_context: Optional[torch.Tensor] = None,
        query_answers: Optional[list[list[int]]] = None,
        unlabelled_summaries: Optional[list] = None,
    ) -> EmbeddedPrompt:
        """Prompt embeddings with the audio tokens in place, and what the read-out adds (see
        `EmbeddedPrompt`); its matching loss when `query_answers` (each row's query answer ids,
        for training) are given."""
        n_audio = self._count_audios(input_features, audio_hidden_states)
        placeholders = self._check_placeholders(input_ids, n_audio)
        if self.context_readout is not None or self.speaker_routes is not None:
            self._check_audio_labels(audio_label_ids, n_audio)  # before any encoder work
        # The placeholder id may lie outside the LM vocabulary: look up a valid id instead.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        if not placeholders.any():
            return EmbeddedPrompt(embeds)
        if input_features is not None:
            hidden, hidden_mask = self.get_audio_features(input_features, feature_attention_mask)
        else:
            hidden = audio_hidden_states
            hidden_mask = audio_hidden_mask
            if hidden_mask is None:
                hidden_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if (hidden_mask.sum(-1) == 0).any():
            raise ValueError("An audio has no valid encoder frames; every utterance needs at least one frame.")
        hidden, hidden_mask = hidden.to(embeds.device), hidden_mask.to(embeds.device)
        audio_tokens = self.projector(hidden, hidden_mask)
        audio_tokens = audio_tokens * self._text_embedding_rms()
        readout_loss = row_readout = after = pointers = speaker_rows = None
        readout_loss_rows = 0
        if self.context_readout is not None or self.speaker_routes is not None:
            speaker_rows, labelled = self._speaker_rows(placeholders, hidden, hidden_mask, audio_label_ids, enrollment_context,
                                                        unlabelled_summaries)
        if self.context_readout is not None:
            readout, (readout_loss, readout_loss_rows), pointers = self._read_enrollment(
                speaker_rows, labelled, audio_label_ids, enrollment_context, query_answers
            )
            audio_tokens = audio_tokens + readout[:, None, :].to(audio_tokens.dtype)
            # The query line's text after its audio (the position that predicts the answer, and
            # the answer itself in training) carries the read-out too: there the tied LM head
            # sees the label word's embedding directly, a route the LM needs no training for.
            per_row = placeholders.sum(-1)
            last_audio = per_row.cumsum(0) // self.config.num_audio_tokens - 1
            row_readout = readout[last_audio.clamp_min(0)] * (per_row > 0)[:, None]
            seen = placeholders.long().cumsum(-1)
            after = (seen == placeholders.sum(-1, keepdim=True)) & ~placeholders
            embeds = embeds + after[..., None].to(embeds.dtype) * row_readout[:, None, :].to(embeds.dtype)
        # Row-major order of the placeholders = sample after sample, audio after audio.
        embeds = embeds.masked_scatter(placeholders[..., None], audio_tokens.to(embeds.dtype))
        return EmbeddedPrompt(embeds, readout_loss, row_readout, after, pointers, readout_loss_rows, speaker_rows)

    @contextlib.contextmanager
    def _readout_on_output(self, positions: Optional[torch.Tensor], row_readout: Optional[torch.Tensor]):
        """While active, the LM's final norm output gets `output_gain` × each row's read-out
        (brought to unit RMS) at `positions` `(batch, seq)`: with tied embeddings that raises
        the logits of the enrollment label words the read-out points at, whatever the LM's
        blocks did with it (a copy route, as in pointer-generator models). No-op without a
        read-out or for an LM without a final `norm`."""
        norm = getattr(self.language_model.get_decoder(), "norm", None)
        if row_readout is None or norm is None:
            yield
            return
        delta = self.context_readout.output_gain * row_readout.float() / self._text_embedding_rms()

        def add(module, args, output):
            if output.shape[:2] != positions.shape:
                raise RuntimeError(f"read-out positions {tuple(positions.shape)} do not match the LM's {tuple(output.shape[:2])}.")
            return output + positions[..., None].to(output.dtype) * delta[:, None, :].to(output.dtype)

        handle = norm.register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()

    # ----------------------------------------------------------------- enrollment read-out
    def feed_context_readout(self, enabled: bool) -> None:
        """Whether the read-out's vector reaches the LM (its tokens, its output, the pointer).

        Switched off, the model behaves as one without a read-out while the read-out's matching
        loss still trains its attention: the first stage of train.py's two-stage schedule
        (`--readout_stage_steps`), where the LM learns to label speech (K = 0) undisturbed.
        Not saved: a loaded model always feeds it.
        """
        self.context_readout_feeds_lm = bool(enabled)

    def _label_embeddings(self, audio_label_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) label token ids (-100 = none) → (N, W) mean token embedding (0 for unlabelled)."""
        valid = audio_label_ids != -100
        embeds = self.get_input_embeddings()(audio_label_ids.masked_fill(~valid, 0))
        weights = valid.to(embeds.dtype)[..., None]
        return (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _check_audio_labels(self, audio_label_ids: Optional[torch.Tensor], n_audio: int) -> None:
        if audio_label_ids is not None and (audio_label_ids.ndim != 2 or audio_label_ids.shape[0] != n_audio):
            raise ValueError(
                f"audio_label_ids must be (n_audio, L) with one row per audio ({n_audio}), got "
                f"{tuple(audio_label_ids.shape)}. Build inputs with IclSerProcessor."
            )

    def enrollment_context(
        self,
        audio_label_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        audio_hidden_states: Optional[torch.Tensor] = None,
        audio_hidden_mask: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """What the enrollment read-out needs of a speaker's K labelled utterances, computed once.

        Returns `(K, summary_width + LM width)`: each utterance's summary vector and its label's
        embedding, side by side (`None` for a model without a read-out). Pass it, expanded to
        `(batch, K, ...)`, as `enrollment_context=` to `forward`/`classify` with prompts whose
        enrollment lines come from a cached prefix (the pipeline's speaker profiles).
        """
        if self.context_readout is None:
            return None
        if input_features is not None:
            hidden, mask = self.get_audio_features(input_features, feature_attention_mask)
        elif audio_hidden_states is not None:
            hidden = audio_hidden_states
            mask = audio_hidden_mask if audio_hidden_mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
        else:
            raise ValueError("enrollment_context needs the enrollment audio: input_features or audio_hidden_states.")
        self._check_audio_labels(audio_label_ids, hidden.shape[0])
        if bool((audio_label_ids == -100).all(-1).any()):
            raise ValueError("Every enrollment utterance needs its label's token ids in audio_label_ids.")
        summaries = self.context_readout.summarize(hidden, mask.to(hidden.device))
        labels = self._label_embeddings(audio_label_ids.to(hidden.device)).float()
        return torch.cat([summaries, labels], dim=-1)

    def _speaker_rows(
        self,
        placeholders: torch.Tensor,
        hidden: torch.Tensor,
        hidden_mask: torch.Tensor,
        audio_label_ids: Optional[torch.Tensor],
        enrollment_context: Optional[torch.Tensor],
        unlabelled_summaries: Optional[list] = None,
    ) -> tuple[list[SpeakerRow], torch.Tensor]:
        """Each row's `SpeakerRow` (its unlabelled audios and its enrollment: `enrollment_context`'s
        utterances first, then its labelled audios), and `(n_audio,)` which audios are labelled.
        Speaker statistics come from the enrollment plus the row's `unlabelled_summaries` (if any)."""
        n_audio = hidden.shape[0]  # audio_label_ids' shape was checked by _embed_with_audio
        width = self.get_input_embeddings().weight.shape[-1]
        per_row = (placeholders.sum(-1) // self.config.num_audio_tokens).tolist()
        if enrollment_context is not None and enrollment_context.shape[0] != len(per_row):
            raise ValueError(f"enrollment_context has {enrollment_context.shape[0]} rows for a batch of {len(per_row)}.")
        if unlabelled_summaries is not None and len(unlabelled_summaries) != len(per_row):
            raise ValueError(f"unlabelled_summaries has {len(unlabelled_summaries)} entries for a batch of {len(per_row)}; "
                             "pass one (U, F) tensor or None per row.")
        summaries = IclSerContextReadout.summarize(hidden, hidden_mask)
        if audio_label_ids is None:
            labelled = torch.zeros(n_audio, dtype=torch.bool, device=hidden.device)
            label_embeds = torch.zeros(n_audio, width, device=hidden.device)
        else:
            audio_label_ids = audio_label_ids.to(hidden.device)
            labelled = (audio_label_ids != -100).any(-1)
            label_embeds = self._label_embeddings(audio_label_ids).float()
        split = summaries.shape[-1]
        normalize = bool(self.config.speaker_normalization)
        floor = float(self.config.speaker_variance_floor)
        rows, start = [], 0
        for row, count in enumerate(per_row):
            index = torch.arange(start, start + count, device=hidden.device)
            start += count
            enrolled, queries = index[labelled[index]], index[~labelled[index]]
            memory, memory_labels = summaries[enrolled], label_embeds[enrolled]
            if enrollment_context is not None:
                context = enrollment_context[row].to(hidden.device).float()
                memory = torch.cat([context[:, :split], memory])
                memory_labels = torch.cat([context[:, split:], memory_labels])
            query_summaries, memory_summaries = summaries[queries], memory
            # Unlabelled speech of the row's speaker adds to the statistics only (not to the read-out's memory).
            extra = None if unlabelled_summaries is None else unlabelled_summaries[row]
            stats = memory if extra is None or not len(extra) else torch.cat([memory, extra.to(memory.device, memory.dtype)])
            if normalize:
                query_summaries = speaker_standardize(query_summaries, stats, floor)
                memory_summaries = speaker_standardize(memory, stats, floor)
            rows.append(SpeakerRow(queries, enrolled, bool(count) and not bool(labelled[index[-1]]), memory, memory_labels,
                                   query_summaries, memory_summaries, len(stats) > 0))
        return rows, labelled

    def _read_enrollment(
        self,
        speaker_rows: list[SpeakerRow],
        labelled: torch.Tensor,
        audio_label_ids: Optional[torch.Tensor],
        enrollment_context: Optional[torch.Tensor],
        query_answers: Optional[list[list[int]]] = None,
    ) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], int], list]:
        """(N, W) read-out vector per audio: zero for labelled (enrollment) audios and for queries
        without enrollment; for each unlabelled audio, the read-out over its row's enrollment
        (`_speaker_rows`). With `query_answers` (row i's query answer ids), also `(mean matching
        loss, rows)` over the rows' last unlabelled audios, else `(None, 0)`.
        Third, per row, the pointer of its last audio (`EmbeddedPrompt.pointers`) or None."""
        n_audio = labelled.shape[0]
        width = self.get_input_embeddings().weight.shape[-1]
        out = torch.zeros(n_audio, width, device=labelled.device, dtype=torch.float32)
        pointers = [None] * len(speaker_rows)
        if audio_label_ids is None and enrollment_context is None:
            return out, (None, 0), pointers
        if not self.context_readout_feeds_lm and query_answers is None:
            return out, (None, 0), pointers  # switched off and no matching loss asked for: nothing to read
        rows, reads, losses = [], [], []
        for row, speaker in enumerate(speaker_rows):
            queries = speaker.queries
            if len(queries) and len(speaker.memory):
                read, weights = self.context_readout(speaker.query_summaries, speaker.memory_summaries, speaker.memory_labels)
                rows.append(queries)
                reads.append(read.float())
                if speaker.last_query:  # the row's query is its last audio
                    pointers[row] = (weights[-1, :, :-1].mean(0).float(), speaker.memory_labels)
                if query_answers is not None and enrollment_context is None:
                    answer = query_answers[row]
                    matches = torch.tensor([[[i for i in ids if i != -100] == answer
                                             for ids in audio_label_ids[speaker.enrolled].tolist()]],
                                           dtype=torch.bool, device=labelled.device)
                    losses.append(self.context_readout.matching_loss(weights[-1:], matches))
        if rows:
            out = out.index_copy(0, torch.cat(rows), torch.cat(reads))
        drop = float(self.config.context_readout_dropout)
        if self.training and drop > 0:
            # Whole queries without their read-out: the LM must keep learning to label speech
            # itself (its K = 0 skill) instead of leaning on the read-out whenever K > 0.
            out = out * (torch.rand(n_audio, 1, device=out.device) >= drop).to(out.dtype)
        loss = (torch.stack(losses).mean() if losses else None, len(losses))
        if not self.context_readout_feeds_lm:
            return torch.zeros_like(out), loss, [None] * len(speaker_rows)
        return out, loss, pointers

    @staticmethod
    def _query_answers(labels: torch.Tensor) -> list[list[int]]:
        """Each row's last run of target tokens (its query's answer) from training `labels`."""
        answers = []
        for row in labels.tolist():
            end = len(row)
            while end and row[end - 1] == -100:
                end -= 1
            start = end
            while start and row[start - 1] != -100:
                start -= 1
            answers.append(row[start:end])
        return answers

    @torch.no_grad()
    def _text_embedding_rms(self) -> torch.Tensor:
        """RMS of the LM's token embeddings (the scale audio tokens are brought to).

        Cached: a pass over the whole embedding matrix costs as much as a short query. The key
        holds the tensor's version counter, so in-place updates (optimizer steps, weight
        loading) and moves to another device or dtype recompute it.
        """
        weight = self.get_input_embeddings().weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if getattr(self, "_embedding_rms_key", None) != key:
            self._embedding_rms = weight.float().square().mean().sqrt()
            self._embedding_rms_key = key
        return self._embedding_rms

    @staticmethod
    def _positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Left padding: positions count valid tokens only; the last `seq_len` are returned."""
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        return positions[:, -seq_len:]

    # --------------------------------------------------------------------------- forward
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        audio_hidden_states: Optional[torch.Tensor] = None,
        audio_hidden_mask: Optional[torch.Tensor] = None,
        audio_label_ids: Optional[torch.LongTensor] = None,
        enrollment_context: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        candidate_input_ids: Optional[torch.LongTensor] = None,
        candidate_attention_mask: Optional[torch.Tensor] = None,
        num_enrolled_queries_in_batch: Optional[int] = None,
        num_queries_in_batch: Optional[int] = None,
        unlabelled_summaries: Optional[list] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""Language-model pass with the audio tokens spliced in.

        Args:
            input_ids: `(batch, seq)` left-padded prompt ids with audio placeholders.
            attention_mask: `(batch, past + seq)` 1 for real tokens; position ids follow it.
            input_features / feature_attention_mask: audio of all samples, stacked sample after
                sample (enrollment audios, then the query); see `get_audio_features`.
            audio_hidden_states / audio_hidden_mask: cached encoder outputs `(n_audio, T, D)` and
                `(n_audio, T)`, used instead of `input_features` (frozen-encoder training).
            audio_label_ids: `(n_audio, L)` token ids of each audio's label answer, -100 padded;
                a row of -100 marks an unlabelled audio (the query). The enrollment read-out
                (`config.context_readout_heads`) uses them; other models ignore them.
            enrollment_context: `(batch, K, ...)` from `enrollment_context()`: enrollment
                utterances whose lines are in a cached prefix, read before the prompt's own.
            labels: `(batch, seq)` targets, -100 except on answer tokens → shifted LM loss (plus
                `context_readout_loss_coef` × the read-out's matching loss, the query's answer
                being each row's last target run). The returned logits then cover only the
                target tokens, `(n_targets, vocab)` in row-major order (the loss needs no others).
            position_ids: Defaults to positions counted from `attention_mask`.
            cache: Key/value cache (`past_key_values` is accepted as its old name).
            candidate_input_ids / candidate_attention_mask: The candidates `classify` scores; in
                training, the SI route's cross-entropy runs over them (`config.si_route`), else
                they are ignored, so one processor output feeds both `forward` and `classify`.
            num_enrolled_queries_in_batch: With `num_items_in_batch` (the target tokens of the
                whole batch, as transformers' Trainer passes it), when this call is one
                micro-batch of a larger batch: the batch's rows with K >= 1, over which the
                matching loss averages. The LM loss is then the sum over this call's targets /
                `num_items_in_batch` and the matching loss this call's share of the batch mean,
                so the micro-batches' losses add up to the whole batch's.
            num_queries_in_batch: Likewise the batch's rows, over which the SI route's loss
                averages (`config.si_route`).
            unlabelled_summaries: Per row, None or a `(U, F)` tensor of raw summaries
                (`utterance_embeddings`) of other, unlabelled speech of that row's speaker: speaker
                normalization standardizes by the enrollment plus these; the prototype route and
                the read-out still use the labelled enrollment only.

        Raises:
            ValueError: placeholder count ≠ `num_audio_tokens` × number of audios, or both
                `input_features` and `audio_hidden_states` given.
        """
        answers = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (or inputs_embeds).")
            if labels is not None and ((self.context_readout is not None and self.config.context_readout_loss_coef)
                                       or (self.speaker_routes is not None and self.config.si_route_loss_coef)):
                answers = self._query_answers(labels)
            prompt = self._embed_with_audio(
                input_ids, input_features, feature_attention_mask, audio_hidden_states, audio_hidden_mask,
                audio_label_ids, enrollment_context, answers, unlabelled_summaries,
            )
        elif input_features is not None or audio_hidden_states is not None:
            raise ValueError("Audio inputs need input_ids (to find the placeholders), not inputs_embeds.")
        else:
            prompt = EmbeddedPrompt(inputs_embeds)
        inputs_embeds = prompt.embeds
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = self._positions_from_mask(attention_mask, inputs_embeds.shape[1])
        with self._readout_on_output(prompt.readout_positions, prompt.readout):
            if labels is not None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
                # The LM head is vocabulary-sized (a fifth of a small LM's compute, more for a cut
                # one): run it only at the positions that predict a target token.
                outputs = self._loss_at_targets(inputs_embeds, attention_mask, position_ids, cache, use_cache, labels, kwargs)
            else:
                outputs = self.language_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=use_cache,
                    labels=labels,
                    logits_to_keep=logits_to_keep,
                    **kwargs,
                )
        if prompt.readout_loss is not None and outputs.loss is not None:
            readout_loss = prompt.readout_loss
            if num_enrolled_queries_in_batch:  # a micro-batch of a larger batch: its share of the batch mean
                readout_loss = readout_loss * prompt.readout_loss_rows / num_enrolled_queries_in_batch
            outputs.loss = outputs.loss + self.config.context_readout_loss_coef * readout_loss.to(outputs.loss.dtype)
        if (outputs.loss is not None and self.speaker_routes is not None and self.config.si_route_loss_coef
                and prompt.speaker_rows is not None and candidate_input_ids is not None):
            si_loss, si_rows = self._si_route_loss(prompt.speaker_rows, answers, audio_label_ids, candidate_input_ids,
                                                   candidate_attention_mask)
            if si_loss is not None:
                if num_queries_in_batch:  # a micro-batch of a larger batch: its share of the batch mean
                    si_loss = si_loss * si_rows / num_queries_in_batch
                outputs.loss = outputs.loss + self.config.si_route_loss_coef * si_loss.to(outputs.loss.dtype)
        return outputs

    def _candidate_embeddings(self, cands: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """`(B, C, L)` candidate ids and mask → `(B, C, W)` label embeddings (as the read-out's)."""
        embeds = self._label_embeddings(cands.masked_fill(cand_mask == 0, -100).flatten(0, 1))
        return embeds.float().view(*cands.shape[:2], -1)

    def _si_route_loss(self, speaker_rows: list, answers: list, audio_label_ids: Optional[torch.Tensor],
                       candidate_input_ids, candidate_attention_mask):
        """Cross-entropy of the SI route over the candidates: `(mean over rows, rows)`, `(None, 0)`
        when no row has a target among the candidates.

        A row's examples: its query (the normalized head when the row has enrollment, else the
        raw one) and each enrollment utterance, on the raw head (the speaker-independent task,
        five times the examples of the queries alone) and, with `NORMALIZED_ENROLLMENT_MIN_K`
        or more of them, on the normalized head too (its statistics then hardly depend on the
        utterance itself).
        """
        cands, cand_mask = self._expand_candidates(candidate_input_ids, candidate_attention_mask, len(speaker_rows))
        cand_embeds = self._candidate_embeddings(cands, cand_mask)
        normalized_head = self.speaker_routes.normalized is not None
        losses = []
        for row, speaker in enumerate(speaker_rows):
            options = [[i for i, keep in zip(ids, kept) if keep] for ids, kept in zip(cands[row].tolist(), cand_mask[row].tolist())]
            index_of = {tuple(ids): c for c, ids in reversed(list(enumerate(options)))}
            terms = []

            def add(summaries: torch.Tensor, normalized: bool, targets: list) -> None:
                keep = [i for i, t in enumerate(targets) if t is not None]
                if keep:
                    logits = self.speaker_routes.logits(summaries[keep], normalized, cand_embeds[row])
                    target = torch.tensor([targets[i] for i in keep], device=logits.device)
                    terms.append(nn.functional.cross_entropy(logits, target, reduction="none"))

            if speaker.last_query and answers is not None:
                add(speaker.query_summaries[-1:], speaker.has_statistics, [index_of.get(tuple(answers[row]))])
            if len(speaker.enrolled) and audio_label_ids is not None:
                targets = [index_of.get(tuple(i for i in ids if i != -100))
                           for ids in audio_label_ids[speaker.enrolled].tolist()]
                own = speaker.memory[-len(speaker.enrolled):]  # the row's labelled audios come last
                add(own, False, targets)
                if normalized_head and len(speaker.memory) >= NORMALIZED_ENROLLMENT_MIN_K:
                    add(speaker.memory_summaries[-len(speaker.enrolled):], True, targets)
            if terms:
                losses.append(torch.cat(terms).mean())
        if not losses:
            return None, 0
        return torch.stack(losses).mean(), len(losses)

    def _loss_at_targets(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, labels, kwargs):
        """Shifted LM loss with logits only for the target tokens.

        The LM head is vocabulary-sized: over every column that holds a target in some row of a
        padded episode batch it cost as much as the LM's blocks (measured in
        bench/bench_train_step.py). Here the decoder runs once and the head sees only the
        `(row, column)` pairs that predict a target token.

        Returns logits `(n_targets, vocab)`, the target tokens in row-major order of
        `(row, position)`; the loss is their mean (or their sum over `num_items_in_batch`, as
        transformers' loss takes it).
        """
        num_items = kwargs.pop("num_items_in_batch", None)
        targets = labels[:, 1:].to(inputs_embeds.device)
        rows, columns = (targets != -100).nonzero(as_tuple=True)
        decoded = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, **kwargs,
        )
        logits = self.language_model.get_output_embeddings()(decoded.last_hidden_state[rows, columns])
        softcap = getattr(self.language_model.config, "final_logit_softcapping", None)
        if softcap:  # Gemma-style LMs cap their logits after the head
            logits = torch.tanh(logits / softcap) * softcap
        if len(rows) == 0:  # no target at all: a zero loss that still has a graph
            loss = logits.sum() * 0.0 + decoded.last_hidden_state.sum() * 0.0
        else:
            loss = nn.functional.cross_entropy(
                logits.float(), targets[rows, columns], reduction="sum" if num_items is not None else "mean"
            )
        if num_items is not None:
            loss = loss / num_items
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=decoded.cache,
                                      hidden_states=decoded.hidden_states, attentions=decoded.attentions)

    # ============================================================================================
    # 4. Scoring: closed-set classification over label words (``classify``), then generation
    # ============================================================================================
    @torch.no_grad()
    def classify(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        candidate_input_ids: torch.LongTensor,
        candidate_attention_mask: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        audio_hidden_states: Optional[torch.Tensor] = None,
        audio_hidden_mask: Optional[torch.Tensor] = None,
        audio_label_ids: Optional[torch.Tensor] = None,
        enrollment_context: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        return_routes: bool = False,
        unlabelled_summaries: Optional[list] = None,
        **unused,
    ) -> Union[torch.Tensor, dict]:
        """Closed-set probabilities of the candidate labels for each sample.

        Each candidate (the tokens of its answer text, e.g. `" happiness\\n"`) is scored by its
        mean token log-likelihood after the prompt; a softmax over candidates gives the result.
        Prompt and candidates run in **one** LM pass: the candidates are laid side by side after
        the prompt, and a 4D attention mask lets each candidate token see the prompt and its own
        earlier tokens only, with positions continuing the prompt's (a small LM's cost on CPU is
        mostly reading its weights, so one pass instead of two matters).

        Args:
            input_ids, attention_mask, input_features, ...: the processor's (left-padded) prompt
                batch, as for `forward`. `labels` (training targets) is ignored.
            candidate_input_ids: `(n_labels, L)` shared by the batch, or `(batch, n_labels, L)`;
                right-padded.
            candidate_attention_mask: Same shape, 1 for real candidate tokens.
            cache: Key/value cache of a prompt prefix already run for every row (e.g. a speaker's
                instruction and enrollment lines); `input_ids` then hold only the rest of the prompt
                and `attention_mask` covers `prefix + input_ids`. The cache is extended in place
                (pass a fresh one per call). Scores equal those of the whole prompt in one pass.
                With an enrollment read-out, pass the prefix's `enrollment_context` too.

            return_routes: Return each route's probabilities instead of their mixture: a dict
                `{"lm", "si", "prototype"}` of `(batch, n_labels)` (None for a route the model
                lacks; NaN rows where a route cannot score), from which `mix_routes` gives the
                mixture for any `route_weights` (train.py chooses them this way).
            unlabelled_summaries: Per row, None or `(U, F)` raw summaries of unlabelled speech of
                the row's speaker, added to the speaker statistics (see `forward`).

        Returns:
            `(batch, n_labels)` probabilities (rows sum to 1), in the candidates' order: the LM's,
            mixed with the SI and prototype routes by `config.route_weights` when set.

        Raises:
            ValueError: right-padded prompts, a mask that does not cover prefix + prompt, empty
                candidates, or an LM attention kernel that takes no 4D mask (use "sdpa" or "eager").
        """
        batch = input_ids.shape[0]
        cands, cand_mask = self._expand_candidates(candidate_input_ids, candidate_attention_mask, batch)
        if not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError("classify needs left-padded prompts (the last position of every row must be a token).")
        past = 0 if cache is None else cache.get_seq_length()
        prompt_len = input_ids.shape[1]
        if attention_mask.shape[1] != past + prompt_len:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} positions but the cached prefix ({past}) plus "
                f"input_ids ({prompt_len}) have {past + prompt_len}; it must cover both."
            )
        attention = self.language_model.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"classify scores all candidates in one pass with a 4D attention mask, which the "
                             f"{attention!r} attention kernel does not take; load the model with attn_implementation='sdpa'.")
        n_labels, cand_len = cands.shape[1], cands.shape[2]
        # Candidates side by side, without the columns that are padding in every row.
        column_mask = cand_mask.reshape(batch, n_labels * cand_len)
        kept = column_mask.bool().any(0).nonzero().squeeze(-1)
        cand_ids = cands.masked_fill(cand_mask == 0, 0).reshape(batch, -1)[:, kept]  # pads: any valid id
        cand_of, token_of = kept // cand_len, kept % cand_len

        prompt = self._embed_with_audio(
            input_ids, input_features, feature_attention_mask, audio_hidden_states, audio_hidden_mask,
            audio_label_ids, enrollment_context, unlabelled_summaries=unlabelled_summaries)
        embeds, row_readout, readout_positions = prompt.embeds, prompt.readout, prompt.readout_positions
        candidate_embeds = self.get_input_embeddings()(cand_ids)
        if row_readout is not None:  # as on the answer tokens in training
            candidate_embeds = candidate_embeds + row_readout[:, None, :].to(candidate_embeds.dtype)
            readout_positions = torch.cat([readout_positions, torch.ones_like(cand_ids, dtype=torch.bool)], dim=1)
        embeds = torch.cat([embeds, candidate_embeds], dim=1)
        mask, positions = self._candidate_tree(attention_mask, prompt_len, cand_of, token_of, attention, embeds.dtype)

        # Logits only where they predict a candidate token: the prompt's end predicts token 0 of
        # every candidate, candidate c's token j-1 predicts its token j (the previous kept column).
        previous = prompt_len + torch.arange(len(kept), device=kept.device) - 1
        predictors = torch.where(token_of == 0, prompt_len - 1, previous)
        with self._readout_on_output(readout_positions, row_readout):
            logits = self.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=cache is not None, logits_to_keep=predictors,
            ).logits  # (B, kept, V)
        token_logp = logits.float().log_softmax(-1).gather(-1, cand_ids[..., None]).squeeze(-1)
        token_logp = token_logp * column_mask[:, kept]
        scores = torch.zeros(batch, n_labels, device=token_logp.device).index_add_(1, cand_of, token_logp)
        probs = (scores / cand_mask.sum(-1)).softmax(-1)
        if self.config.context_readout_pointer and prompt.pointers is not None:
            probs = self._mix_pointers(probs, prompt.pointers, cands, cand_mask)
        if not (return_routes or self.config.route_weights or self.config.route_weights_without_enrollment):
            return probs
        routes = self._route_probabilities(probs, prompt.speaker_rows, cands, cand_mask)
        return routes if return_routes else mix_routes(routes, self.config.route_weights,
                                                       self.config.route_weights_without_enrollment)

    def _route_probabilities(self, probs: torch.Tensor, speaker_rows: Optional[list], cands: torch.Tensor,
                             cand_mask: torch.Tensor) -> dict:
        """`{"lm": probs, "si": (B, C) or None, "prototype": (B, C)}` for `classify`'s mixture; the
        rows a route cannot score (no enrollment for the prototype route) are NaN."""
        routes = {"lm": probs, "si": None, "prototype": None}
        if speaker_rows is None:
            return routes
        cand_embeds = self._candidate_embeddings(cands, cand_mask)
        nan = torch.full(probs.shape, float("nan"), device=probs.device)
        prototype, si = nan.clone(), (nan.clone() if self.speaker_routes is not None else None)
        for b, row in enumerate(speaker_rows):
            if not row.last_query:
                continue
            query = row.query_summaries[-1]
            if si is not None:
                si[b] = self.speaker_routes.logits(query[None], row.has_statistics, cand_embeds[b]).softmax(-1)[0]
            if len(row.memory):
                point = prototype_probabilities(query, row.memory_summaries, row.memory_labels, cand_embeds[b],
                                                float(self.config.prototype_temperature))
                if point is not None:
                    prototype[b] = point
        routes.update(si=si, prototype=prototype)
        return routes

    def _mix_pointers(self, probs: torch.Tensor, pointers: list, cands: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """Pointer-generator mixture: row b's probabilities become `(1 − m) · probs + pointer`,
        where `pointer` puts the read-out's attention mass on each enrollment utterance onto the
        candidate with that label and `m` is its total (the rest, "none" and labels outside the
        candidates, stays with the LM). Labels are matched by their answer embeddings, which
        are the same for the same tokens; this works for a profile's enrollment too."""
        cand_embeds = self._candidate_embeddings(cands, cand_mask)  # (B, n_labels, W)
        mixed = []
        for b, pointer in enumerate(pointers):
            if pointer is None:
                mixed.append(probs[b])
                continue
            mass, label_embeds = pointer
            match, found = match_labels(label_embeds, cand_embeds[b])
            point = torch.zeros_like(probs[b]).index_add_(0, match[found], mass[found].to(probs.dtype))
            mixed.append((1 - point.sum()) * probs[b] + point)
        return torch.stack(mixed)

    @staticmethod
    def _candidate_tree(
        attention_mask: torch.Tensor,
        prompt_len: int,
        cand_of: torch.Tensor,
        token_of: torch.Tensor,
        attention: str,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """4D attention mask `(B, 1, P + N, past + P + N)` and position ids `(B, P + N)` for a
        left-padded prompt (its last `prompt_len` = P tokens after `past` cached ones) followed by
        N candidate tokens, column n being token `token_of[n]` of candidate `cand_of[n]`.

        Prompt tokens see the valid prefix/prompt tokens up to themselves; candidate c's token j
        sees the whole valid prompt and candidate c's tokens 0..j, at position `n_valid + j`.
        Every token also sees itself, so padding rows stay finite. The mask is boolean (True =
        attend) for "sdpa" and additive for "eager".
        """
        batch, device = attention_mask.shape[0], attention_mask.device
        valid = attention_mask.bool()  # (B, past + P)
        past, n_cand = valid.shape[1] - prompt_len, len(cand_of)
        causal = torch.ones(prompt_len, past + prompt_len, dtype=torch.bool, device=device).tril(diagonal=past)
        own_tokens = (cand_of[:, None] == cand_of[None, :]) & (token_of[None, :] <= token_of[:, None])

        allowed = torch.zeros(batch, prompt_len + n_cand, past + prompt_len + n_cand, dtype=torch.bool, device=device)
        allowed[:, :prompt_len, : past + prompt_len] = causal & valid[:, None, :]
        allowed[:, prompt_len:, : past + prompt_len] = valid[:, None, :]
        allowed[:, prompt_len:, past + prompt_len :] = own_tokens
        diagonal = torch.arange(prompt_len + n_cand, device=device)
        allowed[:, diagonal, past + diagonal] = True

        prompt_positions = IclSerForConditionalGeneration._positions_from_mask(attention_mask, prompt_len)
        cand_positions = valid.sum(-1, keepdim=True) + token_of[None, :]
        positions = torch.cat([prompt_positions, cand_positions], dim=1)
        if attention == "sdpa":
            return allowed[:, None], positions
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return additive[:, None], positions

    @staticmethod
    def _expand_candidates(
        ids: torch.Tensor, mask: Optional[torch.Tensor], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.ndim == 2:
            ids, mask = ids[None].expand(batch, -1, -1), mask[None].expand(batch, -1, -1)
        if ids.ndim != 3 or ids.shape[0] != batch or ids.shape != mask.shape:
            raise ValueError(
                "candidate_input_ids must be (n_labels, L) or (batch, n_labels, L) with a mask of the same "
                f"shape; got {tuple(ids.shape)} and {tuple(mask.shape)} for batch {batch}."
            )
        if ids.shape[1] == 0 or bool((mask.sum(-1) == 0).any()):
            raise ValueError("Every candidate label needs at least one token; pass non-empty labels.")
        return ids, mask.float()

    # --------------------------------------------------------------------------- generation
    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        """Audio (features, cached encoder outputs and their masks) is used on the prefill step
        only; later steps reuse the cache. Candidate tensors are dropped (classify-only)."""
        kwargs.pop("candidate_input_ids", None)
        kwargs.pop("candidate_attention_mask", None)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("input_features", "feature_attention_mask", "audio_hidden_states", "audio_hidden_mask",
                        "audio_label_ids", "enrollment_context", "unlabelled_summaries"):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)


__all__ = ["IclSerPreTrainedModel", "IclSerForConditionalGeneration", "IclSerProjector", "IclSerContextReadout"]
