"""Speaker verification with the target-speaker check's encoder (GE2E, `speaker_check_icl_ser`).

Per shared corpus: every speaker's enrollment embedding from `--enroll` (default 4) of their
utterances, scored (cosine) against each of `--trials` (default 10) other utterances of the same
speaker and of every other speaker. Prints the equal error rate (EER) and its threshold per
corpus, and the false-accept / false-reject rates at the threshold the pipeline ships
(`DEFAULT_THRESHOLD`, chosen on RAVDESS; the other corpora test it). Then, with `--calls N`
(default 8) per corpus: two-speaker calls of 12 + 12 alternating utterances (a K = 8 voice print
of the first speaker): % of utterances assigned right by the threshold alone and by
`TargetSpeakerTracker` with reference weights 2 and 8 (the shipped weight was chosen on RAVDESS).

    python bench/bench_speaker_check.py [--corpora ravdess ased emotiontts-ko] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data")


def eer(same: np.ndarray, different: np.ndarray) -> tuple[float, float]:
    """(equal error rate, threshold): where false rejects of `same` equal false accepts of `different`."""
    thresholds = np.unique(np.concatenate([same, different]))
    frr = np.array([(same < t).mean() for t in thresholds])
    far = np.array([(different >= t).mean() for t in thresholds])
    i = int(np.argmin(np.abs(frr - far)))
    return float((frr[i] + far[i]) / 2), float(thresholds[i])


def corpus_scores(name: str, enroll: int, trials: int, rng: np.random.Generator, encoder) -> tuple[np.ndarray, np.ndarray]:
    from dataset_builder import read_corpus
    from modeling_icl_ser import load_audio
    from modeling_icl_ser.speaker_check_icl_ser import speaker_embedding

    corpus = read_corpus(name, os.path.join(DATA, name))
    by_speaker: dict = {}
    for row in corpus:
        by_speaker.setdefault(row["speaker"], []).append(row["path"])
    profiles, tests = {}, {}
    for speaker, paths in sorted(by_speaker.items()):
        if len(paths) < enroll + 2:
            continue
        order = rng.permutation(len(paths))
        profiles[speaker] = speaker_embedding(encoder, [load_audio(paths[i]) for i in order[:enroll]])
        tests[speaker] = encoder.embed([load_audio(paths[i]) for i in order[enroll:enroll + trials]])
    same, different = [], []
    for speaker, vectors in tests.items():
        for other, profile in profiles.items():
            (same if other == speaker else different).extend((vectors @ profile).tolist())
    return np.asarray(same), np.asarray(different)


def calls(name: str, n: int, rng: np.random.Generator, encoder) -> dict:
    """Accuracy (%) of each speaker rule on `n` alternating two-speaker calls of corpus `name`."""
    from dataset_builder import read_corpus
    from modeling_icl_ser import load_audio
    from modeling_icl_ser.speaker_check_icl_ser import DEFAULT_THRESHOLD, TargetSpeakerTracker, speaker_embedding

    by: dict = {}
    for row in read_corpus(name, os.path.join(DATA, name)):
        by.setdefault(row["speaker"], []).append(row["path"])
    names = [s for s in sorted(by) if len(by[s]) >= 20]
    scores: dict = {}
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        target = [by[names[a]][i] for i in rng.permutation(len(by[names[a]]))[:20]]
        other = [by[names[b]][i] for i in rng.permutation(len(by[names[b]]))[:12]]
        reference = speaker_embedding(encoder, [load_audio(p) for p in target[:8]])
        call = np.empty((24, 256), np.float32)
        call[0::2] = encoder.embed([load_audio(p) for p in target[8:]])
        call[1::2] = encoder.embed([load_audio(p) for p in other])
        truth = np.array([True, False] * 12)
        scores.setdefault("threshold alone", []).append(np.mean((call @ reference >= DEFAULT_THRESHOLD) == truth))
        for weight in (2.0, 8.0):
            decided = [t for t, _ in TargetSpeakerTracker(reference, reference_weight=weight).assign(call)]
            scores.setdefault(f"tracker, weight {weight:g}", []).append(np.mean(np.array(decided) == truth))
    return {rule: 100 * float(np.mean(v)) for rule, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", nargs="+", default=["ravdess", "ased", "emotiontts-ko"])
    parser.add_argument("--enroll", type=int, default=4)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from modeling_icl_ser.speaker_check_icl_ser import DEFAULT_THRESHOLD, load_speaker_encoder

    encoder = load_speaker_encoder(required=True, why="bench_speaker_check needs the speaker encoder")
    rng = np.random.default_rng(0)
    for name in args.corpora:
        if not os.path.isdir(os.path.join(DATA, name)):
            print(f"{name}: not found under {DATA}, skipped")
            continue
        same, different = corpus_scores(name, args.enroll, args.trials, rng, encoder)
        rate, threshold = eer(same, different)
        far, frr = float((different >= DEFAULT_THRESHOLD).mean()), float((same < DEFAULT_THRESHOLD).mean())
        print(f"{name}: {len(same)} same / {len(different)} different-speaker trials (K = {args.enroll} enrollment "
              f"utterances): EER {100 * rate:.1f} % at cosine {threshold:.3f}; at the shipped threshold "
              f"{DEFAULT_THRESHOLD:.2f}: false accepts {100 * far:.1f} %, false rejects {100 * frr:.1f} %")
        if args.calls:
            accuracy = calls(name, args.calls, rng, encoder)
            print(f"{name}: {args.calls} two-speaker calls (12 + 12 alternating utterances), % assigned right: "
                  + "; ".join(f"{rule} {value:.1f}" for rule, value in accuracy.items()))


if __name__ == "__main__":
    main()
