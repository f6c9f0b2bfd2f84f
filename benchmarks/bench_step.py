"""One microbatch's forward + backward in process: time and aten ops for the same token count packed as many short
samples or as a few long ones (the hot path's cost must not grow with the number of samples).

Four LoRA jobs (rank 16, dropout 0.05) on the end-to-end bench's model; 200 samples of ~10 tokens against 5 of
~400 (2000 tokens each); the median of --repeats timed steps after a warm-up, then one profiled step.

    python -m benchmarks.bench_step            # rows -> benchmarks/results/step.csv
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lorafusion as lf
from benchmarks.bench_end_to_end import BenchConfig, bench_checkpoint
from benchmarks.results_csv import emit_rows
from lorafusion.data import IGNORE_INDEX, Sample

SHAPES = {"200x10": (200, 10), "5x400": (5, 400)}
JOBS = ("a", "b", "c", "d")


def _items(samples: int, length: int, vocab: int) -> list[tuple[str, Sample, int]]:
    rng = random.Random(0)
    items = []
    for i in range(samples):
        ids = tuple(rng.randrange(3, vocab) for _ in range(length))
        items.append((JOBS[i % len(JOBS)], Sample(input_ids=ids, labels=ids[1:] + (IGNORE_INDEX,), source=f"s{i}"), i))
    return items


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    from lorafusion.batching import build_microbatch
    from lorafusion.models.megatron_compat import ensure_model_parallel
    from runtime.worker import StageWorker

    torch.set_num_threads(args.threads)
    cfg = BenchConfig()
    checkpoint = bench_checkpoint(cfg)
    ensure_model_parallel()
    with tempfile.TemporaryDirectory() as tmp:
        run = lf.RunConfig(base_model=str(checkpoint), output_dir=tmp, dtype=args.dtype, progress=False)
        jobs = [lf.JobSpec(name=name, dataset=str(Path(tmp) / "unused.jsonl"),
                           adapter=lf.LoRAConfig(rank=16, alpha=32, dropout=0.05), global_batch_size=8,
                           learning_rate=1e-4, max_steps=1, seed=i) for i, name in enumerate(JOBS)]
        worker = StageWorker(run, [(job, 1) for job in jobs])
    weights = {job: 1e-3 for job in JOBS}
    rows = []
    for name, (samples, length) in SHAPES.items():
        mb = build_microbatch(_items(samples, length, 250)).to(worker.device)

        def step():
            out, _ = worker.forward(mb, weights)
            worker.backward(out, None, None)

        step()
        times = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            step()
            times.append(time.perf_counter() - tic)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        seconds = statistics.median(times)
        rows.append({"shape": name, "samples": samples, "tokens": samples * length, "model": cfg.model_name,
                     "dtype": str(worker.dtype).removeprefix("torch."), "threads": args.threads,
                     "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(samples * length / seconds),
                     "aten_ops": ops})
    rows[0]["time_vs_" + rows[1]["shape"]] = round(rows[0]["step_ms"] / rows[1]["step_ms"], 2)
    return emit_rows("step", rows, record=not args.no_record)


if __name__ == "__main__":
    main()
