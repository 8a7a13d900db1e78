#!/usr/bin/env python
"""In-context probe: what validation UA do frozen pooled features allow at each K?

A reference diagnostic for the LM path, not a product model. Each utterance becomes ONE
vector (mean + std over the frames of a frozen encoder block, ``baselines.pool_features``), and
a small transformer trained from scratch reads an episode in context:

    [e_1 .. e_K]   enrollment tokens: proj(feature) + embedding(label word index)
    [q_1 .. q_K]   the same utterances with the "no label" embedding  (--enrollment_loss)
    q              the query: proj(feature) + "no label" embedding

and predicts the query's label at ``q``. With ``--enrollment_loss`` (default; ``--no_enrollment_loss``
drops the copies) each ``q_i`` also predicts enrollment label ``i`` from ``e_1 .. e_{i-1}`` only (an
attention mask enforces it), the counterpart of train.py's ``--loss_on_enrollment_labels``. Training episodes come from
``EpisodeSampler`` on the training speakers (K uniform in 0..--k_max, optionally with label
words permuted per episode); validation UA is measured every ``--eval_every`` steps on the fixed
``build_episodes(..., k=K)["validation"]`` episodes of train.py's speaker split (seed 0).

Features come from the same encoder eval.py's baselines use (``eval.feature_model``: the offline
Whisper tiny.en, or the tiny random model with ``--tiny``), through the on-disk feature cache
($ICL_SER_CACHE/features), so re-runs only pay for the probe's training.

Usage (from the repo root). The default 2000 steps of 32 episodes took 1.8-5.6 min on one thread
of a shared 2-core CPU once features were cached (docs/PROBE.md has the measured grid)::

    OMP_NUM_THREADS=1 python bench/icl_probe.py                                  # synthetic corpus
    OMP_NUM_THREADS=1 python bench/icl_probe.py --audio_feature_layer 1 --permuted_label_share 0.5
    OMP_NUM_THREADS=1 python bench/icl_probe.py --corpus ravdess --data_dir ../shared/data/ravdess \\
        --audio_feature_layer 2 --output outputs/probe/ravdess-l2.json
    python bench/icl_probe.py --tiny --corpus_options '{"n_speakers": 6, "utterances_per_emotion": 4}' \\
        --steps 5 --eval_every 5                                                 # smoke run (tests)

Prints a learning curve (validation UA % per K every --eval_every steps) and returns (and with
--output writes as JSON) a dict with ``settings, features, labels, n_validation_episodes, curve,
final, ua_ci, gain_base_k, gain, prototypes, seconds``: ``ua_ci`` is the bootstrap 95% CI of the
final UA per K, ``gain`` each K's paired UA gain over the smallest K with its CI, and
``prototypes`` the UA of an untrained nearest-class-mean rule on the same features and episodes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python bench/icl_probe.py` finds eval.py and the packages
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from dataset_builder.cli import parse_arguments as parse_script_arguments, parse_corpus_options  # noqa: E402


@dataclass
class ProbeArguments:
    """Probe settings (every field is a command-line flag)."""

    corpus: str = field(default="synthetic", metadata={"help": "ravdess, cremad, emodb, iemocap, esd, manifest or synthetic."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Corpus folder (not needed for synthetic)."})
    corpus_options: Optional[str] = field(default=None, metadata={"help": "Synthetic generator options as JSON."})
    tiny: bool = field(default=False, metadata={"help": "Features of the tiny random model (tests)."})
    audio_feature_layer: Optional[int] = field(default=None, metadata={
        "help": "Encoder block to pool (1 = first; default: the last)."})
    permuted_label_share: float = field(default=0.0, metadata={
        "help": "Share of training episodes with permuted label words (0..1)."})
    k_max: int = field(default=8, metadata={"help": "Training K is uniform in 0..k_max."})
    k: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8], metadata={"help": "Validation K values."})
    eval_episodes_per_speaker: Optional[int] = field(default=None, metadata={
        "help": "Validation episodes per speaker and K (default: every utterance is a query once)."})
    steps: int = field(default=2000, metadata={"help": "Training steps."})
    batch_size: int = field(default=32, metadata={"help": "Episodes per step."})
    eval_every: int = field(default=250, metadata={"help": "Validate every this many steps (and at the end)."})
    enrollment_loss: bool = field(default=True, metadata={"help": "Also predict each enrollment label from the ones before it."})
    d_model: int = field(default=128)
    layers: int = field(default=2)
    heads: int = field(default=4)
    dropout: float = field(default=0.1)
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.01)
    seed: int = field(default=0, metadata={"help": "Seeds the speaker split, episodes, initialisation and dropout."})
    feature_cache_dir: Optional[str] = field(default=None, metadata={"help": "Default: $ICL_SER_CACHE/features."})
    output: Optional[str] = field(default=None, metadata={"help": "Write the result dict here as JSON."})

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work, before any heavy work."""
        from dataset_builder.corpora import check_corpus_name

        check_corpus_name(self.corpus)
        parse_corpus_options(self.corpus_options)
        if self.corpus != "synthetic" and not self.data_dir:
            raise ValueError(f"--corpus {self.corpus} needs --data_dir (the corpus folder).")
        if self.audio_feature_layer is not None and self.audio_feature_layer < 1:
            raise ValueError("--audio_feature_layer must be >= 1 (1 = the encoder's first block), "
                             f"got {self.audio_feature_layer}.")
        if not 0.0 <= self.permuted_label_share <= 1.0:
            raise ValueError(f"--permuted_label_share must be between 0 and 1, got {self.permuted_label_share}.")
        if self.k_max < 0 or not self.k or any(k < 0 for k in self.k):
            raise ValueError(f"--k_max and --k need integers >= 0, got --k_max {self.k_max} --k {self.k}.")
        for flag in ("steps", "batch_size", "eval_every", "d_model", "layers", "heads"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}.")
        if self.d_model % self.heads:
            raise ValueError(f"--d_model {self.d_model} must be divisible by --heads {self.heads}.")
        if self.eval_episodes_per_speaker is not None and self.eval_episodes_per_speaker < 1:
            raise ValueError(f"--eval_episodes_per_speaker must be >= 1, got {self.eval_episodes_per_speaker}.")


