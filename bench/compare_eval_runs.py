"""Paired comparison of two `eval.py` runs on the same episodes (e.g. two encoders).

For every (method, K) cell both runs scored, prints UA of run A → run B; then the mean UA over
all cells and a paired bootstrap 95% CI of the mean difference (the same resampled episodes
for both runs within each cell).

    python bench/compare_eval_runs.py outputs/eval-tiny outputs/eval-base [--n_bootstrap 1000]

Reads each folder's `predictions.jsonl`; refuses runs whose cells or episodes differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluation.metrics import paired_ua_resamples, unweighted_accuracy


def read_predictions(folder: str) -> dict[tuple[str, str, int], dict[str, tuple[str, str]]]:
    """(method, mode, k) → episode id → (true emotion, prediction)."""
    path = Path(folder) / "predictions.jsonl"
    if not path.is_file():
        raise ValueError(f"{folder} has no predictions.jsonl; pass an eval.py --output_dir.")
    cells: dict = defaultdict(dict)
    with open(path) as handle:
        for line in handle:
            row = json.loads(line)
            cells[(row["method"], row["mode"], row["k"])][row["episode_id"]] = (row["emotion"], row["prediction"])
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    a, b = read_predictions(args.run_a), read_predictions(args.run_b)
    if sorted(a) != sorted(b):
        raise ValueError(f"The runs scored different cells: {sorted(set(a) ^ set(b))[:5]}.")

    boot = np.zeros(args.n_bootstrap)
    ua_a, ua_b = [], []
    for number, cell in enumerate(sorted(a)):
        ids = sorted(a[cell])
        if ids != sorted(b[cell]):
            raise ValueError(f"Cell {cell}: the runs scored different episodes; use the same split, seed and K.")
        truth = [a[cell][i][0] for i in ids]
        pred_a, pred_b = ([run[cell][i][1] for i in ids] for run in (a, b))
        ua_a.append(unweighted_accuracy(pred_a, truth))
        ua_b.append(unweighted_accuracy(pred_b, truth))
        # Each cell resampled on its own stream; the resampled differences add up to the mean's.
        boot += paired_ua_resamples(pred_a, pred_b, truth, args.n_bootstrap, seed=args.seed * 1000 + number)[1]
        print(f"{cell[0]:18s} {cell[1]} K={cell[2]}: {100 * ua_a[-1]:5.1f} -> {100 * ua_b[-1]:5.1f} "
              f"({100 * (ua_b[-1] - ua_a[-1]):+5.1f})")
    low, high = np.percentile(100 * boot / len(ua_a), [2.5, 97.5])
    print(f"mean UA over {len(ua_a)} cells: {100 * np.mean(ua_a):.1f} -> {100 * np.mean(ua_b):.1f}, "
          f"difference {100 * (np.mean(ua_b) - np.mean(ua_a)):+.1f} (paired bootstrap 95% CI {low:+.1f} to {high:+.1f})")


if __name__ == "__main__":
    main()
