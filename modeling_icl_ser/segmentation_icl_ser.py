"""Utterances of a long recording: a voice-activity detector run window by window.

A recording is cut where its speaker pauses, not into fixed windows. `UtteranceSegmenter` reads
frame scores (the probability that a 32 ms frame holds speech) one window at a time and yields
each utterance `(start, end)` as soon as the pause after it is long enough, so neither the
recording nor its features ever sit in memory whole.

Frame scores come from Silero VAD (`SileroVad`, MIT licence, weights shipped inside the
`silero-vad` wheel as safetensors; run here in plain torch, no TorchScript, no ONNX and no
download), or, when that package is absent, from the energy gate (`energy_frame_scores`, a
frame counts as speech at -50 dBFS or more), with a logged warning.

Relative imports only: a checkpoint copies this file beside the model code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
FRAME = 512  # samples per VAD frame at 16 kHz (32 ms), as Silero VAD takes them
_CONTEXT = 64  # samples of the previous frame Silero VAD sees in front of each frame
VAD_WEIGHTS = os.path.join("data", "silero_vad_16k.safetensors")
VAD_EXTRA = "silero-vad"


def _package_file(package: str, relative: str) -> Optional[str]:
    """A data file inside an installed package, found without importing it (silero_vad's
    import changes torch's thread count; resemblyzer's needs compiled extras)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, relative)
        if os.path.isfile(path):
            return path
    return None