# ------------------------------------------------------------------------------- model
def build_probe(n_features: int, n_labels: int, args: ProbeArguments):
    """The in-context transformer: feature projection, label embeddings (+1 "no label"), encoder, head."""
    import torch
    from torch import nn

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.Sequential(nn.Dropout(args.dropout), nn.Linear(n_features, args.d_model))
            self.label_embedding = nn.Embedding(n_labels + 1, args.d_model)  # index n_labels = "no label"
            layer = nn.TransformerEncoderLayer(args.d_model, args.heads, 4 * args.d_model, args.dropout,
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(args.d_model)
            self.head = nn.Linear(args.d_model, n_labels)

        def forward(self, features: torch.Tensor, labels: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
            """Logits ``(B, L, n_labels)``; ``blocked`` ``(B, L, L)`` is True where attention is not allowed."""
            hidden = self.project(features) + self.label_embedding(labels)
            mask = blocked.repeat_interleave(args.heads, dim=0)  # (B * heads, L, L), as nn.MultiheadAttention wants
            return self.head(self.norm(self.encoder(hidden, mask=mask)))

    return Probe()


def episode_layout(k: int, enrollment_loss: bool) -> tuple[np.ndarray, list[int]]:
    """Attention block mask ``(L, L)`` (True = blocked) and the prediction positions of a K-shot episode.

    Positions 0..K-1 are the labelled enrollment tokens (causal among themselves, so a prefix
    never sees later ones); with ``enrollment_loss`` positions K..2K-1 are the unlabelled copies,
    copy i seeing labelled tokens < i and itself; the last position is the query, seeing every
    labelled token and itself.
    """
    copies = k if enrollment_loss else 0
    length = k + copies + 1
    blocked = np.ones((length, length), dtype=bool)
    for i in range(k):
        blocked[i, : i + 1] = False
    for i in range(copies):
        blocked[k + i, :i] = False
        blocked[k + i, k + i] = False
    blocked[-1, :k] = False
    blocked[-1, -1] = False
    return blocked, [k + i for i in range(copies)] + [length - 1]


def collate(episodes: list[dict], row_of: dict[str, int], label_index: dict[str, int], no_label: int,
            enrollment_loss: bool) -> dict[str, Any]:
    """Batch tensors: feature rows, input label ids, blocked masks, targets (-100 = no loss), query positions."""
    import torch

    layouts = [episode_layout(len(e["enrollment_ids"]), enrollment_loss) for e in episodes]
    width = max(len(blocked) for blocked, _ in layouts)
    rows = np.zeros((len(episodes), width), dtype=np.int64)
    inputs = np.full((len(episodes), width), no_label, dtype=np.int64)
    targets = np.full((len(episodes), width), -100, dtype=np.int64)
    blocked_batch = np.zeros((len(episodes), width, width), dtype=bool)  # padding positions attend only to themselves
    blocked_batch[:] = ~np.eye(width, dtype=bool)
    query_positions = []
    for b, (episode, (blocked, predict_at)) in enumerate(zip(episodes, layouts)):
        ids, words = list(episode["enrollment_ids"]), list(episode["enrollment_labels"])
        k, length = len(ids), len(blocked)
        sequence = ids + (ids if enrollment_loss else []) + [episode["query_id"]]
        rows[b, :length] = [row_of[i] for i in sequence]
        inputs[b, :k] = [label_index[w] for w in words]
        answers = (words if enrollment_loss else []) + [episode["emotion"]]
        targets[b, predict_at] = [label_index[w] for w in answers]
        blocked_batch[b, :length, :length] = blocked
        query_positions.append(length - 1)
    return {"rows": torch.as_tensor(rows), "inputs": torch.as_tensor(inputs), "targets": torch.as_tensor(targets),
            "blocked": torch.as_tensor(blocked_batch), "query_positions": torch.as_tensor(query_positions)}


# -------------------------------------------------------------------------------- data
def pooled_features(args: ProbeArguments, table, labels: list[str], used_ids: set[str]) -> tuple[np.ndarray, dict[str, int], str]:
    """Pooled frozen-encoder features of the used utterances (``(n, 2D)``), row index by id, description.

    The encoder is built exactly as eval.py builds the baselines' one (``eval.feature_model``),
    so the feature cache is shared with eval.py and train.py runs on the same encoder block.
    """
    import eval as eval_script
    from evaluation.baselines import pool_features
    from evaluation.episodic import EncodedUtterances

    # audio_feature_layer None = the last block (0 for eval.py)
    settings = eval_script.EvalArguments(tiny=args.tiny, audio_feature_layer=args.audio_feature_layer or 0,
                                         seed=args.seed, feature_cache_dir=args.feature_cache_dir)
    model, processor, description = eval_script.feature_model(settings, labels, {})
    rows = [row for row in table if row["id"] in used_ids]  # test speakers are never encoded
    encoded = EncodedUtterances(model, processor, rows, cache_dir=eval_script.feature_cache_dir(settings),
                                show_progress=False)
    ids = [row["id"] for row in rows]
    return np.stack([pool_features(encoded[i]) for i in ids]), {i: n for n, i in enumerate(ids)}, description


@dataclass
class ProbeData:
    labels: list[str]
    features: Any  # torch (n, 2D), standardized with training-speaker statistics
    row_of: dict[str, int]
    sampler: Any
    validation: dict[int, list[dict]]
    n_train_speakers: int
    description: str


def prepare(args: ProbeArguments) -> ProbeData:
    """Corpus, train.py's speaker split, the sampler, validation episodes, then (last) the features."""
    import torch

    from dataset_builder import EpisodeSampler, build_episodes, read_corpus, split_speakers

    options = parse_corpus_options(args.corpus_options)
    table = read_corpus(args.corpus, args.data_dir, **options)
    labels = sorted(set(table["emotion"]))
    splits = split_speakers(table["speaker"], seed=args.seed)
    sampler = EpisodeSampler(table, speakers=splits["train"], k=(0, args.k_max), mode="arbitrary",
                             seed=args.seed, permuted_label_share=args.permuted_label_share)
    validation = {
        k: list(build_episodes(args.corpus, args.data_dir, k=k, mode="arbitrary", seed=args.seed,
                               episodes_per_speaker=args.eval_episodes_per_speaker,
                               validation_speakers=splits["validation"], test_speakers=splits["test"],
                               **options)["validation"])
        for k in args.k
    }
    used = set(splits["train"]) | set(splits["validation"])
    used_ids = {i for i, s in zip(table["id"], table["speaker"]) if s in used}
    features, row_of, description = pooled_features(args, table, labels, used_ids)
    # Global standardization with training-speaker statistics only (what the probe may know a priori).
    train_rows = [row_of[i] for i, s in zip(table["id"], table["speaker"]) if s in set(splits["train"])]
    mean, std = features[train_rows].mean(0), features[train_rows].std(0) + 1e-6
    features = torch.as_tensor((features - mean) / std, dtype=torch.float32)
    return ProbeData(labels, features, row_of, sampler, validation, len(splits["train"]), description)


# ---------------------------------------------------------------------------- training
def evaluate(model, data: ProbeData) -> dict[int, list[str]]:
    """Predicted query labels of the validation episodes per K (argmax over the full label set)."""
    import torch

    label_index = {w: i for i, w in enumerate(data.labels)}
    predictions = {}
    model.eval()
    with torch.no_grad():
        for k, episodes in data.validation.items():
            predicted = []
            for start in range(0, len(episodes), 256):
                batch = collate(episodes[start : start + 256], data.row_of, label_index, len(data.labels), False)
                logits = model(data.features[batch["rows"]], batch["inputs"], batch["blocked"])
                at_query = logits[torch.arange(len(logits)), batch["query_positions"]]
                predicted += [data.labels[i] for i in at_query.argmax(-1).tolist()]
            predictions[k] = predicted
    model.train()
    return predictions


def final_intervals(predictions: dict[int, list[str]], data: ProbeData, seed: int) -> dict[str, dict]:
    """Bootstrap 95% CIs of the final UA per K, and of each K's paired UA gain over the smallest K.

    The fixed validation episodes of every K share their queries (the query order depends on
    the seed only), so the gain is compared query by query, as eval.py does.
    """
    from evaluation.metrics import bootstrap_ci, paired_ua_difference

    base = min(predictions)
    references = {k: [e["emotion"] for e in data.validation[k]] for k in predictions}
    same_queries = {k: [e["query_id"] for e in data.validation[k]] == [e["query_id"] for e in data.validation[base]]
                    for k in predictions}
    return {
        "ua_ci": {k: bootstrap_ci(p, references[k], seed=seed)["ua"] for k, p in predictions.items()},
        "gain_base_k": base,
        "gain": {k: paired_ua_difference(predictions[base], p, references[k], seed=seed)
                 for k, p in predictions.items() if k != base and same_queries[k]},
    }


def prototype_reference(data: ProbeData) -> dict[int, Optional[float]]:
    """Validation UA per K of nearest class mean (cosine) over the enrollment, on the same features.

    No training at all: a yardstick for what the enrollment alone tells about the query at
    each K (undefined at K = 0; classes missing from the enrollment can never be predicted).
    """
    import torch

    from evaluation.metrics import unweighted_accuracy

    scores: dict[int, Optional[float]] = {}
    for k, episodes in data.validation.items():
        if k == 0:
            scores[k] = None
            continue
        predicted = []
        for episode in episodes:
            words = list(episode["enrollment_labels"])
            enrollment = data.features[[data.row_of[i] for i in episode["enrollment_ids"]]]
            classes = sorted(set(words))
            means = torch.stack([enrollment[[j for j, w in enumerate(words) if w == c]].mean(0) for c in classes])
            query = data.features[data.row_of[episode["query_id"]]]
            predicted.append(classes[int(torch.nn.functional.cosine_similarity(means, query[None]).argmax())])
        scores[k] = unweighted_accuracy(predicted, [e["emotion"] for e in episodes])
    return scores


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_script_arguments(ProbeArguments, argv)
    import torch

    from evaluation.metrics import unweighted_accuracy

    torch.set_num_threads(1)  # a diagnostic that shares a small CPU; one thread is also reproducible
    started = time.time()
    data = prepare(args)
    torch.manual_seed(args.seed)
    model = build_probe(data.features.shape[1], len(data.labels), args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.steps, pct_start=0.1)
    label_index = {w: i for i, w in enumerate(data.labels)}
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)

    print(f"probe: {args.corpus}, features: {data.description}, {len(data.labels)} labels, "
          f"{data.n_train_speakers} train speakers, permuted share {args.permuted_label_share}")
    prototypes = prototype_reference(data)
    print(f"{'step':>6} {'loss':>7} " + " ".join(f"{'K=' + str(k):>6}" for k in args.k))
    print(f"{'protos':>6} {'-':>7} " + " ".join(f"{'-' if ua is None else f'{100 * ua:.1f}':>6}" for ua in prototypes.values()))
    curve, running = [], []
    for step in range(1, args.steps + 1):
        batch = collate([next(data.sampler) for _ in range(args.batch_size)], data.row_of, label_index,
                        len(data.labels), args.enrollment_loss)
        logits = model(data.features[batch["rows"]], batch["inputs"], batch["blocked"])
        loss = loss_fn(logits.flatten(0, 1), batch["targets"].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            predictions = evaluate(model, data)
            ua = {k: unweighted_accuracy(p, [e["emotion"] for e in data.validation[k]]) for k, p in predictions.items()}
            curve.append({"step": step, "train_loss": float(np.mean(running)), "ua": ua})
            running = []
            print(f"{step:>6} {curve[-1]['train_loss']:>7.3f} " + " ".join(f"{100 * ua[k]:>6.1f}" for k in args.k), flush=True)
    report = {
        "settings": asdict(args),
        "features": data.description,
        "labels": data.labels,
        "n_validation_episodes": {k: len(eps) for k, eps in data.validation.items()},
        "curve": curve,
        "final": curve[-1]["ua"],
        **final_intervals(predictions, data, args.seed),
        "prototypes": prototypes,
        "seconds": round(time.time() - started, 1),
    }
    gains = " ".join(f"K={k}: {100 * g['difference']:+.1f} [{100 * g['ci'][0]:+.1f}, {100 * g['ci'][1]:+.1f}]"
                     for k, g in report["gain"].items())
    print("final UA 95% CI: " + " ".join(f"K={k}: [{100 * lo:.1f}, {100 * hi:.1f}]" for k, (lo, hi) in report["ua_ci"].items()))
    print(f"paired gain over K={report['gain_base_k']}: {gains}")
    print(f"({report['seconds']:.0f} s)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # only effective before torch loads; set it in the shell too
    main()
