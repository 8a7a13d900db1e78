"""Who is speaking: a speaker encoder that tells the enrolled speaker from the other party of a call.

The emotion encoder's pooled features do not tell speakers apart, so the target-speaker check
uses a speaker encoder of its own: Resemblyzer's GE2E voice encoder (Apache-2.0; a 3-layer,
256-unit LSTM over 40-channel mel frames of 1.6 s partial utterances, trained for speaker
verification). Its weights ship in the `resemblyzer` wheel (`pretrained.pt`). That package's
own code needs `webrtcvad` and `librosa`, which compile or pull in much more, so it is
installed without its dependencies (`pip install --no-deps -r offline-weights.txt`) and the
network and its mel front end are re-implemented here in torch/torchaudio; the weights are
read with `torch.load(weights_only=True)` (tensors only, no code runs).

Relative imports only: a checkpoint copies this file beside the model code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .segmentation_icl_ser import SAMPLING_RATE, _package_file

SPEAKER_EXTRA = "resemblyzer"  # installed --no-deps from offline-weights.txt
INSTALL_HINT = ("the speaker encoder's weights are not installed: pip install --no-deps -r offline-weights.txt "
                "(or pip install --no-deps resemblyzer==0.1.4)")
# Cosine similarity to the enrolled speaker's voice print at or above which a segment starts out as
# theirs: the equal-error threshold of same/different-speaker pairs of RAVDESS (bench/bench_speaker_check.py).
DEFAULT_THRESHOLD = 0.72
# How many segments the enrolled voice print counts for in the call's target cluster (chosen on
# RAVDESS two-speaker recordings; ASED and emotiontts-ko test it).
REFERENCE_WEIGHT = 8.0
_PARTIAL_FRAMES = 160  # 1.6 s partial utterances (10 ms mel hop), as the encoder was trained
_HOP = 160
_TARGET_DBFS = -30.0


def trim_silences(wav: np.ndarray, below_peak_db: float = 40.0, frame: int = 480, keep: int = 3) -> np.ndarray:
    """The clip without its pauses: 30 ms frames more than `below_peak_db` under its loudest frame
    are dropped, except within `keep` frames of a kept one (the encoder was trained on speech
    with long silences cut, by webrtcvad in Resemblyzer's own preprocessing)."""
    n = len(wav) // frame
    if n < 2:
        return wav
    level = 10 * np.log10(np.mean(np.square(wav[: n * frame].reshape(n, frame), dtype=np.float64), axis=1) + 1e-12)
    voiced = level >= level.max() - below_peak_db
    voiced = np.convolve(voiced.astype(float), np.ones(2 * keep + 1), mode="same") > 0
    return wav[: n * frame].reshape(n, frame)[voiced].reshape(-1) if voiced.any() else wav


class SpeakerEncoder(nn.Module):
    """GE2E speaker encoder: `embed(clips)` → unit-length 256-d speaker embeddings."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self._mel = None

    @classmethod
    def from_package(cls) -> Optional["SpeakerEncoder"]:
        """The encoder with the `resemblyzer` wheel's weights, or None when it is not installed."""
        path = _package_file("resemblyzer", "pretrained.pt")
        if path is None:
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
        model = cls()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
        return model.eval()

    def mel(self, samples: torch.Tensor) -> torch.Tensor:
        """(samples,) 16 kHz → (frames, 40) mel power spectrogram (25 ms windows, 10 ms hop)."""
        if self._mel is None:
            import torchaudio

            self._mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=SAMPLING_RATE, n_fft=400, hop_length=_HOP, n_mels=40, power=2.0, center=True,
                pad_mode="reflect", norm="slaney", mel_scale="slaney")
        return self._mel(samples).T

    @torch.no_grad()
    def embed(self, clips: Sequence[np.ndarray], rate: float = 1.3, min_coverage: float = 0.75) -> np.ndarray:
        """One unit-length embedding per 16 kHz clip: the mean of its 1.6 s partials' embeddings
        (`rate` partials per second; a last partial covering less than `min_coverage` is dropped
        unless it is the only one), all partials of all clips in one batch."""
        partials, owner = [], []
        step = max(1, int(round(SAMPLING_RATE / rate / _HOP)))
        for i, clip in enumerate(clips):
            wav = trim_silences(np.asarray(clip, dtype=np.float32))
            rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
            if rms > 0:  # volume up to -30 dBFS (never down), as the encoder was trained
                wav = wav * np.float32(max(1.0, 10 ** ((_TARGET_DBFS - 20 * np.log10(rms)) / 20)))
            n_frames = int(np.ceil((len(wav) + 1) / _HOP))
            starts = list(range(0, max(1, n_frames - _PARTIAL_FRAMES + step + 1), step))
            if len(starts) > 1 and (len(wav) - starts[-1] * _HOP) / (_PARTIAL_FRAMES * _HOP) < min_coverage:
                starts = starts[:-1]
            need = (starts[-1] + _PARTIAL_FRAMES) * _HOP
            wav = np.pad(wav, (0, max(0, need - len(wav)))).astype(np.float32, copy=False)
            mel = self.mel(torch.from_numpy(wav))
            for s in starts:
                partials.append(mel[s:s + _PARTIAL_FRAMES])
                owner.append(i)
        _, (hidden, _) = self.lstm(torch.stack(partials).to(self.linear.weight.dtype))
        raw = torch.relu(self.linear(hidden[-1]))
        units = nn.functional.normalize(raw, dim=-1)
        sums = torch.zeros(len(clips), units.shape[-1]).index_add_(0, torch.tensor(owner), units.float())
        return nn.functional.normalize(sums, dim=-1).numpy()


