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
from collections import defaultdict
from pathlib import Path

import numpy as np


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


def unweighted_accuracy(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``truth``."""
    return float(np.mean([np.mean(prediction[truth == label] == label) for label in np.unique(truth)]))


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

    rng = np.random.default_rng(args.seed)
    boot = np.zeros(args.n_bootstrap)
    ua_a, ua_b = [], []
    for cell in sorted(a):
        ids = sorted(a[cell])
        if ids != sorted(b[cell]):
            raise ValueError(f"Cell {cell}: the runs scored different episodes; use the same split, seed and K.")
        truth = np.array([a[cell][i][0] for i in ids])
        pred_a, pred_b = (np.array([run[cell][i][1] for i in ids]) for run in (a, b))
        ua_a.append(unweighted_accuracy(truth, pred_a))
        ua_b.append(unweighted_accuracy(truth, pred_b))
        for j in range(args.n_bootstrap):
            idx = rng.integers(0, len(ids), len(ids))
            boot[j] += unweighted_accuracy(truth[idx], pred_b[idx]) - unweighted_accuracy(truth[idx], pred_a[idx])
        print(f"{cell[0]:18s} {cell[1]} K={cell[2]}: {100 * ua_a[-1]:5.1f} -> {100 * ua_b[-1]:5.1f} "
              f"({100 * (ua_b[-1] - ua_a[-1]):+5.1f})")
    low, high = np.percentile(100 * boot / len(ua_a), [2.5, 97.5])
    print(f"mean UA over {len(ua_a)} cells: {100 * np.mean(ua_a):.1f} -> {100 * np.mean(ua_b):.1f}, "
          f"difference {100 * (np.mean(ua_b) - np.mean(ua_a)):+.1f} (paired bootstrap 95% CI {low:+.1f} to {high:+.1f})")


if __name__ == "__main__":
    main()
