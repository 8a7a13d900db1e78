"""Measure how much knowing the speaker helps on a corpus (by default the synthetic one).

Features: per-utterance mean and standard deviation of 40 log-mel bands and 20 MFCCs
(torchaudio), standardized over the corpus. Classifiers:

* ``speaker-independent`` - logistic regression trained on other speakers (4-fold,
  speaker-grouped cross-validation);
* ``SI + speaker norm`` - the same after z-normalizing each speaker's features with that
  speaker's own (unlabelled) statistics: a stronger speaker-independent baseline;
* ``same-speaker K=8 prototypes`` - nearest class mean among K=8 enrollment utterances of
  the query's speaker (balanced episodes: every emotion at least once), one episode per
  query;
* ``same-speaker LOO prototypes`` - nearest class mean over all of the speaker's other
  utterances (a near upper bound for speaker-dependent classification).

Usage (from the repo root)::

    python bench/synthetic_gap.py                          # default synthetic corpus
    python bench/synthetic_gap.py --speaker-specificity 0.5
    python bench/synthetic_gap.py --corpus ravdess --data-dir ../shared/data/ravdess
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torchaudio  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GroupKFold  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from dataset_builder import read_corpus  # noqa: E402
from dataset_builder.episodes import build_pools, fixed_episodes  # noqa: E402
from modeling_icl_ser.audio_utils import load_audio  # noqa: E402


def utterance_features(paths: list[str]) -> np.ndarray:
    """Mean and std over frames of log-mel (40) and MFCC (20) coefficients."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=40)
    mfcc = torchaudio.transforms.MFCC(sample_rate=16000, n_mfcc=20, melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40})
    rows = []
    with torch.no_grad():
        for path in paths:
            audio = torch.from_numpy(load_audio(path))
            logmel = torch.log(mel(audio) + 1e-6)
            coefficients = mfcc(audio)
            rows.append(
                torch.cat([logmel.mean(1), logmel.std(1), coefficients.mean(1), coefficients.std(1)]).numpy()
            )
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="synthetic")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--speaker-specificity", type=float, default=None, help="synthetic only")
    parser.add_argument("--variability", type=float, default=None, help="synthetic only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()

    options = {}
    if args.speaker_specificity is not None:
        options["speaker_specificity"] = args.speaker_specificity
    if args.variability is not None:
        options["variability"] = args.variability
    if args.corpus == "synthetic":
        options["seed"] = args.seed
    start = time.time()
    table = read_corpus(args.corpus, args.data_dir, **options)
    features = utterance_features(table["path"])
    features = StandardScaler().fit_transform(features)
    speakers = np.array(table["speaker"])
    labels = np.array(table["emotion"])
    classes = sorted(set(labels))
    row_of = {utterance_id: i for i, utterance_id in enumerate(table["id"])}

    def logistic() -> LogisticRegression:
        return LogisticRegression(C=0.5, max_iter=2000)

    # Speaker-independent: train on other speakers.
    folds = GroupKFold(n_splits=4)
    si_correct = si_norm_correct = 0
    normalized = features.copy()
    for speaker in set(speakers):
        rows = speakers == speaker
        normalized[rows] = (features[rows] - features[rows].mean(0)) / (features[rows].std(0) + 1e-6)
    for train, test in folds.split(features, labels, speakers):
        si_correct += (logistic().fit(features[train], labels[train]).predict(features[test]) == labels[test]).sum()
        si_norm_correct += (
            logistic().fit(normalized[train], labels[train]).predict(normalized[test]) == labels[test]
        ).sum()

    # Same speaker, K enrollment utterances (balanced), nearest class prototype.
    pools = build_pools(table)
    proto_correct = proto_total = 0
    for episode in fixed_episodes(pools, k=args.k, mode="balanced", seed=args.seed):
        enrollment = np.array([row_of[i] for i in episode["enrollment_ids"]])
        enrollment_labels = np.array(episode["enrollment_labels"])
        prototypes = {e: features[enrollment[enrollment_labels == e]].mean(0) for e in set(enrollment_labels)}
        query = features[row_of[episode["query_id"]]]
        guess = min(prototypes, key=lambda e: np.sum((query - prototypes[e]) ** 2))
        proto_correct += guess == episode["emotion"]
        proto_total += 1

    # Same speaker, leave-one-out prototypes from all of the speaker's other utterances.
    loo_correct = 0
    for speaker in set(speakers):
        rows = np.flatnonzero(speakers == speaker)
        for i in rows:
            others = rows[rows != i]
            prototypes = {e: features[others[labels[others] == e]].mean(0) for e in set(labels[others])}
            loo_correct += min(prototypes, key=lambda e: np.sum((features[i] - prototypes[e]) ** 2)) == labels[i]

    n = len(labels)
    print(f"corpus={args.corpus} {options} utterances={n} speakers={len(set(speakers))} classes={len(classes)}")
    print(f"chance (1/classes)                    {1 / len(classes):.3f}")
    print(f"speaker-independent (LR, 4-fold)      {si_correct / n:.3f}")
    print(f"SI + per-speaker feature norm         {si_norm_correct / n:.3f}")
    print(f"same-speaker K={args.k} prototypes (balanced) {proto_correct / proto_total:.3f}")
    print(f"same-speaker prototypes, leave-one-out {loo_correct / n:.3f}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
