"""What identifies a checkpoint, and the code a saved folder carries.

* Fingerprints: stable digests of a config and a module's weights (the feature cache keys on
  the encoder's, a speaker profile's cache on the whole model's).
* Code files: the modules a saved folder needs to run with ``trust_remote_code=True`` where this
  package is not installed, and the ``"icl-speech-emotion"`` pipeline entry of its config.json.
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers.dynamic_module_utils import get_relative_imports

# Bumped whenever the model's encoder pass changes what features it computes (feature-cache key).
ENCODER_PASS_VERSION = "icl_ser-encoder-v1"
# Bumped whenever the model's prompt pass changes what a speaker profile's cache holds.
MODEL_FINGERPRINT_VERSION = "icl_ser-model-v1"
# Config keys that do not change what the model computes.
_FINGERPRINT_IGNORED_KEYS = (
    "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "auto_map", "custom_pipelines",
    "config_layout_version",
)


# The modules a checkpoint's code starts from: those of the Auto classes (config, model,
# processor) and the pipeline's. A checkpoint carries them and every module they import
# relatively, transitively (`checkpoint_code_files`): a new file in this folder that they import
# travels with it, and one they do not import (testing.py, the backbone loaders) stays out.
CHECKPOINT_MODULES = ("configuration_icl_ser", "modeling_icl_ser", "processing_icl_ser", "pipeline_icl_ser")
PIPELINE_MODULE = "pipeline_icl_ser"
# What `Pipeline.save_pretrained` writes for the "icl-speech-emotion" pipeline; a plain
# `model.save_pretrained` writes it too, so the folder runs with `pipeline(...)`.
CUSTOM_PIPELINES = {
    "icl-speech-emotion": {"impl": "pipeline_icl_ser.IclSpeechEmotionPipeline", "pt": ["AutoModel"], "type": "multimodal"}
}


def code_file(module: str, near: Optional[Path] = None) -> Optional[Path]:
    """Where a module of the checkpoint's code is: in `near` (the importing file's folder), beside
    this file (the package, or a checkpoint's remote code), else the file of a loaded remote-code
    module of that name (transformers caches the files each loaded class needs in a folder of
    their own); None when it is not at hand."""
    for folder in (near, Path(__file__).parent):
        if folder is not None and (folder / f"{module}.py").is_file():
            return folder / f"{module}.py"
    for name, loaded in list(sys.modules.items()):
        file = getattr(loaded, "__file__", None)
        if (name.startswith("transformers_modules.") and name.rsplit(".", 1)[-1] == module and file
                and Path(file).name == f"{module}.py" and Path(file).is_file()):
            return Path(file)
    return None


def code_closure(modules: tuple[str, ...]) -> tuple[dict[str, Path], set[str]]:
    """`modules` and every module they import relatively, transitively (read the way transformers
    reads imports when it copies and loads remote code): `({module: file}, {modules not at hand})`."""
    found, missing, todo = {}, set(), [(module, None) for module in modules]
    while todo:
        module, near = todo.pop()
        if module in found or module in missing:
            continue
        file = code_file(module, near)
        if file is None:
            missing.add(module)
            continue
        found[module] = file
        todo.extend((name, file.parent) for name in get_relative_imports(file))
    return found, missing


def checkpoint_code_files() -> list[str]:
    """The code file names a saved checkpoint carries (see `CHECKPOINT_MODULES`)."""
    found, _ = code_closure(CHECKPOINT_MODULES)
    return sorted(f"{module}.py" for module in found)


def save_code_files(save_directory: Union[str, os.PathLike]) -> list[str]:
    """Copy every checkpoint code file at hand into `save_directory` (each atomically); returns the
    names copied. The pipeline's files go only when all of them are at hand (`pipeline_at_hand`)."""
    found, _ = code_closure(CHECKPOINT_MODULES)
    if not pipeline_at_hand():
        pipeline_only = set(code_closure((PIPELINE_MODULE,))[0]) - set(
            code_closure(tuple(m for m in CHECKPOINT_MODULES if m != PIPELINE_MODULE))[0])
        found = {module: file for module, file in found.items() if module not in pipeline_only}
    for module, file in found.items():
        target = Path(save_directory) / file.name
        if not (target.is_file() and target.read_bytes() == file.read_bytes()):
            _copy_atomically(file, target)
    return sorted(file.name for file in found.values())


def pipeline_at_hand() -> bool:
    """True when the pipeline's code and everything it imports are at hand (a checkpoint can carry it)."""
    return not code_closure((PIPELINE_MODULE,))[1]


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


def config_and_weights_digest(version: str, config, module: nn.Module) -> str:
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


__all__ = ["CHECKPOINT_MODULES", "CUSTOM_PIPELINES", "checkpoint_code_files", "config_and_weights_digest", "pipeline_at_hand",
           "save_code_files"]
