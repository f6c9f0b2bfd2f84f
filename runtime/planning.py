"""From prepared jobs to scheduler windows and back: what the fit driver plans and what it then runs.

    planner = WindowPlanner(capacity_tokens=run.max_tokens_per_microbatch, pipeline_depth=run.pipeline_stages)
    jobs = scheduler_jobs(prepared.jobs, {"sql": range(12, 14), "chat": range(3, 4)})
    window = planner.next_window(jobs)
    for items in window_items(window, prepared.jobs):   # [] for a no-op
        ...                                             # items: (job name, Sample, dropout seed)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lorafusion.data import Sample
from lorafusion.prepare import PreparedJob
from scheduler import CostModel, Job, Microbatch, Plan, WindowPlanner, microbatch_lengths, simulate_plan, token_imbalance
from scheduler.problem import batch_spans

__all__ = ["scheduler_jobs", "window_items", "last_microbatch", "WindowSummary", "RunPlan", "plan_windows",
           "format_run_plan"]

Item = tuple[str, Sample, int]
"""(job name, sample, dropout seed): one entry of a microbatch as the stage worker consumes it."""


def scheduler_jobs(prepared_jobs: list[PreparedJob], steps: dict[str, range]) -> list[Job]:
    """Scheduler Jobs for one window: global batches steps[name] of each job named (the active ones); a job
    whose range is empty is left out.

    Sample lengths are len(sample) of PreparedJob.global_batch(step); sample i of a scheduler global batch
    is sample i of that list.
    """
    by_name = {job.name: job for job in prepared_jobs}
    jobs = []
    for name, window_steps in steps.items():
        if name not in by_name:
            raise ValueError(f"steps names job {name!r}, which is not among the prepared jobs "
                             f"{sorted(by_name)}; pass only the names of active jobs")
        job = by_name[name]
        if not isinstance(window_steps, range) or window_steps.step != 1 or window_steps.start < 0 \
                or window_steps.stop > job.total_steps:
            raise ValueError(f"steps[{name!r}]={window_steps!r} must be a range of consecutive steps within "
                             f"0..{job.total_steps} (the job's total_steps), e.g. range(2, 4)")
        if window_steps:
            jobs.append(Job(name, [[len(s) for s in job.global_batch(step)] for step in window_steps],
                            first_global_batch=window_steps.start))
    return jobs


def window_items(plan: Plan, prepared_jobs: list[PreparedJob]) -> list[list[Item]]:
    """Each planned microbatch as the runtime's items ([] for a no-op); the dropout seed of sample i of
    global batch `step` is PreparedJob.dropout_seeds(step)[i], wherever the sample lands."""
    by_name = {job.name: job for job in prepared_jobs}
    batches: dict[tuple[str, int], tuple[list[Sample], list[int]]] = {}
    result = []
    for mb in plan.microbatches:
        items = []
        for name, step, i in mb.samples:
            if (name, step) not in batches:
                job = by_name[name]
                batches[(name, step)] = (job.global_batch(step), job.dropout_seeds(step))
            samples, seeds = batches[(name, step)]
            items.append((name, samples[i], seeds[i]))
        result.append(items)
    return result


def last_microbatch(plan: Plan) -> dict[tuple[str, int], int]:
    """(job, step) -> index of the window microbatch whose backward completes that global batch (then the
    job's optimizer steps)."""
    return {key: end for key, (_, end) in batch_spans(plan.microbatches).items()}


@dataclass
class WindowSummary:
    """Statistics of one planned window."""

    microbatches: int
    noops: int
    real_tokens: int
    padded_tokens: int
    waste_fraction: float
    """Capacity left unused by padding, slack and no-ops (see PlanStats)."""
    imbalance: float
    """Max over mean real tokens of the non-empty microbatches."""
    solve_time_s: float
    """Wall time of the whole window's planning."""
    bubble_fraction: float
    """Simulated 1F1B bubble of the window run alone (pipeline filled and drained; mean over stages)."""


@dataclass
class RunPlan:
    """The windows' statistics and the simulation of their whole stream, run back to back."""

    windows: list[WindowSummary]
    capacity_tokens: int
    stages: int
    bubble_fraction: float
    """Simulated 1F1B bubble of all windows as one stream (no flush between windows)."""
    makespan: float
    """Simulated time of that stream, in the cost model's units."""


def plan_windows(
    prepared_jobs: list[PreparedJob], planner: WindowPlanner, *, steps_per_window: int, stages: int,
    max_windows: int | None = None, cost_model: CostModel | None = None,
) -> RunPlan:
    """Plan the whole run (or its first `max_windows` windows) window by window, every job starting at
    step 0 and running to its total_steps; summarise each window and simulate the whole stream."""
    if isinstance(steps_per_window, bool) or not isinstance(steps_per_window, int) or steps_per_window < 1:
        raise ValueError(f"steps_per_window={steps_per_window!r} must be a positive integer (global batches of "
                         "each job per window)")
    cost_model = cost_model or CostModel()
    step = {job.name: 0 for job in prepared_jobs}
    summaries: list[WindowSummary] = []
    stream: list[Microbatch] = []
    lengths: dict[str, list[list[int]]] = {}
    while max_windows is None or len(summaries) < max_windows:
        window_steps = {job.name: range(step[job.name], min(step[job.name] + steps_per_window, job.total_steps))
                        for job in prepared_jobs}
        jobs = scheduler_jobs(prepared_jobs, window_steps)
        if not jobs:
            break
        last = all(window_steps[job.name].stop >= job.total_steps for job in prepared_jobs)
        start = time.perf_counter()
        window = planner.next_window(jobs, last=last)
        elapsed = time.perf_counter() - start
        stats = window.stats
        sim = simulate_plan(window.microbatches, jobs, cost_model, stages, planner.limits["pad_multiple"])
        summaries.append(WindowSummary(
            microbatches=stats.num_microbatches, noops=stats.num_noops, real_tokens=stats.real_tokens,
            padded_tokens=stats.padded_tokens, waste_fraction=stats.waste_fraction,
            imbalance=token_imbalance(microbatch_lengths(window.microbatches, jobs)), solve_time_s=elapsed,
            bubble_fraction=sim.bubble_fraction,
        ))
        stream += window.microbatches
        for job in jobs:
            step[job.name] = job.first_global_batch + len(job.global_batches)
            lengths.setdefault(job.name, []).extend(job.global_batches)  # consecutive from step 0
    whole = simulate_plan(stream, [Job(name, batches) for name, batches in lengths.items()], cost_model, stages,
                          planner.limits["pad_multiple"]) if stream else None
    return RunPlan(windows=summaries, capacity_tokens=planner.limits["capacity_tokens"], stages=stages,
                   bubble_fraction=whole.bubble_fraction if whole else 0.0, makespan=whole.makespan if whole else 0.0)


def format_run_plan(run_plan: RunPlan) -> str:
    """A table: one row per window and a total row (waste over the whole stream, worst imbalance, the
    bubble of the whole stream simulated at once)."""
    summaries, capacity_tokens = run_plan.windows, run_plan.capacity_tokens
    header = f"{'window':>6} {'mbs':>5} {'no-ops':>6} {'real tok':>9} {'padded':>9} {'waste':>7} " \
             f"{'imbal':>6} {'solve s':>8} {'bubble':>7}"
    lines = [header, "-" * len(header)]
    for w, s in enumerate(summaries):
        lines.append(f"{w:>6} {s.microbatches:>5} {s.noops:>6} {s.real_tokens:>9} {s.padded_tokens:>9} "
                     f"{s.waste_fraction:>7.1%} {s.imbalance:>6.2f} {s.solve_time_s:>8.3f} {s.bubble_fraction:>7.1%}")
    mbs = sum(s.microbatches for s in summaries)
    real = sum(s.real_tokens for s in summaries)
    waste = 1 - real / (mbs * capacity_tokens) if mbs else 0.0
    lines += ["-" * len(header),
              f"{'total':>6} {mbs:>5} {sum(s.noops for s in summaries):>6} {real:>9} "
              f"{sum(s.padded_tokens for s in summaries):>9} {waste:>7.1%} "
              f"{max((s.imbalance for s in summaries), default=1.0):>6.2f} "
              f"{sum(s.solve_time_s for s in summaries):>8.3f} {run_plan.bubble_fraction:>7.1%}",
              f"pipeline stages {run_plan.stages}, capacity {capacity_tokens} tokens; bubble per window: that "
              "window alone, total: the whole stream"]
    return "\n".join(lines)
