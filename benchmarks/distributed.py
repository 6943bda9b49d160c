"""Data-parallel step time and bytes communicated per step on smollm2-135m-instruct (the demo's run).

The same global batch either way (micro-batches of 4, global batch 8):

    python -m benchmarks.distributed --threads 2                          # 1 process x 2 threads, grad_accum 2
    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed    # 2 processes x 1 thread, grad_accum 1

Bytes are counted by a DDP communication hook (the gradient buckets handed to all-reduce, per rank) and
compared with the trainable parameters' gradient size; the loop's one extra all-reduce per step (loss sum,
token count, tokens: 3 float64) is listed apart. Rank 0 prints one JSON line and appends it to --result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from benchmarks.runner import cpu_flags
from loratune.batching import BatchOrder
from loratune.train import demo_config
from loratune.train.distributed import join_processes
from loratune.train.loop import start_run, train_step
from loratune.train.session import prepare


def counting_allreduce(counter: dict, bucket):
    """DDP's own all-reduce, counting the bytes of each gradient bucket it is given."""
    buffer = bucket.buffer()
    counter["bytes"] += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: 1 under "
                                                                  "torchrun, else 2)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--result", default="benchmarks/results/distributed.jsonl")
    args = parser.parse_args()
    processes = join_processes()
    threads = args.threads or (1 if processes.world > 1 else 2)
    torch.set_num_threads(threads)
    accum = args.global_batch // (args.micro_batch * processes.world)
    out = tempfile.mkdtemp(prefix="loratune-distributed-bench-")
    config = demo_config(out, [f"train.batch_size={args.micro_batch}", f"train.grad_accum={accum}",
                               f"train.max_steps={args.warmup + args.steps}", "train.generation_eval=false",
                               "data.max_eval_records=8", "train.precision=fp32"])
    session = prepare(config, quiet=True, processes=processes)
    run = start_run(session, session.config.output_dir)
    counter = {"bytes": 0}
    if isinstance(run.trainer, DistributedDataParallel):
        run.trainer.register_comm_hook(counter, counting_allreduce)
    order = BatchOrder(len(session.data.train_examples), args.micro_batch, config.train.seed)
    progress = session.progress(total=args.warmup + args.steps)
    times, bytes_per_step = [], []
    for step in range(args.warmup + args.steps):
        counter["bytes"] = 0
        processes.barrier()
        started = time.perf_counter()
        train_step(run, order, progress)
        elapsed = max(processes.gather(time.perf_counter() - started))  # a step ends when its slowest rank does
        if step >= args.warmup:
            times.append(elapsed)
            bytes_per_step.append(counter["bytes"])
    trainable = [p for p in session.model.parameters() if p.requires_grad]
    result = {
        "processes": processes.world, "threads_per_process": threads, "micro_batch": args.micro_batch,
        "grad_accum": accum, "global_batch": args.global_batch, "timed_steps": args.steps,
        "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
        "gradient_bytes_per_step_per_rank": statistics.median(bytes_per_step),
        "trainable_gradient_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "base_parameter_bytes": sum(p.numel() * p.element_size() for p in session.model.parameters()
                                    if not p.requires_grad),
        "step_scalar_allreduce_bytes": 3 * 8 if processes.world > 1 else 0,
        "load_average": os.getloadavg(), "torch": torch.__version__, "cpu": platform.processor() or "unknown",
        "cpu_flags": cpu_flags(),
    }
    if processes.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "cpu_flags"}))
        with open(args.result, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(result) + "\n")
        shutil.rmtree(out, ignore_errors=True)
    processes.close()


if __name__ == "__main__":
    main()
