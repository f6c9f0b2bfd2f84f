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
from scheduler import (CostModel, Job, Microbatch, Plan, WindowPlanner, microbatch_lengths, simulate_plan,
                       token_imbalance, window_global_batches)
from scheduler.planner import MAX_WINDOW_GLOBAL_BATCHES
from scheduler.problem import batch_spans, positive_int

__all__ = ["scheduler_jobs", "window_size", "window_items", "last_microbatch", "simulated_makespan", "CapacityChoice",
           "balanced_plan", "stream_window", "WindowSummary", "RunPlan", "plan_windows", "format_run_plan"]

# Capacities a pipelined stream may plan at (run.balance_pipeline), as fractions of max_tokens_per_microbatch.
CAPACITY_FRACTIONS = (1.0, 0.75, 0.625, 0.5)
# A smaller capacity is taken only when the 1F1B simulation finishes the window at least this much sooner.
MIN_BALANCE_GAIN = 0.02
# Per-microbatch cost in that simulation, in tokens: the sends, receives and per-op work of a microbatch
# that do not shrink with it (on CPU, per-token speed measured flat from 700 to 2048 tokens per microbatch).
MICROBATCH_OVERHEAD_TOKENS = 64

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


def window_size(prepared_jobs: list[PreparedJob], next_step: dict[str, int], capacity_tokens: int, slots: int,
                most: int = MAX_WINDOW_GLOBAL_BATCHES) -> int:
    """Global batches of each job in the window whose jobs start at next_step[name] (lf.fit's rule:
    `scheduler.window_global_batches` of the tokens of those global batches)."""
    by_name = {job.name: job for job in prepared_jobs}
    tokens = sum(len(s) for name, step in next_step.items() for s in by_name[name].global_batch(step))
    return window_global_batches(tokens, capacity_tokens, slots, most)


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


def simulated_makespan(plan: Plan, jobs: list[Job], stages: int, replicas: int = 1) -> float:
    """How long the window takes as 1F1B on `stages` stages, in token units (CostModel with a per-microbatch
    overhead); with replicas (microbatches dealt round-robin), the slowest replica's share."""
    model = CostModel(overhead=MICROBATCH_OVERHEAD_TOKENS)
    return max(simulate_plan(plan.microbatches[r::replicas], jobs, model, stages).makespan for r in range(replicas))


@dataclass
class CapacityChoice:
    """Which capacity `balanced_plan` planned a window at, and why."""

    capacity_tokens: int
    simulated: dict[int, float]
    """Each capacity tried -> the window's simulated makespan (token units)."""
    jobs: tuple[str, ...]
    """The window's jobs (sorted names): the stream keeps the capacity until this set changes."""

    @property
    def gain(self) -> float:
        """How much sooner the chosen capacity finishes than the largest one, in the simulation."""
        full = self.simulated[max(self.simulated)]
        return 1.0 - self.simulated[self.capacity_tokens] / full if full else 0.0


def balanced_plan(jobs: list[Job], planner: WindowPlanner, stages: int, replicas: int = 1, last: bool = False
                  ) -> tuple[Plan, WindowPlanner, CapacityChoice]:
    """The window planned at the capacity its pipeline runs fastest: the planner's capacity or a fraction of it
    (run.balance_pipeline).

    A 1F1B stage waits whenever consecutive microbatches differ in size. When one job holds most of the
    tokens, the distance rule leaves every few microbatches without it, so full microbatches alternate with
    light ones; smaller microbatches can spread that job over more of them and even the stream out (4 jobs
    at 2 stages, bench_end_to_end: measured bubble 13.1% at 2048 tokens, 6.8% at 1024). Each candidate no
    shorter than the window's longest sample is planned on its own copy of `planner` and simulated
    (`simulated_makespan`); a smaller one wins only by at least MIN_BALANCE_GAIN. Returns the plan, the
    planner that continues the stream at the chosen capacity (`planner` itself is left as it was), and the
    choice.
    """
    full = planner.limits["capacity_tokens"]
    longest = max(n for job in jobs for batch in job.global_batches for n in batch)
    capacities = sorted({int(full * f) for f in CAPACITY_FRACTIONS}, reverse=True)
    trials: dict[int, tuple[Plan, WindowPlanner, float]] = {}
    for capacity in [c for c in capacities if c >= longest or c == full]:
        trial = planner.with_capacity(capacity)
        plan = trial.next_window(jobs, last=last)
        trials[capacity] = (plan, trial, simulated_makespan(plan, jobs, stages, replicas))
    best = min(trials, key=lambda c: trials[c][2])
    if trials[best][2] > trials[full][2] * (1.0 - MIN_BALANCE_GAIN):
        best = full
    plan, trial, _ = trials[best]
    return plan, trial, CapacityChoice(best, {c: round(m, 1) for c, (_, _, m) in trials.items()}, _names(jobs))


def stream_window(jobs: list[Job], planner: WindowPlanner, *, stages: int, replicas: int = 1, balance: bool = False,
                  chosen_for: tuple[str, ...] | None = None, last: bool = False
                  ) -> tuple[Plan, WindowPlanner, CapacityChoice | None]:
    """The next window of a stream (as `lf.fit` and `lorafusion plan` plan it), the planner of the windows after
    it, and the capacity choice when one was made: with `balance` (run.balance_pipeline) and stages > 1, the
    capacity is chosen by `balanced_plan` whenever the window's set of jobs is not `chosen_for` (the set of the
    stream's last choice); otherwise the window is planned at the planner's capacity."""
    if balance and stages > 1 and _names(jobs) != chosen_for:
        return balanced_plan(jobs, planner, stages, replicas, last)
    return planner.next_window(jobs, last=last), planner, None


