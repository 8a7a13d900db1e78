"""A frozen-encoder feature cache on disk.

With a frozen speech encoder, an utterance's encoder output never changes, yet meta-training
sees each utterance in many episodes. :class:`FeatureCache` stores the output once per
(encoder, audio content) pair:

* **Keys.** ``encoder_id`` names the encoder and its settings (e.g.
  ``model.audio_encoder_fingerprint()``); the content key is a hash of the audio file's bytes
  (:func:`content_key_for_file`) or of the samples (:func:`content_key_for_samples`). A
  renamed file hits; an edited file or another encoder misses.
* **Format.** One safetensors file per entry (never pickle), at
  ``<root>/<sha256(encoder_id)[:16]>/<key[:2]>/<key>.safetensors``; its metadata repeats
  the encoder id and content key, and a mismatching, unreadable or truncated file is
  treated as a miss, deleted and recomputed.
* **Atomic writes.** An entry is written to a temporary file in the same folder and moved
  into place with ``os.replace``, so readers never see a half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling_icl_ser.audio_utils import load_audio

logger = logging.getLogger(__name__)

FORMAT = "icl-ser-feature-cache/1"
Tensors = dict[str, torch.Tensor]


def write_atomically(path: Path, write: Callable[[str], None], prefix: str = ".tmp-") -> None:
    """Call ``write(temporary_path)`` on a temporary file beside ``path``, then rename it into
    place: readers see the old file or the whole new one, never a half-written one."""
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def content_key_for_file(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's bytes (the cache key of an audio file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key_for_samples(samples: np.ndarray, sampling_rate: int) -> str:
    """SHA-256 of float32 samples and their rate (the cache key of in-memory audio)."""
    digest = hashlib.sha256(f"{int(sampling_rate)}:".encode())
    digest.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Encoder outputs per utterance, keyed by encoder identity and audio content.

    Args:
        root: The cache folder (created on first write).
        encoder_id: A string that changes whenever the encoder's outputs would change
            (weights, preprocessing, layer choice).
    """

    def __init__(self, root: Union[str, os.PathLike], encoder_id: str) -> None:
        if not encoder_id:
            raise ValueError("encoder_id must be a non-empty string naming the encoder (e.g. its fingerprint).")
        self.root = Path(root).expanduser()
        self.encoder_id = encoder_id
        self.folder = self.root / hashlib.sha256(encoder_id.encode("utf-8")).hexdigest()[:16]
        self.hits = 0
        self.misses = 0

    def path_for(self, content_key: str) -> Path:
        """Where the entry of ``content_key`` lives."""
        if not content_key or any(c in content_key for c in "/\\."):
            raise ValueError(f"Invalid content key {content_key!r}; use content_key_for_file/_for_samples.")
        return self.folder / content_key[:2] / f"{content_key}.safetensors"

    def get(self, content_key: str) -> Optional[Tensors]:
        """The cached tensors, or ``None`` on a miss (a corrupt or stale entry is deleted)."""
        path = self.path_for(content_key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if (
                    metadata.get("format") != FORMAT
                    or metadata.get("encoder_id") != self.encoder_id
                    or metadata.get("content_key") != content_key
                ):
                    raise ValueError(f"metadata {metadata} does not match this entry")
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises several types for damaged files
            logger.warning("Discarding bad feature-cache entry %s (%s); it will be recomputed.", path, error)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, content_key: str, tensors: Tensors) -> None:
        """Store ``tensors`` (a dict of name -> tensor) for ``content_key``, atomically."""
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError("put() needs a non-empty dict of name -> torch.Tensor.")
        path = self.path_for(content_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        metadata = {"format": FORMAT, "encoder_id": self.encoder_id, "content_key": content_key}
        write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata=metadata),
                         prefix=f".{content_key[:8]}-")

    def get_or_compute(self, content_key: str, compute: Callable[[], Tensors]) -> Tensors:
        """The cached tensors, computing and storing them with ``compute()`` on a miss."""
        tensors = self.get(content_key)
        if tensors is None:
            tensors = compute()
            self.put(content_key, tensors)
        return tensors


_LENGTH_SORT_BATCHES = 8  # batches read at once and sorted by length


def encode_paths(
    cache: Optional[FeatureCache],
    paths: Sequence[Union[str, os.PathLike]],
    encode_fn: Callable[[list[np.ndarray]], Sequence[torch.Tensor]],
    batch_size: int = 8,
    sampling_rate: int = 16000,
) -> list[torch.Tensor]:
    """Encoder features (one tensor per path, in order), computed only for cache misses.

    Misses are decoded with :func:`load_audio` (mono, ``sampling_rate``) and encoded in
    batches of ``batch_size`` by ``encode_fn(list_of_arrays) -> list_of_tensors``; each
    result is stored under the key ``"features"``. A path listed twice is encoded once.
    With ``cache=None`` everything is encoded (the uncached baseline).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    keys = [content_key_for_file(p) if cache is not None else os.fspath(p) for p in paths]
    results: dict[str, torch.Tensor] = {}
    missing: dict[str, Union[str, os.PathLike]] = {}
    for key, path in zip(keys, paths):
        if key in results or key in missing:
            continue
        cached = cache.get(key) if cache is not None else None
        if cached is not None and "features" in cached:
            results[key] = cached["features"]
        else:
            missing[key] = path
    pending = list(missing.items())
    # Audio is read a window of batches at a time and batched by length within the window: a
    # batch pads to its longest utterance, so similar lengths waste less encoder work (valid
    # frames do not depend on the batch), while memory stays bounded by the window.
    window = batch_size * _LENGTH_SORT_BATCHES
    for window_start in range(0, len(pending), window):
        items = pending[window_start : window_start + window]
        arrays = [load_audio(path, target_sampling_rate=sampling_rate) for _, path in items]
        order = sorted(range(len(items)), key=lambda i: len(arrays[i]))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            outputs = list(encode_fn([arrays[i] for i in chosen]))
            if len(outputs) != len(chosen):
                raise ValueError(f"encode_fn returned {len(outputs)} tensors for {len(chosen)} audios; return one per audio.")
            for i, features in zip(chosen, outputs):
                key = items[i][0]
                results[key] = features
                if cache is not None:
                    cache.put(key, {"features": features})
    return [results[key] for key in keys]
