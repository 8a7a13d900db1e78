"""Cost of one default meta-training step, broken down, on this CPU.

Builds exactly what `python train.py` builds (the offline default model, the synthetic corpus
with its virtual speakers and cached encoder features: the first run fills the cache, which is
not timed), then times `--steps` optimizer steps of the first stage and prints, per step:

* wall time of each part: drawing + collating the batch, forward, backward, optimizer;
* the process's user and system CPU time (all threads) and minor page faults (memory faulted in
  and zeroed anew: a vocabulary-sized logits tensor per step showed as ~22,000 faults a step).

Run it for each setting side by side, in one process each, on an otherwise idle machine:

    python bench/bench_train_step.py --threads 2 --precision fp32
    python bench/bench_train_step.py --threads 2 --precision fp32 --length_groups 1
    python bench/bench_train_step.py --threads 1 --precision fp32
    python bench/bench_train_step.py --threads 2 --precision bf16   # only where the CPU has AVX512-BF16/AMX
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.py's choice)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--length_groups", type=int, default=None, help="forward passes per batch (default: train.py's)")
    options = parser.parse_args()

    import torch

    import train

    if options.threads:
        torch.set_num_threads(options.threads)

    from accelerate import Accelerator

    from modeling_icl_ser import IclSerDataCollator

    args = train.parse_arguments([] if options.length_groups is None else ["--length_groups", str(options.length_groups)])
    groups = getattr(args, "length_groups", 1)
    accelerator = Accelerator(mixed_precision="bf16" if options.precision == "bf16" else "no")
    table, labels = train.load_data(args, accelerator)
    model, processor, _ = train.build_model(args, labels)
    data = train.prepare_episodes(args, accelerator, table, labels, model, processor)
    model = train.apply_adapters(model, args)
    model.train()
    collator = IclSerDataCollator(processor, labels=labels, label_enrollment=args.loss_on_enrollment_labels)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    train.base(accelerator.unwrap_model(model)).feed_context_readout(False)  # stage 1, as train.py starts

    parts = {"data": [], "forward": [], "backward": [], "optimizer": [], "step": []}
    usage = []
    for step in range(options.warmup + options.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        examples = [data.next_example() for _ in range(args.batch_size)]
        batches = train.length_grouped_batches(examples, groups, collator) if groups > 1 else [collator(examples)]
        t1 = time.perf_counter()
        forward = backward = 0.0
        for batch in batches:  # forward and backward alternate, as in train.py
            start = time.perf_counter()
            loss = model(**batch).loss
            middle = time.perf_counter()
            accelerator.backward(loss)
            forward, backward = forward + middle - start, backward + time.perf_counter() - middle
        t2, t3 = t1 + forward, t1 + forward + backward
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        t4 = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_SELF)
        if step >= options.warmup:
            for name, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[name].append(value)
            usage.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                          after.ru_minflt - before.ru_minflt))

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{options.precision}, {groups} length group(s); batch {args.batch_size} episodes, K in [0, 8]")
    print("median seconds per step: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in parts.items()))
    user, system, faults = (statistics.median(u[i] for u in usage) for i in range(3))
    print(f"median CPU per step: user {user:.2f} s, system {system:.2f} s "
          f"({100 * system / max(user + system, 1e-9):.0f} % system), {faults:.0f} minor page faults")


if __name__ == "__main__":
    main()
