#!/usr/bin/env python
"""Evaluate few-shot personalized SER methods on the fixed TEST episodes of a corpus.

Every method sees the same frozen-encoder features of the same test episodes (K enrollment
utterances of a test speaker + one query of that speaker), for each K and enrollment mode:

    si, si_norm, si_finetune, prototypes, speaker_embedding, enroll_prototypes   (evaluation/baselines.py)
    slm_no_icl   the speech LM trained without ICL (train.py --k_min 0 --k_max 0), --baseline_model
    icl          the meta-trained ICL model, --model

    python eval.py --model outputs/icl-ser/final --corpus ravdess --data_dir ../shared/data/ravdess \
        --methods all --k 0 1 2 4 8 --mode arbitrary --output_dir outputs/eval-ravdess
    python eval.py --corpus ravdess --data_dir ... --methods baselines      # no LM: offline Whisper encoder
    python eval.py --tiny --corpus synthetic --methods baselines            # tiny random encoder (tests)
    python eval.py --corpus ased --data_dir ../shared/data/ased --test_speakers all --methods baselines \
        --baseline_corpus ravdess,emotiontts-ko --baseline_data_dir ../shared/data/ravdess,../shared/data/emotiontts-ko

``--methods all`` means the six baselines plus ``icl`` (with ``--model``) and ``slm_no_icl``
(with ``--baseline_model``); ``baselines`` means the six baselines. Baselines use the encoder of
``--model`` when given, else ``--audio_encoder``, else the offline Whisper of ``--offline_encoder``
(tiny.en, the default, or base), or the tiny random model's with ``--tiny``. The speaker split is train.py's (same seed / explicit
lists), so test speakers are never trained on. ``--test_speakers all`` tests every speaker of a
corpus (cross-corpus: a model trained elsewhere); the baselines are then fitted on the training
speakers of ``--baseline_corpus`` (see docs/EVALUATION.md for labels outside their training
set). Several corpora (``--corpus a,b --data_dir A,B``) are split within each corpus and each
episode is scored over its own corpus' labels. Writes ``results.json``, ``results.md``,
``predictions.jsonl``, PNG plots and a filled model card ``README.md`` to ``--output_dir``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dataset_builder.cli import parse_arguments as parse_script_arguments, parse_corpus_options

logger = logging.getLogger("icl_ser.eval")
REPO_ROOT = Path(__file__).resolve().parent

BASELINE_METHODS = ("si", "si_norm", "si_finetune", "prototypes", "speaker_embedding", "enroll_prototypes")
LM_METHODS = ("slm_no_icl", "icl")
METHODS = BASELINE_METHODS + LM_METHODS
# The routes of a routed icl model, reported beside its mixture as icl_<route> (a route that
# cannot score an episode, the prototype route at K = 0, falls back to the LM there).
ROUTE_METHODS = ("lm", "si", "prototype")
METHOD_TITLES = {
    "si": "SI (speaker-independent)",
    "si_norm": "SI + speaker normalization",
    "si_finetune": "SI + fine-tuning on enrollment",
    "prototypes": "Prototypes (nearest class mean)",
    "speaker_embedding": "SI + speaker embedding",
    "enroll_prototypes": "Enrollment-standardized prototypes (no training)",
    "slm_no_icl": "Speech LM without ICL training",
    "icl": "ICL (meta-trained, proposed)",
    "icl_lm": "  ICL: its LM route alone",
    "icl_si": "  ICL: its SI route alone",
    "icl_prototype": "  ICL: its prototype route alone (LM at K = 0)",
}


@dataclass
class EvalArguments:
    """Evaluation settings (every field is a command-line flag)."""

    # what to evaluate
    model: Optional[str] = field(default=None, metadata={"help": "Folder of the meta-trained icl-ser model (method icl)."})
    baseline_model: Optional[str] = field(default=None, metadata={"help":
            "Folder of a model trained with --k_min 0 --k_max 0 (method slm_no_icl)."})
    methods: list[str] = field(default_factory=lambda: ["all"],
                               metadata={"help": f"Any of {', '.join(METHODS)}, 'baselines' or 'all'."})
    audio_encoder: Optional[str] = field(default=None, metadata={"help":
            "Encoder for the baselines without --model (default: offline Whisper tiny.en)."})
    offline_encoder: Optional[str] = field(default=None, metadata={"help":
            "Offline Whisper for the baselines without --model/--audio_encoder: tiny.en (default) or base."})
    tiny: bool = field(default=False, metadata={"help": "Baselines on the tiny random model's encoder (tests)."})
    audio_feature_layer: Optional[int] = field(default=None, metadata={"help":
            "Encoder block the baselines read without --model (1 = the first, 0 = the last; default: train.py's default, 2). "
            "With --model, the model's own block is used."})
    # data
    corpus: str = field(default="synthetic", metadata={"help":
            "ravdess, cremad, emodb, iemocap, esd, ased, emotiontts-ko, manifest or synthetic; several comma-separated."})
    data_dir: Optional[str] = field(default=None, metadata={"help":
            "Corpus folder (or manifest), one per corpus, comma-separated; not needed for synthetic."})
    corpus_options: Optional[str] = field(default=None, metadata={"help": "Synthetic generator options as JSON."})
    labels: Optional[list[str]] = field(default=None, metadata={"help":
            "Label set (default: the corpus' emotions; one corpus only)."})
    validation_speakers: Optional[list[str]] = field(default=None, metadata={"help":
            "Explicit validation speakers (as in train.py)."})
    test_speakers: Optional[list[str]] = field(default=None, metadata={"help":
            "Explicit test speakers (as in train.py), or 'all': every speaker (cross-corpus)."})
    baseline_corpus: Optional[str] = field(default=None, metadata={"help":
            "Fit the baselines on these corpora's training speakers instead (comma-separated)."})
    baseline_data_dir: Optional[str] = field(default=None, metadata={"help":
            "Folders of --baseline_corpus, comma-separated in the same order."})
    seed: int = field(default=0, metadata={"help": "Seed of the speaker split and the episodes (train.py's --seed)."})
    eval_split: str = field(default="test", metadata={"help": "test (report once) or validation (choose settings on it)."})
    # sweep
    k: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8], metadata={"help": "Enrollment sizes K."})
    mode: list[str] = field(default_factory=lambda: ["arbitrary"], metadata={"help":
            "arbitrary, balanced and/or exclude_query_class."})
    content_disjoint: bool = field(default=False, metadata={"help":
            "No enrollment utterance has the query's sentence (text); needs corpora with texts (not iemocap/synthetic)."})
    episodes_per_speaker: Optional[int] = field(default=None, metadata={"help":
            "Episodes per test speaker (default: every utterance is a query once)."})
    same_queries: bool = field(default=True, metadata={"help":
            "Every K of the sweep gets the same queries (those eligible at the largest K), so each K is compared with the "
            "smallest query by query (the paired CIs); false = each K's own eligible queries."})
    unlabelled: int = field(default=0, metadata={"help":
            "U other utterances of the test speaker given without labels (never the query nor the enrollment; never the query's"
            " sentence with --content_disjoint): speaker statistics come from enrollment + unlabelled speech (icl, si_norm, "
            "enroll_prototypes). 0 = none."})
    # running
    batch_size: int = field(default=8, metadata={"help": "Episodes per classify call (LM methods)."})
    baseline_train_steps: int = field(default=1500, metadata={"help": "Minibatch steps of the baselines' head training."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the CIs."})
    feature_cache_dir: Optional[str] = field(default=None, metadata={"help": "Default: $ICL_SER_CACHE/features."})
    device: Optional[str] = field(default=None, metadata={"help": "cpu / cuda (default: cuda if available)."})
    output_dir: str = field(default="outputs/eval")
    update_model_card: bool = field(default=False, metadata={"help": "Also write the filled card into the --model folder."})
    route_weights: Optional[str] = field(default=None, metadata={"help":
            "A JSON file whose 'weights' map K to route weights (train.py's folds/<corpus>/nested_route_weights.json: chosen "
            "without this corpus), used instead of the model's own; for a nested out-of-domain test."})

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work, before any heavy work."""
        from dataset_builder import MODES, check_texts_known, parse_corpora

        specs = parse_corpora(self.corpus, self.data_dir)
        if self.content_disjoint:
            check_texts_known(name for name, _ in specs)
        parse_corpus_options(self.corpus_options)
        if self.labels and len(specs) > 1:
            raise ValueError("--labels sets one label set for a single corpus; with several corpora each episode "
                             "uses its own corpus' emotions, so drop --labels.")
        self.validate_cross_corpus(specs)
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"--eval_split must be test or validation, got {self.eval_split!r}.")
        if self.update_model_card and self.eval_split != "test":
            raise ValueError("--update_model_card reports test-speaker results; drop it with --eval_split validation.")
        unknown = [m for m in self.methods if m not in METHODS + ("all", "baselines")]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose among {', '.join(METHODS)}, 'baselines' or 'all'.")
        bad_modes = [m for m in self.mode if m not in MODES]
        if bad_modes:
            raise ValueError(f"Unknown enrollment mode(s) {bad_modes}; use {', '.join(MODES)}.")
        if not self.k or any(k < 0 for k in self.k):
            raise ValueError(f"--k needs one or more integers >= 0, got {self.k}.")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"--labels has duplicates: {self.labels}.")
        for flag, folder in (("--model", self.model), ("--baseline_model", self.baseline_model)):
            if folder is not None:
                check_model_folder(folder, flag)
        if "icl" in self.methods and not self.model:
            raise ValueError("Method icl needs --model (the meta-trained model's folder).")
        if "slm_no_icl" in self.methods and not self.baseline_model:
            raise ValueError("Method slm_no_icl needs --baseline_model (a model trained with --k_min 0 --k_max 0).")
        if self.update_model_card and not self.model:
            raise ValueError("--update_model_card needs --model (the folder whose README.md is updated).")
        if self.audio_feature_layer is not None and self.model:
            raise ValueError("--audio_feature_layer is for baselines without --model; with --model the baselines read "
                             "the model's own encoder block (its config's audio_feature_layer). Drop one of them.")
        if self.audio_feature_layer is not None and self.audio_feature_layer < 0:
            raise ValueError("--audio_feature_layer must be >= 0 (1 = the encoder's first block, 0 = its last), "
                             f"got {self.audio_feature_layer}.")
        if self.offline_encoder is not None:
            from modeling_icl_ser.backbones import check_offline_encoder

            check_offline_encoder(self.offline_encoder)
            if self.model or self.audio_encoder or self.tiny:
                raise ValueError("--offline_encoder picks the baselines' offline Whisper; drop it with --model, "
                                 "--audio_encoder or --tiny.")
        if self.baseline_train_steps < 1:
            raise ValueError(f"--baseline_train_steps must be >= 1, got {self.baseline_train_steps}.")
        if self.route_weights is not None:
            load_route_weights(self.route_weights)
            if not self.model:
                raise ValueError("--route_weights sets how the icl model mixes its routes; it needs --model.")
        if self.unlabelled < 0:
            raise ValueError(f"--unlabelled must be >= 0 (0 = no unlabelled speech), got {self.unlabelled}.")
        if self.episodes_per_speaker is not None and self.episodes_per_speaker < 1:
            raise ValueError(f"--episodes_per_speaker must be >= 1, got {self.episodes_per_speaker}.")

    def testing_all_speakers(self) -> bool:
        """``--test_speakers all``: every speaker of the corpus is a test speaker."""
        return self.test_speakers is not None and "all" in self.test_speakers

    def validate_cross_corpus(self, specs) -> None:
        """Checks of --test_speakers all and --baseline_corpus/--baseline_data_dir."""
        from dataset_builder import parse_corpora

        if self.testing_all_speakers():
            if self.test_speakers != ["all"]:
                raise ValueError(f"--test_speakers all stands alone (got {self.test_speakers}); list speakers or pass all.")
            if self.validation_speakers:
                raise ValueError("--test_speakers all makes every speaker a test speaker; drop --validation_speakers.")
            if self.eval_split != "test":
                raise ValueError("--test_speakers all leaves no validation speaker; drop --eval_split validation.")
        if self.baseline_data_dir and not self.baseline_corpus:
            raise ValueError("--baseline_data_dir needs --baseline_corpus (the corpora those folders hold).")
        if self.baseline_corpus is None:
            if self.testing_all_speakers() and any(m in BASELINE_METHODS + ("baselines", "all") for m in self.methods):
                raise ValueError("--test_speakers all leaves no training speaker for the baselines; pass --baseline_corpus "
                                 "NAME --baseline_data_dir DIR (other corpora to fit them on), or --methods icl.")
            return
        baseline_specs = parse_corpora(self.baseline_corpus, self.baseline_data_dir, "--baseline_corpus/--baseline_data_dir")
        shared = sorted({name for name, _ in baseline_specs} & {name for name, _ in specs})
        if shared:
            raise ValueError(f"--baseline_corpus repeats the test corpus {shared}; cross-corpus baselines are fitted on "
                             "other corpora (drop --baseline_corpus for in-domain baselines).")
        if not any(m in BASELINE_METHODS + ("baselines", "all") for m in self.methods):
            raise ValueError("--baseline_corpus only changes what the baselines are fitted on; add them to --methods.")

    def method_list(self) -> list[str]:
        """The methods to run, in table order (``all``/``baselines`` expanded)."""
        chosen = set()
        for name in self.methods:
            if name == "baselines":
                chosen |= set(BASELINE_METHODS)
            elif name == "all":
                chosen |= set(BASELINE_METHODS)
                chosen |= {"icl"} if self.model else set()
                chosen |= {"slm_no_icl"} if self.baseline_model else set()
            else:
                chosen.add(name)
        return [m for m in METHODS if m in chosen]


