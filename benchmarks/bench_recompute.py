"""Activation memory and step time of run.recompute none / selective / full, side by side in one process.

One microbatch of the end-to-end bench's four jobs (its first window's fullest microbatch) on its model; per mode:
the bytes kept for the backward (every storage autograd saved, counted once), the process's peak RSS growth over
the forward and backward, and the forward + backward time (median of --repeats).

    python -m benchmarks.bench_recompute             # rows -> benchmarks/results/recompute.csv
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_end_to_end import BenchConfig, _prepared, bench_checkpoint, bench_jobs
from benchmarks.results_csv import append_rows


def _saved_bytes(worker, mb, weights) -> int:
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
    from runtime.fit import plan_window
    from runtime.worker import StageWorker

    run = replace(prepared.run, recompute=mode)
    worker = StageWorker(run, [(j.spec, j.total_steps) for j in prepared.jobs])
    planned = plan_window(prepared.jobs, {j.name: range(0, 1) for j in prepared.jobs}, run)
    slot = max(planned.window.slots[0], key=lambda s: sum(len(sample) for _, sample, _ in s.items))
    mb, weights = build_microbatch(slot.items), slot.weights
    saved = _saved_bytes(worker, mb, weights)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        out, _ = worker.forward(mb, weights)
        worker.backward(out, None, None)
        times.append(time.perf_counter() - tic)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {"recompute": mode, "tokens": mb.input_ids.shape[1], "saved_mib": round(saved / 2**20, 1),
            "peak_rss_growth_mib": round(rss_growth / 2**20, 1), "fwd_bwd_s": round(statistics.median(times), 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _prepared(bench_jobs(cfg), cfg, bench_checkpoint(cfg), Path(tmp))
    from lorafusion.models.megatron_compat import ensure_model_parallel

    ensure_model_parallel()
    # Peak RSS only grows: the modes run from the one that keeps least to the one that keeps most.
    rows = [measure(mode, prepared, args.repeats) for mode in ("full", "selective", "none")]
    for row in rows:
        row.update(model=cfg.model_name, threads=args.threads)
    if args.no_record:
        for row in rows:
            print(row)
    else:
        append_rows("recompute", rows)
    return rows


if __name__ == "__main__":
    main()
