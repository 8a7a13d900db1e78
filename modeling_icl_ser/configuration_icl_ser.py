"""Configuration of the icl-ser speech-language model (speech encoder → projector → causal LM).

The model's own options come in four groups, one dataclass each (as peft has one config per
method); `IclSerConfig` is all four plus the two backbone configs, and its config.json keeps
their keys flat:

* `IclSerAudioOptions`: how an utterance becomes LM tokens (encoder block, pooling, projector);
* `IclSerReadoutOptions`: the enrollment read-out (``context_readout_*``);
* `IclSerRouteOptions`: speaker normalization and the routes `classify` mixes;
* `IclSerPromptOptions`: the label vocabulary and the prompt's text.

Each field's default here is the single home of that default: train.py's flags and the backbone
builders read it from here (tests/test_train.py compares them), and each group's `check` holds
its checks, which train.py runs on its flags before any heavy work.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Emotion vocabulary shared by the corpora the data layer maps onto.
DEFAULT_LABELS = ["anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]

DEFAULT_INSTRUCTION = "Classify the speaker's emotion as one of: {labels}.\n"
DEFAULT_ENROLLMENT = "Speech: {audio} Emotion:{answer}"
DEFAULT_QUERY = "Speech: {audio} Emotion:"
DEFAULT_ANSWER = " {label}\n"
DEFAULT_AUDIO_TOKEN = "<|audio|>"

# Encoders whose frame features and masks the model knows how to compute.
WHISPER_MODEL_TYPES = ("whisper",)
WAV2VEC2_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "wav2vec2-conformer", "data2vec-audio", "unispeech-sat")

# Small defaults (like llava's) so `IclSerConfig()` builds a model; real runs pass real sub-configs.
_DEFAULT_AUDIO = {
    "d_model": 384,
    "encoder_layers": 4,
    "encoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_layers": 1,
    "decoder_attention_heads": 6,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
}
_DEFAULT_TEXT = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}


# The routes `classify` can mix (IclSerConfig.route_weights).
ROUTES = ("lm", "si", "prototype")

# Version of the config layout, written into config.json. A config.json without it was written
# before the defaults below moved here (layout 1): its missing keys take that layout's defaults.
CONFIG_LAYOUT_VERSION = 2
_LAYOUT_1_DEFAULTS = {"audio_feature_layer": None, "context_readout_heads": 0, "context_readout_dropout": 0.0}


def _option(default: Any, help: str, **kwargs) -> Any:
    """A config field with its default and what it does (peft's `field(metadata={"help": ...})`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(kw_only=True)
class IclSerAudioOptions:
    """How each utterance becomes `num_audio_tokens` LM tokens ([`IclSerProjector`])."""

    num_audio_tokens: int = _option(8, "LM tokens each utterance is pooled into (equal time segments).")
    audio_pooling: str = _option("mean_std", '"mean" or "mean_std" (mean and standard deviation per segment).')
    audio_feature_layer: Optional[int] = _option(
        2, "Which encoder block's output the projector and the read-out read (1 = the first block; None = the last, "
           "after the encoder's final layer norm). Only the blocks up to it run.")
    audio_token_dropout: float = _option(
        0.0, "Dropout on the pooled audio features while training; 0 disables it.")
    projector_hidden_size: Optional[int] = _option(None, "Hidden width of the projector MLP (None: the LM width).")
    max_audio_seconds: float = _option(30.0, "Longest utterance the processor accepts.")

    def check_audio_options(self, encoder_depth: Optional[int] = None) -> None:
        """Raise `ValueError` for audio options the model cannot work with (`encoder_depth`: the
        encoder's blocks, when known)."""
        if self.audio_pooling not in ("mean", "mean_std"):
            raise ValueError(f'audio_pooling must be "mean" or "mean_std", got {self.audio_pooling!r}.')
        if int(self.num_audio_tokens) < 1:
            raise ValueError(f"num_audio_tokens must be >= 1, got {self.num_audio_tokens}.")
        if self.audio_feature_layer is not None and not 1 <= int(self.audio_feature_layer) <= int(encoder_depth or 10**6):
            raise ValueError(
                f"audio_feature_layer must be between 1 and the encoder's {encoder_depth or 'number of'} blocks (or "
                f"None for the last), got {self.audio_feature_layer}."
            )
        if not 0.0 <= float(self.audio_token_dropout) < 1.0:
            raise ValueError(f"audio_token_dropout must be in [0, 1), got {self.audio_token_dropout}.")


@dataclass(kw_only=True)
class IclSerReadoutOptions:
    """The enrollment read-out ([`IclSerContextReadout`]): each unlabelled (query) utterance is
    compared with its sample's labelled (enrollment) utterances by a learned distance, and the
    attention-weighted embeddings of their label words go onto its audio tokens, the text after
    them and the LM's output (docs/ARCHITECTURE.md, "Enrollment read-out")."""

    context_readout_heads: int = _option(4, "Heads of the enrollment read-out; 0 = no read-out.")
    context_readout_dim: int = _option(64, "Width of each read-out head's query/key space.")
    context_readout_dropout: float = _option(
        0.5, "Share of training queries whose read-out is left out (on their tokens and the LM's output), so the LM "
             "keeps learning to label speech on its own.")
    context_readout_loss_coef: float = _option(
        1.0, "Weight of the read-out's matching loss (`IclSerContextReadout.matching_loss`), added to the LM loss in "
             "training; 0 = LM loss only.")

    def check_readout_options(self) -> None:
        """Raise `ValueError` for read-out options the model cannot work with."""
        if int(self.context_readout_heads) < 0 or int(self.context_readout_dim) < 1:
            raise ValueError(f"context_readout_heads must be >= 0 (0 = off) and context_readout_dim >= 1, got "
                             f"{self.context_readout_heads} and {self.context_readout_dim}.")
        if not 0.0 <= float(self.context_readout_dropout) < 1.0:
            raise ValueError(f"context_readout_dropout must be in [0, 1), got {self.context_readout_dropout}.")


@dataclass(kw_only=True)
class IclSerRouteOptions:
    """Speaker normalization and the routes `classify` mixes with the LM's answer
    (docs/ARCHITECTURE.md, "Speaker normalization and the routes")."""

    speaker_normalization: bool = _option(
        False, "Standardize each utterance's summary vector (mean and std of its frames) by the statistics of its "
               "speaker: the enrollment utterances plus any unlabelled speech of the speaker (per-dimension mean; with "
               "2 or more utterances also the standard deviation, floored at `speaker_variance_floor` × its mean), "
               "before the read-out and the routes; labels are not needed. Without either the summaries stay as they are.")
    speaker_normalized_audio_tokens: bool = _option(
        False, "Feed the LM speaker-normalized speech too: the projector's pooled segments (mean and std of their "
               "frames) are standardized by the same speaker statistics as the summaries (`speaker_normalization`), "
               "so the LM compares a query with its enrollment after the speaker's offset is removed. Rows without "
               "statistics (K = 0 and no unlabelled speech) stay as they are. Needs `speaker_normalization`.")
    speaker_variance_floor: float = _option(
        0.01, "Floor of the enrollment variance, as a share of its mean over dimensions (a dimension on which a few "
              "utterances happen to agree must not dominate).")
    si_route: bool = _option(
        False, "Add the speaker-independent route ([`IclSerSpeakerRoutes`]): the summary vector mapped into the LM's "
               "embedding width and scored against each candidate's label-word embedding, with its own head for "
               "speaker-normalized summaries. train.py fits it before meta-training (`--si_route_fit`) or beside the "
               "LM loss.")
    si_route_loss_coef: float = _option(1.0, "Weight of the SI route's cross-entropy over each sample's candidates.")
    prototype_temperature: float = _option(
        0.1, "Temperature of the parameter-free prototype route: cosine of the query's summary to the means of each "
             "enrolled label's summaries (speaker-normalized with `speaker_normalization`), softmax over the "
             "enrolled labels.")
    route_weights: Optional[dict] = _option(
        None, 'How `classify` mixes its routes, {"lm": a, "si": b, "prototype": c}: a·p_LM + b·p_SI + c·p_prototype, '
              "weights renormalized over the routes a sample has (no prototype route without enrollment). None = the "
              "LM alone. train.py chooses them on validation speakers.")
    route_weights_without_enrollment: Optional[dict] = _option(
        None, "The same for samples without enrollment (K = 0); None = `route_weights`.")
    route_weights_by_k: Optional[dict] = _option(
        None, 'Weights per enrollment size, {"0": {...}, "1": {...}, ..., "8": {...}}: a sample with K enrollment '
              "utterances mixes by the entry of the largest listed K <= K. When set it replaces `route_weights` and "
              "`route_weights_without_enrollment`. train.py chooses it out of domain (`--route_weights_from "
              "held_out_corpora`).")

    def check_route_options(self) -> None:
        """Raise `ValueError` for route options the model cannot work with."""
        if float(self.speaker_variance_floor) < 0 or float(self.prototype_temperature) <= 0:
            raise ValueError(f"speaker_variance_floor must be >= 0 and prototype_temperature > 0, got "
                             f"{self.speaker_variance_floor} and {self.prototype_temperature}.")
        if self.speaker_normalized_audio_tokens and not self.speaker_normalization:
            raise ValueError("speaker_normalized_audio_tokens standardizes the LM's audio input by the speaker statistics "
                             "of speaker_normalization; set speaker_normalization=True too.")
        checked = [(name, getattr(self, name)) for name in ("route_weights", "route_weights_without_enrollment")]
        if self.route_weights_by_k is not None:
            if not isinstance(self.route_weights_by_k, dict) or not all(str(k).isdigit() for k in self.route_weights_by_k):
                raise ValueError(f"route_weights_by_k must map enrollment sizes K (>= 0) to route weights, got "
                                 f"{self.route_weights_by_k!r}.")
            checked += [(f"route_weights_by_k[{k}]", w) for k, w in self.route_weights_by_k.items()]
        for name, weights in checked:
            if weights is None:
                continue
            weights = dict(weights)
            unknown = sorted(set(weights) - set(ROUTES))
            if unknown or any(float(v) < 0 for v in weights.values()) or sum(float(v) for v in weights.values()) <= 0:
                raise ValueError(f"{name} must map some of {ROUTES} to weights >= 0 with a positive sum, got "
                                 f"{weights!r}.")
            if float(weights.get("si", 0)) > 0 and not self.si_route:
                raise ValueError(f"{name} gives the SI route a weight but the model has none; set si_route=True "
                                 "(and train it) or drop 'si'.")


@dataclass(kw_only=True)
class IclSerPromptOptions:
    """The label vocabulary and the prompt's text (docs/ARCHITECTURE.md, "Sequence format")."""

    labels: Optional[list[str]] = _option(None, "Default emotion vocabulary (None: DEFAULT_LABELS).")
    instruction_template: str = _option(
        DEFAULT_INSTRUCTION, "First prompt line; {labels} is replaced by the candidate labels joined by "
                             "`label_separator`.")
    enrollment_template: str = _option(
        DEFAULT_ENROLLMENT, "One enrollment line; {audio} marks the audio placeholders and {answer} the answer "
                            "(formatted with `answer_template`).")
    query_template: str = _option(DEFAULT_QUERY, "The query line; {audio} marks the audio placeholders.")
    answer_template: str = _option(DEFAULT_ANSWER, "The answer text; {label} is the label (also the scored candidate).")
    label_separator: str = _option(", ", "Joins the labels in the instruction.")
    audio_token: str = _option(DEFAULT_AUDIO_TOKEN, "Placeholder token; each utterance occupies `num_audio_tokens`.")
    audio_token_id: Optional[int] = _option(
        None, "Its id in the tokenizer (set by the processor/builder). It may lie outside the LM vocabulary: the "
              "model never looks it up in the embedding table.")

    def check_prompt_options(self) -> None:
        """Raise `ValueError` for a label list or templates the processor cannot work with."""
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"labels must be a non-empty list of distinct strings, got {self.labels!r}.")
        for name, marker in (("enrollment_template", "{audio}"), ("enrollment_template", "{answer}"),
                             ("query_template", "{audio}"), ("answer_template", "{label}")):
            if marker not in getattr(self, name):
                raise ValueError(f"{name} must contain {marker}, got {getattr(self, name)!r}.")