def load_route_weights(path: str) -> dict[str, dict[str, float]]:
    """The per-K weights of a --route_weights file (``{"weights": {"0": {...}, "8": {...}}}``)."""
    from modeling_icl_ser.configuration_icl_ser import ROUTES

    try:
        weights = json.loads(Path(path).read_text(encoding="utf-8"))["weights"]
        ok = all(int(k) >= 0 and set(w) <= set(ROUTES) for k, w in weights.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"--route_weights {path!r} is not a JSON file with 'weights': {{K: {{route: weight}}}} "
                         "(train.py writes folds/<corpus>/nested_route_weights.json).")
    return weights


def mixture(scored: dict, config, k: int, override: Optional[dict] = None) -> np.ndarray:
    """The icl model's answer for episodes with ``k`` enrollment utterances: its routes mixed by
    the per-K weights (``override``, else ``config.route_weights_by_k``), else by its weights with
    and without enrollment."""
    import torch

    from modeling_icl_ser.route_mixing import mix_routes, weights_for_k

    routes = {route: None if p is None else torch.from_numpy(p) for route, p in scored.items()}
    by_k = override or getattr(config, "route_weights_by_k", None)
    if by_k:
        return mix_routes(routes, weights_for_k(by_k, k)).numpy()
    return mix_routes(routes, config.route_weights, config.route_weights_without_enrollment).numpy()


