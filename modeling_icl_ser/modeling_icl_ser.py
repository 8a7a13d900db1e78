"""icl-ser: a speech encoder, a pooling projector and a causal LM that labels a query utterance
from a speaker's enrollment (utterance, emotion) pairs given in context.

Transformers model-file idiom with relative imports only, so that a saved checkpoint runs with
``trust_remote_code=True`` where this package is not installed. This file holds the model
(`IclSerForConditionalGeneration`); its parts live beside it, one job per file:

* ``projector.py``: `IclSerProjector`, encoder frames -> LM-width audio tokens;
* ``readout.py``: `IclSerContextReadout`, the enrollment read-out;
* ``speaker_routes.py``: speaker normalization, the SI route and the prototype route;
* ``speaker_context.py`` / ``scoring.py``: the model's enrollment plumbing and ``classify``
  (mixins);
* ``route_mixing.py``: `mix_routes`, how ``classify`` mixes the routes;
* ``checkpointing.py``: fingerprints and the code files a saved folder carries.
"""

import contextlib
import importlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils.deprecation import deprecate_kwarg

from .checkpointing import (
    CUSTOM_PIPELINES,
    ENCODER_PASS_VERSION,
    MODEL_FINGERPRINT_VERSION,
    config_and_weights_digest,
    pipeline_at_hand,
    save_code_files,
)
from .configuration_icl_ser import IclSerConfig
from .projector import IclSerProjector
from .readout import IclSerContextReadout
from .route_mixing import mix_routes  # noqa: F401  (re-exported: this module's import path of earlier versions)
from .scoring import IclSerScoringMixin
from .speaker_context import IclSerSpeakerContextMixin
from .speaker_routes import IclSerSpeakerRoutes, speaker_standardize  # noqa: F401  (re-exported, as mix_routes)

