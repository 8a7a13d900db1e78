"""Audio input handling shared by the processor, the pipeline and the data layer.

Every audio that enters icl-ser goes through :func:`load_audio`: it accepts a file path, a
1-D/2-D numpy array or torch tensor (with ``sampling_rate=``) or the Hugging Face audio dict
``{"array", "sampling_rate"}``, and returns mono float32 samples at the target rate.
Decoding uses soundfile (WAV/FLAC/OGG without FFmpeg); resampling uses torchaudio.
Problems raise ``ValueError`` naming the problem and the fix, before any model work.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, dict]

# The torch/torchaudio pair this package was tested with (constraints.txt pins the same pair;
# tests/test_install.py keeps the two in step). torchaudio's compiled library links against one
# torch build: a pair that does not fit fails inside the dynamic linker.
TESTED_TORCH = "2.14.1"
TESTED_TORCHAUDIO = "2.11.1"


class TorchaudioMismatchError(ImportError):
    """The installed torchaudio cannot be loaded with the installed torch."""


def _installed_version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def torchaudio_mismatch_message(torch_version: Optional[str], torchaudio_version: Optional[str], cause: str) -> str:
    """What is installed, what fits, and the pip command that fixes it."""
    installed = f"torch {torch_version or '(not installed)'} with torchaudio {torchaudio_version or '(not installed)'}"
    return (
        f"torchaudio cannot be loaded: {installed} do not fit ({cause}). torchaudio's compiled "
        f"library must be built for the installed torch release. icl-ser is tested with torch "
        f"{TESTED_TORCH} + torchaudio {TESTED_TORCHAUDIO}; fix it with:\n"
        f"    pip install torch=={TESTED_TORCH} torchaudio=={TESTED_TORCHAUDIO}\n"
        "(in a clone of icl-ser: pip install -e . -c constraints.txt, the tested set of every dependency)."
    )


def check_torchaudio() -> None:
    """Import torchaudio once and turn a torch/torchaudio mismatch into a clear error.

    transformers imports torchaudio as soon as its audio utilities load, so a torchaudio built
    for another torch otherwise surfaces as a linker message ("undefined symbol ...") from deep
    inside an unrelated import.

    Raises:
        TorchaudioMismatchError: torchaudio is missing or does not load with this torch; the
            message names both versions, the tested pair and the pip command that fixes it.
    """
    try:
        import torchaudio.functional  # noqa: F401  (loads libtorchaudio)
    except (ImportError, OSError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TorchaudioMismatchError(
            torchaudio_mismatch_message(torch.__version__, _installed_version("torchaudio"), cause)
        ) from error


def _open_file(path: Union[str, os.PathLike]):
    """An open `soundfile.SoundFile`, or a `ValueError` naming the problem (missing, not audio)."""
    import soundfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Audio file not found: {path!r}. Pass an existing WAV/FLAC/OGG file path.")
    try:
        return soundfile.SoundFile(path)
    except Exception as error:  # soundfile raises several types for corrupt or non-audio files
        raise ValueError(
            f"Could not decode audio file {path!r} ({error}). Convert it to WAV or FLAC, "
            "or pass the samples as an array with sampling_rate=."
        ) from None


def _decode_file(path: Union[str, os.PathLike]) -> tuple[np.ndarray, int]:
    with _open_file(path) as handle:
        try:
            samples = handle.read(dtype="float32", always_2d=True)
        except Exception as error:
            raise ValueError(f"Could not decode audio file {os.fspath(path)!r} ({error}). Convert it to WAV or FLAC, "
                             "or pass the samples as an array with sampling_rate=.") from None
        return samples.T, int(handle.samplerate)  # (channels, samples)


def _to_channels_first(samples: np.ndarray, source: str) -> np.ndarray:
    if samples.ndim == 1:
        return samples[None, :]
    if samples.ndim != 2:
        raise ValueError(
            f"{source} has shape {tuple(samples.shape)}; expected 1-D (samples,) or 2-D "
            "(channels, samples) / (samples, channels) audio."
        )
    # Channels are the short axis: (2, 48000) and (48000, 2) both mean stereo.
    return samples if samples.shape[0] <= samples.shape[1] else samples.T


def load_audio(
    audio: AudioInput,
    sampling_rate: Optional[int] = None,
    target_sampling_rate: int = 16000,
    max_seconds: Optional[float] = None,
) -> np.ndarray:
    """Return ``audio`` as mono float32 samples at ``target_sampling_rate``.

    Args:
        audio: A file path, a numpy array or tensor of samples (1-D, or 2-D with a channel
            axis), or a dict with ``"array"`` and ``"sampling_rate"`` (as ``datasets.Audio``
            yields; a ``"path"`` alone is read from disk).
        sampling_rate: The rate of a raw array or tensor. Required for those; for files and
            dicts it must agree with the stored rate if given.
        target_sampling_rate: The rate to resample to.
        max_seconds: If given, audio longer than this raises ``ValueError`` with the limit.

    Raises:
        ValueError: missing/unreadable file, missing ``sampling_rate``, empty audio,
            NaN/inf samples, a bad shape or dict, or audio longer than ``max_seconds``.
    """
    source = "audio"
    if isinstance(audio, dict):
        if audio.get("array") is not None:
            if "sampling_rate" not in audio:
                raise ValueError('An audio dict needs both "array" and "sampling_rate" keys.')
            samples, rate = audio["array"], audio["sampling_rate"]
        elif audio.get("path"):
            samples, rate = _decode_file(audio["path"])
        else:
            raise ValueError(
                'An audio dict needs "array" and "sampling_rate" (or a readable "path"); '
                f"got keys {sorted(audio)}."
            )
    elif isinstance(audio, (str, os.PathLike)):
        source = f"audio file {os.fspath(audio)!r}"
        samples, rate = _decode_file(audio)
        if sampling_rate is not None and int(sampling_rate) != rate:
            raise ValueError(
                f"{source} is stored at {rate} Hz but sampling_rate={sampling_rate} was given; "
                "drop sampling_rate for files (it is read from the file)."
            )
    elif isinstance(audio, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise ValueError(
                "A raw audio array needs its sampling rate: pass sampling_rate=16000 (or the "
                'actual rate), or a dict {"array": ..., "sampling_rate": ...}.'
            )
        samples, rate = audio, sampling_rate
    else:
        raise ValueError(
            f"Unsupported audio input of type {type(audio).__name__}; pass a file path, a numpy "
            'array or tensor with sampling_rate=, or {"array": ..., "sampling_rate": ...}.'
        )

    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples, dtype=np.float32)
    if rate is None or int(rate) <= 0:
        raise ValueError(f"Invalid sampling rate {rate!r} for {source}; it must be a positive integer.")
    rate = int(rate)
    samples = _to_channels_first(samples, source)
    if samples.shape[1] == 0:
        raise ValueError(f"{source} is empty (zero samples); pass at least a few milliseconds of audio.")
    if not np.isfinite(samples).all():
        raise ValueError(f"{source} contains NaN or infinite samples; clean or replace the audio.")
    if max_seconds is not None and samples.shape[1] / rate > max_seconds:
        raise ValueError(
            f"{source} is {samples.shape[1] / rate:.1f} s long; the encoder takes at most "
            f"{max_seconds:g} s per utterance. Cut it into shorter utterances first."
        )

    mono = samples.mean(axis=0)
    if rate != target_sampling_rate:
        import torchaudio.functional

        mono = torchaudio.functional.resample(
            torch.from_numpy(mono), orig_freq=rate, new_freq=target_sampling_rate
        ).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


# ----------------------------------------------------------------------------- long recordings
SILENCE_PEAK_DB = -60.0  # a clip whose loudest sample is below this (dBFS) is refused as silent


def peak_db(samples: np.ndarray) -> float:
    """The loudest sample's level in dBFS (full scale = 1.0); -inf for digital silence."""
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")


