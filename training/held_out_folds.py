"""Route weights chosen out of domain: leave one training corpus out, score it, rotate, combine.

The SI route is strong in the corpora it was fitted on and weak in a language it never heard;
the prototype route is parameter-free and holds up. Weights chosen on validation speakers of
the training corpora therefore lean on the SI route too much for new languages. Here, for each
training corpus C in turn, a *fold model* is meta-trained on the other corpora (train.py's own
recipe, fewer steps) and scored, route by route, on C's non-test speakers: speech the fold
model never heard. The weights for each K are those with the best UA averaged over the
held-out corpora (``evaluation.route_weights.choose_route_weights_per_k``), and the model
trained on every corpus exports them (``IclSerConfig.route_weights_by_k``).

C's test speakers are never scored here, so the release model's in-domain test stays clean.
Each fold's export and scores are kept under ``<output_dir>/folds/<corpus>/``; a rerun reuses
the folds that finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from dataset_builder import parse_corpora, read_corpora, split_corpora, split_episodes
from dataset_builder.feature_cache import write_atomically
from dataset_builder.multi import corpus_of
from dataset_builder.synthetic import default_cache_root

logger = logging.getLogger(__name__)

FOLD_SCORES = "held_out_routes.npz"


def fold_arguments(args, held_out: str, fold_dir: Path):
    """train.py's arguments for the fold model that never sees ``held_out``."""
    specs = [(name, folder) for name, folder in parse_corpora(args.corpus, args.data_dir) if name != held_out]
    return dataclasses.replace(
        args, corpus=",".join(name for name, _ in specs), data_dir=",".join(str(folder) for _, folder in specs),
        output_dir=str(fold_dir), max_steps=args.fold_steps, route_weights_from="validation",
        eval_every=0, checkpoint_every=0, resume_from_checkpoint=None, push_to_hub=False,
        readout_stage_steps=None if args.readout_stage_steps is None else min(args.readout_stage_steps, args.fold_steps // 3),
    )


def held_out_episodes(args, held_out: str) -> tuple[Any, dict[int, list[dict]], list[str]]:
    """``(table, {k: episodes}, labels)`` of ``held_out``'s train and validation speakers (never its
    test speakers: the speaker split is the release run's, same seed and corpora)."""
    specs = parse_corpora(args.corpus, args.data_dir)
    table = read_corpora(specs)
    splits = split_corpora(table, specs, seed=args.seed, validation_speakers=args.validation_speakers,
                           test_speakers=args.test_speakers)
    speakers = sorted(s for s in set(splits["train"]) | set(splits["validation"])
                      if (corpus_of(s) if len(specs) > 1 else specs[0][0]) == held_out)
    if not speakers:
        raise ValueError(f"Corpus {held_out!r} has no train or validation speakers to score a fold on.")
    episodes = {k: split_episodes(table, specs, speakers, "held_out", k, args.enrollment_mode, seed=args.seed,
                                  episodes_per_speaker=args.fold_episodes_per_speaker,
                                  content_disjoint=args.content_disjoint)
                for k in args.fold_eval_k}
    labels = sorted({e["emotion"] for es in episodes.values() for e in es}
                    | {label for es in episodes.values() for e in es for label in e.get("labels", ())})
    return table, episodes, labels


def score_fold(model_dir: Path, args, held_out: str) -> tuple[dict, dict, list[str]]:
    """Route probabilities of the fold model in ``model_dir`` on ``held_out``'s episodes:
    ``({k: {route: (n, C)}}, {k: truths}, labels)``."""
    import torch

    from evaluation.episodic import EncodedUtterances, native_bf16_available, predict_episodes
    from modeling_icl_ser import IclSerDataCollator, IclSerForConditionalGeneration, IclSerProcessor

    table, episodes, labels = held_out_episodes(args, held_out)
    model = IclSerForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    processor = IclSerProcessor.from_pretrained(str(model_dir))
    used = {i for es in episodes.values() for e in es for i in [e["query_id"], *e["enrollment_ids"]]}
    rows = [row for row in table if row["id"] in used]
    cache_dir = args.feature_cache_dir or str(default_cache_root() / "features")
    encoded = EncodedUtterances(model, processor, rows, cache_dir=cache_dir, show_progress=False)
    collator = IclSerDataCollator(processor, labels=labels)
    paths = dict(zip(table["id"], table["path"]))
    routes, truths = {}, {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16_available("cpu")):
        for k, eps in episodes.items():
            routes[k] = predict_episodes(model, collator, eps, paths, labels, encoded, return_routes=True)
            truths[k] = [e["emotion"] for e in eps]
    return routes, truths, labels


def save_fold_scores(path: Path, routes: dict, truths: dict, labels: list[str]) -> None:
    """The fold's route probabilities as one .npz (written to a temporary file, then renamed)."""
    arrays = {f"k{k}_{name}": value for k, by_route in routes.items() for name, value in by_route.items() if value is not None}
    arrays.update({f"k{k}_truth": np.array(t, dtype=object).astype(str) for k, t in truths.items()})
    arrays["labels"] = np.array(labels, dtype=str)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(temporary, **arrays)
    temporary.replace(path)


def load_fold_scores(path: Path) -> tuple[dict, dict, list[str]]:
    """What :func:`save_fold_scores` wrote: ``(routes_by_k, truths_by_k, labels)``."""
    with np.load(path, allow_pickle=False) as data:
        labels = [str(label) for label in data["labels"]]
        ks = sorted({int(key[1:].split("_")[0]) for key in data.files if key.startswith("k")})
        routes = {k: {name: (data[f"k{k}_{name}"] if f"k{k}_{name}" in data.files else None)
                      for name in ("lm", "si", "prototype")} for k in ks}
        truths = {k: [str(t) for t in data[f"k{k}_truth"]] for k in ks}
    return routes, truths, labels


def run_held_out_folds(args, train_main: Callable[[Any], dict]) -> dict[str, tuple[dict, dict, list[str]]]:
    """Train (or reuse) one fold model per training corpus and score it on that corpus.

    Args:
        args: train.py's arguments (``corpus`` names two or more corpora).
        train_main: train.py's ``main``, called with each fold's arguments.

    Returns:
        ``{held-out corpus: (routes_by_k, truths_by_k, labels)}``.

    Raises:
        ValueError: fewer than two training corpora.
    """
    names = [name for name, _ in parse_corpora(args.corpus, args.data_dir)]
    if len(names) < 2:
        raise ValueError("--route_weights_from held_out_corpora leaves one training corpus out at a time; it needs two "
                         f"or more corpora in --corpus, got {names}. Use --route_weights_from validation.")
    folds = {}
    for held_out in names:
        fold_dir = Path(args.output_dir) / "folds" / held_out
        scores = fold_dir / FOLD_SCORES
        if not scores.is_file():
            if not (fold_dir / "final" / "config.json").is_file():
                logger.warning("Fold without %s: training on %s.", held_out, [n for n in names if n != held_out])
                train_main(fold_arguments(args, held_out, fold_dir))
            save_fold_scores(scores, *score_fold(fold_dir / "final", args, held_out))
        folds[held_out] = load_fold_scores(scores)
    return folds


def choose_out_of_domain_weights(folds: dict, step: float, exclude: Optional[str] = None) -> dict:
    """Per-K weights from the held-out folds (all, or all but ``exclude``, for a nested test on
    that corpus), with each fold's UA: ``{"weights": {k: ...}, "ua": {k: ...}, "per_fold": ...}``."""
    from evaluation.route_weights import choose_route_weights_per_k

    used = {name: fold for name, fold in folds.items() if name != exclude}
    weights, means, per_fold = choose_route_weights_per_k(list(used.values()), step=step)
    return {"weights": {str(k): w for k, w in weights.items()}, "ua": {str(k): round(v, 4) for k, v in means.items()},
            "per_fold": {str(k): dict(zip(used, [round(v, 4) for v in scores])) for k, scores in per_fold.items()}}


def write_json_atomically(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, never half-written (``dataset_builder.feature_cache.write_atomically``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=2) + "\n"
    write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
