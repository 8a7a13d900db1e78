#!/usr/bin/env python
"""Meta-train an icl-ser speech-language model for in-context personalization.

Each step draws fresh episodes from the training speakers — K enrollment (utterance, label)
pairs of one speaker (K drawn from a range, labels arbitrary) and a query of the same speaker —
and trains the model to produce the labels (each enrollment label before it is seen, and the
query's). Defaults are the best setting of docs/RESULTS.md: the encoder frozen with cached
features, a trained projector, the LM cut to its first 8 blocks with LoRA adapters (peft),
4 virtual speakers (voice transforms) per training speaker, 16 episodes per step.

    python train.py                                   # embedded synthetic corpus, offline backbones
    python train.py --tiny --max_steps 20             # tiny random model (smoke run)
    python train.py --corpus ravdess --data_dir ../shared/data/ravdess
    accelerate launch --num_processes 2 train.py ...  # multi-process via Accelerate
    python train.py config.yaml                       # arguments from a YAML/JSON file

Validation UA at K = 0, 4, 8 is printed periodically; checkpoints go to
``<output_dir>/checkpoints`` and the exported model to ``<output_dir>/final``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from dataset_builder import EpisodeSampler, check_texts_known, parse_corpora, read_corpora, split_corpora, split_episodes
from dataset_builder.multi import label_sets, with_labels
from dataset_builder.synthetic import default_cache_root
from dataset_builder.virtual_speakers import add_virtual_speakers, real_speaker
from dataset_builder.cli import parse_arguments as parse_script_arguments, parse_corpus_options
from modeling_icl_ser import IclSerDataCollator, save_with_pipeline
from modeling_icl_ser.configuration_icl_ser import check_options, option_default
from evaluation.episodic import EncodedUtterances, episode_example, native_bf16_available, predict_episodes
from evaluation.metrics import unweighted_accuracy
from evaluation.route_weights import ROUTE_NAMES, choose_route_weights, mixture_ua
from training.held_out_folds import run_held_out_folds

logger = logging.getLogger("icl_ser.train")
REPO_ROOT = Path(__file__).resolve().parent


@dataclass
class TrainingArguments:
    """Meta-training settings (every field is a command-line flag)."""

    # data
    corpus: str = field(default="synthetic", metadata={"help":
            "ravdess, cremad, emodb, iemocap, esd, ased, emotiontts-ko, manifest or synthetic; several comma-separated "
            "(ravdess,ased)."})
    data_dir: Optional[str] = field(default=None, metadata={"help":
            "Corpus folder (or manifest), one per corpus, comma-separated; not needed for synthetic."})
    corpus_options: Optional[str] = field(default=None, metadata={
        "help": 'Synthetic generator options as JSON, e.g. \'{"n_speakers": 8}\'.'})
    validation_speakers: Optional[list[str]] = field(default=None, metadata={"help":
            "Explicit validation speakers (corpus/speaker with several corpora)."})
    test_speakers: Optional[list[str]] = field(default=None, metadata={"help": "Explicit test speakers (never used here)."})
    labels: Optional[list[str]] = field(default=None, metadata={"help":
            "Label vocabulary (default: the corpus' emotions; one corpus only)."})
    # model
    tiny: bool = field(default=False, metadata={"help": "Use the tiny random model (tests, smoke runs)."})
    audio_encoder: Optional[str] = field(default=None, metadata={"help": "Hub id / HF folder / CTranslate2 Whisper folder."})
    language_model: Optional[str] = field(default=None, metadata={"help": "Hub id / HF folder / .gguf file."})
    offline_encoder: Optional[str] = field(default=None, metadata={"help":
            "Offline Whisper without --audio_encoder: tiny.en (default) or base (multilingual)."})
    language_model_layers: int = field(default=4, metadata={"help":
            "Keep the LM's first N pretrained blocks (fewer = cheaper steps); 0 = all."})
    num_audio_tokens: int = field(default=option_default("num_audio_tokens"), metadata={"help": "Speech tokens per utterance."})
    audio_pooling: str = field(default=option_default("audio_pooling"), metadata={"help": "Projector pooling: mean or mean_std."})
    audio_feature_layer: int = field(default=option_default("audio_feature_layer") or 0, metadata={"help":
            "Encoder block the projector reads (1 = the first; 0 = the last). Early blocks keep speaker-specific cues "
            "(docs/RESULTS.md)."})
    enrollment_template: Optional[str] = field(default=None, metadata={"help":
            "Enrollment line with {audio} and {answer} (default: the config's)."})
    query_template: Optional[str] = field(default=None, metadata={"help": "Query line with {audio} (default: the config's)."})
    audio_token_dropout: float = field(default=option_default("audio_token_dropout"), metadata={"help":
            "Dropout on the pooled audio features while training."})
    context_readout_heads: int = field(default=option_default("context_readout_heads"), metadata={"help":
            "Heads of the enrollment read-out (query vs enrollment utterances → their label words on the query's tokens and the"
            " LM's output; docs/RESULTS.md); 0 = none."})
    context_readout_dim: int = field(default=option_default("context_readout_dim"), metadata={"help":
            "Width of each read-out head's metric space (smaller = fewer parameters to fit the training speakers)."})
    context_readout_dropout: float = field(default=option_default("context_readout_dropout"), metadata={"help":
            "Share of training queries without their read-out (the LM keeps learning to label speech itself; docs/RESULTS.md)."})
    speaker_normalization: bool = field(default=option_default("speaker_normalization"), metadata={"help":
            "Standardize utterance summaries by the speaker's enrollment (label-free speaker normalization) before the read-out"
            " and the routes (IclSerConfig.speaker_normalization)."})
    speaker_normalized_audio_tokens: bool = field(default=option_default("speaker_normalized_audio_tokens"), metadata={"help":
            "Standardize the LM's audio input (the projector's pooled segments) by the same speaker statistics "
            "(IclSerConfig.speaker_normalized_audio_tokens; needs --speaker_normalization)."})
    si_route: bool = field(default=option_default("si_route"), metadata={"help":
            "Add the speaker-independent route (summary → label-word embeddings), trained beside the LM loss "
            "(IclSerConfig.si_route)."})
    si_route_loss_coef: float = field(default=option_default("si_route_loss_coef"), metadata={"help":
            "Weight of the SI route's cross-entropy (only with --si_route_fit false)."})
    si_route_fit: bool = field(default=True, metadata={"help":
            "Fit the SI route before meta-training as the SI baseline is fitted (every training utterance's cached summary, "
            "early stopping on validation speakers; training.si_route) and keep it fixed; false = train it beside the LM loss. "
            "Needs --encoder_mode frozen."})
    route_weights_from: str = field(default="validation", metadata={"help":
            "Where the route weights are chosen: validation (the training corpora's validation speakers) or held_out_corpora "
            "(per K, out of domain: one fold model per training corpus trained on the others and scored on it; "
            "training.held_out_folds)."})
    fold_steps: int = field(default=150, metadata={"help":
            "With --route_weights_from held_out_corpora: meta-training steps of each fold model."})
    fold_eval_k: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8], metadata={"help":
            "The K's the fold models are scored at (the weights' K grid)."})
    fold_episodes_per_speaker: int = field(default=10, metadata={"help":
            "Held-out episodes per speaker and K for the fold scores."})
    route_weight_step: float = field(default=0.1, metadata={"help":
            "At each validation, choose how classify mixes the LM, SI and prototype routes on a grid of this step (best mean "
            "validation UA over --eval_k; exported in the config); 0 = the LM alone. Needs a read-out or --si_route."})
    readout_stage_steps: Optional[int] = field(default=None, metadata={"help":
            "Two-stage schedule: the last N of --max_steps train only the enrollment read-out (LM, adapters and projector "
            "fixed, the learning-rate schedule restarted); before them the LM trains without the read-out's vector, so its K = "
            "0 skill is undisturbed. The best checkpoint is chosen among stage-2 validations. Default: a third of --max_steps "
            "with a read-out; 0 = one stage (docs/RESULTS.md)."})
    # what is trained
    encoder_mode: str = field(default="frozen", metadata={"help": "frozen (cached features), lora or full."})
    encoder_lora_layers: int = field(default=2, metadata={"help": "With encoder_mode=lora: adapt the top N encoder layers."})
    lm_lora: bool = field(default=True, metadata={"help": "Add LoRA adapters to the LM (else the LM stays frozen)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (LM and encoder adapters)."})
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.0)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # episodes
    k_min: int = field(default=0, metadata={"help": "Smallest K drawn for a training episode."})
    k_max: int = field(default=8, metadata={"help": "Largest K drawn for a training episode."})
    enrollment_mode: str = field(default="arbitrary", metadata={"help": "arbitrary, balanced or exclude_query_class."})
    content_disjoint: bool = field(default=False, metadata={"help":
            "No enrollment utterance has the query's sentence (text), in training and validation episodes; needs corpora with "
            "texts (not iemocap/synthetic)."})
    permuted_label_share: float = field(default=0.0, metadata={"help":
            "Share of the training episodes the context can answer (enrollment holds the query's emotion) whose label words are"
            " permuted (same for enrollment and query)."})
    virtual_speakers: int = field(default=2, metadata={"help":
            "Virtual speakers per training speaker (one voice transform each; 0 = none)."})
    loss_on_enrollment_labels: bool = field(default=True, metadata={"help":
            "Also train on the enrollment labels' tokens (K+1 answers per episode)."})
    # optimisation
    max_steps: int = field(default=100, metadata={"help":
            "Optimizer steps (with a read-out, the last third train it alone: --readout_stage_steps)."})
    batch_size: int = field(default=16, metadata={"help": "Episodes per optimizer step and accumulation step (per process)."})
    length_groups: int = field(default=4, metadata={"help":
            "Split each batch into N forward passes of episodes of similar K (less padding; the loss and gradients equal one "
            "pass over the batch); 1 = one pass."})
    gradient_accumulation_steps: int = field(default=1)
    learning_rate: float = field(default=2e-3)
    weight_decay: float = field(default=0.0)
    warmup_steps: int = field(default=20)
    lr_scheduler_type: str = field(default="cosine")
    max_grad_norm: float = field(default=1.0)
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 where the GPU/CPU has it), no, bf16 or fp16."})
    seed: int = field(default=0)
    # validation, checkpoints, export
    eval_every: int = field(default=0, metadata={"help": "Validate every N steps (0 = only at the end)."})
    eval_k: list[int] = field(default_factory=lambda: [0, 4, 8])
    eval_episodes_per_speaker: int = field(default=24)
    early_stopping_patience: Optional[int] = field(default=None, metadata={"help": "Stop after N validations without gain."})
    load_best_at_end: bool = field(default=True)
    checkpoint_every: int = field(default=100)
    keep_checkpoints: int = field(default=2)
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A checkpoint folder or 'latest'."})
    output_dir: str = field(default="outputs/icl-ser")
    feature_cache_dir: Optional[str] = field(default=None, metadata={"help": "Default: $ICL_SER_CACHE/features."})
    export_adapter_only: bool = field(default=False, metadata={"help":
            "Export LoRA adapter + projector instead of merged weights."})
    push_to_hub: bool = field(default=False)
    hub_model_id: Optional[str] = field(default=None)
    hub_private: bool = field(default=False)
    log_with: Optional[str] = field(default="tensorboard", metadata={"help": "Accelerate tracker (tensorboard) or none."})

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work, before any heavy work."""
        parse_corpus_options(self.corpus_options)
        specs = parse_corpora(self.corpus, self.data_dir)  # names known, one folder per corpus
        if self.content_disjoint:
            check_texts_known(name for name, _ in specs)
        if self.labels and len(specs) > 1:
            raise ValueError("--labels sets one label set for a single corpus; with several corpora each episode "
                             "uses its own corpus' emotions, so drop --labels.")
        if self.encoder_mode not in ("frozen", "lora", "full"):
            raise ValueError(f"--encoder_mode must be frozen, lora or full, got {self.encoder_mode!r}.")
        if not 0 <= self.k_min <= self.k_max:
            raise ValueError(f"Need 0 <= --k_min <= --k_max, got {self.k_min} and {self.k_max}.")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r} (use --lm_lora false to freeze the LM).")
        if not 0.0 <= self.permuted_label_share <= 1.0:
            raise ValueError(f"--permuted_label_share must be between 0 and 1, got {self.permuted_label_share}.")
        check_options(**model_options(self))  # the model's own checks, before any heavy work
        if self.readout_stage_steps is None:
            self.readout_stage_steps = self.max_steps // 3 if self.context_readout_heads > 0 else 0
        if not 0 <= self.readout_stage_steps < self.max_steps:
            raise ValueError(f"--readout_stage_steps must be in [0, --max_steps) (the first stage needs steps too), got "
                             f"{self.readout_stage_steps} with --max_steps {self.max_steps}.")
        if self.readout_stage_steps and not self.context_readout_heads:
            raise ValueError("--readout_stage_steps trains the enrollment read-out; it needs --context_readout_heads > 0.")
        if self.virtual_speakers < 0:
            raise ValueError(f"--virtual_speakers must be >= 0, got {self.virtual_speakers}.")
        if self.language_model_layers < 0:
            raise ValueError(f"--language_model_layers must be >= 0 (0 keeps every block), got {self.language_model_layers}.")
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("--max_steps, --batch_size and --gradient_accumulation_steps must be >= 1.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/icl-ser-ravdess).")
        if self.offline_encoder is not None:
            from modeling_icl_ser.backbones import check_offline_encoder

            check_offline_encoder(self.offline_encoder)
            if self.audio_encoder or self.tiny:
                raise ValueError("--offline_encoder picks the offline Whisper; drop it with --audio_encoder or --tiny.")
        if self.length_groups < 1:
            raise ValueError(f"--length_groups must be >= 1 (1 = one forward pass per batch), got {self.length_groups}.")
        if self.route_weights_from not in ("validation", "held_out_corpora"):
            raise ValueError(f"--route_weights_from must be validation or held_out_corpora, got {self.route_weights_from!r}.")
        if self.route_weights_from == "held_out_corpora":
            if len(specs) < 2:
                raise ValueError("--route_weights_from held_out_corpora leaves one training corpus out at a time; pass two "
                                 "or more corpora in --corpus (or use --route_weights_from validation).")
            if not self.route_weight_step:
                raise ValueError("--route_weights_from held_out_corpora chooses route weights; it needs --route_weight_step > 0.")
            if self.fold_steps < 1 or self.fold_episodes_per_speaker < 1 or not self.fold_eval_k or min(self.fold_eval_k) < 0:
                raise ValueError("--fold_steps and --fold_episodes_per_speaker must be >= 1 and --fold_eval_k K's >= 0.")
        if self.si_route and self.si_route_fit and self.encoder_mode != "frozen":
            raise ValueError("--si_route_fit fits the SI route on cached encoder features; it needs --encoder_mode frozen "
                             "(or pass --si_route_fit false to train it beside the LM loss).")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}.")