def check_not_silent(samples: np.ndarray, source: str) -> None:
    """`ValueError` if `samples` are silent (peak below `SILENCE_PEAK_DB`): nothing to label."""
    level = peak_db(samples)
    if level < SILENCE_PEAK_DB:
        raise ValueError(f"{source} is silent (peak {level:.0f} dBFS, below {SILENCE_PEAK_DB:.0f} dBFS); "
                         "pass a clip with audible speech (check the microphone or the file).")


def speech_ratio(samples: np.ndarray, sampling_rate: int, threshold_db: float, frame_s: float = 0.03) -> float:
    """The energy gate's measure: the share of `frame_s` frames whose RMS level (dBFS) is at
    least `threshold_db` (a partial last frame counts as a frame)."""
    n = max(1, int(round(frame_s * sampling_rate)))
    frames = np.pad(samples, (0, (-len(samples)) % n)).reshape(-1, n)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return float(np.mean(rms >= 10.0 ** (threshold_db / 20.0)))


def check_chunking(chunk_length_s: Any, stride_length_s: Any, max_seconds: Optional[float] = None) -> tuple[float, float]:
    """Check a long recording's segment length and overlap (seconds); `ValueError` naming the fix."""
    for name, value in (("chunk_length_s", chunk_length_s), ("stride_length_s", stride_length_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a number of seconds, got {value!r}.")
    if chunk_length_s <= 0:
        raise ValueError(f"chunk_length_s must be > 0 seconds, got {chunk_length_s!r}; e.g. chunk_length_s=4.0.")
    if stride_length_s < 0:
        raise ValueError(f"stride_length_s (the overlap of consecutive segments) must be >= 0, got {stride_length_s!r}.")
    if stride_length_s >= chunk_length_s:
        raise ValueError(f"stride_length_s ({stride_length_s:g} s) must be smaller than chunk_length_s "
                         f"({chunk_length_s:g} s): it is the overlap of consecutive segments, and each segment "
                         "starts chunk_length_s - stride_length_s after the previous one.")
    if max_seconds is not None and chunk_length_s > max_seconds:
        raise ValueError(f"chunk_length_s={chunk_length_s:g} s is longer than the encoder takes ({max_seconds:g} s); "
                         "use shorter segments.")
    return float(chunk_length_s), float(stride_length_s)


def chunk_spans(num_samples: int, chunk: int, step: int) -> list[tuple[int, int]]:
    """`[start, end)` sample spans of `chunk` samples every `step` samples over `num_samples`.

    The last span ends at the end of the recording: when fewer than `chunk` samples remain it
    is moved back to span a full `chunk` (overlapping its predecessor more); a recording shorter
    than one chunk is a single span of its whole length.
    """
    if num_samples <= chunk:
        return [(0, num_samples)]
    spans, start = [], 0
    while start + chunk < num_samples:
        spans.append((start, start + chunk))
        start += step
    spans.append((num_samples - chunk, num_samples))
    return spans


class Recording:
    """A long recording, read segment by segment as mono float32 at `target_sampling_rate`.

    A file stays on disk and each segment is read, downmixed and resampled on its own, so memory
    does not grow with the recording's length; arrays, tensors and audio dicts are converted
    once (they are in memory already). Problems (missing, non-audio, empty) raise `ValueError`
    on construction.
    """

    def __init__(self, audio: AudioInput, sampling_rate: Optional[int] = None, target_sampling_rate: int = 16000):
        self.target_sampling_rate = int(target_sampling_rate)
        self._handle, self._samples = None, None
        path = audio.get("path") if isinstance(audio, dict) and audio.get("array") is None else audio
        if isinstance(path, (str, os.PathLike)):
            self.source = f"audio file {os.fspath(path)!r}"
            self._handle = _open_file(path)
            self.sampling_rate, self.num_samples = int(self._handle.samplerate), int(self._handle.frames)
            if sampling_rate is not None and int(sampling_rate) != self.sampling_rate:
                raise ValueError(f"{self.source} is stored at {self.sampling_rate} Hz but sampling_rate="
                                 f"{sampling_rate} was given; drop sampling_rate for files.")
            if self.num_samples == 0:
                raise ValueError(f"{self.source} is empty (zero samples); pass a recording with speech.")
        else:
            self.source = "audio"
            self._samples = load_audio(audio, sampling_rate, self.target_sampling_rate)
            self.sampling_rate, self.num_samples = self.target_sampling_rate, len(self._samples)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.num_samples / self.sampling_rate

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples `[start, end)` (at the recording's own rate) as mono float32 at the target rate."""
        if self._samples is not None:
            return self._samples[start:end]
        self._handle.seek(start)
        try:
            block = self._handle.read(end - start, dtype="float32", always_2d=True)
        except Exception as error:
            raise ValueError(f"Could not decode {self.source} at {start / self.sampling_rate:.1f} s ({error}).") from None
        if not np.isfinite(block).all():
            raise ValueError(f"{self.source} contains NaN or infinite samples near {start / self.sampling_rate:.1f} s.")
        return load_audio(block.T, self.sampling_rate, self.target_sampling_rate)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def audio_duration(path: Union[str, os.PathLike]) -> float:
    """Duration in seconds of an audio file, read from its header (no decoding)."""
    import soundfile

    info = soundfile.info(os.fspath(path))
    return info.frames / float(info.samplerate)


def describe(audio: Any) -> str:
    """A short human-readable name for an audio input, for error messages."""
    if isinstance(audio, (str, os.PathLike)):
        return repr(os.fspath(audio))
    if isinstance(audio, dict):
        return f"audio dict with keys {sorted(audio)}"
    return type(audio).__name__