def check_model_folder(folder: str, flag: str = "--model") -> Path:
    """A folder holding an icl-ser checkpoint (``config.json`` with ``model_type`` icl_ser)."""
    path = Path(folder)
    config = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"{flag} {folder!r} is not a folder; pass the exported model (e.g. <output_dir>/final of train.py).")
    if not config.is_file():
        raise ValueError(f"{flag} {folder!r} has no config.json; it is not a saved icl-ser model.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{flag} {folder!r}: config.json is not a JSON object.") from None
    if model_type != "icl_ser":
        raise ValueError(f"{flag} {folder!r} is a {model_type!r} model, not an icl_ser model.")
    return path


def parse_arguments(argv: Optional[list[str]] = None) -> EvalArguments:
    """Flags, or a single YAML/JSON file of them."""
    return parse_script_arguments(EvalArguments, argv)


# ---------------------------------------------------------------------------------- data
def prepare_data(args: EvalArguments) -> dict[str, Any]:
    """Utterance table, label set, speaker split and the test episodes of every (mode, K).

    Raises ValueError (before any model is loaded) for a corpus without test speakers or
    episodes whose labels are outside the label set.
    """
    from dataset_builder import attach_unlabelled, build_pools, parse_corpora, read_corpora, split_corpora, split_episodes

    specs = parse_corpora(args.corpus, args.data_dir)
    table = read_corpora(specs, **parse_corpus_options(args.corpus_options))
    pools = build_pools(table) if args.unlabelled else None
    labels = list(args.labels) if args.labels else sorted(set(table["emotion"]))
    if args.testing_all_speakers():  # cross-corpus: nothing of this corpus is trained on
        splits = {"train": [], "validation": [], "test": sorted(set(table["speaker"]))}
    else:
        splits = split_corpora(
            table, specs, seed=args.seed,
            validation_speakers=args.validation_speakers, test_speakers=args.test_speakers,
        )
    split = args.eval_split
    if not splits[split]:
        raise ValueError(f"Corpus {args.corpus!r} has no {split} speakers; pass --{split}_speakers.")
    episodes: dict[tuple[str, int], list[dict]] = {}
    for mode in args.mode:
        for k in args.k:
            episodes[(mode, k)] = split_episodes(
                table, specs, splits[split], split, k, mode, seed=args.seed, episodes_per_speaker=args.episodes_per_speaker,
                content_disjoint=args.content_disjoint, query_k=max(args.k) if args.same_queries else None,
            )
            if not episodes[(mode, k)]:
                raise ValueError(f"No {split} episodes for K={k} in mode {mode!r}: the {split} speakers are too small.")
            if args.unlabelled:
                episodes[(mode, k)] = attach_unlabelled(episodes[(mode, k)], pools, args.unlabelled, seed=args.seed,
                                                        content_disjoint=args.content_disjoint)
    used = {e["emotion"] for es in episodes.values() for e in es} | {
        label for es in episodes.values() for e in es for label in e["enrollment_labels"]
    }
    missing = sorted(used - set(labels))
    if missing:
        raise ValueError(
            f"The {split} episodes use labels {missing} that are not in the label set {labels}; "
            "pass --labels including them (or drop --labels to use the corpus' emotions)."
        )
    data = {"table": table, "labels": labels, "splits": splits, "episodes": episodes}
    if args.baseline_corpus:
        baseline_specs = parse_corpora(args.baseline_corpus, args.baseline_data_dir)
        baseline_table = read_corpora(baseline_specs, **parse_corpus_options(args.corpus_options))
        data["baseline"] = {
            "table": baseline_table,
            "labels": sorted(set(baseline_table["emotion"])),
            "splits": split_corpora(baseline_table, baseline_specs, seed=args.seed),
        }
    return data


