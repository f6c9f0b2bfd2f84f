"""Activation memory and step time of run.recompute none / selective / full, side by side in one process.

One microbatch of the end-to-end bench's four jobs (its first window's fullest microbatch) on its model, each mode
in a fresh process: the peak memory of a forward + backward on top of the built model (peak RSS after minus RSS
before, the process's high-water mark: on a CPU the memory a step needs), the bytes autograd saved outside
checkpointed regions (counted once per storage), and the forward + backward time (median of --repeats).

    python -m benchmarks.bench_recompute             # rows -> benchmarks/results/recompute.csv
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_end_to_end import BenchConfig, _prepared, bench_checkpoint, bench_jobs
from benchmarks.results_csv import emit_rows


def saved_bytes(worker, mb, weights) -> int:
    """Forward and backward of `mb`; the bytes autograd saved for the backward (each storage counted once; what a
    checkpointed region keeps is not seen)."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, _ = worker.forward(mb, weights)
    worker.backward(out, None, None)
    return sum(saved.values())


def measure(mode: str, prepared, repeats: int) -> dict:
    from dataclasses import replace

    from lorafusion.batching import build_microbatch
    from runtime.windows import plan_window
    from runtime.worker import StageWorker

    run = replace(prepared.run, recompute=mode)
    worker = StageWorker(run, [(j.spec, j.total_steps) for j in prepared.jobs])
    planned = plan_window(prepared.jobs, {j.name: range(0, 1) for j in prepared.jobs}, run)
    slot = max(planned.window.slots[0], key=lambda s: sum(len(sample) for _, sample, _ in s.items))
    mb, weights = build_microbatch(slot.items), slot.weights
    rss_before = _rss_bytes()
    saved = saved_bytes(worker, mb, weights)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        out, _ = worker.forward(mb, weights)
        worker.backward(out, None, None)
        times.append(time.perf_counter() - tic)
    return {"recompute": mode, "tokens": mb.input_ids.shape[1], "peak_step_mib": round(peak / 2**20, 1),
            "saved_outside_checkpoints_mib": round(saved / 2**20, 1), "fwd_bwd_s": round(statistics.median(times), 3)}


def _rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _child(mode: str, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = BenchConfig(dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _prepared(bench_jobs(cfg), cfg, bench_checkpoint(cfg), Path(tmp))
    from lorafusion.models.megatron_compat import ensure_model_parallel

    ensure_model_parallel()
    return {**measure(mode, prepared, repeats), "model": cfg.model_name, "threads": threads}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", choices=["none", "selective", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one mode in this fresh process: its peak RSS is its own
        print(json.dumps(_child(args.child, args.repeats, args.threads)))
        return []
    rows = []
    for mode in ("none", "selective", "full"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_recompute", "--child", mode, "--repeats",
                               str(args.repeats), "--threads", str(args.threads)], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent.parent)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return emit_rows("recompute", rows, record=not args.no_record)


if __name__ == "__main__":
    main()
