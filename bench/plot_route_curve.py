"""Each route's validation UA over meta-training steps, from a train.py run's metrics.csv.

train.py logs, at every validation (``--eval_every N``), the UA of the mixture and of each route
alone (``route_<name>_ua_k<K>``). This draws them per K, so one sees how the LM route learns
beside the fixed SI and prototype routes.

    python bench/plot_route_curve.py outputs/lm-curve/metrics.csv --output docs/real-speech-lm-curve.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_curve(path: Path) -> tuple[list[int], dict[str, list[float]]]:
    """Steps with a validation, and each ``val_ua_k*`` / ``route_*_ua_k*`` column at them."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val_ua_mean")]
    if not rows:
        raise ValueError(f"{path} has no validation rows; train with --eval_every N to log them.")
    columns = [name for name in rows[0] if name.startswith("val_ua_k") or (name.startswith("route_") and "_ua_k" in name)]
    return [int(row["step"]) for row in rows], {name: [float(row[name]) for row in rows if row[name]] for name in columns}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--output", type=Path, default=Path("route_curve.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, curves = read_curve(args.metrics)
    ks = sorted({name.rsplit("_k", 1)[1] for name in curves}, key=int)
    figure, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.4), sharey=True)
    for axis, k in zip(list(getattr(axes, "flat", [axes])), ks):
        for name, label in (("val_ua", "mixture"), ("route_lm_ua", "LM route"), ("route_si_ua", "SI route"),
                            ("route_prototype_ua", "prototype route")):
            values = curves.get(f"{name}_k{k}")
            if values and len(values) == len(steps):
                axis.plot(steps, [100 * v for v in values], marker="o", label=label)
        axis.set_title(f"K = {k}")
        axis.set_xlabel("meta-training step")
        axis.grid(alpha=0.3)
    list(getattr(axes, "flat", [axes]))[0].set_ylabel("validation UA %")
    list(getattr(axes, "flat", [axes]))[-1].legend(fontsize=8)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
