"""A speaker's profile: their enrollment encoded once, plus unlabelled speech and a voice print.

Made by `pipe.enroll(...)` (pipeline_icl_ser.py); saved to and loaded from one `.safetensors`
file. Relative imports only: a checkpoint copies this file beside the model code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.cache_utils import DynamicCache

PROFILE_FORMAT = "icl_ser-speaker-profile-v1"
_OPTIONAL_TENSORS = ("enrollment_context", "unlabelled", "speaker_embeddings", "audio_statistics")


@dataclass
class SpeakerProfile:
    """A speaker's enrollment, encoded once: the LM key/value cache of the prompt prefix.

    Made by [`IclSpeechEmotionPipeline.enroll`]; pass it as `pipe(audio, profile=profile)`.
    Only valid for the checkpoint it was made with (`model_fingerprint`); the pipeline refuses
    a profile from another checkpoint.

    Attributes:
        labels: Candidate labels the prefix's instruction lists (the call's candidates).
        enrollment_labels: The K enrollment labels, in order.
        prefix_ids: Token ids of the prefix (instruction + enrollment lines).
        model_fingerprint: `model.fingerprint()` of the checkpoint that made it.
        keys, values: Per LM layer, `(1, kv_heads, prefix_len, head_dim)` cached states.
        enrollment_context: `(K, ...)` what the model's enrollment read-out keeps of the
            enrollment (`model.enrollment_context`); None for a model without one.
        unlabelled: `(U, F)` summaries (`pipe.embed`) of the speaker's unlabelled speech: speaker
            normalization takes its statistics from the enrollment plus these; None when U = 0.
        speaker_embeddings: `(N, 256)` speaker-encoder embeddings of the enrollment and
            unlabelled clips (the target-speaker check's reference); None without the encoder.
        audio_statistics: `(2, F)` shift and scale that normalized the cached prefix's audio
            tokens (a model with `speaker_normalized_audio_tokens`: the enrollment plus the
            unlabelled speech given to `enroll`); queries are normalized by the same ones, so
            later unlabelled speech moves the routes' statistics, not the LM's input. None otherwise.
    """

    labels: list[str]
    enrollment_labels: list[str]
    prefix_ids: list[int]
    model_fingerprint: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    enrollment_context: Optional[torch.Tensor] = None
    unlabelled: Optional[torch.Tensor] = None
    speaker_embeddings: Optional[torch.Tensor] = None
    audio_statistics: Optional[torch.Tensor] = None

    @property
    def num_enrollment(self) -> int:
        """K, the number of enrollment utterances."""
        return len(self.enrollment_labels)

    @property
    def num_unlabelled(self) -> int:
        """U, the number of unlabelled utterances."""
        return 0 if self.unlabelled is None else len(self.unlabelled)

    @property
    def speaker_embedding(self) -> Optional[np.ndarray]:
        """The speaker's voice print: the unit-length mean of `speaker_embeddings` (None without)."""
        if self.speaker_embeddings is None or not len(self.speaker_embeddings):
            return None
        mean = self.speaker_embeddings.float().mean(0)
        return torch.nn.functional.normalize(mean, dim=0).numpy()

    def add_unlabelled(self, clips, pipeline, sampling_rate: Optional[int] = None) -> "SpeakerProfile":
        """Add unlabelled clips of this speaker (no labels): their summaries join the speaker
        statistics, and their speaker embeddings the voice print. `pipeline` is the pipeline the
        profile was made with. Returns the profile (changed in place).

        Raises:
            ValueError: another checkpoint's pipeline, or bad clips (as for enrollment audio).
        """
        pipeline._check_profile(self, None)
        summaries, voices = pipeline._unlabelled_inputs(clips, sampling_rate)
        if summaries is not None:
            self.unlabelled = summaries if self.unlabelled is None else torch.cat([self.unlabelled, summaries])
        if voices is not None and self.speaker_embeddings is not None:
            self.speaker_embeddings = torch.cat([self.speaker_embeddings, voices])
        return self

    def cache(self, batch_size: int, device: Union[str, torch.device]) -> DynamicCache:
        """A fresh cache holding the prefix for `batch_size` rows (classify extends it in place)."""
        return DynamicCache(
            ddp_cache_data=[
                (k.to(device).expand(batch_size, -1, -1, -1), v.to(device).expand(batch_size, -1, -1, -1))
                for k, v in zip(self.keys, self.values)
            ]
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the profile to one `.safetensors` file (tensors + JSON metadata), atomically."""
        path = os.fspath(path)
        meta = {"labels": self.labels, "enrollment_labels": self.enrollment_labels,
                "prefix_ids": self.prefix_ids, "model_fingerprint": self.model_fingerprint}
        tensors = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"keys.{i}"] = k.detach().to("cpu").contiguous()
            tensors[f"values.{i}"] = v.detach().to("cpu").contiguous()
        for name in _OPTIONAL_TENSORS:
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).detach().to("cpu").contiguous()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        # Temp file in the same folder, then os.replace: readers never see a half-written profile.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".profile-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": PROFILE_FORMAT, "profile": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SpeakerProfile":
        """Read a profile written by `save` (tensors load on CPU)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No speaker profile at {path!r}.")
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path!r} is not a readable safetensors file ({error}).") from None
        if metadata.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path!r} is not an icl-ser speaker profile (format {metadata.get('format')!r}, "
                             f"expected {PROFILE_FORMAT!r}).")
        meta = json.loads(metadata["profile"])
        n_layers = sum(name.startswith("keys.") for name in tensors)
        return cls(labels=list(meta["labels"]), enrollment_labels=list(meta["enrollment_labels"]),
                   prefix_ids=[int(i) for i in meta["prefix_ids"]], model_fingerprint=meta["model_fingerprint"],
                   keys=[tensors[f"keys.{i}"] for i in range(n_layers)],
                   values=[tensors[f"values.{i}"] for i in range(n_layers)],
                   **{name: tensors.get(name) for name in _OPTIONAL_TENSORS})


def is_profile(obj: Any) -> bool:
    """A `SpeakerProfile`, checked by name, not isinstance: the package's class and a checkpoint's
    remote-code copy are different class objects with the same code, and either may make it."""
    return type(obj).__name__ == "SpeakerProfile" and hasattr(obj, "model_fingerprint")
