"""Labelling a long recording utterance by utterance (`pipe(recording, ...)`, `pipe.stream`).

The recording is read window by window (`Recording`), cut into utterances by the VAD
(`segmentation="vad"`, segmentation_icl_ser.py) or into fixed overlapping windows
(`segmentation="fixed"`), optionally checked for who speaks (`target_speaker`,
speaker_check_icl_ser.py), and labelled a batch at a time. With `unlabelled="recording"` the
speaker statistics for speaker normalization come from the recording's own speech: the first
utterances wait until `min_unlabelled` of the speaker's utterances have been heard, each later
batch adds to the statistics before it is labelled. Results come out in time order.

Relative imports only: a checkpoint copies this file beside the model code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .audio_utils import Recording, check_chunking, chunk_spans, speech_ratio
from .segmentation_icl_ser import (
    FRAME,
    SAMPLING_RATE,
    VAD_EXTRA,
    SileroVad,
    UtteranceSegmenter,
    check_segmentation,
    energy_frame_scores,
)
from .speaker_check_icl_ser import DEFAULT_THRESHOLD, INSTALL_HINT, TargetSpeakerTracker

logger = logging.getLogger(__name__)

WINDOW_S = 30.0  # seconds of audio read (and run through the VAD) at a time
MIN_UNLABELLED = 8  # the recording's own speech is used once this many utterances of the speaker are in


@dataclass
class RecordingOptions:
    """A long-recording call's checked settings (see `IclSpeechEmotionPipeline.stream`)."""

    segmentation: str = "vad"
    chunk_length_s: float = 4.0
    stride_length_s: float = 1.0
    vad_threshold_db: Optional[float] = -50.0
    vad_min_speech: float = 0.1
    min_silence_s: float = 0.3
    max_segment_s: float = 12.0
    min_speech_s: float = 0.25
    vad_threshold: float = 0.5
    target_speaker: bool = False
    speaker_threshold: float = DEFAULT_THRESHOLD
    unlabelled: Optional[str] = "recording"
    min_unlabelled: int = MIN_UNLABELLED
    batch_size: int = 8
    top_k: Optional[int] = None


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def check_options(max_seconds: Optional[float], segmentation: Optional[str] = None, chunk_length_s=None,
                  stride_length_s=None, **settings) -> RecordingOptions:
    """Every setting checked (`ValueError` naming the fix), before the recording is read.
    `segmentation=None` means "fixed" when `chunk_length_s` or `stride_length_s` is given, else "vad"."""
    if segmentation is None:
        segmentation = "fixed" if chunk_length_s is not None or stride_length_s is not None else "vad"
    if segmentation not in ("vad", "fixed"):
        raise ValueError(f"segmentation must be 'vad' (utterances found by a voice-activity detector) or 'fixed' "
                         f"(windows of chunk_length_s), got {segmentation!r}.")
    options = RecordingOptions(segmentation=segmentation)
    for name, value in settings.items():
        setattr(options, name, value)
    if options.speaker_threshold is None:
        options.speaker_threshold = DEFAULT_THRESHOLD
    if segmentation == "fixed":
        options.chunk_length_s, options.stride_length_s = check_chunking(
            4.0 if chunk_length_s is None else chunk_length_s, 1.0 if stride_length_s is None else stride_length_s,
            max_seconds)
    elif chunk_length_s is not None or stride_length_s is not None:
        raise ValueError("chunk_length_s / stride_length_s set fixed windows; with segmentation='vad' use "
                         "max_segment_s, min_silence_s and min_speech_s instead (or pass segmentation='fixed').")
    options.min_silence_s, options.max_segment_s, options.min_speech_s, options.vad_threshold = check_segmentation(
        options.min_silence_s, options.max_segment_s, options.min_speech_s, options.vad_threshold, max_seconds)
    db = options.vad_threshold_db
    if db is not None and not _number("vad_threshold_db", db) <= 0:
        raise ValueError(f"vad_threshold_db must be a level in dBFS (<= 0, e.g. -50.0) or None to switch the "
                         f"energy gate off, got {db!r}.")
    if not 0 <= _number("vad_min_speech", options.vad_min_speech) <= 1:
        raise ValueError(f"vad_min_speech must be a share of frames in [0, 1], got {options.vad_min_speech!r}.")
    if not isinstance(options.target_speaker, bool):
        raise ValueError(f"target_speaker must be True or False, got {options.target_speaker!r}.")
    if not -1 <= _number("speaker_threshold", options.speaker_threshold) <= 1:
        raise ValueError(f"speaker_threshold is a cosine similarity in [-1, 1], got {options.speaker_threshold!r}.")
    if options.unlabelled not in ("recording", None, False):
        raise ValueError(f"unlabelled must be 'recording' (speaker statistics from the recording's own speech) or "
                         f"None, got {options.unlabelled!r}; add unlabelled clips to the profile instead "
                         "(pipe.enroll(..., unlabelled=[...])).")
    options.unlabelled = options.unlabelled or None
    _count("min_unlabelled", options.min_unlabelled)
    _count("batch_size", options.batch_size)
    if options.top_k is not None:
        _count("top_k", options.top_k)
    return options


