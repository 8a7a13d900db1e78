"""transformers.Trainer runs on the tiny model with IclSerDataCollator."""

import math

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from modeling_icl_ser import IclSerDataCollator
from modeling_icl_ser.testing import tiny_icl_ser


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_trainer_loss_finite_and_decreasing_on_repeated_batch(make_audio, tmp_path):
    model, processor = tiny_icl_ser(seed=0)
    model.train()
    episodes = [
        {"query": make_audio(0.8, seed=1), "enrollment": [(make_audio(0.5, seed=2), "calm")], "answer": "fear"},
        {"query": make_audio(0.6, seed=3), "enrollment": {"audio": [make_audio(0.4, seed=4)], "label": ["anger"]},
         "answer": "sadness"},
    ]
    losses = _Losses()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=20, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=episodes * 6,
                      data_collator=IclSerDataCollator(processor, sampling_rate=16000), callbacks=[losses])
    trainer.train()
    assert len(losses.losses) == 20
    assert all(math.isfinite(loss) for loss in losses.losses)
    assert losses.losses[-1] < 0.5 * losses.losses[0]
    model.eval()
    batch = IclSerDataCollator(processor, sampling_rate=16000)(episodes)
    probs = model.classify(**batch)
    trained = [processor.labels.index("fear"), processor.labels.index("sadness")]
    # Training moved the closed-set probability mass onto the trained answers (2 of 8 labels:
    # 0.25 before training).
    assert (probs[:, trained].sum(-1) > 0.75).all()
    assert torch.isfinite(probs).all()