# -------------------------------------------------------------------------------- models
def load_icl_model(folder: str, device: str):
    """(model, processor) of a saved icl-ser checkpoint, eval mode, on ``device``."""
    from modeling_icl_ser import IclSerForConditionalGeneration, IclSerProcessor

    model = IclSerForConditionalGeneration.from_pretrained(folder).to(device).eval()
    processor = IclSerProcessor.from_pretrained(folder)
    return model, processor


def encoder_only_model(source, labels: list[str], audio_feature_layer: Optional[int] = None):
    """An icl-ser wrapper around a bare audio encoder (tiny random LM), for EncodedUtterances.

    The encoder fingerprint depends only on the encoder, so features cached here are shared
    with train.py runs on the same encoder.
    """
    import torch
    from transformers import LlamaConfig

    from modeling_icl_ser import IclSerConfig, IclSerForConditionalGeneration, IclSerProcessor
    from modeling_icl_ser.backbones import load_audio_encoder
    from modeling_icl_ser.testing import tiny_tokenizer

    encoder, feature_extractor = load_audio_encoder(source)
    tokenizer = tiny_tokenizer(labels)
    config = IclSerConfig(
        audio_config=encoder.config,
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id),
        num_audio_tokens=1, labels=labels, audio_feature_layer=audio_feature_layer, context_readout_heads=0,
    )
    processor = IclSerProcessor.from_model_config(feature_extractor, tokenizer, config)
    config.audio_token_id = processor.audio_token_id
    model = IclSerForConditionalGeneration(config)
    result = model.audio_tower.load_state_dict(encoder.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"Encoder {source!r} does not fit: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}.")
    return model.to(torch.float32).eval(), processor


def feature_model(args: EvalArguments, labels: list[str], loaded: dict[str, Any]):
    """(model, processor, description) whose encoder gives the baselines' features."""
    if args.model:
        model, processor = loaded["icl"]
        return model, processor, f"encoder of --model {args.model}"
    from modeling_icl_ser.backbones import DEFAULT_AUDIO_FEATURE_LAYER

    # The block train.py reads by default, so default baselines and default models see the same features.
    layer = DEFAULT_AUDIO_FEATURE_LAYER if args.audio_feature_layer is None else args.audio_feature_layer
    block = "last block" if layer == 0 else f"block {layer}"
    if args.tiny:
        from modeling_icl_ser.testing import tiny_icl_ser

        model, processor = tiny_icl_ser(labels=labels, seed=args.seed, audio_feature_layer=layer or None)
        return model, processor, f"tiny random model (tiny_icl_ser(seed={args.seed}), {block})"
    source = args.audio_encoder
    if source is None:  # only the encoder is needed: the LM package may be absent
        from modeling_icl_ser.backbones import DEFAULT_OFFLINE_ENCODER, offline_audio_encoder

        source = offline_audio_encoder(args.offline_encoder or DEFAULT_OFFLINE_ENCODER)
    model, processor = encoder_only_model(source, labels, layer or None)
    return model, processor, f"audio encoder {source} ({block})"


