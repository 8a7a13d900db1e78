"""Virtual speakers: more meta-training speakers from the real ones.

A virtual speaker is a real training speaker whose every utterance went through **one**
consistent voice transform, so it reads as a new person with the same way of expressing
emotion relative to their own voice: episodes drawn from it (enrollment and query all
transformed alike) teach "compare with this speaker's other utterances" on a voice the model
has not seen. The transform (:class:`VoiceTransform`, all torchaudio) has four parts:

* ``spectral_ratio`` - pitch *and* formants scaled together (phase-vocoder time stretch, then
  resampling back), a stand-in for another vocal tract and larynx;
* ``tempo`` - speaking rate (the same phase-vocoder stretch, without resampling);
* ``eq_center_hz`` / ``eq_gain_db`` - one peaking filter, another microphone and room.

The ratio is drawn from a grid where ``16000 * ratio`` is a multiple of 400 Hz, which keeps
torchaudio's polyphase resampling kernel small (an arbitrary ratio makes it slow).

Rendered files are FLAC under ``$ICL_SER_CACHE/virtual/`` named by the source file's content
hash and the transform, written atomically, so they are made once and shared between runs.
Virtual speakers must only be made from *training* speakers (validation and test stay real).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .feature_cache import content_key_for_file, write_atomically
from .synthetic import default_cache_root

SEPARATOR = "@v"  # virtual speaker "03@v2" = transform 2 of real speaker "03"
RATIO_GRID = tuple(n / 40 for n in range(34, 47) if n != 40)  # 0.85 ... 1.15, without 1.0


def real_speaker(name: str) -> str:
    """The real speaker behind a (virtual or real) speaker name: "03@v2" -> "03"."""
    return str(name).split(SEPARATOR)[0]


@dataclass(frozen=True)
class VoiceTransform:
    """One virtual speaker's voice: applied identically to all of its utterances."""

    spectral_ratio: float = 1.0
    tempo: float = 1.0
    eq_center_hz: float = 1000.0
    eq_gain_db: float = 0.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "VoiceTransform":
        """A random transform: ratio 0.85-1.15 (grid), tempo 0.85-1.15, a ±8 dB peak at 200-4000 Hz."""
        return cls(
            spectral_ratio=float(rng.choice(RATIO_GRID)),
            tempo=round(float(rng.uniform(0.85, 1.15)), 3),
            eq_center_hz=round(float(math.exp(rng.uniform(math.log(200.0), math.log(4000.0)))), 1),
            eq_gain_db=round(float(rng.uniform(-8.0, 8.0)), 2),
        )

    def key(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:16]

    def apply(self, samples: np.ndarray, sampling_rate: int) -> np.ndarray:
        """Transform a mono float waveform; returns float32 at the same rate, length ≈ len / tempo."""
        import torch
        import torchaudio.functional as F

        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"VoiceTransform.apply needs a non-empty mono waveform, got shape {samples.shape}.")
        wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        stretch = self.spectral_ratio / self.tempo  # duration factor before resampling
        n_fft, hop = 512, 128
        window = torch.hann_window(n_fft)
        spec = torch.stft(wave, n_fft, hop_length=hop, window=window, return_complex=True)
        phase_advance = torch.linspace(0, math.pi * hop, n_fft // 2 + 1)[..., None]
        spec = F.phase_vocoder(spec, rate=1.0 / stretch, phase_advance=phase_advance)
        wave = torch.istft(spec, n_fft, hop_length=hop, window=window, length=round(wave.numel() * stretch))
        # Played back faster by the ratio: every frequency (pitch and formants) scales by it.
        source_rate = round(sampling_rate * self.spectral_ratio)
        wave = F.resample(wave, source_rate, sampling_rate)
        if self.eq_gain_db:
            wave = F.equalizer_biquad(wave, sampling_rate, self.eq_center_hz, self.eq_gain_db, Q=0.707)
        peak = float(wave.abs().max())
        if peak > 0.99:  # an EQ boost must not clip
            wave = wave * (0.99 / peak)
        return wave.numpy().astype(np.float32)


def virtual_speaker_transforms(speakers: Sequence[str], per_speaker: int, seed: int = 0) -> dict[str, VoiceTransform]:
    """``{virtual speaker name: transform}``, ``per_speaker`` for each real speaker, seeded."""
    if per_speaker < 0:
        raise ValueError(f"per_speaker must be >= 0, got {per_speaker}.")
    transforms = {}
    for speaker in speakers:
        if SEPARATOR in str(speaker):
            raise ValueError(f"Speaker {speaker!r} is already virtual; make virtual speakers from real ones.")
        # Seeded by name, so a speaker's voices do not depend on which other speakers are listed.
        name_seed = int(hashlib.sha256(f"{seed}:{speaker}".encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng(name_seed)
        for j in range(1, per_speaker + 1):
            transforms[f"{speaker}{SEPARATOR}{j}"] = VoiceTransform.draw(rng)
    return transforms


def _render(source: str, transform: VoiceTransform, folder: Path) -> tuple[str, float]:
    """The transformed copy of one file (made once, atomically); returns (path, seconds)."""
    import soundfile as sf

    target = folder / f"{content_key_for_file(source)[:24]}-{transform.key()}.flac"
    if target.is_file():
        return str(target), sf.info(str(target)).duration
    samples, rate = sf.read(source, dtype="float32", always_2d=True)
    out = transform.apply(samples.mean(axis=1), rate)
    write_atomically(target, lambda temporary: sf.write(temporary, out, rate, format="FLAC"), prefix=".virtual-")
    return str(target), out.size / rate


def add_virtual_speakers(
    utterances: Iterable[Mapping[str, Any]],
    speakers: Sequence[str],
    per_speaker: int,
    seed: int = 0,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    show_progress: bool = False,
):
    """The utterance table plus ``per_speaker`` virtual copies of each listed (training) speaker.

    Args:
        utterances: The utterance table (``read_corpus`` output, or rows with the same columns).
        speakers: Real speakers to copy - the training split's only.
        per_speaker: Virtual speakers per real speaker (0 returns the table unchanged).
        seed: Seed of the transforms.
        cache_dir: Folder of the rendered files (default ``$ICL_SER_CACHE/virtual``).
        show_progress: tqdm bar while rendering.

    Returns:
        A ``datasets.Dataset``: the original rows, then one row per (virtual speaker, source
        utterance) with ``id`` and ``speaker`` suffixed ``@v<j>``, the rendered ``path`` and its
        ``duration``; emotion and the other columns are the source's.

    Raises:
        ValueError: unknown or already virtual speakers, or ``per_speaker < 0``.
    """
    from datasets import Dataset

    rows = [dict(row) for row in utterances]
    rows_of = defaultdict(list)
    for row in rows:
        rows_of[row["speaker"]].append(row)
    unknown = sorted(set(speakers) - set(rows_of))
    if unknown:
        raise ValueError(f"Unknown speakers {unknown[:5]}; make virtual speakers from the table's (training) speakers.")
    transforms = virtual_speaker_transforms(sorted(set(speakers)), per_speaker, seed)
    folder = Path(cache_dir) if cache_dir else default_cache_root() / "virtual"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(row, name, transform) for name, transform in transforms.items() for row in rows_of[real_speaker(name)]]
    rendered = _render_all([(row["path"], transform) for row, _, transform in jobs], folder, show_progress)
    added = []
    for (row, name, _), (path, seconds) in zip(jobs, rendered):
        suffix = name[len(row["speaker"]):]  # "@v<j>"
        added.append({**row, "id": f"{row['id']}{suffix}", "speaker": name, "path": path, "duration": float(seconds)})
    # The source table's features, so that a column of all-None texts keeps its string type.
    return Dataset.from_list(rows + added, features=getattr(utterances, "features", None))


def _render_all(jobs: list[tuple[str, VoiceTransform]], folder: Path, show_progress: bool) -> list[tuple[str, float]]:
    """`_render` for every (source, transform), in order, one file per CPU core at a time.

    Each file's transform is a chain of small torch ops: one thread per file, files in
    parallel, keeps every core busy (torch releases the GIL inside its ops), where torch's own
    intra-op threads would mostly wait on each other. The result does not depend on the order.
    """
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from tqdm.auto import tqdm

    workers = max(1, min(os.cpu_count() or 1, len(jobs)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda job: _render(job[0], job[1], folder), jobs)
            return list(tqdm(results, total=len(jobs), desc="virtual speakers", disable=not show_progress))
    finally:
        torch.set_num_threads(threads)


__all__ = ["VoiceTransform", "add_virtual_speakers", "real_speaker", "virtual_speaker_transforms", "SEPARATOR"]
