"""The windows the fit driver sends to the stage actors: a scheduler plan of global batches turned into slots dealt
to the data-parallel replicas, with what the driver needs to record each step; the init-pass and eval windows.

    planned = plan_window(prepared.jobs, {"sql": range(0, 2)}, run)   # a window of its own (its own planner)
    planned.window.slots[replica][i].items                            # (job, Sample, dropout seed) per microbatch
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import scheduler
from lorafusion.config import RunConfig
from lorafusion.data import Sample
from lorafusion.prepare import PreparedJob
from runtime.planning import last_microbatch, scheduler_jobs, window_items
from runtime.stage import Slot, Window

__all__ = ["WindowPlan", "window_planner", "plan_window", "window_plan", "init_pass_window", "eval_window"]


@dataclass
class WindowPlan:
    """The window sent to the actors and, per global batch in it, what the driver needs to record its step."""

    window: Window
    tokens: dict[tuple[str, int], int]
    """(job, step) -> tokens of that global batch."""
    microbatches: int
    """Microbatches that run (no-ops not counted)."""


def _deal(slots_flat: list[Slot], replicas: int) -> list[list[Slot]]:
    """Plan order → replica m % D, slot m // D; the last slots are padded with no-ops."""
    per_replica = -(-len(slots_flat) // replicas)
    padded = slots_flat + [Slot() for _ in range(per_replica * replicas - len(slots_flat))]
    return [padded[r::replicas] for r in range(replicas)]


def window_planner(run: RunConfig) -> scheduler.WindowPlanner:
    """The planner of one continuous stream of windows: a job's consecutive global batches stay stages ×
    replicas microbatches apart across window boundaries (the no-ops `_deal` pads a window with only add
    distance, so the planner need not count them)."""
    return scheduler.WindowPlanner(capacity_tokens=run.max_tokens_per_microbatch,
                                   pipeline_depth=run.pipeline_stages * run.data_parallel, pad_multiple=1,
                                   time_limit_s=run.plan_time_limit_s, num_workers=1)


def plan_window(prepared_jobs: list[PreparedJob], steps: dict[str, range], run: RunConfig,
                planner: scheduler.WindowPlanner | None = None, flush: bool = True, last: bool = False) -> WindowPlan:
    """Pack and order the global batches `steps[job]` of each named job into one window for the actors, at the
    planner's capacity.

    planner: the stream's planner when the window continues earlier ones without a flush (None: a stream of
    its own). flush: the window drains the pipeline at its end (see Window.flush). last: no training window
    follows (the planner need not keep room for one).
    """
    planner = planner or window_planner(run)
    return window_plan(prepared_jobs, steps, run, planner.next_window(scheduler_jobs(prepared_jobs, steps), last=last),
                       flush)


def window_plan(prepared_jobs: list[PreparedJob], steps: dict[str, range], run: RunConfig, plan: scheduler.Plan,
                flush: bool = True) -> WindowPlan:
    """The actors' Window of `plan`, the scheduler's plan of the global batches `steps` (scheduler_jobs)."""
    by_name = {job.name: job for job in prepared_jobs}
    batches = {(name, step): by_name[name].global_batch(step) for name, r in steps.items() for step in r}
    replicas = run.data_parallel
    weights = {key: 1.0 / max(sum(s.num_loss_tokens for s in batch), 1) for key, batch in batches.items()}
    slots = [Slot(items=items, weights={name: weights[(name, step)] for name, step, _ in mb.samples})
             for items, mb in zip(window_items(plan, prepared_jobs), plan.microbatches)]
    steps_after: dict[int, list[str]] = {}
    for (name, _), index in sorted(last_microbatch(plan).items(), key=lambda kv: (kv[1], kv[0][1], kv[0][0])):
        steps_after.setdefault(index // replicas, []).append(name)
    tokens = {key: sum(len(s) for s in batch) for key, batch in batches.items()}
    real = sum(1 for mb in plan.microbatches if not mb.is_noop)
    window = Window(slots=_deal(slots, replicas), steps_after=steps_after, flush=flush)
    return WindowPlan(window, tokens, real)


def init_pass_window(prepared_jobs: list[PreparedJob], run: RunConfig) -> Window | None:
    """The window of every job's gradient init pass (its first `adapter.init_pass_batches` global batches, at most
    as many as it trains on; no steps), or None when no job's variant has one."""
    due = {j.name: range(min(j.spec.adapter.init_pass_batches, j.total_steps)) for j in prepared_jobs
           if j.spec.adapter.init_pass_batches}
    if not due:
        return None
    planned = plan_window(prepared_jobs, due, run)
    return replace(planned.window, steps_after={}, init_jobs=sorted(due), flush=True)


def eval_window(samples: dict[str, list[Sample]], run: RunConfig) -> Window:
    """Every due job's eval samples packed first-fit-decreasing, forward only."""
    items = [(name, s, 0) for name, job_samples in samples.items() for s in job_samples]
    bins = scheduler.first_fit_decreasing([len(item[1]) for item in items], run.max_tokens_per_microbatch)
    slots = [Slot(items=[items[i] for i in b]) for b in bins]
    return Window(slots=_deal(slots, run.data_parallel), train=False)