OPTION_GROUPS = (IclSerAudioOptions, IclSerReadoutOptions, IclSerRouteOptions, IclSerPromptOptions)


def option_default(name: str) -> Any:
    """The default of one model option (the value `IclSerConfig()` has)."""
    for group in OPTION_GROUPS:
        for option in dataclasses.fields(group):
            if option.name == name:
                return option.default_factory() if option.default_factory is not dataclasses.MISSING else option.default
    raise KeyError(f"{name!r} is not an IclSerConfig option.")


def check_options(encoder_depth: Optional[int] = None, **options) -> None:
    """Run every group's checks on `options` (the others at their defaults) without building a
    model config: what train.py runs on its flags before any heavy work."""
    known = {option.name for group in OPTION_GROUPS for option in dataclasses.fields(group)}
    if set(options) - known:
        raise ValueError(f"Unknown IclSerConfig option(s) {sorted(set(options) - known)}.")

    def values(group):
        names = {option.name for option in dataclasses.fields(group)}
        return group(**{name: value for name, value in options.items() if name in names})

    values(IclSerAudioOptions).check_audio_options(encoder_depth)
    values(IclSerReadoutOptions).check_readout_options()
    values(IclSerRouteOptions).check_route_options()
    values(IclSerPromptOptions).check_prompt_options()


