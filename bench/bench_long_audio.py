"""Speed and memory of labelling a long recording with a speaker profile (`pipe.stream`).

Builds a recording of `--minutes` (default 10) from one RAVDESS actor's utterances with 0.5-4 s
silences between them (`--data_dir`; without RAVDESS, synthetic voiced tones), written to a
temporary 16 kHz WAV file, enrolls the same actor with K = 8 other utterances, and labels the
file with `chunk_length_s=4, stride_length_s=1` (the energy gate on, batch 8), read from disk
segment by segment. Model: `--model` (an export), else `outputs/icl-ser/final` (the README's
main command's export) if it exists, else an untrained export of the same architecture (offline
Whisper tiny.en block 2 + SmolLM2-135M cut to 8 blocks + read-out; fine for timing), loaded in
a fresh process with `trust_remote_code` as a user would. Prints, from one run of that process:

* the real-time ratio (recording seconds / labelling seconds; goal >= 20x on 2 CPU cores),
* peak RSS of the whole process (model included; goal < 2 GB) and the RSS before labelling,
* segments labelled / skipped by the gate.

    python bench/bench_long_audio.py [--minutes 10] [--threads 2] [--data_dir ../shared/data/ravdess] [--model DIR]
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
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "ravdess")


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def speech(data_dir: str, rng: np.random.Generator):
    """(enrollment [(samples, label)] * 8, utterances [samples]) of one speaker: RAVDESS or synthetic tones."""
    from modeling_icl_ser import load_audio

    if os.path.isdir(data_dir):
        from dataset_builder import read_corpus

        corpus = read_corpus("ravdess", data_dir)
        rows = [row for row in corpus if row["speaker"] == corpus[0]["speaker"]]
        order = rng.permutation(len(rows))
        enrollment, seen = [], set()
        for i in order:  # 8 enrollment utterances, as many distinct labels as possible first
            if rows[i]["emotion"] not in seen and len(enrollment) < 8:
                seen.add(rows[i]["emotion"])
                enrollment.append(i)
        enrollment += [i for i in order if i not in enrollment][: 8 - len(enrollment)]
        rest = [i for i in order if i not in enrollment]
        load = lambda i: load_audio(rows[i]["path"], target_sampling_rate=SR)  # noqa: E731
        return [(load(i), rows[i]["emotion"]) for i in enrollment], [load(i) for i in rest], "RAVDESS " + rows[0]["speaker"]

    def tone(seed):
        t = np.arange(int(rng.uniform(2, 4) * SR)) / SR
        wave = np.sin(2 * np.pi * (110 + 12 * seed) * t + 2 * np.sin(2 * np.pi * 4 * t))
        return (0.3 * wave * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t)) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)

    labels = ["anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    return [(tone(j), labels[j]) for j in range(8)], [tone(8 + j) for j in range(40)], "synthetic tones"


def export_stand_in(folder: str) -> None:
    """An export with train.py's default architecture (offline backbones, LM cut to 8 blocks,
    encoder block 2, a 4-head read-out), untrained: what `python train.py` writes, for timing."""
    from modeling_icl_ser import save_with_pipeline
    from modeling_icl_ser.backbones import offline_default

    model, processor = offline_default(language_model_layers=8, audio_feature_layer=2, context_readout_heads=4)
    save_with_pipeline(model.eval(), processor, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--model", default=None, help="an exported model folder (default: outputs/icl-ser/final if it "
                                                      "exists, else an untrained export of the same architecture)")
    parser.add_argument("--chunk", type=float, default=4.0)
    parser.add_argument("--stride", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None and os.path.isdir("outputs/icl-ser/final"):
        args.model = "outputs/icl-ser/final"
    if args.model is None:  # built in a child process, so its memory does not count here
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "export")
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                            f"from bench.bench_long_audio import export_stand_in; export_stand_in({folder!r})"],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--model", folder], check=True)
        return
    import soundfile
    from transformers import pipeline

    rng = np.random.default_rng(0)
    enrollment, utterances, source = speech(args.data_dir, rng)
    target = int(args.minutes * 60 * SR)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recording.wav")
        written = 0
        with soundfile.SoundFile(path, "w", SR, 1, subtype="PCM_16") as out:  # built piecewise: never all in memory
            while written < target:
                for piece in (utterances[int(rng.integers(len(utterances)))], np.zeros(int(rng.uniform(0.5, 4) * SR))):
                    piece = piece[: target - written]
                    out.write(piece)
                    written += len(piece)
        del utterances
        pipe = pipeline("icl-speech-emotion", model=args.model, trust_remote_code=True, device="cpu")
        labels = list(dict.fromkeys(list(pipe.processor.labels) + [label for _, label in enrollment]))
        profile = pipe.enroll(enrollment, labels=labels, sampling_rate=SR)
        pipe(enrollment[0][0], profile=profile, sampling_rate=SR)  # warm-up
        before = rss_mb()
        start = time.perf_counter()
        segments = 0
        for _ in pipe.stream(path, profile=profile, chunk_length_s=args.chunk, stride_length_s=args.stride,
                             batch_size=args.batch_size):
            segments += 1
        elapsed = time.perf_counter() - start
        total = len(range(0, max(written - int(args.chunk * SR), 0), int((args.chunk - args.stride) * SR))) + 1
    seconds = written / SR
    a, w = torch.randn(256, 576), torch.randn(1536, 576)  # what the CPU gives this process now (a shared machine)
    start = time.perf_counter()
    for _ in range(100):
        torch.nn.functional.linear(a, w)
    gflops = 100 * 2 * 256 * 576 * 1536 / (time.perf_counter() - start) / 1e9
    print(f"model: {args.model}; recording: {seconds / 60:.1f} min of {source} + silences, K = {profile.num_enrollment} "
          f"profile, chunk {args.chunk:g} s / overlap {args.stride:g} s, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"segments labelled: {segments} of {total} (the rest skipped as silence)")
    print(f"labelling time: {elapsed:.1f} s -> {seconds / elapsed:.1f}x faster than real time (goal >= 20x)")
    print(f"fp32 matmul throughput right after (LM-sized, {torch.get_num_threads()} threads): {gflops:.1f} GFLOP/s; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"RSS before labelling: {before:.0f} MB; peak RSS of the process (model loaded from the export "
          f"included): {peak_rss_mb():.0f} MB (goal < 2048 MB)")


if __name__ == "__main__":
    main()
