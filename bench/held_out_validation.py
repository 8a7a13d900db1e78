"""Out-of-domain validation of a release run: compare recipes without touching a test speaker.

A run with ``--route_weights_from held_out_corpora`` saves each fold model's route probabilities
on the train and validation speakers of the corpus it never heard
(``<run>/folds/<corpus>/held_out_routes.npz``). Here each fold is scored with weights chosen on
the *other* folds only (as ``nested_route_weights.json``), per K, beside each route alone, and the
folds are averaged (each corpus counts once). Two recipes are compared by this table, and only
then is the chosen one tested (bench/leave_one_corpus_out.py).

    python bench/held_out_validation.py outputs/real-speech [outputs/real-speech-400 ...]
        [--route_weight_step 0.1] [--output summary.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.route_weights import ROUTE_NAMES, mixture_ua  # noqa: E402
from training.held_out_folds import FOLD_SCORES, choose_out_of_domain_weights, load_fold_scores  # noqa: E402


def load_folds(run: Path) -> dict:
    """``{held-out corpus: (routes_by_k, truths_by_k, labels)}`` of a run's folds."""
    paths = sorted((run / "folds").glob(f"*/{FOLD_SCORES}"))
    if len(paths) < 2:
        raise ValueError(f"{run} has {len(paths)} fold score files ({FOLD_SCORES}); a nested choice needs two or more. "
                         "Train it with --route_weights_from held_out_corpora.")
    return {path.parent.name: load_fold_scores(path) for path in paths}


def route_alone(routes: dict, name: str, truths, labels) -> float | None:
    """UA of one route alone, or None where it cannot score (the prototype route at K = 0)."""
    if routes.get(name) is None or np.isnan(routes[name]).all():
        return None
    return mixture_ua(routes, truths, labels, {name: 1.0})


def nested_scores(folds: dict, step: float) -> dict[str, dict[int, dict[str, float | None]]]:
    """``{corpus: {k: {"mixture": UA with weights chosen on the other folds, route: UA alone}}}`` in %."""
    table = {}
    for corpus, (routes_by_k, truths_by_k, labels) in folds.items():
        weights = choose_out_of_domain_weights(folds, step, exclude=corpus)["weights"]
        table[corpus] = {}
        for k, routes in routes_by_k.items():
            if str(k) not in weights:
                continue
            row = {"mixture": mixture_ua(routes, truths_by_k[k], labels, weights[str(k)])}
            row.update({name: route_alone(routes, name, truths_by_k[k], labels) for name in ROUTE_NAMES})
            table[corpus][k] = {key: (None if value is None else 100 * value) for key, value in row.items()}
    return table


def markdown(runs: dict[str, dict]) -> str:
    """One table: a row per run, corpus and scorer, a column per K, then the mean over corpora."""
    ks = sorted({k for table in runs.values() for rows in table.values() for k in rows})
    lines = ["| run | held-out corpus | scored by | " + " | ".join(f"K={k}" for k in ks) + " | mean |",
             "|---|---|---|" + "---:|" * (len(ks) + 1)]

    def cells(values):
        shown = [("–" if v is None else f"{v:.1f}") for v in values]
        known = [v for v in values if v is not None]
        return " | ".join(shown) + " | " + (f"{np.mean(known):.1f}" if known else "–")

    for run, table in runs.items():
        for scorer in ("mixture", *ROUTE_NAMES):
            for corpus, rows in table.items():
                lines.append(f"| {run} | {corpus} | {scorer} | " + cells([rows.get(k, {}).get(scorer) for k in ks]) + " |")
            means = [None if any(rows.get(k, {}).get(scorer) is None for rows in table.values())
                     else float(np.mean([rows[k][scorer] for rows in table.values()])) for k in ks]
            lines.append(f"| {run} | **mean of corpora** | {scorer} | " + cells(means) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="release run folders (each with folds/<corpus>/).")
    parser.add_argument("--route_weight_step", type=float, default=0.1)
    parser.add_argument("--output", type=Path, help="also write the table here.")
    args = parser.parse_args(argv)
    folds = {str(run): load_folds(run) for run in args.runs}  # every run checked before any is scored
    text = markdown({run: nested_scores(run_folds, args.route_weight_step) for run, run_folds in folds.items()})
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
