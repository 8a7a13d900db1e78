"""train.py: a few tiny steps, kill-and-resume, 2-process Accelerate, export in a clean process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
# A small synthetic corpus keeps these runs to seconds (6 speakers: 4 train, 1 validation, 1 test).
SMALL = ["--corpus", "synthetic", "--corpus_options", json.dumps({"n_speakers": 6, "utterances_per_emotion": 4})]
FAST = SMALL + ["--tiny", "--virtual_speakers", "0", "--batch_size", "2", "--eval_episodes_per_speaker", "4",
                "--log_with", "none"]


def run_train(args, output_dir, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, TRAIN, *FAST, "--output_dir", str(output_dir), *args],
                          env=env, capture_output=True, text=True, timeout=600, **kwargs)


def trained_weights(checkpoint: Path) -> dict:
    return load_file(str(checkpoint / "model.safetensors"))


def test_few_steps_export_and_metrics(tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    summary = train.main([*FAST, "--max_steps", "3", "--eval_every", "2", "--checkpoint_every", "2",
                          "--output_dir", str(tmp_path)])
    assert summary["steps"] == 3
    # The default model has a read-out, so the validation also chooses the route weights and
    # logs each route's own UA (the SI route only with --si_route).
    ua_keys = {"val_ua_k0", "val_ua_k4", "val_ua_k8", "val_ua_mean"}
    route_keys = {f"route_{route}_ua_k{k}" for route in ("lm", "prototype") for k in (0, 4, 8)}
    weight_keys = {f"route_weight_{route}" for route in ("lm", "si", "prototype")}
    k0_weight_keys = {f"route_weight_k0_{r}" for r in ("lm", "si", "prototype")}
    assert set(summary["validation"]) == ua_keys | route_keys | weight_keys | k0_weight_keys
    assert all(0.0 <= v <= 1.0 for v in summary["validation"].values())
    assert abs(sum(summary["validation"][key] for key in weight_keys) - 1.0) < 1e-6
    final = tmp_path / "final"
    files = set(os.listdir(final))
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "modeling_icl_ser.py"} <= files
    card = (final / "README.md").read_text()
    assert "synthetic" in card and "val_ua_k8" in card and "library_name: transformers" in card
    assert "**Encoder block read:** block 2" in card  # train.py's default block
    assert "**Enrollment read-out:** 4 heads" in card  # train.py's default read-out
    assert "Two stages: 2 steps" in card and "then 1 step(s) of the read-out alone" in card  # default: a third
    config = json.loads((final / "config.json").read_text())
    assert config["context_readout_heads"] == 4
    assert abs(sum(config["route_weights"].values()) - 1.0) < 1e-6 and set(config["route_weights"]) <= {"lm", "prototype"}
    assert "**Routes mixed by `classify`:** with enrollment:" in card
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), framework="pt") as weights:
        assert any(name.startswith("context_readout.") for name in weights.keys())  # it trained and exported
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:7] == ["step", "loss", "lr", "val_ua_mean", "val_ua_k0", "val_ua_k4", "val_ua_k8"] and len(rows) == 4
    assert "route_prototype_ua_k8" in header and "route_weight_k0_lm" in header
    assert len(rows[2].split(",")) == len(header) and rows[2].split(",")[4]  # step 2 was validated
    assert rows[2].split(",")[header.index("route_prototype_ua_k8")]  # with each route's UA
    assert (tmp_path / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_fail_before_work(tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    with pytest.raises(ValueError, match="encoder_mode"):
        train.main([*FAST, "--encoder_mode", "half", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="hub_model_id"):
        train.main([*FAST, "--push_to_hub", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="corpus_options"):
        train.main([*FAST, "--corpus_options", "[1]", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="language_model_layers"):
        train.main([*FAST, "--language_model_layers", "-1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="virtual_speakers"):
        train.main([*FAST, "--virtual_speakers", "-1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="permuted_label_share"):
        train.main([*FAST, "--permuted_label_share", "1.2", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="context_readout_heads"):
        train.main([*FAST, "--context_readout_heads", "-1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="context_readout_dim"):
        train.main([*FAST, "--context_readout_dim", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="readout_stage_steps must be in"):
        train.main([*FAST, "--max_steps", "4", "--readout_stage_steps", "4", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="needs --context_readout_heads"):
        train.main([*FAST, "--readout_stage_steps", "2", "--context_readout_heads", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="audio_feature_layer"):
        train.main([*FAST, "--audio_feature_layer", "-1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="audio_token_dropout"):
        train.main([*FAST, "--audio_token_dropout", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="choose one of tiny.en, base"):
        train.main([*FAST, "--offline_encoder", "large", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="drop it with --audio_encoder or --tiny"):
        train.main([*FAST, "--offline_encoder", "base", "--output_dir", str(tmp_path)])  # FAST has --tiny
    assert not (tmp_path / "final").exists()


def test_virtual_speakers_join_training_only(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    import train

    monkeypatch.setenv("ICL_SER_CACHE", str(tmp_path / "cache"))
    seen = {}
    original = train.EpisodeSampler.__init__

    def spy(self, table, speakers=None, **kwargs):
        seen["speakers"] = list(speakers)
        original(self, table, speakers=speakers, **kwargs)

    monkeypatch.setattr(train.EpisodeSampler, "__init__", spy)
    summary = train.main([*FAST, "--max_steps", "1", "--eval_k", "0", "--virtual_speakers", "2",
                          "--output_dir", str(tmp_path / "out")])
    assert summary["steps"] == 1
    real = [s for s in seen["speakers"] if "@v" not in s]
    assert len(real) == 4 and len(seen["speakers"]) == 4 * 3  # 4 training speakers, 2 voices each
    assert len(list((tmp_path / "cache" / "virtual").glob("*.flac"))) == 4 * 2 * 24


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    steps = ["--max_steps", "24", "--checkpoint_every", "4", "--eval_every", "0", "--keep_checkpoints", "10"]
    reference = run_train(steps, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, TRAIN, *FAST, "--output_dir", str(killed_dir), *steps],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step-8" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "final").exists()

    resumed = run_train([*steps, "--resume_from_checkpoint", "latest"], killed_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    ref_state = json.loads((tmp_path / "reference" / "checkpoints" / "step-24" / "trainer_state.json").read_text())
    new_state = json.loads((killed_dir / "checkpoints" / "step-24" / "trainer_state.json").read_text())
    assert new_state["step"] == ref_state["step"] == 24
    assert [r["loss"] for r in new_state["history"]] == [r["loss"] for r in ref_state["history"]]
    a = trained_weights(tmp_path / "reference" / "checkpoints" / "step-24")
    b = trained_weights(killed_dir / "checkpoints" / "step-24")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert (a[name] - b[name]).abs().max().item() == 0.0, name


def test_two_stage_schedule_trains_only_the_readout_last_and_resumes_exactly(tmp_path):
    steps = ["--max_steps", "6", "--readout_stage_steps", "3", "--checkpoint_every", "3", "--eval_every", "2",
             "--keep_checkpoints", "5"]
    reference = run_train(steps, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    end_of_stage_1 = trained_weights(tmp_path / "reference" / "checkpoints" / "step-3")
    end = trained_weights(tmp_path / "reference" / "checkpoints" / "step-6")
    assert end_of_stage_1.keys() == end.keys()  # stage 2's fixed tensors still in its checkpoints
    readout = [n for n in end if "context_readout" in n]
    others = [n for n in end if "context_readout" not in n]
    assert readout and any("lora" in n for n in others) and any("projector" in n for n in others)
    for name in others:  # stage 2 leaves LM adapters and projector as stage 1 left them
        assert (end[name] - end_of_stage_1[name]).abs().max().item() == 0.0, name
    assert any((end[n] - end_of_stage_1[n]).abs().max().item() > 0 for n in readout)
    state = json.loads((tmp_path / "reference" / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert state["best_step"] in (4, 6)  # validated at 2, 4, 6; step 2 (stage 1) is no candidate
    lrs = [r["lr"] for r in state["history"]]
    assert lrs[2] > lrs[1]  # the schedule restarts for stage 2 (a row logs the next step's rate)

    resumed_dir = tmp_path / "resumed"  # from the end of stage 1, in a new process
    resumed = run_train([*steps, "--resume_from_checkpoint", str(tmp_path / "reference" / "checkpoints" / "step-3")],
                        resumed_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = trained_weights(resumed_dir / "checkpoints" / "step-6")
    assert again.keys() == end.keys()
    for name in end:
        assert (again[name] - end[name]).abs().max().item() == 0.0, name


def test_sigterm_saves_a_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, TRAIN, *FAST, "--output_dir", str(tmp_path), "--max_steps", "100000",
         "--checkpoint_every", "0", "--eval_every", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "metrics.csv").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "checkpoint saved" in out
    saved = list((tmp_path / "checkpoints").glob("step-*/trainer_state.json"))
    assert len(saved) == 1


def test_two_process_accelerate_launch(tmp_path):
    # On CPU, Accelerate runs several processes through torchrun (--multi_gpu) with ACCELERATE_USE_CPU.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, *FAST,
         "--max_steps", "4", "--readout_stage_steps", "2", "--checkpoint_every", "2", "--eval_every", "0",
         "--output_dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    # Both stages leave parameters out of the loss, which DDP only takes when told.
    assert result.returncode == 0, result.stderr[-4000:]
    stage_1, stage_2 = (trained_weights(tmp_path / "checkpoints" / f"step-{n}") for n in (2, 4))
    assert all(torch.equal(stage_1[n], stage_2[n]) for n in stage_1 if "context_readout" not in n)
    assert not all(torch.equal(stage_1[n], stage_2[n]) for n in stage_1 if "context_readout" in n)
    checkpoint = tmp_path / "checkpoints" / "step-2"
    assert {"sampler_0.json", "sampler_1.json"} <= set(os.listdir(checkpoint))
    streams = [json.loads((checkpoint / f"sampler_{i}.json").read_text()) for i in (0, 1)]
    assert streams[0]["seed"] != streams[1]["seed"]  # each process draws its own episodes
    assert (tmp_path / "final" / "model.safetensors").is_file()


_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_icl_ser"] = None
    sys.modules["dataset_builder"] = None
    import numpy as np, torch
    from transformers import AutoModel, AutoProcessor
    folder, out = sys.argv[1:3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(3)]
    inputs = processor(query=audio[0], enrollment=[(audio[1], processor.labels[0]), (audio[2], processor.labels[1])],
                       sampling_rate=16000)
    json.dump({"probs": model.classify(**inputs).tolist(), "labels": processor.labels}, open(out, "w"))
    """
)