def feature_cache_dir(args: EvalArguments) -> str:
    from dataset_builder.synthetic import default_cache_root

    return args.feature_cache_dir or str(default_cache_root() / "features")


# ------------------------------------------------------------------------------- running
def run_baseline(method, episodes, pooled: dict[str, np.ndarray], description: str) -> np.ndarray:
    """Probabilities ``(n_episodes, len(method.label_set))`` of a fitted baseline, one episode at a time.

    Enrollment utterances whose label the baseline was not trained on (cross-corpus) are left
    out of its enrollment: it has no output for them.
    """
    from tqdm.auto import tqdm

    known = set(method.label_set)
    rows = []
    for episode in tqdm(episodes, desc=description, leave=False):
        pairs = [(i, label) for i, label in zip(episode["enrollment_ids"], episode["enrollment_labels"]) if label in known]
        enrollment = np.stack([pooled[i] for i, _ in pairs]) if pairs else None
        unlabelled = [pooled[i] for i in episode.get("unlabelled_ids", ())]
        rows.append(method.predict_proba(pooled[episode["query_id"]], enrollment, [label for _, label in pairs],
                                         np.stack(unlabelled) if unlabelled else None)[0])
    return np.stack(rows)


def baseline_options(name: str, args: EvalArguments) -> dict[str, Any]:
    """A baseline's constructor options. With ``--unlabelled U``, ``si_norm`` also trains on
    speaker statistics of the sizes it then sees (U + K utterances)."""
    options: dict[str, Any] = {"seed": args.seed, "train_steps": args.baseline_train_steps}
    if name == "si_norm" and args.unlabelled:
        options["train_ks"] = tuple(sorted({1, 2, 4, 8} | {args.unlabelled + k for k in args.k}))
    return options


def restrict_to_labels(probabilities: np.ndarray, trained: list[str], target: list[str]) -> np.ndarray:
    """A baseline's ``(n, len(trained))`` probabilities as ``(n, len(target))`` over the test labels.

    Each row keeps its mass on the labels both sets share, renormalized (uniform over them if
    it had none there); a test label the baseline never trained on gets 0, so it is never
    predicted. The identity when both sets are equal (in-domain).
    """
    if list(trained) == list(target):
        return probabilities
    shared = [label for label in target if label in trained]
    if not shared:
        raise ValueError(f"The baselines were trained on {trained}, none of the test labels {target}; "
                         "fit them on corpora that share labels with the test corpus.")
    out = np.zeros((len(probabilities), len(target)), dtype=np.float64)
    columns = [target.index(label) for label in shared]
    out[:, columns] = probabilities[:, [trained.index(label) for label in shared]]
    mass = out.sum(-1, keepdims=True)
    out[:, columns] = np.where(mass > 0, out[:, columns] / np.where(mass > 0, mass, 1), 1.0 / len(shared))
    return out


def restrict_to_episode_labels(probabilities: np.ndarray, episodes, labels: list[str]) -> np.ndarray:
    """Each row restricted to its episode's own ``labels`` (several corpora; as the LM methods score).

    Rows of episodes without ``labels`` (one corpus) are returned unchanged.
    """
    out = probabilities.copy()
    for i, episode in enumerate(episodes):
        if episode.get("labels"):
            own = list(episode["labels"])
            out[i] = 0.0
            out[i, [labels.index(label) for label in own]] = restrict_to_labels(probabilities[i : i + 1], labels, own)[0]
    return out


def add_paired_gains(results: list[dict], probabilities: dict, episodes: dict, labels: list[str], args) -> None:
    """Add each result's UA gain over the smallest K on the same queries (paired bootstrap CI).

    Fixed episodes of one mode share their queries across K (each speaker's query order
    depends on the seed only), so K = 8 and K = 0 can be compared query by query; where the
    queries differ (e.g. a mode whose eligible queries depend on K) no gain is reported.
    """
    from evaluation.metrics import paired_ua_difference

    for result in results:
        name, mode, k = result["method"], result["mode"], result["k"]
        base_k = min(kk for (m, kk) in episodes if m == mode)
        if k == base_k:
            continue
        base, this = episodes[(mode, base_k)], episodes[(mode, k)]
        if [e["query_id"] for e in base] != [e["query_id"] for e in this]:
            continue
        paired = paired_ua_difference(
            [labels[i] for i in probabilities[(name, mode, base_k)].argmax(-1)],
            [labels[i] for i in probabilities[(name, mode, k)].argmax(-1)],
            [e["emotion"] for e in this], n_resamples=args.n_bootstrap, seed=args.seed,
        )
        result["ua_gain_base_k"] = base_k
        result["ua_gain"] = paired["difference"]
        result["ua_gain_ci"] = paired["ci"]


