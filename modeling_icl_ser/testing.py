"""Tiny random icl-ser models for tests: no downloads, deterministic by seed, fast on CPU."""

from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    PreTrainedTokenizerFast,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_icl_ser import DEFAULT_LABELS, IclSerConfig
from .modeling_icl_ser import IclSerForConditionalGeneration
from .processing_icl_ser import IclSerProcessor

_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
_CORPUS = (
    "Classify the speaker's emotion as one of: {labels}.\n"
    "Speech: Emotion: {labels}\n"
    "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()-\n"
)


def tiny_tokenizer(labels: Optional[list[str]] = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on the prompt template and the labels."""
    words = ", ".join(list(DEFAULT_LABELS) + list(labels or []))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS.format(labels=words)] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_audio_config(audio_model_type: str):
    if audio_model_type == "whisper":
        return WhisperConfig(
            num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=1500,
            vocab_size=64, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1,
        )
    # wav2vec2 family: a 3-layer conv stem with total stride 320 (50 frames/s, as the real ones).
    # "layer" feature-extractor norm keeps frames independent of batch padding.
    return CONFIG_MAPPING[audio_model_type](
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8), feat_extract_norm="layer",
        do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0, mask_feature_prob=0.0, vocab_size=32,
    )


# The options whose `IclSerConfig` default adds a part or cuts the encoder, off for the tiny model.
BARE_OPTIONS = {"context_readout_heads": 0, "context_readout_dropout": 0.0, "audio_feature_layer": None}


def tiny_icl_ser(
    labels: Optional[list[str]] = None, seed: int = 0, audio_model_type: str = "whisper", num_audio_tokens: int = 4,
    **config_kwargs,
) -> tuple[IclSerForConditionalGeneration, IclSerProcessor]:
    """A random tiny model and its processor (eval mode, float32).

    Args:
        labels: Label vocabulary (default: the emotion vocabulary).
        seed: Seeds the weights; equal seeds give equal models.
        audio_model_type: `"whisper"` or a wav2vec2-family type (`"wav2vec2"`, `"hubert"`, `"wavlm"`).
        num_audio_tokens: Tokens per utterance.
        **config_kwargs: Other `IclSerConfig` fields (`audio_pooling`, `audio_feature_layer`, ...).
            Unless given, the model is the bare architecture (`BARE_OPTIONS`: no read-out, the
            encoder's last block), so a test switches on only what it tests.
    """
    config_kwargs = {**BARE_OPTIONS, **config_kwargs}
    labels = list(labels) if labels is not None else list(DEFAULT_LABELS)
    tokenizer = tiny_tokenizer(labels)
    text_vocab = len(tokenizer)  # before the audio token is added: it stays outside the LM vocabulary
    if audio_model_type == "whisper":
        extractor = WhisperFeatureExtractor(feature_size=80)
    else:
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                             return_attention_mask=True)
    config = IclSerConfig(
        audio_config=_tiny_audio_config(audio_model_type),
        text_config=LlamaConfig(
            vocab_size=text_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        ),
        num_audio_tokens=num_audio_tokens,
        projector_hidden_size=64,
        labels=labels,
        **config_kwargs,
    )
    processor = IclSerProcessor.from_model_config(extractor, tokenizer, config)
    config.audio_token_id = processor.audio_token_id
    torch.manual_seed(seed)
    model = IclSerForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


# Formants (Hz) of six vowels, for `synthetic_speech`.
_VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410), (660, 1720, 2410))


def synthetic_speech(seconds: float, seed: int = 0, pitch: float = 120.0, amplitude: float = 0.3,
                     sampling_rate: int = 16000):
    """Vowel babble that a voice-activity detector takes for speech: a glottal pulse train at
    `pitch` Hz (with jitter and vibrato) through three formant resonators, a new vowel every
    200 ms with a syllable envelope, plus faint noise. float32 mono samples."""
    import numpy as np
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n, syllable = int(round(seconds * sampling_rate)), int(0.2 * sampling_rate)
    out = np.zeros(n)
    for start in range(0, n, syllable):
        m = min(syllable, n - start)
        t = np.arange(m) / sampling_rate
        f0 = pitch * (1 + 0.1 * rng.standard_normal()) * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
        pulses = (np.diff(np.floor(np.cumsum(f0) / sampling_rate), prepend=0) > 0).astype(float)
        for formant in _VOWELS[rng.integers(len(_VOWELS))]:
            r, theta = np.exp(-np.pi * 80 / sampling_rate), 2 * np.pi * formant / sampling_rate
            pulses = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], pulses)
        out[start:start + m] = pulses * np.sin(np.pi * np.arange(m) / m) ** 0.5
    out = out / max(np.abs(out).max(), 1e-12) * amplitude
    return (out + 0.003 * rng.standard_normal(n)).astype(np.float32)


__all__ = ["synthetic_speech", "tiny_icl_ser", "tiny_tokenizer"]
