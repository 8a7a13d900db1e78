"""Long recordings as users have them: utterances found, labelled, and the enrolled speaker picked out.

One run measures, side by side (`--data_dir` = the shared corpora; RAVDESS is required):

1. Segmentation: a `--minutes` (default 10) recording of one RAVDESS actor's utterances (their
   silent edges trimmed, so each utterance's true boundaries are known) with random 0.3-4 s
   pauses. % of utterances found (a VAD segment with IoU >= 0.5) and the median boundary error.
2. Emotion: per-utterance UA on that recording (each utterance gets the label of its best VAD
   segment; a missed one counts as wrong) vs labelling the same utterances one by one, and vs
   the fixed-window mode (chunk 4 s / overlap 1 s; an utterance gets the overlap-weighted mean of
   the windows over it), all with the same K = 8 profile of that actor.
3. Two speakers: per corpus, recordings alternating an enrolled speaker and another one (other
   speakers, pairs drawn at random): % of the segments assigned to the right speaker
   (`target_speaker=True`, the shipped threshold and reference weight,
   chosen on RAVDESS: bench/bench_speaker_check.py).
4. Cost: real-time factor of the whole path (VAD, speaker check, emotion; `target_speaker=True`,
   `unlabelled="recording"`) on the 10-minute file, and the peak RSS of a fresh process that
   labels a `--long_minutes` (default 60) file read from disk (`--skip_long` to leave it out).

Model: `--model` (an export), else outputs/real-speech/final or outputs/icl-ser/final of the main
checkout if one exists, else an untrained export of train.py's default architecture (then the
UA numbers are a plumbing check only: an untrained model labels at chance).

    python bench/bench_recordings.py [--threads 2] [--minutes 10] [--model DIR] [--skip_long]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SR = 16000
DATA = os.path.join(ROOT, "..", "shared", "data")
TRAINED = [os.path.join(ROOT, "..", "main", "outputs", name, "final") for name in ("real-speech", "icl-ser")]


def trimmed(path: str) -> np.ndarray:
    """The utterance without its silent edges (10 ms frames more than 35 dB under the loudest)."""
    from modeling_icl_ser import load_audio

    wav = load_audio(path)
    n = len(wav) // 160
    level = 10 * np.log10(np.mean(np.square(wav[: n * 160].reshape(n, 160), dtype=np.float64), axis=1) + 1e-12)
    voiced = np.flatnonzero(level >= level.max() - 35)
    return wav[voiced[0] * 160:(voiced[-1] + 1) * 160]


def speakers_of(corpus: str) -> dict:
    from dataset_builder import read_corpus

    by: dict = {}
    for row in read_corpus(corpus, os.path.join(DATA, corpus)):
        by.setdefault(row["speaker"], []).append((row["path"], row["emotion"]))
    return by


def build(pieces, rng, minutes=None):
    """Concatenate (samples, tag) pieces with random 0.3-4 s pauses: (recording, [(start, end, tag)])."""
    out, truth, t = [np.zeros(int(0.5 * SR), np.float32)], [], int(0.5 * SR)
    for samples, tag in pieces:
        if minutes is not None and t + len(samples) > minutes * 60 * SR:
            break
        truth.append((t / SR, (t + len(samples)) / SR, tag))
        pause = np.zeros(int(rng.uniform(0.3, 4.0) * SR), np.float32)
        out += [samples, pause]
        t += len(samples) + len(pause)
    return np.concatenate(out), truth


def iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / max(a[1] - a[0] + b[1] - b[0] - inter, 1e-9)


def match(truth, segments):
    """Per true utterance, (its best segment or None, IoU)."""
    out = []
    for start, end, _ in truth:
        best = max(segments, key=lambda s: iou((start, end), s["timestamp"]), default=None)
        out.append((best, 0.0 if best is None else iou((start, end), best["timestamp"])))
    return out


def ua(truth_labels, predicted, labels) -> float:
    recalls = [np.mean([p == t for p, t in zip(predicted, truth_labels) if t == label])
               for label in labels if label in truth_labels]
    return 100 * float(np.mean(recalls))


def fixed_labels(truth, windows, labels):
    out = []
    for start, end, _ in truth:
        total = np.zeros(len(labels))
        for w in windows:
            overlap = max(0.0, min(end, w["timestamp"][1]) - max(start, w["timestamp"][0]))
            total += overlap * np.array([w["scores"][label] for label in labels])
        out.append(labels[int(total.argmax())] if total.any() else None)
    return out


def long_run(args) -> None:
    """Child process: label a --long_minutes file from disk, print RTF and peak RSS."""
    import soundfile
    from transformers import pipeline

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    by = speakers_of("ravdess")
    actor = sorted(by)[0]
    rows = by[actor]
    pipe = pipeline("icl-speech-emotion", model=args.model, trust_remote_code=True, device="cpu")
    profile = pipe.enroll([(trimmed(p), e) for p, e in rows[:8]], labels=sorted({e for _, e in rows}), sampling_rate=SR)
    clips = [trimmed(p) for p, _ in rows[8:]]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "long.wav")
        with soundfile.SoundFile(path, "w", SR, 1, subtype="PCM_16") as out:  # written piecewise
            written = 0
            while written < args.long_minutes * 60 * SR:
                piece = np.concatenate([clips[int(rng.integers(len(clips)))], np.zeros(int(rng.uniform(0.3, 4) * SR))])
                out.write(piece)
                written += len(piece)
        del clips
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        n = sum(1 for _ in pipe.stream(path, profile=profile, target_speaker=True))
        elapsed = time.perf_counter() - start
    print(f"60-minute case: {written / SR / 60:.1f} min from disk, {n} segments, {elapsed:.0f} s -> "
          f"{written / SR / elapsed:.1f}x real time; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(model loaded: {before:.0f} MB; goal < 2048 MB)")


def two_speaker(pipe, corpus: str, rng, pairs: int, labels_of) -> tuple[int, int]:
    """(right, total) speaker assignments over `pairs` alternating two-speaker recordings of `corpus`."""
    by = {s: rows for s, rows in speakers_of(corpus).items() if len(rows) >= 16}
    names = sorted(by)
    right = total = 0
    for _ in range(pairs):
        a, b = rng.choice(len(names), 2, replace=False)
        target, other = by[names[a]], by[names[b]]
        order_t, order_o = rng.permutation(len(target)), rng.permutation(len(other))
        enroll = [(trimmed(target[i][0]), target[i][1]) for i in order_t[:8]]
        profile = pipe.enroll(enroll, labels=labels_of(corpus), sampling_rate=SR)
        pieces = []
        for i, j in zip(order_t[8:20], order_o[:12]):
            pieces += [(trimmed(target[i][0]), "target"), (trimmed(other[j][0]), "other")]
        recording, truth = build(pieces, rng)
        segments = pipe(recording, profile=profile, sampling_rate=SR, target_speaker=True)
        for seg in segments:  # each segment's true speaker: the utterance it overlaps most
            best = max(truth, key=lambda t: iou((t[0], t[1]), seg["timestamp"]))
            right += seg["speaker"] == best[2]
            total += 1
    return right, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--long_minutes", type=float, default=60.0)
    parser.add_argument("--pairs", type=int, default=4, help="two-speaker recordings per corpus")
    parser.add_argument("--model", default=None)
    parser.add_argument("--skip_long", action="store_true")
    parser.add_argument("--skip_emotion", action="store_true", help="leave out the UA comparison (3 more passes)")
    parser.add_argument("--long_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        args.model = next((path for path in TRAINED if os.path.isdir(path)), None)
    if args.model is None:  # an untrained stand-in, built in a child process
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "export")
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                            f"from bench.bench_long_audio import export_stand_in; export_stand_in({folder!r})"],
                           check=True, stdout=subprocess.DEVNULL)
            print("model: an UNTRAINED export of train.py's default architecture (no trained export found): the UA "
                  "numbers below are a plumbing check only")
            subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--model", folder], check=True)
        return
    if args.long_child:
        return long_run(args)
    from transformers import pipeline

    print(f"model: {args.model}; {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} "
          "(the 2 cores are shared with other workers)")
    rng = np.random.default_rng(0)
    by = speakers_of("ravdess")
    actor = sorted(by)[0]
    rows = [by[actor][i] for i in rng.permutation(len(by[actor]))]
    labels = sorted({e for _, e in rows})
    enroll, rest = rows[:8], rows[8:]
    pipe = pipeline("icl-speech-emotion", model=args.model, trust_remote_code=True, device="cpu")
    profile = pipe.enroll([(trimmed(p), e) for p, e in enroll], labels=labels, sampling_rate=SR)
    clips = [(trimmed(p), e) for p, e in rest]
    pieces = [clips[i] for _ in range(4) for i in rng.permutation(len(clips))]
    recording, truth = build(pieces, rng, minutes=args.minutes)
    seconds = len(recording) / SR
    truth_labels = [tag for _, _, tag in truth]

    # 1 + 2: VAD segments, one by one, fixed windows (same profile)
    start = time.perf_counter()
    segments = pipe(recording, profile=profile, sampling_rate=SR, segmentation="vad")
    t_vad = time.perf_counter() - start
    matched = match(truth, segments)
    found = [iou_ >= 0.5 for _, iou_ in matched]
    errors = [abs(a - b) for (seg, iou_), (s, e, _) in zip(matched, truth) if iou_ >= 0.5
              for a, b in zip(seg["timestamp"], (s, e))]
    print(f"recording: {seconds / 60:.1f} min, {len(truth)} utterances of RAVDESS {actor} (K = 8 profile of the "
          f"same actor), pauses 0.3-4 s; {len(segments)} VAD segments")
    print(f"segmentation: {100 * np.mean(found):.1f} % of utterances found (IoU >= 0.5; goal >= 95 %), median "
          f"boundary error {np.median(errors):.3f} s (goal <= 0.25 s)")
    if not args.skip_emotion:
        vad_pred = [seg["label"] if iou_ > 0 else None for seg, iou_ in matched]
        one = [pipe(samples, profile=profile, sampling_rate=SR)[0]["label"] for samples, _ in pieces[:len(truth)]]
        windows = pipe(recording, profile=profile, sampling_rate=SR, chunk_length_s=4.0, stride_length_s=1.0)
        fixed = fixed_labels(truth, windows, labels)
        no_self = pipe(recording, profile=profile, sampling_rate=SR, segmentation="vad", unlabelled=None)
        no_self_pred = [seg["label"] if iou_ > 0 else None for seg, iou_ in match(truth, no_self)]
        print(f"emotion UA ({len(labels)} labels): VAD segments {ua(truth_labels, vad_pred, labels):.1f} | the same "
              f"utterances one by one {ua(truth_labels, one, labels):.1f} | fixed windows {ua(truth_labels, fixed, labels):.1f} "
              f"| VAD without the recording's own statistics {ua(truth_labels, no_self_pred, labels):.1f}")

    # 3: two speakers
    label_sets = {"ravdess": labels}
    for corpus in ("ravdess", "ased", "emotiontts-ko"):
        if not os.path.isdir(os.path.join(DATA, corpus)):
            print(f"two speakers, {corpus}: not found, skipped")
            continue
        def labels_of(name):
            if name not in label_sets:
                label_sets[name] = sorted({e for rows_ in speakers_of(name).values() for _, e in rows_})
            return label_sets[name]
        right, total = two_speaker(pipe, corpus, rng, args.pairs, labels_of)
        print(f"two speakers, {corpus}: {100 * right / total:.1f} % of {total} segments assigned to the right speaker "
              f"({args.pairs} recordings of 2 x 12 alternating utterances; goal >= 90 %)")

    # 4: cost of the whole path on the 10-minute recording
    start = time.perf_counter()
    pipe(recording, profile=profile, sampling_rate=SR, target_speaker=True)
    whole = time.perf_counter() - start
    print(f"cost: whole path (VAD + speaker check + emotion + the recording's statistics) {seconds / whole:.1f}x real "
          f"time (goal >= 30x); VAD + emotion alone {seconds / t_vad:.1f}x; {torch.get_num_threads()} threads, load "
          f"average {os.getloadavg()[0]:.1f}")
    if not args.skip_long:
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--long_child", "--model", args.model,
                            "--threads", str(args.threads), "--long_minutes", str(args.long_minutes)],
                           check=True, timeout=1500)
        except subprocess.TimeoutExpired:
            print("60-minute case: timed out after 1500 s")


if __name__ == "__main__":
    main()