# ----------------------------------------------------------------------------- utterances
def _windows(recording: Recording) -> Iterator[np.ndarray]:
    """The recording as consecutive 16 kHz blocks of about `WINDOW_S` seconds."""
    step = int(WINDOW_S * recording.sampling_rate)
    for start in range(0, recording.num_samples, step):
        yield recording.read(start, min(start + step, recording.num_samples))


def _read_seconds(recording: Recording, start_s: float, end_s: float) -> np.ndarray:
    rate = recording.sampling_rate
    return recording.read(int(round(start_s * rate)), min(recording.num_samples, int(round(end_s * rate))))


def vad_utterances(recording: Recording, options: RecordingOptions, vad: Optional[SileroVad]
                   ) -> Iterator[tuple[tuple[float, float], np.ndarray]]:
    """`((start_s, end_s), samples)` per utterance, each as soon as the pause after it is heard.
    Without `vad` (the package is absent), frames are scored by the energy gate."""
    segmenter = UtteranceSegmenter(options.min_silence_s, options.max_segment_s, options.min_speech_s,
                                   options.vad_threshold)
    state = vad.initial_state() if vad is not None else None
    carry = np.zeros(0, np.float32)
    seconds = FRAME / SAMPLING_RATE

    def spans(frames):
        for start, end in frames:
            yield (start * seconds, min(end * seconds, recording.duration)), _read_seconds(recording, start * seconds,
                                                                                              end * seconds)

    for block in _windows(recording):
        block = np.concatenate([carry, block])
        whole = len(block) // FRAME * FRAME
        block, carry = block[:whole], block[whole:]
        if vad is not None:
            scores, state = vad.frame_scores(block, state)
        else:
            scores = energy_frame_scores(block, -50.0 if options.vad_threshold_db is None else options.vad_threshold_db)
        yield from spans(segmenter.feed(scores))
    yield from spans(segmenter.finish())


def fixed_utterances(recording: Recording, options: RecordingOptions) -> Iterator[tuple[tuple[float, float], np.ndarray]]:
    """Fixed overlapping windows (`chunk_length_s`, `stride_length_s`), those under the energy gate skipped."""
    rate = recording.sampling_rate
    chunk = int(round(options.chunk_length_s * rate))
    for start, end in chunk_spans(recording.num_samples, chunk, chunk - int(round(options.stride_length_s * rate))):
        samples = recording.read(start, end)
        if options.vad_threshold_db is None or speech_ratio(samples, SAMPLING_RATE, options.vad_threshold_db) >= max(
                options.vad_min_speech, 1e-9):
            yield (start / rate, end / rate), samples


def utterances(recording: Recording, options: RecordingOptions, vad_loader) -> Iterator[tuple[tuple[float, float], np.ndarray]]:
    """The recording's segments in time order, by `options.segmentation`."""
    if options.segmentation == "fixed":
        return fixed_utterances(recording, options)
    vad = vad_loader()
    if vad is None:
        logger.warning("%s is not installed: segmentation='vad' falls back to the energy gate (frames at %s dBFS or "
                       "more count as speech), whose boundaries are rougher. pip install %s==6.2.3 for a real VAD.",
                       VAD_EXTRA, options.vad_threshold_db or -50.0, VAD_EXTRA)
    return vad_utterances(recording, options, vad)


