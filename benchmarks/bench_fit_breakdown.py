"""Where a fit's time goes beyond its microbatches: the end-to-end bench's fits, (a) the four jobs together and (b)
each job alone, each followed by warm replays of its own microbatches in the same process.

Per fit: its wall time and tokens/s; the time inside the stage's forward and backward and the rest (gradient
collection, optimizer steps, the driver); the minor page faults of its first microbatch and of the others; and the
tokens/s of the same microbatches run again, warm, on this thread (the median of --replays passes). Both rates are
also given as fractions of the GEMM-bound ceiling (benchmarks/ceiling.py: the fit's FLOPs per real token over the
fastest matmul rate measured in the run), and a/b for the fits and for the replays: a replay a/b near 1 says
that packing the jobs together saves nothing per token on this device, so the fits' a/b comes from costs per fit.

    python -m benchmarks.bench_fit_breakdown        # rows -> benchmarks/results/fit_breakdown.csv
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.bench_end_to_end import BenchConfig, bench_checkpoint, bench_jobs, checkpoint_dims, run_ours
from benchmarks.ceiling import flops_per_token, matmul_rate
from benchmarks.results_csv import append_rows

__all__ = ["FitTrace", "trace_fit", "breakdown_rows", "main"]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class FitTrace:
    """One fit's training microbatches as its stage ran them, and what they cost there."""

    wall_s: float
    tokens: int
    calls: list[tuple] = field(default_factory=list)  # (worker, microbatch, forward's other arguments)
    step_s: list[float] = field(default_factory=list)  # forward + backward of each microbatch
    faults: list[int] = field(default_factory=list)  # minor page faults during each one's forward + backward

    @property
    def microbatches(self) -> int:
        return len(self.step_s)

    def lengths(self) -> list[int]:
        return [int(n) for _, mb, _ in self.calls for n in mb.cu_seqlens.diff().tolist()]

    def replay_s(self) -> float:
        """One warm pass over the microbatches: forward and backward of each, on this thread."""
        tic = time.perf_counter()
        for worker, mb, args in self.calls:
            out, _ = worker.forward(mb, *args)
            worker.backward(out, None, None)
        return time.perf_counter() - tic


@contextlib.contextmanager
def _recording(trace: FitTrace):
    """Record every training forward (and its backward) of the StageWorkers built meanwhile."""
    from runtime.worker import StageWorker

    forward, backward = StageWorker.forward, StageWorker.backward

    def recorded_forward(worker, mb, *args):
        faults, tic = _minor_faults(), time.perf_counter()
        out = forward(worker, mb, *args)
        if torch.is_grad_enabled():
            trace.calls.append((worker, mb, args))
            trace.step_s.append(time.perf_counter() - tic)
            trace.faults.append(_minor_faults() - faults)
        return out

    def recorded_backward(worker, *args):
        faults, tic = _minor_faults(), time.perf_counter()
        out = backward(worker, *args)
        trace.step_s[-1] += time.perf_counter() - tic
        trace.faults[-1] += _minor_faults() - faults
        return out

    StageWorker.forward, StageWorker.backward = recorded_forward, recorded_backward
    try:
        yield trace
    finally:
        StageWorker.forward, StageWorker.backward = forward, backward


def trace_fit(jobs, cfg: BenchConfig, checkpoint: Path, output_dir: Path) -> FitTrace:
    """One fit of `jobs` in this process (one stage), its microbatches recorded."""
    trace = FitTrace(wall_s=0.0, tokens=0)
    with _recording(trace):
        result = run_ours(jobs, cfg, checkpoint, output_dir)
    trace.wall_s, trace.tokens = result.wall_s, result.tokens
    return trace