logger = logging.getLogger(__name__)


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
        speaker_rows: Per row, its `SpeakerRow` (what the SI and prototype routes read), or None
            for a model without read-out or SI route.
    """

    embeds: torch.Tensor
    readout_loss: Optional[torch.Tensor] = None
    readout: Optional[torch.Tensor] = None
    readout_positions: Optional[torch.Tensor] = None
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


class IclSerForConditionalGeneration(IclSerScoringMixin, IclSerSpeakerContextMixin, IclSerPreTrainedModel, GenerationMixin):
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
        Only in the installed package: the backbone loaders are not part of a checkpoint, so
        they are imported by name here (a `from .backbones import` line would make transformers
        copy them into every saved folder).
        """
        try:
            backbones = importlib.import_module(".backbones", __package__)
        except ImportError as error:
            raise ImportError("from_backbones needs the icl-ser package (pip install icl-ser); a model loaded "
                              "from a checkpoint's remote code has no backbone loaders.") from error
        return backbones.from_backbones(audio_encoder, language_model, labels=labels, **config_kwargs)

    # Embeddings and sub-models
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

    # Audio features
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
        version = ENCODER_PASS_VERSION
        if self.config.audio_feature_layer is not None:  # other blocks, other features
            version += f"-block{int(self.config.audio_feature_layer)}"
        return config_and_weights_digest(version, self.config.audio_config, self.audio_tower)

    def fingerprint(self) -> str:
        """A stable hex digest of the whole model: its config and every weight (with dtypes).

        Anything computed from the model's hidden states (e.g. a speaker profile's key/value
        cache) is only valid for a model with the same fingerprint. Hashes every weight, so it
        takes a moment for large models; callers cache it.
        """
        return config_and_weights_digest(MODEL_FINGERPRINT_VERSION, self.config, self)

    # Saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus every code file the checkpoint needs
        (`checkpointing.checkpoint_code_files`: the model's, the processor's and the
        `"icl-speech-emotion"` pipeline's modules) and a `custom_pipelines` entry in config.json,
        so `pipeline("icl-speech-emotion", model=folder, trust_remote_code=True)` runs on a
        plain `model.save_pretrained` + `processor.save_pretrained` folder too.

        The pipeline is skipped (with a warning, and any inherited `custom_pipelines` left out of
        the saved config) when its code is not at hand, e.g. a model loaded from remote code
        without its pipeline; the folder then still loads with `AutoModel`.
        """
        registered = getattr(self, "_auto_class", None) is not None  # code files get copied
        with_pipeline = registered and pipeline_at_hand()
        if registered and not with_pipeline:
            logger.warning("The icl-speech-emotion pipeline code is not loaded; %s will load with AutoModel "
                           "but not with pipeline(...).", save_directory)
        # Changed while saving only, so the in-memory config stays as it was. Without the code
        # file, an inherited entry is left out: the folder must not name code it lacks.
        had = hasattr(self.config, "custom_pipelines")
        inherited = getattr(self.config, "custom_pipelines", None)
        if with_pipeline:
            self.config.custom_pipelines = inherited or json.loads(json.dumps(CUSTOM_PIPELINES))
        elif had:
            del self.config.custom_pipelines
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had:
                self.config.custom_pipelines = inherited
            elif hasattr(self.config, "custom_pipelines"):
                del self.config.custom_pipelines
        if registered and kwargs.get("is_main_process", True):
            save_code_files(save_directory)
        return result

    # Prompt embedding: audio tokens in place of the placeholders
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
        audio_statistics: Optional[list] = None,
    ) -> EmbeddedPrompt:
        """Prompt embeddings with the audio tokens in place, and what the read-out adds (see
        `EmbeddedPrompt`); its matching loss when `query_answers` (each row's query answer ids,
        for training) are given."""
        n_audio = self._count_audios(input_features, audio_hidden_states)
        placeholders = self._check_placeholders(input_ids, n_audio)
        uses_rows = (self.context_readout is not None or self.speaker_routes is not None
                     or bool(self.config.speaker_normalized_audio_tokens))
        if uses_rows:
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
        readout_loss = row_readout = after = speaker_rows = None
        readout_loss_rows = 0
        if uses_rows:
            speaker_rows, labelled = self._speaker_rows(placeholders, hidden, hidden_mask, audio_label_ids, enrollment_context,
                                                        unlabelled_summaries)
        shift, scale = self._audio_statistics(speaker_rows, hidden, audio_statistics)
        audio_tokens = self.projector(hidden, hidden_mask, shift, scale)
        audio_tokens = audio_tokens * self._text_embedding_rms()
        if self.context_readout is not None:
            readout, (readout_loss, readout_loss_rows) = self._read_enrollment(
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
        return EmbeddedPrompt(embeds, readout_loss, row_readout, after, readout_loss_rows, speaker_rows)

    def _audio_statistics(self, speaker_rows: Optional[list], hidden: torch.Tensor,
                          fixed: Optional[list] = None) -> tuple:
        """Per audio, its speaker's `(shift, scale)` for the projector (`speaker_normalized_audio_tokens`),
        as `(n_audio, 2D)` tensors (zeros and ones for rows without statistics); `(None, None)` when off.
        `fixed` (per row None or a `(2, 2D)` tensor) replaces a row's statistics (a profile's, so the
        query is normalized as its cached enrollment prefix was)."""
        if not self.config.speaker_normalized_audio_tokens or speaker_rows is None:
            return None, None
        if fixed is not None and len(fixed) != len(speaker_rows):
            raise ValueError(f"audio_statistics has {len(fixed)} entries for a batch of {len(speaker_rows)}; pass one "
                             "(2, F) tensor or None per row.")
        width = 2 * hidden.shape[-1]
        shift = torch.zeros(hidden.shape[0], width, device=hidden.device)
        scale = torch.ones(hidden.shape[0], width, device=hidden.device)
        for i, row in enumerate(speaker_rows):
            statistics = row.statistics if fixed is None or fixed[i] is None else fixed[i]
            if statistics is not None:
                audios = torch.cat([row.queries, row.enrolled])
                shift[audios], scale[audios] = statistics[0].to(shift.device), statistics[1].to(scale.device)
        return shift, scale

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
                raise RuntimeError(f"read-out positions {tuple(positions.shape)} do not match the LM's "
                                   f"{tuple(output.shape[:2])}.")
            return output + positions[..., None].to(output.dtype) * delta[:, None, :].to(output.dtype)

        handle = norm.register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()

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

    # Forward pass and loss
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
        unlabelled_input_features: Optional[torch.Tensor] = None,
        unlabelled_feature_attention_mask: Optional[torch.Tensor] = None,
        unlabelled_row_index: Optional[torch.LongTensor] = None,
        audio_statistics: Optional[list] = None,
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
            unlabelled_input_features / unlabelled_feature_attention_mask / unlabelled_row_index:
                the same speech as audio features, as `processor(..., unlabelled=...)` returns
                them (each clip's row in `unlabelled_row_index`), instead of `unlabelled_summaries`.
            audio_statistics: Per row, None or a `(2, F)` tensor (shift; scale) that normalizes the
                row's LM input instead of its speaker statistics (`speaker_normalized_audio_tokens`;
                a speaker profile's, fixed when its prefix was cached).

        Raises:
            ValueError: placeholder count ≠ `num_audio_tokens` × number of audios, or both
                `input_features` and `audio_hidden_states` given.
        """
        answers = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (or inputs_embeds).")
            unlabelled_summaries = self.unlabelled_from_features(
                unlabelled_summaries, unlabelled_input_features, unlabelled_feature_attention_mask, unlabelled_row_index,
                input_ids.shape[0])
            if labels is not None and ((self.context_readout is not None and self.config.context_readout_loss_coef)
                                       or (self.speaker_routes is not None and self.config.si_route_loss_coef)):
                answers = self._query_answers(labels)
            prompt = self._embed_with_audio(
                input_ids, input_features, feature_attention_mask, audio_hidden_states, audio_hidden_mask,
                audio_label_ids, enrollment_context, answers, unlabelled_summaries, audio_statistics,
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

    # Generation
    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        """Audio (features, cached encoder outputs and their masks) is used on the prefill step
        only; later steps reuse the cache. Candidate tensors are dropped (classify-only)."""
        kwargs.pop("candidate_input_ids", None)
        kwargs.pop("candidate_attention_mask", None)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("input_features", "feature_attention_mask", "audio_hidden_states", "audio_hidden_mask",
                        "audio_label_ids", "enrollment_context", "unlabelled_summaries", "unlabelled_input_features",
                        "unlabelled_feature_attention_mask", "unlabelled_row_index", "audio_statistics"):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)


__all__ = ["IclSerPreTrainedModel", "IclSerForConditionalGeneration", "IclSerProjector", "IclSerContextReadout",
           "mix_routes", "speaker_standardize"]
