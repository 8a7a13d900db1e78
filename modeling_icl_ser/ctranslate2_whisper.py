"""Read a CTranslate2 (faster-whisper) Whisper checkpoint into a transformers ``WhisperEncoder``.

The reader parses the documented binary layout of ``model.bin`` with ``struct``/numpy only;
nothing is unpickled. (Layout, as written by ``ctranslate2.specs.model_spec.ModelSpec._serialize``:
``u32 binary_version, str spec_name, u32 revision, u32 n_variables, n × (str name, u8 rank,
rank × u32 dim, u8 dtype_id, u32 n_bytes, bytes), u32 n_aliases, n × (str alias, str target)``
where ``str`` is ``u16 length-with-NUL`` + UTF-8 bytes + NUL, all little-endian.) A model whose
``model.bin`` ships in several files (:class:`SplitCTranslate2Model`) is joined in memory.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import WhisperConfig

PathLike = Union[str, os.PathLike]

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


def _check_all_loaded(result, what: str, source: str) -> None:
    """Every pretrained weight must land in the target module, and every target weight be set."""
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"Loading the {what} from {source!r} did not match the model: missing keys "
            f"{missing[:10]}, unexpected keys {unexpected[:10]}."
        )


__all__ = [
    "CTranslate2Checkpoint",
    "CTranslate2Source",
    "SplitCTranslate2Model",
    "ctranslate2_whisper_encoder_state_dict",
    "dequantize_ctranslate2_variables",
    "is_ctranslate2_folder",
    "load_ctranslate2_whisper_encoder",
    "read_ctranslate2_model",
]