def _names(jobs: list[Job]) -> tuple[str, ...]:
    return tuple(sorted(job.name for job in jobs))


@dataclass
class WindowSummary:
    """Statistics of one planned window."""

    microbatches: int
    noops: int
    capacity_tokens: int
    """The capacity the window was planned at (below run.max_tokens_per_microbatch where balanced_plan chose)."""
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
    """run.max_tokens_per_microbatch (windows balanced_plan planned smaller say so in their summary)."""
    stages: int
    bubble_fraction: float
    """Simulated 1F1B bubble of all windows as one stream (no flush between windows)."""
    makespan: float
    """Simulated time of that stream, in the cost model's units."""


def plan_windows(
    prepared_jobs: list[PreparedJob], planner: WindowPlanner, *, steps_per_window: int | None = None, stages: int,
    max_windows: int | None = None, cost_model: CostModel | None = None, replicas: int = 1, balance: bool = False,
) -> RunPlan:
    """Plan the whole run (or its first `max_windows` windows) window by window, every job starting at
    step 0 and running to its total_steps; summarise each window and simulate the whole stream.

    steps_per_window: global batches of each job per window; None: as the fit chooses them
    (`window_size`). balance (run.balance_pipeline):
    choose the capacity as the fit does (`stream_window`).
    """
    if steps_per_window is not None:
        positive_int("steps_per_window", steps_per_window, "4 (global batches of each job per window; None: as "
                     "the fit chooses)")
    cost_model = cost_model or CostModel()
    step = {job.name: 0 for job in prepared_jobs}
    summaries: list[WindowSummary] = []
    stream: list[Microbatch] = []
    lengths: dict[str, list[list[int]]] = {}
    chosen_for: tuple[str, ...] | None = None
    configured = planner.limits["capacity_tokens"]
    while max_windows is None or len(summaries) < max_windows:
        left = {job.name: step[job.name] for job in prepared_jobs if step[job.name] < job.total_steps}
        if not left:
            break
        size = steps_per_window or window_size(prepared_jobs, left, configured, stages * replicas)
        window_steps = {job.name: range(step[job.name], min(step[job.name] + size, job.total_steps))
                        for job in prepared_jobs}
        jobs = scheduler_jobs(prepared_jobs, window_steps)
        last = all(window_steps[job.name].stop >= job.total_steps for job in prepared_jobs)
        start = time.perf_counter()
        window, planner, choice = stream_window(jobs, planner, stages=stages, replicas=replicas, balance=balance,
                                                chosen_for=chosen_for, last=last)
        chosen_for = choice.jobs if choice is not None else chosen_for
        elapsed = time.perf_counter() - start
        stats = window.stats
        sim = simulate_plan(window.microbatches, jobs, cost_model, stages, planner.limits["pad_multiple"])
        summaries.append(WindowSummary(
            microbatches=stats.num_microbatches, noops=stats.num_noops,
            capacity_tokens=planner.limits["capacity_tokens"], real_tokens=stats.real_tokens,
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
    return RunPlan(windows=summaries, capacity_tokens=configured, stages=stages,
                   bubble_fraction=whole.bubble_fraction if whole else 0.0, makespan=whole.makespan if whole else 0.0)


def format_run_plan(run_plan: RunPlan) -> str:
    """A table: one row per window and a total row (waste over the whole stream, worst imbalance, the
    bubble of the whole stream simulated at once)."""
    summaries, capacity_tokens = run_plan.windows, run_plan.capacity_tokens
    header = f"{'window':>6} {'mbs':>5} {'no-ops':>6} {'real tok':>9} {'padded':>9} {'waste':>7} " \
             f"{'imbal':>6} {'solve s':>8} {'bubble':>7} {'capacity':>8}"
    lines = [header, "-" * len(header)]
    for w, s in enumerate(summaries):
        lines.append(f"{w:>6} {s.microbatches:>5} {s.noops:>6} {s.real_tokens:>9} {s.padded_tokens:>9} "
                     f"{s.waste_fraction:>7.1%} {s.imbalance:>6.2f} {s.solve_time_s:>8.3f} {s.bubble_fraction:>7.1%} "
                     f"{s.capacity_tokens:>8}")
    mbs = sum(s.microbatches for s in summaries)
    real = sum(s.real_tokens for s in summaries)
    room = sum(s.microbatches * s.capacity_tokens for s in summaries)
    waste = 1 - real / room if room else 0.0
    lines += ["-" * len(header),
              f"{'total':>6} {mbs:>5} {sum(s.noops for s in summaries):>6} {real:>9} "
              f"{sum(s.padded_tokens for s in summaries):>9} {waste:>7.1%} "
              f"{max((s.imbalance for s in summaries), default=1.0):>6.2f} "
              f"{sum(s.solve_time_s for s in summaries):>8.3f} {run_plan.bubble_fraction:>7.1%}",
              f"pipeline stages {run_plan.stages}, capacity {capacity_tokens} tokens; bubble per window: that "
              "window alone, total: the whole stream; waste against each window's capacity"]
    return "\n".join(lines)
