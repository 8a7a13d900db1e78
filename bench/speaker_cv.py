"""Speaker cross-validation in domain (issue 24, G3): the release recipe, each fold of one corpus'
speakers held out as test speakers in turn, against the conventional methods fitted in domain.

For fold i of F, the test speakers are the corpus' sorted speakers i, i + F, i + 2F, ...
train.py trains the recipe on every corpus of it with those speakers left out (``--test_speakers``;
``--validation_per_fold`` of the rest validate, and the other corpora keep the validation speakers
of the recipe's own split and train on all others), and eval.py scores the
fold model on them (content-disjoint enrollment where the corpus has texts, the same queries at
every K) beside the conventional methods fitted on the corpus' own training speakers. The
summary is one table of UA per method and K, averaged over the folds (every speaker is a test
speaker exactly once), and each fold's ICL K8 − best conventional K8.

    python bench/speaker_cv.py configs/real-speech.yaml --corpus ravdess --folds 3 \
        [--train_flags "--route_weights_from validation"] [--output_dir outputs/speaker-cv]

Test speakers are scored once per reported number; settings are chosen on validation speakers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from dataset_builder import TEXTLESS_CORPORA, parse_corpora, read_corpora  # noqa: E402
from dataset_builder.multi import namespaced  # noqa: E402

METHODS = ("icl", "icl_lm", "icl_si", "icl_prototype", "si", "si_norm", "si_finetune", "prototypes",
           "speaker_embedding", "enroll_prototypes")
CONVENTIONAL = ("si", "si_norm", "si_finetune", "prototypes", "speaker_embedding", "enroll_prototypes")


def fold_speakers(speakers: list[str], folds: int) -> list[list[str]]:
    """Fold i holds the sorted speakers i, i + folds, ...; raises ValueError for too few speakers."""
    speakers = sorted(speakers)
    if folds < 2 or len(speakers) < 2 * folds:
        raise ValueError(f"Speaker cross-validation needs folds >= 2 and >= 2 speakers per fold; got {folds} folds "
                         f"for {len(speakers)} speakers.")
    return [speakers[i::folds] for i in range(folds)]


def validation_speakers(speakers: list[str], test: list[str], n: int) -> list[str]:
    """``n`` of the non-test speakers, spread over the sorted rest, for train.py's validation."""
    rest = [s for s in sorted(speakers) if s not in set(test)]
    if not 1 <= n < len(rest):
        raise ValueError(f"--validation_per_fold must be in 1..{len(rest) - 1}, got {n}.")
    return rest[:: max(len(rest) // n, 1)][:n]


def other_validation_speakers(specs, corpus: str) -> list[str]:
    """The other corpora's validation speakers of the recipe's own split (seed 0), so their
    validation stays as in the release run (explicit speaker lists replace the fractions)."""
    if len(specs) < 2:
        return []
    from dataset_builder import split_corpora
    from dataset_builder.multi import corpus_of

    table = read_corpora(specs)
    return [s for s in split_corpora(table, specs, seed=0)["validation"] if corpus_of(s) != corpus]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="train.py's recipe (YAML), e.g. configs/real-speech.yaml")
    parser.add_argument("--corpus", default="ravdess", help="The corpus whose speakers are cross-validated.")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--train_flags", default="", help="Extra train.py flags (after the recipe).")
    parser.add_argument("--validation_per_fold", type=int, default=4,
                        help="Non-test speakers of the corpus that train.py validates on in each fold.")
    parser.add_argument("--episodes_per_speaker", type=int, default=20)
    parser.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--output_dir", default="outputs/speaker-cv")
    args = parser.parse_args(argv)

    recipe = yaml.safe_load(Path(args.config).read_text())
    specs = parse_corpora(recipe["corpus"], recipe["data_dir"])
    folder = dict(specs).get(args.corpus)
    if folder is None:
        raise ValueError(f"--corpus {args.corpus!r} is not one of the recipe's corpora {[n for n, _ in specs]}.")
    speakers = sorted(set(read_corpora([(args.corpus, folder)])["speaker"]))
    out = Path(args.output_dir)
    per_fold = []
    for i, test in enumerate(fold_speakers(speakers, args.folds)):
        run = out / f"fold{i}"
        own_validation = validation_speakers(speakers, test, args.validation_per_fold)
        if not (run / "final" / "config.json").is_file():
            name = (lambda s: namespaced(args.corpus, s)) if len(specs) > 1 else (lambda s: s)
            validation = [name(s) for s in own_validation] + other_validation_speakers(specs, args.corpus)
            subprocess.run([sys.executable, str(ROOT / "train.py"), args.config, *shlex.split(args.train_flags),
                            "--test_speakers", *map(name, test), "--validation_speakers", *validation,
                            "--output_dir", str(run)], check=True, cwd=ROOT)
        scored = run / "eval"
        if not (scored / "results.json").is_file():
            command = [sys.executable, str(ROOT / "eval.py"), "--model", str(run / "final"), "--corpus", args.corpus,
                       "--data_dir", str(folder), "--test_speakers", *test, "--validation_speakers", *own_validation,
                       "--episodes_per_speaker", str(args.episodes_per_speaker), "--k", *map(str, args.k),
                       "--output_dir", str(scored)]
            if args.corpus not in TEXTLESS_CORPORA:
                command.append("--content_disjoint")
            subprocess.run(command, check=True, cwd=ROOT)
        results = json.loads((scored / "results.json").read_text())["results"]
        per_fold.append({(r["method"], r["k"]): r["ua"] for r in results if r.get("mode", "arbitrary") == "arbitrary"})
    (out / "summary.md").write_text(summary(per_fold, args), encoding="utf-8")
    print((out / "summary.md").read_text())


def summary(per_fold: list[dict], args) -> str:
    """Fold-averaged UA per method and K, and each fold's ICL − best conventional at the largest K."""
    ks, top = args.k, max(args.k)
    lines = [f"## Speaker cross-validation on {args.corpus}: {args.folds} folds, UA % averaged over the folds", "",
             "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for method in METHODS:
        if all((method, k) in fold for fold in per_fold for k in ks):
            lines.append(f"| {method} | " + " | ".join(
                f"{100 * sum(fold[(method, k)] for fold in per_fold) / len(per_fold):.1f}" for k in ks) + " |")
    lines.append("")
    for i, fold in enumerate(per_fold):
        best = max((fold[(m, top)], m) for m in CONVENTIONAL if (m, top) in fold)
        lines.append(f"- fold {i}: ICL K={top} {100 * fold[('icl', top)]:.1f}, best conventional {100 * best[0]:.1f} "
                     f"({best[1]}), ICL − best {100 * (fold[('icl', top)] - best[0]):+.1f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