def speaker_embedding(encoder: SpeakerEncoder, clips: Sequence[np.ndarray]) -> np.ndarray:
    """A speaker's embedding from several clips: the normalized mean of their embeddings."""
    mean = encoder.embed(clips).mean(0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


class TargetSpeakerTracker:
    """Decides, segment by segment, whether the enrolled speaker is speaking in a two-party call.

    A segment's voice is compared with the call so far, not with the voice print alone: the
    segments heard up to and including it are split into two clusters (2-means on cosine
    similarity), starting from the threshold rule (similarity to the voice print >=
    `threshold`); the target cluster's centre is the voice print, counted as `reference_weight`
    segments, plus its members. The segment is the target's when it is closer to that centre
    than to the other cluster's (with no other cluster yet: when its similarity reaches the
    threshold). Earlier decisions are never revised, so results can be streamed.
    """

    def __init__(self, reference: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                 reference_weight: float = REFERENCE_WEIGHT, iterations: int = 5):
        self.reference = np.asarray(reference, dtype=np.float32)
        self.threshold, self.reference_weight, self.iterations = float(threshold), float(reference_weight), iterations
        self._heard: list[np.ndarray] = []

    def assign(self, embeddings: np.ndarray) -> list[tuple[bool, float]]:
        """`(is_target, similarity to the voice print)` for each unit-length embedding, in order."""
        out = []
        for vector in np.asarray(embeddings, dtype=np.float32):
            self._heard.append(vector)
            heard = np.stack(self._heard)
            target = heard @ self.reference >= self.threshold
            for _ in range(self.iterations):
                centre = self.reference * self.reference_weight + heard[target].sum(0)
                centre /= max(float(np.linalg.norm(centre)), 1e-12)
                if target.all():
                    target = heard @ centre >= self.threshold
                    continue
                other = heard[~target].sum(0)
                other /= max(float(np.linalg.norm(other)), 1e-12)
                target = heard @ centre >= heard @ other
            out.append((bool(target[-1]), float(vector @ self.reference)))
        return out


def load_speaker_encoder(required: bool = False, why: str = "") -> Optional[SpeakerEncoder]:
    """The speaker encoder, or None when absent; with `required`, a `ValueError` naming what to install."""
    encoder = SpeakerEncoder.from_package()
    if encoder is None and required:
        raise ValueError(f"{why}: {INSTALL_HINT}.")
    return encoder


__all__ = ["DEFAULT_THRESHOLD", "SpeakerEncoder", "TargetSpeakerTracker", "load_speaker_encoder", "speaker_embedding"]