class SileroVad(nn.Module):
    """Silero VAD v6 (16 kHz) in plain torch: a learned STFT, four convolutions and an LSTM cell
    over 32 ms frames, each seen with the 4 ms before it. `frame_scores` runs a window of frames
    at once (the convolutions in one batch, the LSTM cell frame by frame) and carries the
    LSTM state and the context samples to the next window."""

    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    @classmethod
    def from_package(cls) -> Optional["SileroVad"]:
        """The model with the `silero-vad` wheel's weights, or None when it is not installed."""
        path = _package_file("silero_vad", VAD_WEIGHTS)
        if path is None:
            return None
        from safetensors.torch import load_file

        model = cls()
        model.load_state_dict(load_file(path))
        return model.eval()

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, c, context): the state before the first frame."""
        return torch.zeros(1, 128), torch.zeros(1, 128), torch.zeros(_CONTEXT)

    @torch.no_grad()
    def frame_scores(self, samples: np.ndarray, state) -> tuple[np.ndarray, Any]:
        """Speech probability of each whole 512-sample frame of `samples` (16 kHz) and the state
        after them; `len(samples)` must be a multiple of 512."""
        x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        h, c, context = state
        frames = torch.cat([context, x]).unfold(0, FRAME + _CONTEXT, FRAME)  # (n, 576)
        if not len(frames):
            return np.zeros(0, dtype=np.float32), state
        dtype = self.conv1.weight.dtype
        frames = nn.functional.pad(frames.to(dtype)[:, None, :], (0, 64), mode="reflect")
        spec = self.stft_conv(frames)
        magnitude = torch.sqrt(spec[:, :129].square() + spec[:, 129:].square())
        hidden = torch.relu(self.conv1(magnitude))
        hidden = torch.relu(self.conv2(hidden))
        hidden = torch.relu(self.conv3(hidden))
        hidden = torch.relu(self.conv4(hidden)).squeeze(-1)  # (n, 128): one step per frame
        gates_in = nn.functional.linear(hidden, self.lstm_cell.weight_ih, self.lstm_cell.bias_ih)
        outputs = []
        for step in gates_in:  # the input half of the gates is batched above; the recurrence is not
            gates = step[None] + nn.functional.linear(h, self.lstm_cell.weight_hh, self.lstm_cell.bias_hh)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        out = torch.relu(torch.cat(outputs))[:, :, None]
        scores = torch.sigmoid(self.final_conv(out)).reshape(-1)
        return scores.float().numpy(), (h, c, x[-_CONTEXT:].clone() if len(x) >= _CONTEXT else context)


def energy_frame_scores(samples: np.ndarray, threshold_db: float = -50.0) -> np.ndarray:
    """The fallback frame score: 1.0 where a 512-sample frame's RMS level is `threshold_db` dBFS or more."""
    frames = samples[: len(samples) // FRAME * FRAME].reshape(-1, FRAME)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return (rms >= 10.0 ** (threshold_db / 20.0)).astype(np.float32)


def check_segmentation(min_silence_s: Any, max_segment_s: Any, min_speech_s: Any, threshold: Any,
                       max_seconds: Optional[float]) -> tuple[float, float, float, float]:
    """Check the VAD settings (seconds, probability); `ValueError` naming the fix."""
    for name, value in (("min_silence_s", min_silence_s), ("max_segment_s", max_segment_s),
                        ("min_speech_s", min_speech_s), ("vad_threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
    if not 0 < threshold < 1:
        raise ValueError(f"vad_threshold is a speech probability in (0, 1), got {threshold!r}; e.g. 0.5.")
    if max_segment_s <= min_speech_s:
        raise ValueError(f"max_segment_s ({max_segment_s:g} s) must be longer than min_speech_s ({min_speech_s:g} s): "
                         "a turn is split into segments of at most max_segment_s, and segments shorter than "
                         "min_speech_s are dropped.")
    if max_seconds is not None and max_segment_s > max_seconds:
        raise ValueError(f"max_segment_s={max_segment_s:g} s is longer than the encoder takes ({max_seconds:g} s); "
                         f"use max_segment_s <= {max_seconds:g}.")
    if min_silence_s * SAMPLING_RATE < FRAME:
        raise ValueError(f"min_silence_s={min_silence_s:g} s is shorter than one VAD frame ({FRAME / SAMPLING_RATE:g} s).")
    return float(min_silence_s), float(max_segment_s), float(min_speech_s), float(threshold)


@dataclass
class UtteranceSegmenter:
    """Turns frame scores, fed window by window, into utterances (frame indices).

    An utterance starts at a frame scoring `threshold` or more and ends after `min_silence_s`
    of frames under `threshold - 0.15` (hysteresis, as in Silero's own timestamps); it is then
    padded by `pad_s` on each side (never into its neighbours). A turn reaching `max_segment_s`
    is split at its quietest frame (the lowest score) in its second half. Utterances shorter
    than `min_speech_s` are dropped.
    """

    min_silence_s: float = 0.3
    max_segment_s: float = 12.0
    min_speech_s: float = 0.25
    threshold: float = 0.5
    pad_s: float = 0.064

    def __post_init__(self):
        per_s = SAMPLING_RATE / FRAME
        self._min_silence = max(1, int(round(self.min_silence_s * per_s)))
        self._max_frames = max(2, int(self.max_segment_s * per_s))
        self._min_frames = int(np.ceil(self.min_speech_s * per_s))
        # An utterance closes min_silence frames after its speech, so its right padding is seen by then.
        self._pad = min(int(round(self.pad_s * per_s)), self._min_silence)
        self._frame = 0  # index of the next frame fed
        self._start: Optional[int] = None  # the open utterance's first frame
        self._split = False  # the open utterance starts where a long turn was split (no left padding)
        self._last_speech = -1
        self._scores: list[float] = []  # the open utterance's scores (where to split it)
        self._last_end = 0  # end of the last utterance yielded: padding never overlaps it

    def _emit(self, start: int, end: int, right_pad: bool) -> Iterator[tuple[int, int]]:
        if end - start < self._min_frames:
            return
        left = start if self._split else max(self._last_end, start - self._pad)
        right = min(end + self._pad, self._frame) if right_pad else end
        self._last_end = right
        yield left, right

    def feed(self, scores: np.ndarray) -> Iterator[tuple[int, int]]:
        """Yield the `[start, end)` frame spans of the utterances these scores close."""
        off = self.threshold - 0.15
        for score in np.asarray(scores, dtype=np.float64).tolist():
            t, self._frame = self._frame, self._frame + 1
            if self._start is None:
                if score >= self.threshold:
                    self._start, self._last_speech, self._scores, self._split = t, t, [score], False
                continue
            self._scores.append(score)
            if score >= off:
                self._last_speech = t
            if t - self._last_speech >= self._min_silence:  # the pause is long enough: close
                yield from self._emit(self._start, self._last_speech + 1, right_pad=True)
                self._start = None
            elif t + 1 - self._start >= self._max_frames:  # too long: split at the quietest frame of its second half
                half = len(self._scores) // 2
                cut = self._start + half + int(np.argmin(self._scores[half:]))
                yield from self._emit(self._start, cut, right_pad=False)
                self._scores, self._start, self._split = self._scores[cut - self._start:], cut, True

    def finish(self) -> Iterator[tuple[int, int]]:
        """Yield the utterance still open at the end of the recording."""
        if self._start is not None:
            yield from self._emit(self._start, self._last_speech + 1, right_pad=True)
            self._start = None