def _drop_removed_options(kwargs: dict) -> None:
    """Old config.json keys of options that no longer exist: dropped when off, refused when on
    (the model would compute something else than the checkpoint was made with)."""
    if kwargs.pop("context_readout_pointer", False):
        raise ValueError(
            "This config sets context_readout_pointer=true, an option icl-ser no longer has (classify mixed the "
            "read-out's attention into the LM's probabilities). Load the checkpoint with trust_remote_code=True "
            "to run its own code, or set context_readout_pointer to false in its config.json to score without it."
        )


class IclSerConfig(PretrainedConfig, IclSerAudioOptions, IclSerReadoutOptions, IclSerRouteOptions, IclSerPromptOptions):
    r"""Configuration of [`IclSerForConditionalGeneration`].

    Args:
        audio_config: Config of the speech encoder (Whisper, WavLM, HuBERT, Wav2Vec2, ...), as a
            config object or a dict with `model_type`. Defaults to a small Whisper encoder.
        text_config: Config of the causal LM, as a config object or a dict with `model_type`.
            Defaults to a small Llama.
        **options: The fields of [`IclSerAudioOptions`], [`IclSerReadoutOptions`],
            [`IclSerRouteOptions`] and [`IclSerPromptOptions`] (each documented there).

    An old config.json loads too: one without `config_layout_version` takes the defaults it was
    written with for its missing keys, and the removed `context_readout_pointer` is dropped when
    false (a `ValueError` names the ways to load one that sets it true).
    """

    model_type = "icl_ser"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", init_kwargs=_DEFAULT_AUDIO),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=_DEFAULT_TEXT),
    }

    audio_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    config_layout_version: int = CONFIG_LAYOUT_VERSION

    def __post_init__(self, **kwargs):
        _drop_removed_options(kwargs)
        super().__post_init__(**kwargs)
        if self.labels is None:
            self.labels = list(DEFAULT_LABELS)
        self.labels = list(self.labels)
        self.validate_settings()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """`PretrainedConfig.from_dict`, reading config.json files of every layout (see the class docstring)."""
        if "config_layout_version" not in config_dict:
            config_dict = {**_LAYOUT_1_DEFAULTS, **config_dict, "config_layout_version": CONFIG_LAYOUT_VERSION}
        return super().from_dict(config_dict, **kwargs)

    def validate_settings(self) -> None:
        """Raise `ValueError` for settings the model cannot work with."""
        depth = getattr(self.audio_config, "encoder_layers", None) or getattr(self.audio_config, "num_hidden_layers", None)
        self.check_audio_options(depth)
        self.check_readout_options()
        self.check_route_options()
        self.check_prompt_options()
        audio_type = getattr(self.audio_config, "model_type", None)
        if audio_type not in WHISPER_MODEL_TYPES + WAV2VEC2_MODEL_TYPES:
            raise ValueError(
                f"Unsupported audio encoder model_type {audio_type!r}; use one of "
                f"{', '.join(WHISPER_MODEL_TYPES + WAV2VEC2_MODEL_TYPES)}."
            )

    @property
    def is_whisper_encoder(self) -> bool:
        """True when the audio encoder is Whisper-style (log-mel input, conv stem, fixed positions)."""
        return self.audio_config.model_type in WHISPER_MODEL_TYPES


__all__ = [
    "DEFAULT_LABELS",
    "IclSerAudioOptions",
    "IclSerConfig",
    "IclSerPromptOptions",
    "IclSerReadoutOptions",
    "IclSerRouteOptions",
    "ROUTES",
    "check_options",
    "option_default",
]
