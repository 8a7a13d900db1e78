"""An embedded synthetic emotional-speech corpus: the project's offline default.

Generated in seconds from a seed, with no download, so that tests, examples and smoke
trainings run anywhere. It is built to reward exactly what icl-ser learns: *reading a
speaker's enrollment examples*. A classifier that ignores who is speaking is confused; one
that compares the query with the same speaker's labelled utterances is not.

How an utterance is made (16 kHz, about 1-2 s; see ``docs/SYNTHETIC.md``):

* **Source.** A glottal pulse train follows a pitch contour (speaker base pitch + emotion
  pitch level, per-syllable accents scaled by the pitch range, a global rise/fall slope,
  declination and period jitter). The pulses go through a glottal low-pass and a
  spectral-tilt filter; aspiration noise is mixed in by the breathiness.
* **Filter.** Each syllable is a vowel (a, e, i, o, u, ae) rendered with four formant
  resonators scaled by the speaker's vocal-tract length, preceded by a fricative noise, a
  stop burst or nothing.
* **Rhythm.** Syllable count and durations follow the speaking rate; each syllable has an
  attack/decay envelope and stressed syllables are louder.
* **Level and noise.** The loudness follows the energy; background noise is added.

How emotion enters: an emotion is a point in an 8-D prosodic space (pitch level, pitch
range, energy, rate, breathiness, spectral tilt, contour slope, jitter); each canonical
emotion has a prototype pattern (anger: loud, bright, fast, falling; sadness: low, quiet,
slow, dark, breathy; ...). Every speaker has its **own permutation** ``pi_s`` of the
emotions (one without 2-cycles, so no two emotions of a speaker ever coincide), and renders
emotion ``e`` with the pattern::

    cos(a) * pattern[e] + sin(a) * pattern[pi_s(e)] + speaker_offset_s + variability * noise
    with a = speaker_specificity * pi / 2

plus the speaker's own voice (base pitch, vocal-tract length, tilt, breathiness, rate).
``speaker_specificity`` is the difficulty knob: at 0 every speaker expresses emotions the
same way (a speaker-independent classifier works); at 1 the pattern an emotion gets is a
speaker's private convention (speaker-independent accuracy falls to chance, while a few
labelled utterances of the same speaker still identify each emotion). The default 0.6 gives
a speaker-independent classifier about 0.32 accuracy (chance 0.17) against 0.71 for
prototypes from K=8 enrollment utterances of the same speaker (``bench/synthetic_gap.py``).

Files are written as FLAC under ``$ICL_SER_CACHE/synthetic/<parameter hash>/`` (default
cache ``~/.cache/icl_ser``) with a ``manifest.jsonl``; generation writes into a temporary
folder and renames it into place, so a folder that exists is complete and is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import soundfile
from scipy.signal import lfilter

logger = logging.getLogger(__name__)

#: Bump when the generator's output changes, so old caches are not reused.
GENERATOR_VERSION = 1

PROSODIC_DIMENSIONS = (
    "pitch_level",
    "pitch_range",
    "energy",
    "rate",
    "breathiness",
    "tilt",
    "slope",
    "jitter",
)

#: How far the emotion prototypes below lie from neutral (a multiplier on the table), in
#: the units in which the per-utterance ``variability`` and the speaker offsets are given.
EMOTION_SCALE = 2.0

# Prototype directions in the prosodic space (one column per dimension above).
EMOTION_PATTERNS: dict[str, tuple[float, ...]] = {
    #             level range energy rate breath tilt slope jitter
    "neutral": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "calm": (-0.5, -0.8, -0.7, -0.6, 0.6, -0.6, 0.0, -0.6),
    "happiness": (1.0, 1.2, 0.6, 0.6, -0.2, 0.6, 0.8, 0.0),
    "sadness": (-0.8, -1.0, -1.2, -1.2, 1.2, -1.2, -0.6, 0.6),
    "anger": (0.6, 0.6, 1.6, 0.6, -0.8, 1.6, -1.2, 0.6),
    "fear": (1.6, -0.6, 0.0, 1.2, 0.8, 0.0, 1.0, 1.6),
    "disgust": (-1.0, 0.6, 0.4, -1.0, 0.2, -0.4, -1.2, 1.2),
    "surprise": (1.6, 1.6, 0.6, 0.0, 0.0, 0.6, 1.6, 0.0),
    "boredom": (-1.0, -1.6, -0.6, -0.8, 0.6, -0.6, -0.6, 0.0),
}

# Vowel formants (F1, F2, F3, F4) in Hz for an average adult vocal tract.
_VOWELS = np.array(
    [
        [730, 1090, 2440, 3400],  # a
        [530, 1840, 2480, 3500],  # e
        [270, 2290, 3010, 3700],  # i
        [570, 840, 2410, 3300],  # o
        [300, 870, 2240, 3300],  # u
        [660, 1720, 2410, 3500],  # ae
    ],
    dtype=np.float64,
)
_BANDWIDTHS = np.array([70.0, 100.0, 140.0, 200.0])


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic corpus (all of them key its cache folder).

    Attributes:
        n_speakers: Number of speakers.
        emotions: Emotion words; the built-in patterns cover neutral, calm, happiness,
            sadness, anger, fear, disgust, surprise and boredom, other words get a random
            pattern seeded by the word.
        utterances_per_emotion: Utterances per speaker and emotion.
        speaker_specificity: 0..1, how much of an emotion's rendering is the speaker's
            private convention rather than the shared pattern (the difficulty knob).
        variability: Per-utterance random spread in the prosodic space (pattern units).
        seed: Random seed; the same config always gives the same samples.
        sampling_rate: Output sample rate in Hz.
        audio_format: ``"flac"`` or ``"wav"``.
    """

    n_speakers: int = 24
    emotions: tuple[str, ...] = ("neutral", "happiness", "sadness", "anger", "fear", "disgust")
    utterances_per_emotion: int = 10
    speaker_specificity: float = 0.6
    variability: float = 0.3
    seed: int = 0
    sampling_rate: int = 16000
    audio_format: str = "flac"

    def __post_init__(self) -> None:
        object.__setattr__(self, "emotions", tuple(self.emotions))
        if self.n_speakers < 1 or self.utterances_per_emotion < 1:
            raise ValueError("n_speakers and utterances_per_emotion must be at least 1.")
        if len(self.emotions) < 2 or len(set(self.emotions)) != len(self.emotions):
            raise ValueError(f"emotions must hold at least two distinct words, got {self.emotions}.")
        if not 0.0 <= self.speaker_specificity <= 1.0:
            raise ValueError(f"speaker_specificity must lie in [0, 1], got {self.speaker_specificity}.")
        if self.variability < 0:
            raise ValueError(f"variability must be >= 0, got {self.variability}.")
        if self.audio_format not in ("flac", "wav"):
            raise ValueError(f"audio_format must be 'flac' or 'wav', got {self.audio_format!r}.")
        if self.sampling_rate < 8000:
            raise ValueError(f"sampling_rate must be at least 8000 Hz, got {self.sampling_rate}.")

    def key(self) -> str:
        """A short hash of the parameters and generator version (the cache folder name)."""
        payload = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def emotion_pattern(emotion: str) -> np.ndarray:
    """The prototype prosodic pattern of ``emotion`` (random but fixed for unknown words)."""
    if emotion in EMOTION_PATTERNS:
        return EMOTION_SCALE * np.array(EMOTION_PATTERNS[emotion], dtype=np.float64)
    rng = np.random.default_rng(zlib.crc32(emotion.encode()))
    return EMOTION_SCALE * rng.normal(0.0, 1.0, len(PROSODIC_DIMENSIONS))