def parse_arguments(argv: Optional[list[str]] = None) -> TrainingArguments:
    """Flags, or a single YAML/JSON file of them."""
    return parse_script_arguments(TrainingArguments, argv)


# --------------------------------------------------------------------------------- model
def model_options(args: TrainingArguments) -> dict[str, Any]:
    """The `IclSerConfig` options the flags set, as every built model gets them (`--audio_feature_layer 0`
    = the last block = the config's None; unset templates keep the config's)."""
    options = {"num_audio_tokens": args.num_audio_tokens, "audio_pooling": args.audio_pooling,
               "audio_feature_layer": args.audio_feature_layer or None, "audio_token_dropout": args.audio_token_dropout,
               "context_readout_heads": args.context_readout_heads, "context_readout_dim": args.context_readout_dim,
               "context_readout_dropout": args.context_readout_dropout,
               "speaker_normalization": args.speaker_normalization,
               "speaker_normalized_audio_tokens": args.speaker_normalized_audio_tokens, "si_route": args.si_route,
               "si_route_loss_coef": args.si_route_loss_coef}
    options.update({name: getattr(args, name) for name in ("enrollment_template", "query_template")
                    if getattr(args, name) is not None})
    return options


def build_model(args: TrainingArguments, labels: list[str]):
    """The (model, processor) to meta-train: tiny, given backbones, or the offline default."""
    from modeling_icl_ser.backbones import (
        DEFAULT_OFFLINE_ENCODER, OFFLINE_INSTALL_HINT, from_backbones, offline_backbones_available, offline_default,
    )
    from modeling_icl_ser.testing import tiny_icl_ser

    options = model_options(args)
    settings = {"language_model_layers": args.language_model_layers or None, **options}
    if args.tiny:
        model, processor = tiny_icl_ser(labels=labels, seed=args.seed, **options)
        return model, processor, "tiny random model (modeling_icl_ser.testing.tiny_icl_ser)"
    if args.audio_encoder or args.language_model:
        if not (args.audio_encoder and args.language_model):
            raise ValueError("Pass both --audio_encoder and --language_model (or neither for the offline default).")
        model, processor = from_backbones(args.audio_encoder, args.language_model, labels=labels, **settings)
        return model, processor, f"{args.audio_encoder} + {args.language_model}"
    if args.offline_encoder or offline_backbones_available():  # an explicit choice must not fall back
        encoder = args.offline_encoder or DEFAULT_OFFLINE_ENCODER
        model, processor = offline_default(labels=labels, encoder=encoder, **settings)
        return model, processor, f"offline default: Whisper {encoder} (CTranslate2) + SmolLM2-135M-Instruct (GGUF)"
    logger.warning("Offline backbones not installed (%s); using the tiny random model.", OFFLINE_INSTALL_HINT)
    args.tiny = True
    return build_model(args, labels)


