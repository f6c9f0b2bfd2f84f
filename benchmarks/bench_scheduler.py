"""Scheduler benchmark: mLoRA-style baseline vs greedy FFD vs ours (CP-SAT + grouping + windows), side by side.

    python -m benchmarks.bench_scheduler [--global-batches 8] [--time-limit-s 0.2] [--pad-multiple 1]
                                         [--shorten-time-limit-s 0.15] [--floor-time-limit-s 1.0]

Workloads (4 jobs each; sample lengths in tokens, lognormal, capped at 4096). The means come from the
datasets' papers' word counts (document + summary) times ~1.3 subword tokens per word, the spreads are
our assumption (sigma 0.5-0.6), so these are "-like" workloads, not the datasets:
  XSum (Narayan et al. 2018, 431 + 23 words)       mean  590 tokens, sigma 0.6
  CNN/DailyMail (See et al. 2017, 781 + 56 words)  mean 1090 tokens, sigma 0.5
  WikiSum-like long documents                      mean 2000 tokens, sigma 0.5
  chat-like short turns (heterogeneous workload)   mean  250 tokens, sigma 0.7
  mixed: every sample from a random one of the first three; hetero: one job per distribution.

Methods, each on the same samples:
  mlora   each job's global batch split in order into microbatches of a fixed sample count (the largest
          that keeps every microbatch of that job within capacity when padded to its longest sample),
          jobs round-robin one microbatch at a time, no-ops where the distance rule needs them
  greedy  every job's global batch g packed together by first-fit decreasing, rounds in order, no-ops
          where needed (what the runtime did before the scheduler)
  ours    scheduler.WindowPlanner, windows as lf.fit sizes them (scheduler.window_global_batches of the
          next global batches' tokens, slots = S: at least 64 microbatches and 16 per slot, so 4 to 8
          of the 8 global batches here; --window-batches N fixes N instead), each planned by CP-SAT,
          grouping, interleaving, merged remainders, compaction, then scheduler.improve.shorten: filling,
          squeezing (scheduler.squeeze) and --shorten-time-limit-s of whole-window CP-SAT; the last window
          is planned with last=True, as no window follows it. The window_batches column lists the windows'
          sizes ("4+4").

Simulated time: scheduler.CostModel() per microbatch (tokens + 1.7e-5·Σlen²), split evenly over S
stages, backward = 2 x forward, 1F1B with the optimizer-step dependencies (scheduler.simulate_1f1b).
The baseline's microbatches are padded rectangles: n samples x longest length L cost n·L tokens and
n·L² attention. Throughput = real tokens / makespan; speedup = ours (or greedy) over mlora at the same S.
Waste = 1 - real tokens / (microbatches x capacity), no-ops included; padding waste = (padded - real)
tokens over the same capacity; window_bound_microbatches = Σ over ours' windows of ceil(window tokens /
capacity); capacity_bound_microbatches = ceil(all tokens / capacity). floor_microbatches = Σ over ours'
windows of scheduler.bound.window_floor: no valid schedule of that window (capacity, one global batch of a
job per microbatch, the distance rule, the carry-in ours' planner had from the window before) has fewer
microbatches; it is the best of the tokens, Martello-Toth L2 and per-job chain bounds
(floor_cheap_microbatches) raised by each count CP-SAT proves infeasible within --floor-time-limit-s
deterministic seconds per window (untimed; ours' length stops it). waste_floor = the waste at the floor.
Solve time: wall and CPU time of each window's planning (ours); the solve_8x16 row plans
windows of one global batch of 8 jobs x 16 samples (the ≤ 1 s target).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from benchmarks.results_csv import append_rows
from scheduler import (CostModel, Job, Microbatch, WindowPlanner, simulate_1f1b, token_imbalance, verify,
                       window_global_batches)
from scheduler.bound import Floor, window_floor
from scheduler.greedy import first_fit_decreasing_padded
from scheduler.improve import SHORTEN_TIME_LIMIT_S
from scheduler.order import group_problems, make_pack, order_packs
from scheduler.problem import PlanStats, Plan, waste_fraction
from scheduler.simulate import microbatch_lengths, microbatch_padded_tokens

MAX_LEN = 4096
DISTRIBUTIONS = {"xsum": (590, 0.6), "cnndm": (1090, 0.5), "wikisum": (2000, 0.5), "chat": (250, 0.7)}
WORKLOADS = {  # name -> (per job: distribution or "mixed", global batch size)
    "xsum": [("xsum", 16)] * 4,
    "cnndm": [("cnndm", 16)] * 4,
    "wikisum": [("wikisum", 8)] * 4,
    "mixed": [("mixed", 16), ("mixed", 12), ("mixed", 8), ("mixed", 16)],
    "hetero": [("xsum", 16), ("cnndm", 12), ("wikisum", 8), ("chat", 16)],
}
MODEL = CostModel()


def _lengths(rng: np.random.Generator, kind: str, count: int) -> list[int]:
    kinds = rng.choice(["xsum", "cnndm", "wikisum"], size=count) if kind == "mixed" else [kind] * count
    out = []
    for k in kinds:
        mean, sigma = DISTRIBUTIONS[k]
        out.append(int(min(MAX_LEN, max(1, round(rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma))))))
    return out


def make_jobs(workload: str, global_batches: int, seed: int) -> list[Job]:
    rng = np.random.default_rng([seed, sorted(WORKLOADS).index(workload)])
    return [Job(f"{workload}{j}", [_lengths(rng, kind, gbs) for _ in range(global_batches)])
            for j, (kind, gbs) in enumerate(WORKLOADS[workload])]


def _window(jobs: list[Job], g: int, size: int) -> list[Job]:
    """Global batches g .. g + size - 1 of every job that still has one."""
    return [Job(job.name, job.global_batches[g:g + size], first_global_batch=g)
            for job in jobs if g < len(job.global_batches)]


def _with_noops(order: list[tuple[str, int, list[int]]], depth: int) -> list[Microbatch]:
    """The microbatches (job, global batch, sample indices) in order, no-ops inserted where a job's next
    global batch would start < depth after its previous one ended."""
    last_end: dict[str, tuple[int, int]] = {}  # job -> (global batch, position of its last microbatch so far)
    stream: list[Microbatch] = []
    for job, g, samples in order:
        previous = last_end.get(job)
        if previous is not None and previous[0] != g:
            while len(stream) - previous[1] < depth:
                stream.append(Microbatch([], is_noop=True))
        stream.append(Microbatch([(job, g, i) for i in samples]))
        last_end[job] = (g, len(stream) - 1)
    return stream


def mlora_stream(jobs: list[Job], capacity: int, depth: int) -> list[Microbatch]:
    per_job = []
    for job in jobs:
        size = max(m for m in range(1, max(map(len, job.global_batches)) + 1)
                   if all(len(batch[s:s + m]) * max(batch[s:s + m]) <= capacity
                          for batch in job.global_batches for s in range(0, len(batch), m)))
        per_job.append([(job.name, g, list(range(s, min(s + size, len(batch)))))
                        for g, batch in enumerate(job.global_batches) for s in range(0, len(batch), size)])
    order = [mb for turn in range(max(map(len, per_job))) for mbs in per_job if turn < len(mbs) for mb in [mbs[turn]]]
    return _with_noops(order, depth)


def greedy_stream(jobs: list[Job], capacity: int, depth: int, pad: int) -> list[Microbatch]:
    packs = [make_pack(problem, first_fit_decreasing_padded(problem), 0, g)
             for g, problem in enumerate(group_problems(jobs, capacity, pad))]
    return order_packs([packs], pipeline_depth=depth, capacity_tokens=capacity, pad_multiple=pad)


def ours_stream(
    jobs: list[Job], capacity: int, depth: int, pad: int, args: argparse.Namespace, window_batches: int | None,
    floor_time_limit_s: float = 0.0,
) -> tuple[list[Microbatch], list[tuple[float, float]], list[Floor], list[int]]:
    """Ours' stream, each window's (wall, CPU) planning seconds, each window's floor (none when
    floor_time_limit_s is 0: computed after the window is planned, untimed, from the carry-in the
    planner had and with ours' length as the known schedule) and each window's global batches per job
    (window_batches, or as lf.fit sizes them when None)."""
    planner = WindowPlanner(capacity_tokens=capacity, pipeline_depth=depth, pad_multiple=pad,
                            time_limit_s=args.time_limit_s, shorten_time_limit_s=args.shorten_time_limit_s)
    stream, times, floors, sizes = [], [], [], []
    g, end = 0, max(len(job.global_batches) for job in jobs)
    while g < end:
        size = window_batches or window_global_batches(
            sum(sum(job.global_batches[g]) for job in jobs if g < len(job.global_batches)), capacity, depth)
        window, ready = _window(jobs, g, size), planner.ready
        start, cpu = time.perf_counter(), time.process_time()
        planned = planner.next_window(window, last=g + size >= end).microbatches
        times.append((time.perf_counter() - start, time.process_time() - cpu))
        stream += planned
        sizes.append(min(size, end - g))
        g += size
        if floor_time_limit_s > 0:
            floors.append(window_floor(window, capacity_tokens=capacity, pipeline_depth=depth, pad_multiple=pad,
                                       ready=ready, upper=len(planned), time_limit_s=floor_time_limit_s))
    return stream, times, floors, sizes


def measure(jobs: list[Job], stream: list[Microbatch], capacity: int, depth: int, pad: int, rectangular: bool) -> dict:
    lengths = microbatch_lengths(stream, jobs)
    packed = microbatch_padded_tokens(stream, lengths, pad)  # as the verifier counts
    padded = [len(ls) * max(ls, default=0) for ls in lengths] if rectangular else packed
    real = sum(map(sum, lengths))
    stats = PlanStats(num_microbatches=len(stream), num_noops=sum(mb.is_noop for mb in stream), real_tokens=real,
                      padded_tokens=sum(packed), waste_fraction=waste_fraction(real, len(stream), capacity), groups=[])
    violations = 0
    try:  # the baseline's rectangles are checked as packed tokens; the rectangles fit by construction
        verify(Plan(stream, stats), jobs, capacity_tokens=capacity, pipeline_depth=depth, pad_multiple=pad)
    except ValueError as err:
        violations, first_violation = 1, str(err)
        print("VIOLATION:", first_violation)
    if rectangular:
        fwd = [len(ls) * max(ls) * MODEL.token_coef + MODEL.attn_coef * len(ls) * max(ls) ** 2 if ls else 0.0
               for ls in lengths]
    else:
        fwd = [MODEL.cost(ls, p) for ls, p in zip(lengths, padded)]
    fwd = [f / depth for f in fwd]
    sim = simulate_1f1b(stream, fwd, [2 * f for f in fwd], depth)
    return {
        "microbatches": stats.num_microbatches, "noops": stats.num_noops, "real_tokens": real,
        "waste": round(stats.waste_fraction, 4), "padding_waste": round((sum(padded) - real) / (len(stream) * capacity), 4),
        "imbalance": round(token_imbalance(lengths), 3), "bubble": round(sim.bubble_fraction, 4),
        "makespan": round(sim.makespan, 1), "throughput": real / sim.makespan, "violations": violations,
    }


def run_case(workload: str, capacity: int, depth: int, args: argparse.Namespace) -> list[dict]:
    jobs = make_jobs(workload, args.global_batches, args.seed)
    base = {"workload": workload, "capacity": capacity, "stages": depth, "pad_multiple": args.pad_multiple,
            "global_batches": args.global_batches, "time_limit_s": args.time_limit_s,
            "shorten_time_limit_s": args.shorten_time_limit_s}
    results = {"mlora": measure(jobs, mlora_stream(jobs, capacity, depth), capacity, depth, 1, rectangular=True),
               "greedy": measure(jobs, greedy_stream(jobs, capacity, depth, args.pad_multiple), capacity, depth,
                                 args.pad_multiple, rectangular=False)}
    stream, times, floors, sizes = ours_stream(jobs, capacity, depth, args.pad_multiple, args, args.window_batches,
                                               args.floor_time_limit_s)
    base["window_batches"] = "+".join(map(str, sizes))
    results["ours"] = measure(jobs, stream, capacity, depth, args.pad_multiple, rectangular=False)
    results["ours"].update(_times(times))
    if floors:
        floor = sum(f.microbatches for f in floors)
        results["ours"].update(floor_microbatches=floor, floor_cheap_microbatches=sum(f.cheap for f in floors),
                               waste_floor=round(waste_fraction(results["ours"]["real_tokens"], floor, capacity), 4))
    # No window of ours can use fewer microbatches than its tokens over the capacity, rounded up.
    starts = [sum(sizes[:w]) for w in range(len(sizes))]
    bound = sum(math.ceil(sum(sum(map(sum, job.global_batches[g:g + size])) for job in jobs) / capacity)
                for g, size in zip(starts, sizes))
    fewest = math.ceil(sum(sum(map(sum, job.global_batches)) for job in jobs) / capacity)
    rows = []
    for method, r in results.items():
        r["speedup_vs_mlora"] = round(r.pop("throughput") / (results["mlora"]["real_tokens"] / results["mlora"]["makespan"]), 3)
        rows.append({**base, "method": method, **r, "window_bound_microbatches": bound,
                     "capacity_bound_microbatches": fewest})
    return rows


def solve_time_case(args: argparse.Namespace) -> dict:
    """Solve time per window for 8 jobs x 16 samples (mixed lengths), capacity 8192, S = 4."""
    rng = np.random.default_rng([args.seed, 99])
    jobs = [Job(f"job{j}", [_lengths(rng, "mixed", 16) for _ in range(args.global_batches)]) for j in range(8)]
    _, times, _, _ = ours_stream(jobs, 8192, 4, args.pad_multiple, args, 1)
    return {"workload": "solve_8x16", "capacity": 8192, "stages": 4, "pad_multiple": args.pad_multiple,
            "global_batches": args.global_batches, "time_limit_s": args.time_limit_s, "window_batches": 1,
            "shorten_time_limit_s": args.shorten_time_limit_s,
            "method": "ours",
            **_times(times)}


def _times(times: list[tuple[float, float]]) -> dict:
    """Per-window wall and CPU (all threads) seconds: median and max. CPU time is what the solver did;
    wall time also counts waiting for a core on a shared machine."""
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    return {"solve_s_median": round(statistics.median(wall), 3), "solve_s_max": round(max(wall), 3),
            "solve_cpu_s_median": round(statistics.median(cpu), 3), "solve_cpu_s_max": round(max(cpu), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batches", type=int, default=8, help="global batches per job")
    parser.add_argument("--time-limit-s", type=float, default=0.2, help="CP-SAT limit per window (ours)")
    parser.add_argument("--shorten-time-limit-s", type=float, default=SHORTEN_TIME_LIMIT_S,
                        help="CP-SAT limit of ours' whole-window step per window (0 skips it)")
    parser.add_argument("--floor-time-limit-s", type=float, default=1.0,
                        help="CP-SAT limit of each window's floor (0: no floor columns)")
    parser.add_argument("--pad-multiple", type=int, default=1)
    parser.add_argument("--window-batches", type=int, default=None,
                        help="global batches per job in a window (ours; default: as lf.fit sizes windows)")
    parser.add_argument("--capacities", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [row for workload in args.workloads for capacity in args.capacities for depth in args.stages
            for row in run_case(workload, capacity, depth, args)]
    rows.append(solve_time_case(args))
    append_rows("scheduler", rows)


if __name__ == "__main__":
    main()