def package_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name in ("icl-ser", "torch", "transformers", "datasets", "evaluate", "numpy", "scikit-learn", "peft", "huggingface_hub"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import datasets
    import torch

    from modeling_icl_ser import IclSerDataCollator
    from evaluation.baselines import make_baseline, pool_features
    from evaluation.episodic import EncodedUtterances, native_bf16_available, predict_episodes
    from evaluation.metrics import summarize
    from modeling_icl_ser.route_mixing import mix_routes

    datasets.disable_progress_bars()
    started = time.time()
    methods = args.method_list()
    if not methods:
        raise ValueError("No method to run.")
    data = prepare_data(args)  # every data check happens before a model is loaded
    table, labels, splits, episodes = data["table"], data["labels"], data["splits"], data["episodes"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    override_weights = load_route_weights(args.route_weights) if args.route_weights else None
    loaded = {}
    if args.model:
        loaded["icl"] = load_icl_model(args.model, device)
    if "slm_no_icl" in methods:
        loaded["slm_no_icl"] = load_icl_model(args.baseline_model, device)
    paths = dict(zip(table["id"], table["path"]))
    test_ids = {i for es in episodes.values() for e in es
                for i in [e["query_id"], *e["enrollment_ids"], *e.get("unlabelled_ids", ())]}
    cache_dir = feature_cache_dir(args)

    # Features: each utterance encoded once per distinct encoder (cached on disk).
    encoded_by_fingerprint: dict[str, EncodedUtterances] = {}

    def encode(model, processor, rows) -> EncodedUtterances:
        fingerprint = model.audio_encoder_fingerprint()
        if fingerprint not in encoded_by_fingerprint:
            encoded_by_fingerprint[fingerprint] = EncodedUtterances(model, processor, rows, cache_dir=cache_dir)
        return encoded_by_fingerprint[fingerprint]

    all_rows = [row for row in table]
    baseline_methods = [m for m in methods if m in BASELINE_METHODS]
    results, predictions_log, fitted = [], [], {}
    probabilities: dict[tuple[str, str, int], np.ndarray] = {}
    feature_source = None
    if baseline_methods:
        # In-domain: fitted on this corpus' training speakers; cross-corpus: on --baseline_corpus'.
        fit_data = data.get("baseline") or {"table": table, "labels": labels, "splits": splits}
        fit_table, fit_labels, fit_splits = fit_data["table"], fit_data["labels"], fit_data["splits"]
        model, processor, feature_source = feature_model(args, labels, loaded)
        model.to(device)
        fit_rows = [row for row in fit_table] if fit_table is not table else []
        encoded = encode(model, processor, all_rows + fit_rows)
        pooled = {i: pool_features(encoded[i]) for i in [*table["id"], *(row["id"] for row in fit_rows)]}
        speaker_of = dict(zip(fit_table["id"], fit_table["speaker"]))
        emotion_of = dict(zip(fit_table["id"], fit_table["emotion"]))

        def split_arrays(split):
            ids = [i for i in fit_table["id"] if speaker_of[i] in set(fit_splits[split]) and emotion_of[i] in fit_labels]
            return (np.stack([pooled[i] for i in ids]), [emotion_of[i] for i in ids], [speaker_of[i] for i in ids])

        train, validation = split_arrays("train"), split_arrays("validation")
        assert not test_ids & {i for i in fit_table["id"] if speaker_of[i] in set(fit_splits["train"])}
        for name in baseline_methods:
            # enroll_prototypes trains nothing: its classes are whatever the enrollment names, so it
            # answers over the test corpus' labels (never limited to the baseline corpora's).
            own_labels = labels if name == "enroll_prototypes" else fit_labels
            fitted[name] = make_baseline(name, **baseline_options(name, args)).fit(*train, own_labels, validation=validation)
            for (mode, k), eps in episodes.items():
                trained_probabilities = run_baseline(fitted[name], eps, pooled, f"{name} {mode} K={k}")
                probabilities[(name, mode, k)] = restrict_to_episode_labels(
                    restrict_to_labels(trained_probabilities, own_labels, labels), eps, labels)
    for name in (m for m in methods if m in LM_METHODS):
        model, processor = loaded[name]
        collator = IclSerDataCollator(processor, labels=labels)
        rows = [row for row in all_rows if row["id"] in test_ids]
        encoded = encode(model, processor, rows) if len(rows) else None
        device_type = next(model.parameters()).device.type
        # The same bf16 autocast train.py validates under, where the hardware has it.
        # A model with routes (read-out or SI route) is scored once per route; its own answer is
        # their mixture by the weights chosen on validation speakers (config.route_weights), and
        # each route is reported beside it (icl_lm, icl_si, icl_prototype) to show what it holds.
        routed = name == "icl" and (model.context_readout is not None or model.speaker_routes is not None)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=native_bf16_available(device_type)):
            for (mode, k), eps in episodes.items():
                scored = predict_episodes(
                    model, collator, eps, paths, labels, encoded, batch_size=args.batch_size,
                    show_progress=True, description=f"{name} {mode} K={k}", return_routes=routed,
                )
                if not routed:
                    probabilities[(name, mode, k)] = scored
                    continue
                probabilities[(name, mode, k)] = mixture(scored, model.config, k, override_weights)
                for route, p in scored.items():
                    if p is not None:
                        alone = mix_routes({"lm": torch.from_numpy(scored["lm"]), route: torch.from_numpy(p)}, {route: 1.0})
                        probabilities[(f"icl_{route}", mode, k)] = alone.numpy()
        if routed:
            methods += [f"icl_{route}" for route in ROUTE_METHODS if any(key[0] == f"icl_{route}" for key in probabilities)]

    for (name, mode, k), probs in probabilities.items():
        eps = episodes[(mode, k)]
        predicted = [labels[i] for i in probs.argmax(-1)]
        references = [e["emotion"] for e in eps]
        scores = summarize(predicted, references, [e["speaker"] for e in eps], n_resamples=args.n_bootstrap, seed=args.seed)
        results.append({"method": name, "mode": mode, "k": k, **scores})
        for episode, prediction, row in zip(eps, predicted, probs):
            predictions_log.append({"method": name, "mode": mode, "k": k, "episode_id": episode["episode_id"],
                                    "speaker": episode["speaker"], "emotion": episode["emotion"],
                                    "prediction": prediction, "probabilities": [round(float(p), 5) for p in row]})
    add_paired_gains(results, probabilities, episodes, labels, args)
    results.sort(key=lambda r: (r["mode"], methods.index(r["method"]), r["k"]))

    report = {
        "settings": asdict(args),
        "methods": methods,
        "labels": labels,
        "corpus": args.corpus,
        "splits": splits,
        "baseline_corpus": args.baseline_corpus,
        "baseline_labels": data["baseline"]["labels"] if "baseline" in data else labels,
        "eval_split": args.eval_split,
        "n_test_episodes": {f"{mode}/k{k}": len(eps) for (mode, k), eps in episodes.items()},
        "baseline_features": feature_source,
        "baselines": {name: method.describe() for name, method in fitted.items()},
        "route_weights_by_k": override_weights or (getattr(loaded["icl"][0].config, "route_weights_by_k", None)
                                                   if "icl" in loaded else None),
        "versions": package_versions(),
        "device": device,
        "minutes": round((time.time() - started) / 60, 2),
        "results": results,
    }
    write_outputs(report, predictions_log, output_dir, args)
    print(results_markdown(report))
    print(f"Wrote {output_dir}/results.json, results.md, plots and README.md")
    return report


# ------------------------------------------------------------------------------- outputs
def _atomic_write(path: Path, text: str) -> None:
    from dataset_builder.feature_cache import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: Path(temporary).write_text(text), prefix=f".{path.name}-")