def _row(name: str, traces: list[FitTrace], replay_s: float, flops: float, rate: float) -> dict:
    """The row of one provider: `traces` are its fits (one for (a), one per job for (b))."""
    wall, tokens = sum(t.wall_s for t in traces), sum(t.tokens for t in traces)
    in_step = sum(sum(t.step_s) for t in traces)
    return {
        "provider": name, "fits": len(traces), "microbatches": sum(t.microbatches for t in traces), "tokens": tokens,
        "fit_s": round(wall, 3), "fit_tokens_per_s": round(tokens / wall, 1),
        "in_microbatches_s": round(in_step, 3), "outside_s": round(wall - in_step, 3),
        "first_microbatch_faults": sum(t.faults[0] for t in traces if t.faults),
        "later_faults": sum(sum(t.faults[1:]) for t in traces),
        "replay_s": round(replay_s, 3), "replay_tokens_per_s": round(tokens / replay_s, 1),
        "gemm_gflops": round(rate / 1e9, 1), "mflop_per_token": round(flops / 1e6, 2),
        "fit_ceiling_fraction": round(tokens * flops / wall / rate, 4),
        "replay_ceiling_fraction": round(tokens * flops / replay_s / rate, 4),
    }


def breakdown_rows(cfg: BenchConfig, replays: int = 3) -> list[dict]:
    """Rows for (a), each job alone, and (b) = the jobs alone summed; the (a) row carries a/b of fits and replays.

    Every row's ceiling takes the fastest matmul rate measured in the run (before each provider's replays): the
    hardware's bound, where a host whose speed drifts gives a lower rate at some moments than at others."""
    cfg = replace(cfg, pipeline_stages=1, engine="local")
    torch.set_num_threads(cfg.threads)
    checkpoint = bench_checkpoint(cfg)
    dims = checkpoint_dims(checkpoint)
    jobs = bench_jobs(cfg)
    targets = list(jobs[0].adapter.target_modules)
    measured, rates = [], []  # (name, trace, replay s, FLOPs per token) per fit
    with tempfile.TemporaryDirectory(prefix="bench_fit_breakdown_") as tmp:
        run_ours(jobs, cfg, checkpoint, Path(tmp) / "warmup")
        for name, chosen in [("a", jobs)] + [(job.name, [job]) for job in jobs]:
            trace = trace_fit(chosen, cfg, checkpoint, Path(tmp) / name)
            worker = trace.calls[0][0]
            rates.append(matmul_rate(dims, cfg.max_tokens_per_microbatch, worker.dtype, worker.device))
            replay = statistics.median(trace.replay_s() for _ in range(replays))
            measured.append((name, trace, replay, flops_per_token(dims, cfg.rank, targets, trace.lengths())))
            trace.calls.clear()  # its model and microbatches go
    rate = max(rates)
    rows = [_row(name, [trace], replay, flops, rate) for name, trace, replay, flops in measured]
    alone = measured[1:]
    tokens = sum(trace.tokens for _, trace, _, _ in alone)
    flops = sum(f * trace.tokens for _, trace, _, f in alone) / tokens
    rows.append(_row("b", [trace for _, trace, _, _ in alone], sum(r for _, _, r, _ in alone), flops, rate))
    a, b = rows[0], rows[-1]
    a["a_over_b_fit"] = round(a["fit_tokens_per_s"] / b["fit_tokens_per_s"], 3)
    a["a_over_b_replay"] = round(a["replay_tokens_per_s"] / b["replay_tokens_per_s"], 3)
    return [{"model": cfg.model_name, "threads": cfg.threads, "steps": cfg.steps, **row} for row in rows]


def main(argv: list[str] | None = None, results_dir: Path | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "steps",
                 "global_batch_size", "rank", "max_tokens_per_microbatch", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--replays", type=int, default=3, help="warm passes over each fit's microbatches")
    parser.add_argument("--no-record", action="store_true", help="print the rows without appending them to the CSV")
    args = vars(parser.parse_args(argv))
    record, replays = not args.pop("no_record"), args.pop("replays")
    rows = breakdown_rows(BenchConfig(**args), replays)
    for row in rows:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    if record:
        append_rows("fit_breakdown", rows, **({} if results_dir is None else {"results_dir": results_dir}))
    return rows


if __name__ == "__main__":
    main()
