"""Cost of one meta-training step, broken down, on this CPU, for one or more train.py settings.

Builds exactly what `python train.py [FLAGS]` builds (the offline default model, the synthetic
corpus with its virtual speakers and cached encoder features: the first run fills the cache,
which is not timed), then times `--steps` optimizer steps of the first stage and prints, per step:

* wall time of each part: drawing + collating the batch, forward, backward, optimizer;
* the process's user and system CPU time (all threads) and minor page faults (memory faulted in
  and zeroed anew: a vocabulary-sized logits tensor per step showed as ~22,000 faults a step).

Each `--setting` is a string of train.py flags; several settings are built in one process and
their steps interleaved (A, B, A, B, ...), so a load that changes during the run reaches them
alike, and the ratio of each setting's median step to the first one's is printed:

    python bench/bench_train_step.py --threads 2 --precision fp32
    python bench/bench_train_step.py --setting "" --setting "--language_model_layers 4 --batch_size 8"
    python bench/bench_train_step.py --threads 2 --precision fp32 --length_groups 1
    python bench/bench_train_step.py --threads 2 --precision bf16   # only where the CPU has AVX512-BF16/AMX
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Setting:
    """One train.py setting, built as train.py builds it, that runs one timed optimizer step."""

    def __init__(self, flags: str, precision: str):
        import torch
        from accelerate import Accelerator

        import train
        from modeling_icl_ser import IclSerDataCollator

        self.flags, self.train = flags or "(defaults)", train
        args = self.args = train.parse_arguments(shlex.split(flags))
        self.groups = getattr(args, "length_groups", 1)
        accelerator = self.accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
        table, labels = train.load_data(args, accelerator)
        model, processor, _ = train.build_model(args, labels)
        self.data = train.prepare_episodes(args, accelerator, table, labels, model, processor)
        model = train.apply_adapters(model, args)
        model.train()
        self.collator = IclSerDataCollator(processor, labels=labels, label_enrollment=args.loss_on_enrollment_labels)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        train.base(accelerator.unwrap_model(self.model)).feed_context_readout(False)  # stage 1, as train.py starts
        self.parts = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": []}
        self.usage = []

    def step(self, timed: bool) -> None:
        args, train = self.args, self.train
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        examples = [self.data.next_example() for _ in range(args.batch_size)]
        batches = (train.length_grouped_batches(examples, self.groups, self.collator) if self.groups > 1
                   else [self.collator(examples)])
        t1 = time.perf_counter()
        forward = backward = 0.0
        for batch in batches:  # forward and backward alternate, as in train.py
            start = time.perf_counter()
            loss = self.model(**batch).loss
            middle = time.perf_counter()
            self.accelerator.backward(loss)
            forward, backward = forward + middle - start, backward + time.perf_counter() - middle
        t2, t3 = t1 + forward, t1 + forward + backward
        self.accelerator.clip_grad_norm_(self.params, args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        t4 = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if timed:
            for name, value in zip(self.parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                self.parts[name].append(value)
            self.usage.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                               after.ru_minflt - before.ru_minflt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.py's choice)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--length_groups", type=int, default=None,
                        help="forward passes per batch (default: train.py's); added to every setting")
    parser.add_argument("--setting", action="append", default=None,
                        help="train.py flags of one setting, quoted; repeat to compare (default: one, train.py's defaults)")
    options = parser.parse_args()

    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    settings = [Setting(flags + ("" if options.length_groups is None else f" --length_groups {options.length_groups}"),
                        options.precision)
                for flags in (options.setting or [""])]
    for step in range(options.warmup + options.steps):
        for setting in settings:
            setting.step(timed=step >= options.warmup)

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{options.precision}; load average {os.getloadavg()[0]:.2f} at the end")
    first = statistics.median(settings[0].parts["step"])
    for setting in settings:
        args = setting.args
        print(f"setting {setting.flags}: batch {args.batch_size} episodes, K in [{args.k_min}, {args.k_max}], "
              f"{setting.groups} length group(s), {args.language_model_layers} LM blocks")
        print("  median seconds per step: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in setting.parts.items())
              + f"; {statistics.median(setting.parts['step']) / first:.2f}x the first setting")
        user, system, faults = (statistics.median(u[i] for u in setting.usage) for i in range(3))
        print(f"  median CPU per step: user {user:.2f} s, system {system:.2f} s "
              f"({100 * system / max(user + system, 1e-9):.0f} % system), {faults:.0f} minor page faults")


if __name__ == "__main__":
    main()