def _cell(result: dict) -> str:
    low, high = result["ua_ci"]
    return f"{100 * result['ua']:.1f} ± {100 * (high - low) / 2:.1f}"


def results_markdown(report: dict) -> str:
    """Tables per enrollment mode: rows method, columns K, cells UA ± half-width of the 95% CI (%)."""
    lines = []
    modes = list(dict.fromkeys(r["mode"] for r in report["results"]))
    ks = sorted({r["k"] for r in report["results"]})
    by_key = {(r["method"], r["mode"], r["k"]): r for r in report["results"]}
    disjoint = " content-disjoint" if report.get("settings", {}).get("content_disjoint") else ""
    unlabelled = report.get("settings", {}).get("unlabelled")
    disjoint += f" + {unlabelled} unlabelled utterances" if unlabelled else ""
    for mode in modes:
        lines += [
            f"**{report['corpus']}**, `{mode}`{disjoint} enrollment: UA % (± half-width of the bootstrap 95% CI over "
            f"episodes); {len(report['splits'][report['eval_split']])} {report['eval_split']} speakers, "
            f"labels: {', '.join(report['labels'])}.",
            "",
            "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
            "|---|" + "---:|" * len(ks),
        ]
        for method in report["methods"]:
            cells = [_cell(by_key[(method, mode, k)]) if (method, mode, k) in by_key else "–" for k in ks]
            lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
        gains = {key: r for key, r in by_key.items() if key[1] == mode and "ua_gain" in r}
        if gains:
            base_k = next(iter(gains.values()))["ua_gain_base_k"]
            lines += ["", f"Paired UA gain over K={base_k} on the same queries, `{mode}` (percentage points, "
                      "bootstrap 95% CI; an interval above 0 means enrollment helped).", "",
                      "| method | " + " | ".join(f"K={k}" for k in ks if k != base_k) + " |",
                      "|---|" + "---:|" * (len(ks) - 1)]
            for method in report["methods"]:
                cells = []
                for k in ks:
                    if k == base_k:
                        continue
                    row = gains.get((method, mode, k))
                    cells.append(f"{100 * row['ua_gain']:+.1f} [{100 * row['ua_gain_ci'][0]:+.1f}, "
                                 f"{100 * row['ua_gain_ci'][1]:+.1f}]" if row else "–")
                lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
        lines += ["", f"Per-speaker UA, `{mode}`: minimum / standard deviation across {report['eval_split']} speakers (%).", "",
                  "| method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for method in report["methods"]:
            cells = [
                f"{100 * by_key[key]['speaker_ua_min']:.1f} / {100 * by_key[key]['speaker_ua_std']:.1f}"
                if (key := (method, mode, k)) in by_key else "–" for k in ks
            ]
            lines.append(f"| {METHOD_TITLES.get(method, method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_results(report: dict, output_dir: Path) -> list[str]:
    """``ua_vs_k_<mode>.png`` (a line per method, CI band) and ``per_speaker_ua_<mode>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    modes = list(dict.fromkeys(r["mode"] for r in report["results"]))
    for mode in modes:
        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        for method in report["methods"]:
            rows = sorted((r for r in report["results"] if r["method"] == method and r["mode"] == mode), key=lambda r: r["k"])
            if not rows:
                continue
            ks = [r["k"] for r in rows]
            line, = axis.plot(ks, [r["ua"] for r in rows], marker="o", label=METHOD_TITLES.get(method, method))
            axis.fill_between(ks, [r["ua_ci"][0] for r in rows], [r["ua_ci"][1] for r in rows],
                              color=line.get_color(), alpha=0.15)
        axis.axhline(1 / len(report["labels"]), color="grey", linestyle=":", linewidth=1, label="chance")
        axis.set(xlabel="K (enrollment utterances)", ylabel="UA", title=f"{report['corpus']}, {mode} enrollment")
        axis.legend(fontsize=7)
        figure.tight_layout()
        name = f"ua_vs_k_{mode}.png"
        figure.savefig(output_dir / name, dpi=120)
        plt.close(figure)
        written.append(name)

        ks = sorted({r["k"] for r in report["results"] if r["mode"] == mode})
        figure, axes = plt.subplots(1, len(ks), figsize=(2.2 * len(ks) + 1, 3.6), sharey=True, squeeze=False)
        for axis, k in zip(axes[0], ks):
            for x, method in enumerate(report["methods"]):
                row = next((r for r in report["results"] if (r["method"], r["mode"], r["k"]) == (method, mode, k)), None)
                if row:
                    values = list(row["per_speaker_ua"].values())
                    axis.scatter([x] * len(values), values, s=12, alpha=0.7)
                    axis.plot([x - 0.3, x + 0.3], [row["ua"]] * 2, color="black", linewidth=1)
            axis.set_xticks(range(len(report["methods"])), report["methods"], rotation=70, fontsize=7)
            axis.set_title(f"K={k}", fontsize=9)
        axes[0][0].set_ylabel("per-speaker UA")
        figure.suptitle(f"{report['corpus']}, {mode}: per-speaker UA (bar: pooled UA)", fontsize=9)
        figure.tight_layout()
        name = f"per_speaker_ua_{mode}.png"
        figure.savefig(output_dir / name, dpi=120)
        plt.close(figure)
        written.append(name)
    return written


def evaluation_key(report: dict) -> str:
    """The setting an evaluation reports on, as the card's block title: corpus, speakers, protocol."""
    settings = report["settings"]
    speakers = "every speaker (never trained on)" if settings.get("test_speakers") == ["all"] else "test speakers"
    enrollment = "content-disjoint enrollment" if settings.get("content_disjoint") else "plain enrollment"
    unlabelled = f", {settings['unlabelled']} unlabelled utterances" if settings.get("unlabelled") else ""
    return f"{report['corpus']}, {speakers}, {enrollment}{unlabelled}"


def _card_blocks(text: str) -> list[str]:
    """The evaluation blocks (`<!-- eval: ... -->` to `<!-- /eval -->`) of an existing card."""
    import re

    return re.findall(r"<!-- eval: .*? -->.*?<!-- /eval -->", text, flags=re.DOTALL)


def _card_field(text: str, name: str) -> Optional[str]:
    import re

    match = re.search(rf"^- \*\*{re.escape(name)}:\*\* (.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else None


def model_card(report: dict, args: EvalArguments) -> str:
    """The model card filled from ``model_card.md``; training details are kept from the model's card."""
    from huggingface_hub import ModelCard, ModelCardData

    existing = ""
    if args.model and (Path(args.model) / "README.md").is_file():
        existing = (Path(args.model) / "README.md").read_text()
    training = None
    if "## Training\n" in existing and "\n## Evaluation" in existing:
        training = existing.split("## Training\n", 1)[1].split("\n## Evaluation", 1)[0].strip() or None
    details: dict[str, Any] = {
        "audio_encoder": _card_field(existing, "Audio encoder") or report.get("baseline_features"),
        "language_model": _card_field(existing, "Language model"),
        "num_audio_tokens": _card_field(existing, "Speech tokens per utterance"),
        "audio_feature_layer": _card_field(existing, "Encoder block read"),
        "context_readout": _card_field(existing, "Enrollment read-out"),
        "routes": _card_field(existing, "Routes mixed by `classify`"),
        "labels": _card_field(existing, "Label vocabulary") or ", ".join(report["labels"]),
    }
    data = ModelCardData(
        library_name="transformers", license="apache-2.0", pipeline_tag="audio-classification",
        tags=["speech-emotion-recognition", "in-context-learning", "personalization", "icl-ser"],
        datasets=report["corpus"].split(","), metrics=["unweighted_accuracy", "accuracy", "f1"],
    )
    if existing:
        try:
            old = ModelCard(existing).data.to_dict()
            datasets_seen = list(dict.fromkeys([*(old.get("datasets") or []), *report["corpus"].split(",")]))
            data = ModelCardData(**{**old, "datasets": datasets_seen})
        except Exception as error:  # a hand-edited card with odd metadata: start from defaults
            logger.warning("Could not reuse the model card's metadata (%s); writing defaults.", error)
    key = evaluation_key(report)
    table = (
        f"<!-- eval: {key} -->\n### {key}\n\nEvaluated with `eval.py` on the test speakers of **{report['corpus']}** "
        f"(methods: {', '.join(report['methods'])}).\n\n" + results_markdown(report) + "\n<!-- /eval -->"
    )
    # One block per evaluated setting: a new evaluation replaces its own block and keeps the others.
    kept = [block for block in _card_blocks(existing) if not block.startswith(f"<!-- eval: {key} -->")]
    table = "\n\n".join([*kept, table])
    card = ModelCard.from_template(
        data, template_path=str(REPO_ROOT / "model_card.md"),
        model_id=Path(args.model).name if args.model else None,
        training_summary=training, results_table=table, **details,
    )
    return str(card)


def write_outputs(report: dict, predictions_log: list[dict], output_dir: Path, args: EvalArguments) -> None:
    report["plots"] = plot_results(report, output_dir)
    _atomic_write(output_dir / "results.json", json.dumps(report, indent=2, default=str))
    _atomic_write(output_dir / "results.md", results_markdown(report))
    _atomic_write(output_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions_log))
    card = model_card(report, args)
    _atomic_write(output_dir / "README.md", card)
    if args.update_model_card:
        _atomic_write(Path(args.model) / "README.md", card)


if __name__ == "__main__":
    main()