# ----------------------------------------------------------------------------- labelling
def label_recording(pipe, recording: Recording, context, options: RecordingOptions, reference: Optional[np.ndarray],
                    encoder) -> Iterator[dict[str, Any]]:
    """Yield one result dict per segment, in time order (see `IclSpeechEmotionPipeline.stream`).

    `reference` is the enrolled speaker's voice print and `encoder` the speaker encoder
    (`target_speaker`), else None. `pipe` provides `_encode` / `_classify` / `_result`.
    """
    slots: list[Optional[dict]] = []  # results in time order; None until labelled
    emitted = 0
    held: list[tuple] = []  # (slots, encoded batch, batch) waiting for enough statistics
    stats: list[torch.Tensor] = []
    found = 0
    tracker = TargetSpeakerTracker(reference, options.speaker_threshold) if options.target_speaker else None

    def label(indices, encoded, batch) -> None:
        extra = torch.cat(stats) if stats else None
        if context.unlabelled is not None:
            extra = context.unlabelled if extra is None else torch.cat([context.unlabelled.to(extra), extra])
        probs = pipe._classify(context, [samples for _, samples, _ in batch], encoded, extra)
        for slot, (timestamp, _, who), row in zip(indices, batch, probs.tolist()):
            slots[slot] = pipe._result(timestamp, row, context.labels, options.top_k, who)

    def run(batch) -> None:
        indices = list(range(len(slots), len(slots) + len(batch)))
        slots.extend([None] * len(batch))
        if options.target_speaker:
            decisions = tracker.assign(encoder.embed([samples for _, samples in batch]))
            whos = [("target" if is_target else "other", similarity) for is_target, similarity in decisions]
        else:
            whos = [(None, None)] * len(batch)
        targets = [i for i, (who, _) in enumerate(whos) if who != "other"]
        for i, (who, score) in enumerate(whos):
            if who == "other":  # another speaker: no emotion (the profile does not describe them)
                slots[indices[i]] = pipe._result(batch[i][0], None, context.labels, None, (who, score))
        if not targets:
            return
        batch = [(batch[i][0], batch[i][1], whos[i]) for i in targets]
        indices = [indices[i] for i in targets]
        encoded = pipe._encode([samples for _, samples, _ in batch])
        if options.unlabelled == "recording":
            stats.append(encoded[2].float().cpu())
            if sum(len(s) for s in stats) < options.min_unlabelled:
                held.append((indices, encoded, batch))
                return
        for args in held:
            label(*args)
        held.clear()
        label(indices, encoded, batch)

    batch = []
    for timestamp, samples in utterances(recording, options, pipe._vad_model):
        found += 1
        batch.append((timestamp, samples))
        if len(batch) == options.batch_size:
            run(batch)
            batch = []
            while emitted < len(slots) and slots[emitted] is not None:
                yield slots[emitted]
                emitted += 1
    if batch:
        run(batch)
    if held:  # the recording ended before enough of its speech was heard: label without its statistics
        stats.clear()
        for args in held:
            label(*args)
    yield from slots[emitted:]
    if not found:
        raise ValueError(f"No speech found in {recording.source} ({recording.duration:.1f} s): "
                         + ("no segment passed the energy gate (vad_threshold_db="
                            f"{options.vad_threshold_db}, vad_min_speech={options.vad_min_speech}); lower "
                            "vad_threshold_db, or pass vad_threshold_db=None to label every segment."
                            if options.segmentation == "fixed" else
                            f"the voice-activity detector found no utterance of at least min_speech_s="
                            f"{options.min_speech_s:g} s. Check the recording, or lower vad_threshold "
                            f"(now {options.vad_threshold:g})."))


__all__ = ["INSTALL_HINT", "RecordingOptions", "check_options", "label_recording", "utterances"]
