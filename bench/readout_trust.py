#!/usr/bin/env python
"""Does a trained enrollment read-out name the query's label as well for new speakers as for
the training speakers?

A diagnostic for the read-out (docs/RESULTS.md, fourth pass), not part of the package. For
train.py's fixed validation episodes and for fresh training episodes of the same K, the read-out
of an exported model (`<run>/final`) attends over the enrollment utterances; its attention,
summed per enrollment label, gives a guess. Reported per K and split: the guess's accuracy on
all episodes, on the "eligible" ones (the query's label is among the enrollment labels) and
the mean attention on "none". A large training − validation gap means the read-out fits the
training speakers rather than learning a metric that carries over.

Usage (from the repo root; the train.py flags choose the corpus and split as for the run)::

    python bench/readout_trust.py --model outputs/icl-ser/final
    python bench/readout_trust.py --model runs/ravdess/final --corpus ravdess --data_dir ../shared/data/ravdess
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/readout_trust.py` finds train.py and the packages
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def readout_of(folder: str):
    """The read-out of an exported model folder (its config.json and model.safetensors)."""
    from safetensors.torch import load_file

    from modeling_icl_ser import IclSerConfig
    from modeling_icl_ser.readout import IclSerContextReadout

    weights = load_file(str(Path(folder) / "model.safetensors"))
    prefix = "context_readout."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{folder} has no enrollment read-out weights (trained with --context_readout_heads 0?).")
    readout = IclSerContextReadout(IclSerConfig.from_pretrained(folder))
    readout.load_state_dict(state)
    return readout.eval()


def summarize(hidden) -> torch.Tensor:
    from modeling_icl_ser.readout import IclSerContextReadout

    h = torch.as_tensor(np.asarray(hidden), dtype=torch.float32)
    return IclSerContextReadout.summarize(h[None], torch.ones(1, h.shape[0], dtype=torch.bool))[0]


@torch.no_grad()
def score(readout, examples: list[dict]) -> dict:
    """Accuracy of the read-out's label-mass guess (all, eligible), eligible count, mean "none" mass."""
    hits, eligible_hits, none_mass = [], [], []
    for ex in examples:
        if not ex["enrollment_labels"]:
            continue
        enrollment = torch.stack([summarize(h) for h in ex["enrollment_hidden_states"]])
        _, weights = readout(summarize(ex["query_hidden_states"])[None], enrollment, torch.zeros(len(enrollment), 1))
        mass = weights.mean(1)[0]
        none_mass.append(float(mass[-1]))
        per_label: dict[str, float] = {}
        for label, m in zip(ex["enrollment_labels"], mass[:-1].tolist()):
            per_label[label] = per_label.get(label, 0.0) + m
        guess = max(per_label, key=per_label.get)
        hits.append(guess == ex["answer"])
        if ex["answer"] in per_label:
            eligible_hits.append(guess == ex["answer"])
    return {"accuracy": float(np.mean(hits)) if hits else None,
            "eligible_accuracy": float(np.mean(eligible_hits)) if eligible_hits else None,
            "n": len(hits), "n_eligible": len(eligible_hits),
            "none_mass": float(np.mean(none_mass)) if none_mass else None}


def main(argv: list[str] | None = None, training_episodes: int = 200) -> dict:
    """`--model FOLDER` plus train.py's flags → `{K: {"validation": score, "training": score}}`."""
    import train
    from accelerate import Accelerator

    from evaluation.episodic import episode_example

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv or argv.index("--model") + 1 >= len(argv):
        raise ValueError("Pass --model <run>/final (a train.py export with an enrollment read-out).")
    at = argv.index("--model")
    folder = argv[at + 1]
    del argv[at : at + 2]
    if not (Path(folder) / "model.safetensors").is_file():
        raise ValueError(f"{folder} holds no model.safetensors; pass a train.py export (<output_dir>/final).")
    readout = readout_of(folder)  # before the data work: a model without a read-out fails here
    args = train.parse_arguments(argv + ["--log_with", "none"])
    accelerator = Accelerator(cpu=True)
    table, labels = train.load_data(args, accelerator)
    model, processor, _ = train.build_model(args, labels)
    data = train.prepare_episodes(args, accelerator, table, labels, model, processor)
    results = {}
    for k, episodes in sorted(data.validation.items()):
        if k == 0:
            continue
        validation = [episode_example(e, data.paths, data.encoded) for e in episodes]
        training, draws = [], 0
        while len(training) < training_episodes and draws < 200 * training_episodes:
            example, draws = data.next_example(), draws + 1
            if len(example["enrollment_labels"]) == k:
                training.append(example)
        results[k] = {"validation": score(readout, validation), "training": score(readout, training)}
        for split, s in results[k].items():
            shown = {key: "-" if s[key] is None else f"{s[key]:.3f}" for key in ("accuracy", "eligible_accuracy", "none_mass")}
            print(f"K={k} {split:10s} accuracy {shown['accuracy']}  eligible {shown['eligible_accuracy']} "
                  f"(n={s['n_eligible']} of {s['n']})  none mass {shown['none_mass']}", flush=True)
    return results


if __name__ == "__main__":
    main()