def test_export_loads_in_clean_process_and_matches(tmp_path, run_clean_process):
    result = run_train(["--max_steps", "3", "--eval_every", "0", "--checkpoint_every", "0"], tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    child = run_clean_process(_CHILD, final, tmp_path / "out.json")
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())

    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from modeling_icl_ser import IclSerForConditionalGeneration, IclSerProcessor

    model = IclSerForConditionalGeneration.from_pretrained(final).eval()
    processor = IclSerProcessor.from_pretrained(final)
    assert out["labels"] == processor.labels == sorted(processor.labels)  # the corpus' emotions
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(3)]
    inputs = processor(query=audio[0], enrollment=[(audio[1], processor.labels[0]), (audio[2], processor.labels[1])],
                       sampling_rate=16000)
    torch.testing.assert_close(torch.tensor(out["probs"]), model.classify(**inputs), atol=1e-5, rtol=1e-5)


def test_push_without_network_fails_clearly_and_keeps_export(tmp_path):
    result = run_train(["--max_steps", "1", "--eval_every", "0", "--checkpoint_every", "0",
                        "--push_to_hub", "--hub_model_id", "someone/icl-ser-test"], tmp_path)
    assert result.returncode != 0
    assert "Could not push to the Hub repo 'someone/icl-ser-test'" in result.stderr
    assert "intact" in result.stderr
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_trainer_fine_tunes_on_the_episodic_dataset(tmp_path):
    """The documented Trainer path: episodic split + with_audio_paths + IclSerDataCollator."""
    import math

    from transformers import Trainer, TrainingArguments

    sys.path.insert(0, str(REPO))
    from dataset_builder import build_episodes, read_corpus
    from modeling_icl_ser import IclSerDataCollator
    from evaluation.episodic import with_audio_paths
    from modeling_icl_ser.testing import tiny_icl_ser

    options = {"n_speakers": 6, "utterances_per_emotion": 4}
    utterances = read_corpus("synthetic", **options)
    episodes = build_episodes("synthetic", k=2, episodes_per_speaker=4, **options)["train"]
    train_dataset = with_audio_paths(episodes, utterances)
    labels = sorted(set(utterances["emotion"]))
    model, processor = tiny_icl_ser(labels=labels)
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                             save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      data_collator=IclSerDataCollator(processor))
    result = trainer.train()
    assert result.global_step == 4
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_length_grouped_micro_batches_give_the_one_pass_loss_and_gradients():
    """train.py's --length_groups: fewer padded tokens, the same loss and gradients."""
    import numpy as np

    from modeling_icl_ser import IclSerDataCollator
    from modeling_icl_ser.testing import tiny_icl_ser
    from train import length_grouped_batches

    model, processor = tiny_icl_ser(seed=0, context_readout_heads=2, context_readout_dropout=0.0)
    model.train()
    labels = processor.labels
    rng = np.random.default_rng(0)
    examples = []
    for i, k in enumerate([3, 0, 5, 1, 0, 2]):  # unsorted, two K = 0 episodes (no matching loss)
        examples.append({
            "query_hidden_states": torch.from_numpy(rng.standard_normal((20 + i, 32)).astype(np.float32)),
            "enrollment_hidden_states": [torch.from_numpy(rng.standard_normal((15 + j, 32)).astype(np.float32))
                                         for j in range(k)],
            "enrollment_labels": [labels[(i + j) % len(labels)] for j in range(k)],
            "answer": labels[i % len(labels)],
        })
    collator = IclSerDataCollator(processor, label_enrollment=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            total = total + loss.detach()
        return total, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    one_loss, one_grads = loss_and_grads([collator(examples)])
    grouped = length_grouped_batches(examples, 3, collator)
    assert len(grouped) == 3
    # Grouped by K, the passes hold fewer (padded) tokens than one pass over the batch.
    assert sum(b["input_ids"].numel() for b in grouped) < collator(examples)["input_ids"].numel()
    grouped_loss, grouped_grads = loss_and_grads(grouped)
    torch.testing.assert_close(grouped_loss, one_loss, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in one_grads)
    for a, b in zip(grouped_grads, one_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # The matching loss is part of it: without its share the sums would differ.
    assert model.config.context_readout_loss_coef > 0


def test_length_groups_flag_is_checked():
    import train

    with pytest.raises(ValueError, match="--length_groups"):
        train.parse_arguments(["--length_groups", "0"])


def test_settings_file_then_overriding_flags(tmp_path):
    import train

    settings = tmp_path / "s.yaml"
    settings.write_text("max_steps: 40\neval_k: [0, 2]\nlm_lora: false\nlearning_rate: 0.002\n")
    args = train.parse_arguments([str(settings), "--max_steps", "7"])
    assert (args.max_steps, args.eval_k, args.lm_lora, args.learning_rate) == (7, [0, 2], False, 0.002)
    assert train.parse_arguments([str(settings)]).max_steps == 40
    with pytest.raises(ValueError, match="Cannot read settings file"):
        train.parse_arguments([str(tmp_path / "missing.yaml"), "--max_steps", "7"])


def test_real_speech_config_names_the_three_shared_corpora():
    import train

    args = train.parse_arguments([str(REPO / "configs" / "real-speech.yaml")])
    assert args.corpus.split(",") == ["ravdess", "ased", "emotiontts-ko"]
    assert args.data_dir.split(",") == [f"../shared/data/{c}" for c in ("ravdess", "ased", "emotiontts-ko")]
    assert args.virtual_speakers == 0 and args.content_disjoint
    # The release recipe chooses its route weights out of domain and fits its SI route up front.
    assert args.route_weights_from == "held_out_corpora" and args.si_route and args.si_route_fit


def test_train_defaults_are_the_model_config_defaults():
    """Each model default has one home (IclSerConfig): the model train.py builds with no flags has
    the options a bare `IclSerConfig` has, and the same parts."""
    sys.path.insert(0, str(REPO))
    import train
    from modeling_icl_ser import IclSerConfig, IclSerForConditionalGeneration
    from modeling_icl_ser.testing import tiny_icl_ser

    args = train.parse_arguments([])  # no flags: the main command's settings
    backbones = tiny_icl_ser()[0].config
    small = {"audio_config": backbones.audio_config, "text_config": backbones.text_config}
    from_train = IclSerConfig(**small, **train.model_options(args))
    from_config = IclSerConfig(**small)
    assert from_train.to_dict() == from_config.to_dict()
    assert (from_config.context_readout_heads, from_config.context_readout_dropout, from_config.audio_feature_layer) \
        == (4, 0.5, 2)  # what train.py has always used
    shapes = [{name: tuple(p.shape) for name, p in IclSerForConditionalGeneration(config).state_dict().items()}
              for config in (from_train, from_config)]
    assert shapes[0] == shapes[1] and any(name.startswith("context_readout.") for name in shapes[0])


def test_train_runs_the_config_checks_on_its_flags():
    sys.path.insert(0, str(REPO))
    import train

    with pytest.raises(ValueError, match="audio_pooling"):
        train.parse_arguments(["--audio_pooling", "max"])
    with pytest.raises(ValueError, match="context_readout_dropout"):
        train.parse_arguments(["--context_readout_dropout", "1.0"])
