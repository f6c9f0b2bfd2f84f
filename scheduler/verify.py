"""Check every invariant of a plan against its jobs; the runtime executes only verified plans."""

from __future__ import annotations

import math
from collections import defaultdict

from scheduler.cost import CostBudget, CostModel
from scheduler.problem import Job, Plan, SampleRef, batch_spans, padded_size, validate_problem, waste_fraction

__all__ = ["verify", "verify_windows", "cost_budget"]


def cost_budget(cost_model: CostModel | None, capacity_cost: float | None, pad_multiple: int) -> CostBudget | None:
    """The integer budget of a cost capacity, None without one; both or neither must be given."""
    if capacity_cost is None:
        return None
    if not isinstance(cost_model, CostModel):
        raise ValueError(f"capacity_cost={capacity_cost!r} needs a cost_model (got {cost_model!r}); pass "
                         "cost_model=scheduler.CostModel(...) or leave capacity_cost out")
    return CostBudget.from_model(cost_model, capacity_cost, pad_multiple)


def verify(
    plan: Plan, jobs: list[Job], *, capacity_tokens: int, pipeline_depth: int, pad_multiple: int,
    cost_model: CostModel | None = None, capacity_cost: float | None = None,
) -> None:
    """Raise ValueError on the first violation found.

    Invariants: every sample of every job exactly once and nothing else; each microbatch's padded size
    (each job's tokens rounded up to pad_multiple) ≤ capacity_tokens, and its cost ≤ capacity_cost when
    one is given; no microbatch holds two global batches of one job; no-ops are empty and only no-ops
    are; a job's global batch g + 1 starts at least pipeline_depth microbatches after its global batch g
    ended; the stats match the microbatches. Global batch indices are absolute (first_global_batch + g).
    """
    budget = cost_budget(cost_model, capacity_cost, pad_multiple)
    validate_problem(jobs, capacity_tokens, pipeline_depth, pad_multiple, budget)
    lengths: dict[SampleRef, int] = {
        (job.name, g, i): n
        for job in jobs for g, batch in enumerate(job.global_batches, start=job.first_global_batch)
        for i, n in enumerate(batch)
    }
    where: dict[SampleRef, int] = {}
    padded_total = 0
    for pos, mb in enumerate(plan.microbatches):
        tokens = _check_microbatch(pos, mb.samples, mb.is_noop, lengths, where)
        padded = padded_size(tokens, pad_multiple)
        if padded > capacity_tokens:
            raise ValueError(f"microbatch {pos} has {padded} padded tokens > capacity_tokens={capacity_tokens}")
        padded_total += padded
        if capacity_cost is not None:
            cost = cost_model.cost([lengths[ref] for ref in mb.samples], padded)
            if cost > capacity_cost * (1 + 1e-9):
                raise ValueError(f"microbatch {pos} costs {cost:.6g} > capacity_cost={capacity_cost}")
    missing = [ref for ref in lengths if ref not in where]
    if missing:
        raise ValueError(f"{len(missing)} samples are in no microbatch, first (job, global batch, sample): {missing[0]}")
    _check_distance(batch_spans(plan.microbatches), pipeline_depth)
    _check_stats(plan, lengths, padded_total, capacity_tokens)


def _check_microbatch(
    pos: int, samples: list[SampleRef], is_noop: bool, lengths: dict[SampleRef, int], where: dict[SampleRef, int]
) -> dict[str, int]:
    """Tokens per job of one microbatch, after checking its samples."""
    if is_noop != (not samples):
        state = "a no-op holding samples" if is_noop else "empty but not marked is_noop"
        raise ValueError(f"microbatch {pos} is {state}")
    tokens: dict[str, int] = defaultdict(int)
    batch_of: dict[str, int] = {}
    for ref in samples:
        job, g, i = ref
        if ref not in lengths:
            raise ValueError(f"microbatch {pos} holds job {job!r} global batch {g} sample {i}, which does not exist")
        if ref in where:
            raise ValueError(f"job {job!r} global batch {g} sample {i} is in microbatches {where[ref]} and {pos}")
        where[ref] = pos
        if batch_of.setdefault(job, g) != g:
            raise ValueError(f"microbatch {pos} mixes global batches {batch_of[job]} and {g} of job {job!r}")
        tokens[job] += lengths[ref]
    return tokens


def _check_distance(span: dict[tuple[str, int], list[int]], pipeline_depth: int) -> None:
    """span[(job, global batch)] = [first, last] stream position; consecutive global batches ≥ S apart."""
    for (job, g), (_, last) in sorted(span.items()):
        if (job, g + 1) in span:
            first = span[(job, g + 1)][0]
            if first - last < pipeline_depth:
                raise ValueError(
                    f"job {job!r} global batch {g + 1} starts at microbatch {first}, {first - last} after its "
                    f"global batch {g} ended at microbatch {last}; pipeline_depth={pipeline_depth} needs "
                    f"≥ {pipeline_depth} so the optimizer step comes first"
                )


def verify_windows(
    windows: list[Plan], jobs_per_window: list[list[Job]], *, capacity_tokens: int, pipeline_depth: int,
    pad_multiple: int, cost_model: CostModel | None = None, capacity_cost: float | None = None,
) -> None:
    """Verify a stream of windows run back to back: each window on its own (`verify`), every (job,
    global batch) in one window only, a job's global batches consecutive, and the distance rule across
    window boundaries (positions counted over the whole stream, no-ops included)."""
    if len(windows) != len(jobs_per_window):
        raise ValueError(f"{len(windows)} windows but {len(jobs_per_window)} job lists; give one per window")
    span: dict[tuple[str, int], list[int]] = {}
    offset = 0
    for w, (window, jobs) in enumerate(zip(windows, jobs_per_window)):
        verify(window, jobs, capacity_tokens=capacity_tokens, pipeline_depth=pipeline_depth,
               pad_multiple=pad_multiple, cost_model=cost_model, capacity_cost=capacity_cost)
        seen = {job for job, _ in span}
        for job in jobs:
            if (job.name, job.first_global_batch) in span:
                raise ValueError(f"job {job.name!r} global batch {job.first_global_batch} is planned in window {w} "
                                 "and in an earlier one; give each window the next global batches only")
            if job.name in seen and (job.name, job.first_global_batch - 1) not in span:
                raise ValueError(f"job {job.name!r} window {w} starts at global batch {job.first_global_batch}, "
                                 "not right after its global batch in an earlier window")
        batch_spans(window.microbatches, offset, span)
        offset += len(window.microbatches)
    _check_distance(span, pipeline_depth)


def _check_stats(plan: Plan, lengths: dict[SampleRef, int], padded_total: int, capacity_tokens: int) -> None:
    stats = plan.stats
    actual = {
        "num_microbatches": len(plan.microbatches),
        "num_noops": sum(mb.is_noop for mb in plan.microbatches),
        "real_tokens": sum(lengths.values()),
        "padded_tokens": padded_total,
    }
    for name, value in actual.items():
        if getattr(stats, name) != value:
            raise ValueError(f"plan.stats.{name}={getattr(stats, name)} but the microbatches give {value}")
    expected_waste = waste_fraction(actual["real_tokens"], actual["num_microbatches"], capacity_tokens)
    if not math.isclose(stats.waste_fraction, expected_waste, abs_tol=1e-12):
        raise ValueError(f"plan.stats.waste_fraction={stats.waste_fraction} but the microbatches give {expected_waste}")
