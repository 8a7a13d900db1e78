"""Configuration of the icl-ser speech-language model (speech encoder → projector → causal LM)."""


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


def _drop_removed_options(kwargs: dict) -> None:
    """Old config.json keys of options that no longer exist: dropped when off, refused when on
    (the model would compute something else than the checkpoint was made with)."""
    if kwargs.pop("context_readout_pointer", False):
        raise ValueError(
            "This config sets context_readout_pointer=true, an option icl-ser no longer has (classify mixed the "
            "read-out's attention into the LM's probabilities). Load the checkpoint with trust_remote_code=True "
            "to run its own code, or set context_readout_pointer to false in its config.json to score without it."
        )


class IclSerConfig(PretrainedConfig):
    r"""Configuration of [`IclSerForConditionalGeneration`].

    Args:
        audio_config: Config of the speech encoder (Whisper, WavLM, HuBERT, Wav2Vec2, ...), as a
            config object or a dict with `model_type`. Defaults to a small Whisper encoder.
        text_config: Config of the causal LM, as a config object or a dict with `model_type`.
            Defaults to a small Llama.
        num_audio_tokens: LM tokens each utterance is pooled into (equal time segments).
        audio_pooling: `"mean"` or `"mean_std"` (mean and standard deviation per segment).
        audio_feature_layer: Which encoder block's output the projector reads (1 = the first
            block; `None` = the last, after the encoder's final layer norm). Only the blocks up to
            it run. Speaker-specific emotion cues are strongest in early blocks of an ASR encoder
            and fade toward the top (docs/RESULTS.md), so early blocks suit personalization.
        audio_token_dropout: Dropout on the pooled audio features while training (a guard against
            memorizing training utterances); 0 disables it.
        projector_hidden_size: Hidden width of the projector MLP (default: the LM width).
        context_readout_heads: Heads of the enrollment read-out ([`IclSerContextReadout`]): each
            unlabelled (query) utterance is compared with its sample's labelled (enrollment)
            utterances by a learned distance, and the attention-weighted embeddings of their
            label words go onto its audio tokens, the text after them and the LM's output. It
            gives the LM a one-step route from "this query sounds like that enrollment
            utterance" to "that label", which the LM alone does not learn (docs/RESULTS.md).
            0 = no read-out.
        context_readout_dim: Width of each read-out head's query/key space.
        context_readout_dropout: Share of training queries whose read-out is left out (on their
            tokens and the LM's output), so the LM keeps learning to label speech on its own.
        context_readout_loss_coef: Weight of the read-out's own loss (attention on the enrollment
            utterances that share the query's label; `IclSerContextReadout.matching_loss`),
            added to the LM loss in training; 0 = LM loss only.
        speaker_normalization: Standardize each utterance's summary vector (mean and std of its
            frames) by the statistics of its speaker's enrollment utterances (per-dimension mean;
            with K >= 2 also the standard deviation, floored at `speaker_variance_floor` × its
            mean), before the read-out and the routes below; labels are not needed. K = 0 leaves
            the summaries as they are. The label-free speaker normalization that beat every other
            personalization on real speech (docs/RESULTS.md).
        speaker_variance_floor: Floor of the enrollment variance, as a share of its mean over
            dimensions (a dimension on which a few utterances happen to agree must not dominate).
        si_route: Add a speaker-independent route ([`IclSerSpeakerRoutes`]): the summary vector
            mapped into the LM's embedding width, scored against each candidate's label-word
            embedding (open vocabulary through the tied embeddings), with its own head for
            speaker-normalized summaries. It trains beside the LM loss (`si_route_loss_coef`).
        si_route_loss_coef: Weight of the SI route's cross-entropy over each sample's candidates.
        prototype_temperature: Temperature of the parameter-free prototype route: cosine of the
            query's summary to the means of each enrolled label's summaries (speaker-normalized
            when `speaker_normalization`), softmax over the enrolled labels.
        route_weights: How `classify` mixes its routes, `{"lm": a, "si": b, "prototype": c}`:
            `a·p_LM + b·p_SI + c·p_prototype`, weights renormalized over the routes a sample has
            (no prototype route without enrollment). `None` = the LM alone. train.py chooses the
            weights on validation speakers (`evaluation.route_weights.choose_route_weights`).
        route_weights_without_enrollment: The same for samples without enrollment (K = 0), where
            the best mixture differs (no prototype route, the SI route on raw summaries);
            `None` = `route_weights`.
        route_weights_by_k: Weights per enrollment size, `{"0": {...}, "1": {...}, ..., "8": {...}}`:
            a sample with K enrollment utterances mixes by the entry of the largest listed K <= K.
            When set it replaces `route_weights` and `route_weights_without_enrollment`. train.py
            chooses it out of domain (`--route_weights_from held_out_corpora`).
        labels: Default emotion vocabulary (candidate labels when none are given).
        instruction_template: First prompt line; `{labels}` is replaced by the candidate labels
            joined by `label_separator`.
        enrollment_template: One enrollment line; `{audio}` marks the audio placeholders and
            `{answer}` the answer (formatted with `answer_template`).
        query_template: The query line; `{audio}` marks the audio placeholders.
        answer_template: The answer text; `{label}` is the label (also the scored candidate text).
        label_separator: Joins the labels in the instruction.
        audio_token: Placeholder token; each utterance occupies `num_audio_tokens` of them.
        audio_token_id: Its id in the tokenizer (set by the processor/builder). It may lie outside
            the LM vocabulary: the model never looks it up in the embedding table.
        max_audio_seconds: Longest utterance the processor accepts.
    """

    model_type = "icl_ser"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", init_kwargs=_DEFAULT_AUDIO),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=_DEFAULT_TEXT),
    }

    audio_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    num_audio_tokens: int = 8
    audio_pooling: str = "mean_std"
    audio_feature_layer: int | None = None
    audio_token_dropout: float = 0.0
    projector_hidden_size: int | None = None
    context_readout_heads: int = 0
    context_readout_dim: int = 64
    context_readout_dropout: float = 0.0
    context_readout_loss_coef: float = 1.0
    speaker_normalization: bool = False
    speaker_variance_floor: float = 0.01
    si_route: bool = False
    si_route_loss_coef: float = 1.0
    prototype_temperature: float = 0.1
    route_weights: dict | None = None
    route_weights_without_enrollment: dict | None = None
    route_weights_by_k: dict | None = None
    labels: list[str] | None = None
    instruction_template: str = DEFAULT_INSTRUCTION
    enrollment_template: str = DEFAULT_ENROLLMENT
    query_template: str = DEFAULT_QUERY
    answer_template: str = DEFAULT_ANSWER
    label_separator: str = ", "
    audio_token: str = DEFAULT_AUDIO_TOKEN
    audio_token_id: int | None = None
    max_audio_seconds: float = 30.0

    def __post_init__(self, **kwargs):
        _drop_removed_options(kwargs)
        super().__post_init__(**kwargs)
        if self.labels is None:
            self.labels = list(DEFAULT_LABELS)
        self.labels = list(self.labels)
        self.validate_settings()

    def validate_settings(self) -> None:
        """Raise `ValueError` for settings the model cannot work with."""
        if self.audio_pooling not in ("mean", "mean_std"):
            raise ValueError(f'audio_pooling must be "mean" or "mean_std", got {self.audio_pooling!r}.')
        if int(self.num_audio_tokens) < 1:
            raise ValueError(f"num_audio_tokens must be >= 1, got {self.num_audio_tokens}.")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be a non-empty list of distinct strings, got {self.labels!r}.")
        if self.audio_feature_layer is not None:
            depth = getattr(self.audio_config, "encoder_layers", None) or getattr(self.audio_config, "num_hidden_layers", None)
            if not 1 <= int(self.audio_feature_layer) <= int(depth or 10**6):
                raise ValueError(
                    f"audio_feature_layer must be between 1 and the encoder's {depth} blocks (or None for the "
                    f"last), got {self.audio_feature_layer}."
                )
        if int(self.context_readout_heads) < 0 or int(self.context_readout_dim) < 1:
            raise ValueError(f"context_readout_heads must be >= 0 (0 = off) and context_readout_dim >= 1, got "
                             f"{self.context_readout_heads} and {self.context_readout_dim}.")
        if not 0.0 <= float(self.context_readout_dropout) < 1.0:
            raise ValueError(f"context_readout_dropout must be in [0, 1), got {self.context_readout_dropout}.")
        if not 0.0 <= float(self.audio_token_dropout) < 1.0:
            raise ValueError(f"audio_token_dropout must be in [0, 1), got {self.audio_token_dropout}.")
        if float(self.speaker_variance_floor) < 0 or float(self.prototype_temperature) <= 0:
            raise ValueError(f"speaker_variance_floor must be >= 0 and prototype_temperature > 0, got "
                             f"{self.speaker_variance_floor} and {self.prototype_temperature}.")
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
        audio_type = getattr(self.audio_config, "model_type", None)
        if audio_type not in WHISPER_MODEL_TYPES + WAV2VEC2_MODEL_TYPES:
            raise ValueError(
                f"Unsupported audio encoder model_type {audio_type!r}; use one of "
                f"{', '.join(WHISPER_MODEL_TYPES + WAV2VEC2_MODEL_TYPES)}."
            )
        for name, marker in (("enrollment_template", "{audio}"), ("enrollment_template", "{answer}"),
                             ("query_template", "{audio}"), ("answer_template", "{label}")):
            if marker not in getattr(self, name):
                raise ValueError(f"{name} must contain {marker}, got {getattr(self, name)!r}.")

    @property
    def is_whisper_encoder(self) -> bool:
        """True when the audio encoder is Whisper-style (log-mel input, conv stem, fixed positions)."""
        return self.audio_config.model_type in WHISPER_MODEL_TYPES


__all__ = ["IclSerConfig", "DEFAULT_LABELS", "ROUTES"]