def apply_adapters(model, args: TrainingArguments):
    """Freeze the backbones, then add LoRA (peft) where asked; the projector always trains."""
    import peft

    model.requires_grad_(False)
    tower = model.audio_tower
    n_encoder_layers = len(tower.layers) if hasattr(tower, "layers") else len(tower.encoder.layers)
    patterns = []
    if args.lm_lora:
        patterns.append(rf"language_model\..*\.({'|'.join(args.lora_target_modules)})")
    if args.encoder_mode == "lora":
        top = "|".join(str(i) for i in range(max(0, n_encoder_layers - args.encoder_lora_layers), n_encoder_layers))
        patterns.append(rf"audio_tower\..*layers\.({top})\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)")
    # The projector and the read-out are new: they always train in full (the SI route too, unless
    # it was fitted before meta-training and stays fixed).
    routes_fitted = args.si_route and args.si_route_fit
    trained_modules = ["projector"] + [name for name in ("context_readout", "speaker_routes")
                                       if getattr(base(model), name) is not None
                                       and not (name == "speaker_routes" and routes_fitted)]
    if patterns:
        config = peft.LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules="|".join(f"(?:{p})" for p in patterns), modules_to_save=trained_modules,
        )
        model = peft.get_peft_model(model, config)
    else:
        for name in trained_modules:
            getattr(model, name).requires_grad_(True)
    if args.encoder_mode == "full":
        base(model).audio_tower.requires_grad_(True)
    return model