def _permutation_without_2_cycles(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no 2-cycles (so blended patterns never coincide)."""
    if n < 3:
        return np.arange(n)  # every non-identity permutation of 2 items is a 2-cycle
    while True:
        perm = rng.permutation(n)
        if not any(perm[perm[i]] == i and perm[i] != i for i in range(n)):
            return perm


@dataclass(frozen=True)
class _Voice:
    f0: float  # base pitch, Hz
    formant_scale: float  # vocal-tract length factor
    tilt: float  # speaker offset of the tilt dimension
    breath: float
    rate: float  # syllables per second
    offset: np.ndarray  # speaker offset in the prosodic space
    permutation: np.ndarray  # emotion index -> pattern index


def _speaker_voice(config: SyntheticConfig, speaker: int) -> _Voice:
    rng = np.random.default_rng([config.seed, speaker, 7919])
    female = speaker % 2 == 1
    f0 = float(np.exp(rng.uniform(np.log(165), np.log(250)) if female else rng.uniform(np.log(90), np.log(140))))
    formant_scale = float(rng.uniform(1.08, 1.2) if female else rng.uniform(0.88, 1.0))
    return _Voice(
        f0=f0,
        formant_scale=formant_scale,
        tilt=float(rng.normal(0.0, 0.4)),
        breath=float(rng.normal(0.0, 0.4)),
        rate=float(rng.uniform(3.8, 5.2)),
        offset=rng.normal(0.0, 0.5, len(PROSODIC_DIMENSIONS)),
        permutation=_permutation_without_2_cycles(len(config.emotions), rng),
    )


def prosodic_target(config: SyntheticConfig, voice: _Voice, emotion_index: int) -> np.ndarray:
    """The mean prosodic pattern with which a speaker renders an emotion."""
    shared = emotion_pattern(config.emotions[emotion_index])
    private = emotion_pattern(config.emotions[int(voice.permutation[emotion_index])])
    # Angle blend (cos/sin rather than 1-a/a) keeps the spread between emotions about constant
    # across the knob, so only *who agrees with whom* changes, not how distinct emotions are.
    angle = 0.5 * np.pi * config.speaker_specificity
    return np.cos(angle) * shared + np.sin(angle) * private + voice.offset


def _resonator_cascade(formants: np.ndarray, bandwidths: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator of a cascade of 2-pole resonators (unit DC gain each)."""
    denominator = np.array([1.0])
    gain = 1.0
    for frequency, bandwidth in zip(formants, bandwidths):
        if frequency >= rate / 2 - 200:
            continue  # above Nyquist at low sample rates
        radius = np.exp(-np.pi * bandwidth / rate)
        section = np.array([1.0, -2.0 * radius * np.cos(2 * np.pi * frequency / rate), radius**2])
        denominator = np.convolve(denominator, section)
        gain *= section.sum()
    return np.array([gain]), denominator


def synthesize_utterance(config: SyntheticConfig, speaker: int, emotion_index: int, utterance: int) -> np.ndarray:
    """Render one utterance as float32 samples in [-1, 1] at ``config.sampling_rate``."""
    sr = config.sampling_rate
    voice = _speaker_voice(config, speaker)
    rng = np.random.default_rng([config.seed, speaker, emotion_index, utterance])
    z = prosodic_target(config, voice, emotion_index) + rng.normal(0.0, config.variability, len(PROSODIC_DIMENSIONS))
    level, pitch_range, energy, rate, breath, tilt, slope, jitter = z

    # Rhythm: syllables at the speaking rate, 1-1.8 s of speech plus short pauses around it.
    syllable_rate = voice.rate * 2.0 ** (0.3 * rate)
    n_syllables = max(2, int(round(rng.uniform(1.0, 1.8) * syllable_rate)))
    durations = rng.uniform(0.75, 1.25, n_syllables) / syllable_rate
    lead = 0.08
    starts = lead + np.concatenate([[0.0], np.cumsum(durations)[:-1]])
    total = lead + durations.sum() + 0.12
    n = int(total * sr)
    t = np.arange(n) / sr

    # Pitch contour in semitones relative to the speaker's base pitch.
    range_st = max(0.5, 3.0 * 2.0 ** (0.6 * pitch_range))
    accents = rng.uniform(0.2, 1.0, n_syllables)
    contour = np.full(n, 2.5 * level)
    centers = starts + 0.5 * durations
    for center, height, width in zip(centers, accents, durations):
        contour += range_st * height * np.exp(-0.5 * ((t - center) / (0.3 * width)) ** 2)
    progress = t / total - 0.5
    contour += 3.0 * slope * progress - 2.0 * progress  # emotion slope + declination
    f0 = voice.f0 * 2.0 ** (contour / 12.0)
    f0 = np.clip(f0, 50.0, 600.0)

    # Glottal source: one pulse per period, with period jitter and amplitude shimmer.
    jitter_amount = 0.01 * 2.0 ** (0.8 * jitter)
    phase = np.cumsum(f0 / sr)
    pulse_positions = np.flatnonzero(np.diff(np.floor(phase)) > 0) + 1
    pulse_positions = pulse_positions + np.round(
        rng.normal(0.0, jitter_amount, len(pulse_positions)) * sr / f0[pulse_positions]
    ).astype(int)
    pulse_positions = pulse_positions[(pulse_positions >= 0) & (pulse_positions < n)]
    source = np.zeros(n)
    np.add.at(source, pulse_positions, 1.0 + rng.normal(0.0, 0.5 * jitter_amount + 0.02, len(pulse_positions)))
    glottal_pole = np.exp(-2 * np.pi * 120.0 / sr)  # glottal flow: -12 dB/oct above ~120 Hz
    source = lfilter([1.0], [1.0, -2 * glottal_pole, glottal_pole**2], source)
    source = np.diff(source, prepend=0.0)  # lip radiation: +6 dB/oct
    tilt_pole = float(np.clip(0.45 - 0.22 * (tilt + voice.tilt), 0.0, 0.92))  # extra darkening
    source = lfilter([1.0 - tilt_pole], [1.0, -tilt_pole], source)
    source /= np.sqrt(np.mean(source**2)) + 1e-9

    # Aspiration noise mixed by the breathiness, shaped like the glottal cycle (louder on pulses).
    breathiness = 1.0 / (1.0 + np.exp(-(breath + voice.breath - 1.0)))
    aspiration = lfilter([1.0, -0.9], [1.0], rng.normal(0.0, 1.0, n))
    aspiration /= np.sqrt(np.mean(aspiration**2)) + 1e-9
    excitation = (1.0 - 0.7 * breathiness) * source + 0.9 * breathiness * aspiration

    # Syllables: a consonant onset then a vowel nucleus through the formant filter.
    out = np.zeros(n)
    vowels = rng.integers(0, len(_VOWELS), n_syllables)
    consonants = rng.choice(3, n_syllables, p=[0.5, 0.3, 0.2])  # fricative, stop, none
    tail = int(0.03 * sr)
    for start, duration, vowel, consonant, accent in zip(starts, durations, vowels, consonants, accents):
        a, b = int(start * sr), int((start + duration) * sr)
        onset = int(duration * (0.3 if consonant == 0 else 0.15 if consonant == 1 else 0.0) * sr)
        if consonant == 0:  # fricative: high-passed noise
            noise = lfilter([1.0, -1.0], [1.0, -0.3], rng.normal(0.0, 1.0, onset))
            out[a : a + onset] += 0.25 * noise * np.hanning(onset)
        elif consonant == 1 and onset > 4:  # stop: closure then a short burst
            burst = min(int(0.008 * sr), onset)
            out[a + onset - burst : a + onset] += 0.5 * rng.normal(0.0, 1.0, burst)
        v0, v1 = a + onset, min(n, b + tail)
        if v1 - v0 < 8:
            continue
        numerator, denominator = _resonator_cascade(_VOWELS[vowel] * voice.formant_scale, _BANDWIDTHS, sr)
        nucleus = lfilter(numerator, denominator, excitation[v0:v1])
        envelope = np.ones(v1 - v0)
        attack, release = min(len(envelope) // 3, int(0.025 * sr)), min(len(envelope) // 2, int(0.06 * sr))
        envelope[:attack] = np.linspace(0.0, 1.0, attack)
        envelope[len(envelope) - release :] = np.linspace(1.0, 0.0, release)
        gain = 0.7 + 0.6 * accent
        out[v0:v1] += gain * nucleus * envelope / (np.sqrt(np.mean(nucleus**2)) + 1e-9)

    # Level: the energy sets the loudness (in dB) around -24 dBFS; then background noise.
    out *= 10 ** ((-24.0 + 3.5 * energy) / 20.0) / (np.sqrt(np.mean(out**2)) + 1e-9)
    out += 10 ** (-58.0 / 20.0) * rng.normal(0.0, 1.0, n)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def default_cache_root() -> Path:
    """``$ICL_SER_CACHE`` or ``~/.cache/icl_ser``."""
    return Path(os.environ.get("ICL_SER_CACHE") or Path.home() / ".cache" / "icl_ser").expanduser()


def speaker_name(index: int) -> str:
    """The speaker id of synthetic speaker ``index`` (``spk00``, ``spk01``, ...)."""
    return f"spk{index:02d}"


def _is_complete(folder: Path) -> bool:
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        return False
    try:
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return False
    return bool(rows) and all((folder / row["path"]).is_file() for row in rows)


def generate_corpus(config: Optional[SyntheticConfig] = None, cache_root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Write the synthetic corpus (if not cached yet) and return its folder.

    The folder holds ``<speaker>/<emotion>_<nn>.<format>`` files, ``manifest.jsonl`` (id,
    path, speaker, emotion) and ``config.json``. It is written into a temporary folder and
    renamed into place, so an existing folder is complete; an incomplete one (files
    deleted by hand) is regenerated.

    Args:
        config: The generator parameters (default :class:`SyntheticConfig`).
        cache_root: Where to put ``synthetic/<key>/`` (default :func:`default_cache_root`).
    """
    config = config or SyntheticConfig()
    parent = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    parent = parent / "synthetic"
    folder = parent / config.key()
    if _is_complete(folder):
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{config.key()}-", dir=parent))
    try:
        rows = []
        for speaker in range(config.n_speakers):
            (temporary / speaker_name(speaker)).mkdir()
            for emotion_index, emotion in enumerate(config.emotions):
                for utterance in range(config.utterances_per_emotion):
                    samples = synthesize_utterance(config, speaker, emotion_index, utterance)
                    relative = f"{speaker_name(speaker)}/{emotion}_{utterance:02d}.{config.audio_format}"
                    soundfile.write(temporary / relative, samples, config.sampling_rate, subtype="PCM_16")
                    rows.append(
                        {
                            "id": f"synthetic/{relative.rsplit('.', 1)[0]}",
                            "path": relative,
                            "speaker": speaker_name(speaker),
                            "emotion": emotion,
                        }
                    )
        (temporary / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (temporary / "config.json").write_text(
            json.dumps({"generator_version": GENERATOR_VERSION, **dataclasses.asdict(config)}, indent=2)
        )
        if folder.exists():  # incomplete leftover: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(temporary, folder)
        except OSError:
            if not _is_complete(folder):  # a concurrent writer won only if it finished
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info("Wrote the synthetic corpus (%d utterances) to %s", len(rows), folder)
    return folder