def base(model):
    """The IclSerForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trained_parameter_names(model) -> set[str]:
    """Names of the parameters meta-training changes (taken once, before any stage freezes some)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def trainable_state(model, names: set[str]) -> dict[str, torch.Tensor]:
    """Only the trained tensors (`names`, from `trained_parameter_names`): checkpoints stay small
    (the backbones do not change)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


class TwoStageSchedule:
    """train.py's `--readout_stage_steps`: which parameters train at a step, and the learning rate.

    Stage 1 (steps before `max_steps - readout_stage_steps`): everything trainable trains, the
    read-out's vector does not reach the LM (its matching loss still trains its attention).
    Stage 2: only the read-out trains, feeding the fixed LM; the schedule restarts for it.
    With `readout_stage_steps == 0` there is one stage and the usual schedule.
    """

    def __init__(self, args: TrainingArguments, model, trained_names: set[str]):
        self.first_stage_steps = args.max_steps - args.readout_stage_steps
        self.two_stage = args.readout_stage_steps > 0
        self.inner = base(model)
        self.fixed_in_stage_2 = [p for n, p in model.named_parameters() if n in trained_names and "context_readout" not in n]

    def in_stage_2(self, step: int) -> bool:
        return self.two_stage and step >= self.first_stage_steps

    def enter(self, step: int) -> None:
        """Set up the model for the step about to run (`step` = steps done so far)."""
        if not self.two_stage:
            return
        stage_2 = self.in_stage_2(step)
        self.inner.feed_context_readout(stage_2)
        for p in self.fixed_in_stage_2:
            p.requires_grad_(not stage_2)

    def drop_fixed_gradients(self, step: int) -> None:
        """In stage 2, forget any gradient of the fixed parameters before the optimizer step (under
        DDP they may hold reduced zeros, and AdamW would still move them by its momentum)."""
        if self.in_stage_2(step):
            for p in self.fixed_in_stage_2:
                p.grad = None

    def scheduler(self, args: TrainingArguments, optimizer):
        if not self.two_stage:
            return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                                 num_training_steps=args.max_steps)
        # Each stage gets the chosen schedule over its own steps (warm restart for the read-out).
        stage_steps = [self.first_stage_steps, args.readout_stage_steps]
        factors = [get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=min(args.warmup_steps, n // 5),
                                 num_training_steps=n).lr_lambdas[0] for n in stage_steps]
        first = self.first_stage_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: factors[0](s) if s < first else factors[1](s - first))


# ---------------------------------------------------------------------------------- data
@dataclass
class EpisodeData:
    """Everything the loop needs to turn episodes into batches."""

    labels: list[str]
    paths: dict[str, str]
    splits: dict[str, list[str]]
    train_sampler: EpisodeSampler
    validation: dict[int, list[dict]]
    encoded: Optional[EncodedUtterances]
    label_sets: Optional[dict[str, list[str]]] = None  # per corpus, when corpora are mixed

    def next_example(self) -> dict:
        """The sampler's next episode as a collator example (with its corpus' labels)."""
        return episode_example(with_labels(next(self.train_sampler), self.label_sets), self.paths, self.encoded)


def enrollment_size(example: dict) -> int:
    """K of a collator example (cached features or audio paths)."""
    return len(example.get("enrollment_labels") or example.get("enrollment") or [])


def length_grouped_batches(examples: list[dict], groups: int, collator) -> list[dict]:
    """One batch as up to `groups` collated micro-batches of episodes of similar K.

    A padded batch of episodes with K from 0 to 8 is ~40 % padding (every row as long as the
    longest); grouped by K, each pass pads only to its own longest. Every micro-batch carries
    `num_items_in_batch` and `num_enrolled_queries_in_batch` for the whole batch, so the
    micro-batches' losses sum to the one-pass loss and their gradients to its gradient.
    """
    order = sorted(range(len(examples)), key=lambda i: enrollment_size(examples[i]))
    chunks = [chunk for chunk in np.array_split(np.array(order), max(1, min(groups, len(examples)))) if len(chunk)]
    batches = [collator([examples[i] for i in sorted(chunk.tolist())]) for chunk in chunks]
    n_targets = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    n_enrolled = sum(1 for example in examples if enrollment_size(example))
    for batch in batches:
        batch["num_items_in_batch"] = max(n_targets, 1)
        batch["num_enrolled_queries_in_batch"] = n_enrolled
        batch["num_queries_in_batch"] = len(examples)
    return batches


def load_data(args: TrainingArguments, accelerator: Accelerator) -> tuple[Any, list[str]]:
    """Utterance table (all corpora) and label vocabulary (their emotions' union)."""
    with accelerator.main_process_first():  # the synthetic corpus is generated once
        table = read_corpora(parse_corpora(args.corpus, args.data_dir), **parse_corpus_options(args.corpus_options))
    labels = list(args.labels) if args.labels else sorted(set(table["emotion"]))
    return table, labels


def prepare_episodes(args, accelerator, table, labels, model, processor) -> EpisodeData:
    """Speaker split, the training sampler, fixed validation episodes and cached features."""
    specs = parse_corpora(args.corpus, args.data_dir)
    splits = split_corpora(
        table, specs, seed=args.seed,
        validation_speakers=args.validation_speakers, test_speakers=args.test_speakers,
    )
    real_table = table
    train_speakers = list(splits["train"])
    if args.virtual_speakers:
        with accelerator.main_process_first():  # rendered once, then read from the cache
            table = add_virtual_speakers(table, splits["train"], args.virtual_speakers, seed=args.seed,
                                         show_progress=accelerator.is_local_main_process)
        real_train = set(splits["train"])
        train_speakers = sorted({s for s in table["speaker"] if real_speaker(s) in real_train})
    # Each process draws its own stream; all are reproducible from (seed, process index).
    sampler = EpisodeSampler(
        table, speakers=train_speakers, k=(args.k_min, args.k_max), mode=args.enrollment_mode,
        seed=args.seed * 1000 + accelerator.process_index, permuted_label_share=args.permuted_label_share,
        content_disjoint=args.content_disjoint,
    )
    validation = {
        k: split_episodes(real_table, specs, splits["validation"], "validation", k, args.enrollment_mode,
                          seed=args.seed, episodes_per_speaker=args.eval_episodes_per_speaker,
                          content_disjoint=args.content_disjoint)
        for k in args.eval_k
    }
    encoded = None
    if args.encoder_mode == "frozen":
        cache_dir = args.feature_cache_dir or str(default_cache_root() / "features")
        used = set(train_speakers) | set(splits["validation"])
        rows = [row for row in table if row["speaker"] in used]  # test speakers stay untouched
        with accelerator.main_process_first():
            encoded = EncodedUtterances(
                model, processor, rows, cache_dir=cache_dir, show_progress=accelerator.is_local_main_process
            )
    return EpisodeData(labels, dict(zip(table["id"], table["path"])), splits, sampler, validation, encoded,
                       label_sets(real_table, specs))


# ---------------------------------------------------------------------------- validation
def validate(model, collator, data: EpisodeData, accelerator, route_weight_step: float = 0.0) -> dict[str, float]:
    """UA on the fixed validation episodes at each K (computed on the main process).

    With `route_weight_step` and a model with routes (read-out or SI route), the route weights
    are chosen here on these episodes (`evaluation.route_weights`), set in the model's config
    (the export carries them) and the UA is the mixture's; each route's own UA is logged too.
    """
    scores = {}
    if accelerator.is_main_process:
        inner = base(accelerator.unwrap_model(model))
        routed = bool(route_weight_step) and (inner.context_readout is not None or inner.speaker_routes is not None)
        truths = {k: [e["emotion"] for e in episodes] for k, episodes in data.validation.items()}
        if routed:
            inner.config.route_weights = inner.config.route_weights_without_enrollment = None
            routes = {}
            for k, episodes in data.validation.items():
                with accelerator.autocast():
                    routes[k] = predict_episodes(inner, collator, episodes, data.paths, data.labels, data.encoded,
                                                 return_routes=True)
            weights, without, chosen = choose_route_weights(routes, truths, data.labels, step=route_weight_step)
            inner.config.route_weights, inner.config.route_weights_without_enrollment = weights, without
            scores.update({f"val_ua_k{k}": ua for k, ua in chosen.items()})
            for name in ROUTE_NAMES:
                for k, by_route in routes.items():
                    if by_route.get(name) is not None:
                        scores[f"route_{name}_ua_k{k}"] = mixture_ua(by_route, truths[k], data.labels, {name: 1.0})
            for prefix, chosen_weights in (("route_weight", weights), ("route_weight_k0", without)):
                if chosen_weights is not None:
                    scores.update({f"{prefix}_{name}": float(chosen_weights.get(name, 0.0)) for name in ROUTE_NAMES})
        else:
            for k, episodes in data.validation.items():
                with accelerator.autocast():
                    probabilities = predict_episodes(inner, collator, episodes, data.paths, data.labels, data.encoded)
                predictions = [data.labels[i] for i in probabilities.argmax(-1)]
                scores[f"val_ua_k{k}"] = unweighted_accuracy(predictions, truths[k])
        scores["val_ua_mean"] = float(np.mean([scores[f"val_ua_k{k}"] for k in data.validation]))
    return scores


# --------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """Atomic, numbered checkpoints under ``<output_dir>/checkpoints`` (written then renamed)."""

    def __init__(self, output_dir: Path, keep: int):
        self.root = output_dir / "checkpoints"
        self.keep = keep

    def completed(self) -> list[Path]:
        found = [p for p in self.root.glob("step-*") if (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def resolve(self, which: str) -> Optional[Path]:
        if which == "latest":
            done = self.completed()
            return done[-1] if done else None
        path = Path(which)
        if not (path / "trainer_state.json").is_file():
            raise ValueError(f"{which!r} is not a complete checkpoint folder; pass one under {self.root} or 'latest'.")
        return path

    def save(self, accelerator: Accelerator, sampler: EpisodeSampler, state: dict) -> Path:
        final = self.root / f"step-{state['step']}"
        staging = self.root / f".staging-step-{state['step']}"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        with open(staging / f"sampler_{accelerator.process_index}.json", "w") as handle:
            json.dump(sampler.state_dict(), handle)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)  # a kill before this line leaves only a staging folder
            for old in self.completed()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(path: Path, accelerator: Accelerator, sampler: EpisodeSampler) -> dict:
        accelerator.load_state(str(path), strict=False)  # trainable tensors only
        sampler.load_state_dict(json.loads((path / f"sampler_{accelerator.process_index}.json").read_text()))
        return json.loads((path / "trainer_state.json").read_text())


# -------------------------------------------------------------------------------- export
def export(model, processor, args: TrainingArguments, summary: dict, output_dir: Path) -> Path:
    """Write ``<output_dir>/final`` atomically: weights (merged LoRA), processor, code, card."""
    from huggingface_hub import ModelCard, ModelCardData

    final, staging = output_dir / "final", output_dir / ".staging-final"
    shutil.rmtree(staging, ignore_errors=True)
    if args.export_adapter_only and hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        # LoRA adapter + projector (modules_to_save); load onto the same backbones with
        # peft.PeftModel.from_pretrained(IclSerForConditionalGeneration.from_backbones(...)[0], folder).
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    else:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        save_with_pipeline(merged, processor, staging)  # weights, processor, code, pipeline
    inner = base(model)
    card = ModelCard.from_template(
        ModelCardData(
            library_name="transformers", license="apache-2.0", pipeline_tag="audio-classification",
            tags=["speech-emotion-recognition", "in-context-learning", "personalization", "icl-ser"],
            datasets=[name for name, _ in parse_corpora(args.corpus, args.data_dir)],
            metrics=["unweighted_accuracy", "accuracy", "f1"],
        ),
        template_path=str(REPO_ROOT / "model_card.md"),
        model_id=args.hub_model_id or "icl-ser",
        audio_encoder=summary["backbones"],
        language_model=inner.config.text_config.model_type,
        num_audio_tokens=inner.config.num_audio_tokens,
        audio_feature_layer=(f"block {inner.config.audio_feature_layer}" if inner.config.audio_feature_layer
                             else "the last block"),
        context_readout=(f"{inner.config.context_readout_heads} heads (IclSerContextReadout: the query's likeness to each "
                         "enrollment utterance, their label words' embeddings on its tokens and on the LM's output)"
                         if inner.config.context_readout_heads else "none"),
        routes=describe_routes(inner.config),
        labels=", ".join(processor.labels),
        training_summary=training_summary(args, summary),
    )
    card.save(staging / "README.md")
    (staging / "training_args.json").write_text(json.dumps(asdict(args), indent=2))
    (staging / "validation_results.json").write_text(json.dumps(summary["validation"], indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def describe_routes(config) -> str:
    """The card's line on how `classify` mixes its routes (chosen on validation speakers)."""
    def weights(chosen) -> str:
        return ", ".join(f"{name} {float(value):.1f}" for name, value in chosen.items() if float(value) > 0)

    parts = []
    by_k = getattr(config, "route_weights_by_k", None)
    if by_k:
        steps = "; ".join(f"K ≥ {k}: {weights(w)}" for k, w in sorted(by_k.items(), key=lambda item: int(item[0])))
        return (f"per enrollment size, {steps} (chosen out of domain: each training corpus held out in turn, "
                "scored by a model trained on the others)")
    if config.route_weights:
        parts.append(f"with enrollment: {weights(config.route_weights)}")
    if config.route_weights_without_enrollment:
        parts.append(f"without enrollment: {weights(config.route_weights_without_enrollment)}")
    if not parts:
        return "the LM alone"
    extras = [name for name, on in (("speaker normalization by the enrollment", config.speaker_normalization),
                                    ("an SI route", config.si_route)) if on]
    return "; ".join(parts) + " (weights chosen on validation speakers" + (f"; {', '.join(extras)}" if extras else "") + ")"


def training_summary(args: TrainingArguments, summary: dict) -> str:
    lines = [
        f"Meta-trained with `train.py` on the **{args.corpus}** corpus: {summary['n_train_speakers']} training "
        f"speakers, {summary['n_validation_speakers']} validation speakers (test speakers unused).",
        f"{summary['steps']} steps × {args.batch_size * args.gradient_accumulation_steps} episodes, K ∈ "
        f"[{args.k_min}, {args.k_max}] `{args.enrollment_mode}`{' content-disjoint' if args.content_disjoint else ''} "
        f"enrollment, encoder `{args.encoder_mode}`, "
        f"LM LoRA {'r=' + str(args.lora_r) + ' on ' + ', '.join(args.lora_target_modules) if args.lm_lora else 'off'}, "
        f"lr {args.learning_rate}, seed {args.seed}; "
        f"{summary['minutes']:.1f} min.",
    ]
    if args.readout_stage_steps:
        lines.append(f"Two stages: {args.max_steps - args.readout_stage_steps} steps of the LM path without the read-out's "
                     f"vector, then {args.readout_stage_steps} step(s) of the read-out alone on the fixed LM; best "
                     f"validation step {summary['best_step']}.")
    if summary.get("si_route_fit"):
        fit = summary["si_route_fit"]
        lines.append("SI route fitted before meta-training on the training utterances' cached summaries (validation UA: "
                     + ", ".join(f"{head} head {report['val_ua']:.3f} at step {report['best_step']}"
                                 for head, report in fit.items())
                     + ").")
    if summary.get("out_of_domain"):
        ood = summary["out_of_domain"]
        lines.append("Route weights chosen on held-out corpora (mean UA over the folds at each K: "
                     + ", ".join(f"K={k}: {ua:.3f}" for k, ua in ood["ua"].items()) + "). With them, the validation "
                     "speakers (in domain) score " + ", ".join(f"K={k[len('val_ua_k'):]}: {v:.3f}" for k, v in
                                                               summary.get("validation_exported", {}).items()
                                                               if k.startswith("val_ua_k"))
                     + "; the table below is the in-domain choice of weights, for comparison.")
    lines += [
        "",
        "| validation | " + " | ".join(summary["validation"]) + " |",
        "|---|" + "---|" * len(summary["validation"]),
        "| UA | " + " | ".join(f"{v:.3f}" for v in summary["validation"].values()) + " |",
    ]
    return "\n".join(lines)


def push(folder: Path, args: TrainingArguments) -> None:
    """Upload the export; on failure say why and keep the local folder."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(args.hub_model_id, private=args.hub_private, exist_ok=True)
        api.upload_folder(repo_id=args.hub_model_id, folder_path=str(folder), commit_message="icl-ser export")
    except Exception as error:  # network, auth and offline-mode errors all end here
        raise SystemExit(
            f"Could not push to the Hub repo {args.hub_model_id!r}: {type(error).__name__}: {error}\n"
            f"The exported model is intact at {folder}; push it later with "
            f"`huggingface-cli upload {args.hub_model_id} {folder}` once online and logged in."
        ) from None
    print(f"Pushed {folder} to https://huggingface.co/{args.hub_model_id}")


# ---------------------------------------------------------------------------------- loop
class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits after the current step."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def resolve_mixed_precision(setting: str) -> str:
    """"auto" → bf16 where the hardware computes it natively (recent GPUs, CPUs with AVX512-BF16/AMX)."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16_available("cuda" if torch.cuda.is_available() else "cpu") else "no"


def main(argv: Optional[list[str]] = None) -> dict:
    # A fold of --route_weights_from held_out_corpora passes its arguments ready-made.
    args = argv if isinstance(argv, TrainingArguments) else parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    output_dir = Path(args.output_dir)
    mixed = resolve_mixed_precision(args.mixed_precision)
    trackers = None if args.log_with in (None, "none") else args.log_with
    # Each stage leaves some parameters out of the loss (stage 1: the copy route's gain; stage 2:
    # everything but the read-out), which DDP must be told about.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if args.readout_stage_steps else []
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed, log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(args.seed)
    started = time.time()

    folds = run_held_out_folds(args, main) if args.route_weights_from == "held_out_corpora" else None
    if folds and accelerator.is_main_process:
        write_nested_weights(folds, args)  # usable for the folds' own tests while the release model trains
    table, labels = load_data(args, accelerator)
    model, processor, backbones = build_model(args, labels)
    data = prepare_episodes(args, accelerator, table, labels, model, processor)
    si_fit = fit_model_si_route(model, processor, data, table, args) if args.si_route and args.si_route_fit else None
    model = apply_adapters(model, args)
    model.train()
    collator = IclSerDataCollator(processor, labels=labels, label_enrollment=args.loss_on_enrollment_labels)

    params = [p for p in model.parameters() if p.requires_grad]
    trained_names = trained_parameter_names(model)
    stages = TwoStageSchedule(args, model, trained_names)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = stages.scheduler(args, optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def keep_trainable_only(models, weights, _output_dir):
        names = trained_names | {f"module.{n}" for n in trained_names}
        for i in range(len(models)):
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    accelerator.register_save_state_pre_hook(keep_trainable_only)
    checkpoints = CheckpointManager(output_dir, args.keep_checkpoints)
    state = {"step": 0, "best_metric": None, "best_step": None, "evals_without_gain": 0, "history": []}
    if args.resume_from_checkpoint:
        path = checkpoints.resolve(args.resume_from_checkpoint)
        if path is None:
            accelerator.print(f"No checkpoint under {checkpoints.root} yet; starting from step 0.")
        else:
            state = CheckpointManager.load(path, accelerator, data.train_sampler)
            accelerator.print(f"Resumed from {path} at step {state['step']}.")
    if trackers:
        accelerator.init_trackers("icl-ser", config={k: str(v) for k, v in asdict(args).items()})

    stop = StopRequest()
    log_path = output_dir / "metrics.csv"
    progress = tqdm(total=args.max_steps, initial=state["step"], desc="meta-training",
                    disable=not accelerator.is_local_main_process)
    best_path = output_dir / "best" / "trainable.safetensors"
    while state["step"] < args.max_steps:
        stages.enter(state["step"])
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                examples = [data.next_example() for _ in range(args.batch_size)]
                loss = 0.0
                for batch in length_grouped_batches(examples, args.length_groups, collator):
                    part = model(**{k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss
                    accelerator.backward(part)
                    loss = loss + part.detach()
                stages.drop_fixed_gradients(state["step"])
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                losses.append(loss.detach().float().item())
        state["step"] += 1
        progress.update(1)
        record = {"step": state["step"], "loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0]}
        progress.set_postfix(loss=f"{record['loss']:.3f}")

        last = state["step"] == args.max_steps
        if (args.eval_every and state["step"] % args.eval_every == 0) or last:
            scores = validate(model, collator, data, accelerator, args.route_weight_step)
            record.update(scores)
            if accelerator.is_main_process:
                accelerator.print(f"step {state['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
                # With two stages only stage-2 weights are candidates: stage 1 never fed the read-out,
                # which the exported model does.
                eligible = not stages.two_stage or stages.in_stage_2(state["step"] - 1)
                if eligible and (state["best_metric"] is None or scores["val_ua_mean"] > state["best_metric"]):
                    state.update(best_metric=scores["val_ua_mean"], best_step=state["step"], evals_without_gain=0)
                    best_path.parent.mkdir(parents=True, exist_ok=True)
                    save_file(trainable_state(accelerator.unwrap_model(model), trained_names), str(best_path) + ".tmp")
                    os.replace(str(best_path) + ".tmp", best_path)
                elif eligible:
                    state["evals_without_gain"] += 1
        state["history"].append(record)
        if accelerator.is_main_process:
            write_metrics_row(log_path, record, args.eval_k)
        if trackers:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state["step"])

        patience_over = bool(args.early_stopping_patience) and state["evals_without_gain"] >= args.early_stopping_patience
        if (args.checkpoint_every and state["step"] % args.checkpoint_every == 0) or stop.signal or patience_over:
            checkpoints.save(accelerator, data.train_sampler, state)
        if stop.signal:
            accelerator.print(f"Interrupted at step {state['step']}; checkpoint saved. "
                              "Continue with --resume_from_checkpoint latest.")
            sys.exit(128 + stop.signal)
        if patience_over:
            accelerator.print(f"Early stopping at step {state['step']} (best step {state['best_step']}).")
            break
    progress.close()

    summary = finish(args, accelerator, model, processor, data, state, backbones, started, best_path, collator,
                     folds=folds, si_fit=si_fit)
    accelerator.end_training()
    return summary


def write_metrics_row(path: Path, record: dict, eval_k: list[int]) -> None:
    """Append one step to ``metrics.csv``; the header names every validation column from the start."""
    fields = (["step", "loss", "lr", "val_ua_mean"] + [f"val_ua_k{k}" for k in eval_k]
              + [f"route_{name}_ua_k{k}" for name in ROUTE_NAMES for k in eval_k]
              + [f"route_weight_{name}" for name in ROUTE_NAMES] + [f"route_weight_k0_{name}" for name in ROUTE_NAMES])
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(record)


def plot_learning_curve(metrics_csv: Path, png: Path) -> Optional[Path]:
    """Validation UA at each K (and the training loss) against step, from ``metrics.csv``.

    Written next to the metrics so every run keeps its curve, not only its end point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = sorted((c for c in rows[0] if c.startswith("val_ua_k")), key=lambda c: int(c[len("val_ua_k"):])) if rows else []
    evaluated = [r for r in rows if r.get("val_ua_mean")]
    if not evaluated:
        return None
    route_columns = [c for c in rows[0] if c.startswith("route_") and "_ua_k" in c and any(r.get(c) for r in evaluated)]
    panels = 3 if route_columns else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    ua_axis, loss_axis = axes[0], axes[1]
    for column in columns:
        points = [(int(r["step"]), float(r[column])) for r in evaluated if r.get(column)]
        ua_axis.plot(*zip(*points), marker="o", label=f"K = {column[len('val_ua_k'):]}")
    ua_axis.set(xlabel="step", ylabel="validation UA", title="Validation UA by enrollment size")
    ua_axis.legend(fontsize=8)
    if route_columns:  # each route alone at the smallest and largest K: what the mixture draws on
        ks = sorted({int(c.rsplit("_k", 1)[1]) for c in route_columns})
        colors = {"lm": "tab:blue", "si": "tab:red", "prototype": "tab:green"}
        for column in route_columns:
            route, k = column[len("route_"):].split("_ua_k")
            if int(k) not in (ks[0], ks[-1]) or (route == "prototype" and int(k) == 0):
                continue  # without enrollment the prototype route falls back to the LM
            points = [(int(r["step"]), float(r[column])) for r in evaluated if r.get(column)]
            axes[2].plot(*zip(*points), marker="o", color=colors.get(route), label=f"{route}, K = {k}",
                         linestyle="-" if int(k) == ks[-1] else ":")
        axes[2].set(xlabel="step", ylabel="validation UA", title="Each route alone")
        axes[2].legend(fontsize=7)
    loss_axis.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], linewidth=0.6)
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    temporary = png.with_name(f".{png.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, png)
    return png


def fit_model_si_route(model, processor, data, table, args) -> dict:
    """Fit the SI route on the training speakers' cached summaries (``training.si_route``); it then
    stays fixed, and the LM loss no longer includes it."""
    import torch as _torch

    from training.si_route import SiRouteFitting, fit_si_route, summarize_utterances

    speakers = {"train": set(data.splits["train"]), "validation": set(data.splits["validation"])}
    rows = {split: [row for row in table if row["speaker"] in members] for split, members in speakers.items()}
    train, validation = (summarize_utterances(data.encoded, rows[split], data.labels, data.label_sets)
                         for split in ("train", "validation"))
    with _torch.no_grad():  # the labels embedded as classify embeds its candidates
        cands = processor.candidate_inputs(data.labels)
        label_embeds = model._candidate_embeddings(_torch.tensor(cands["candidate_input_ids"])[None],
                                                   _torch.tensor(cands["candidate_attention_mask"])[None])[0]
    report = fit_si_route(model.speaker_routes, label_embeds, train, validation, model.config.speaker_variance_floor,
                          SiRouteFitting(seed=args.seed))
    model.config.si_route_loss_coef = 0.0  # fixed from here on: the LM loss alone trains the rest
    return report


def write_nested_weights(folds: dict, args) -> None:
    """For each corpus, the per-K weights chosen on the other folds only (``folds/<corpus>/
    nested_route_weights.json``), for testing that corpus' fold model (bench/leave_one_corpus_out.py)."""
    from training.held_out_folds import choose_out_of_domain_weights, write_json_atomically

    for held_out in folds:
        write_json_atomically(Path(args.output_dir) / "folds" / held_out / "nested_route_weights.json",
                              choose_out_of_domain_weights(folds, args.route_weight_step, exclude=held_out))


def apply_out_of_domain_weights(model, folds: dict, args) -> dict:
    """Set the exported per-K route weights from every held-out fold (``training.held_out_folds``)."""
    from training.held_out_folds import choose_out_of_domain_weights

    chosen = choose_out_of_domain_weights(folds, args.route_weight_step)
    model.config.route_weights_by_k = chosen["weights"]
    return chosen


def finish(args, accelerator, model, processor, data, state, backbones, started, best_path, collator,
           folds: Optional[dict] = None, si_fit: Optional[dict] = None) -> dict:
    """Load the best weights (re-validating them), export (and push) on the main process."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    last = state["history"][-1] if state["history"] else {}
    scores = {k: v for k, v in last.items() if k.startswith(("val_ua_", "route_"))}
    if args.load_best_at_end and best_path.is_file() and state["best_step"] != state["step"]:
        unwrapped.load_state_dict(load_file(str(best_path)), strict=False)
        accelerator.print(f"Loaded the best validation weights (step {state['best_step']}).")
        scores = {}
    if not scores:
        scores = validate(model, collator, data, accelerator, args.route_weight_step)
    summary = {
        "backbones": backbones,
        "steps": state["step"],
        "best_step": state["best_step"],
        "minutes": (time.time() - started) / 60,
        "validation": {k: round(v, 4) for k, v in scores.items()},
        "n_train_speakers": len(data.splits["train"]),
        "n_validation_speakers": len(data.splits["validation"]),
    }
    if si_fit:
        summary["si_route_fit"] = si_fit
    if folds:
        summary["out_of_domain"] = apply_out_of_domain_weights(base(unwrapped), folds, args)
        # The validation speakers scored as the export answers: per-K weights chosen out of domain.
        exported = validate(model, collator, data, accelerator, 0.0)
        summary["validation_exported"] = {k: round(v, 4) for k, v in exported.items()}
    if accelerator.is_main_process:
        metrics_csv = Path(args.output_dir) / "metrics.csv"
        if metrics_csv.is_file():
            plot_learning_curve(metrics_csv, Path(args.output_dir) / "learning_curve.png")
        folder = export(unwrapped, processor, args, summary, Path(args.output_dir))
        shown = summary.get("validation_exported", scores)
        accelerator.print(
            "Validation UA: "
            + ", ".join(f"K={k[len('val_ua_k'):]}: {v:.3f}" for k, v in shown.items() if k.startswith("val_ua_k"))
            + (" (per-K route weights chosen on held-out corpora)" if "validation_exported" in summary else "")
            + f"  ({summary['minutes']:.1f} min). Exported to {folder}"
        )
        if args.push_to_hub:
            push(folder, args)
    return summary


if __name__ == "__main__":
    main()
