"""Check every invariant of a plan against its jobs; the runtime executes only verified plans."""

from __future__ import annotations

import math
from collections import defaultdict

from scheduler.problem import Job, Plan, SampleRef, padded_size, validate_problem, waste_fraction

__all__ = ["verify"]


def verify(plan: Plan, jobs: list[Job], *, capacity_tokens: int, pipeline_depth: int, pad_multiple: int) -> None:
    """Raise ValueError on the first violation found.

    Invariants: every sample of every job exactly once and nothing else; each microbatch's padded size
    (each job's tokens rounded up to pad_multiple) ≤ capacity_tokens; no microbatch holds two global
    batches of one job; no-ops are empty and only no-ops are; a job's global batch g + 1 starts at least
    pipeline_depth microbatches after its global batch g ended; the stats match the microbatches.
    """
    validate_problem(jobs, capacity_tokens, pipeline_depth, pad_multiple)
    lengths: dict[SampleRef, int] = {
        (job.name, g, i): n for job in jobs for g, batch in enumerate(job.global_batches) for i, n in enumerate(batch)
    }
    where: dict[SampleRef, int] = {}
    span: dict[tuple[str, int], list[int]] = {}  # (job, global batch) -> [first, last] position
    padded_total = 0
    for pos, mb in enumerate(plan.microbatches):
        tokens = _check_microbatch(pos, mb.samples, mb.is_noop, lengths, where)
        padded = padded_size(tokens, pad_multiple)
        if padded > capacity_tokens:
            raise ValueError(f"microbatch {pos} has {padded} padded tokens > capacity_tokens={capacity_tokens}")
        padded_total += padded
        for job, g, _ in mb.samples:
            span.setdefault((job, g), [pos, pos])[1] = pos
    missing = [ref for ref in lengths if ref not in where]
    if missing:
        raise ValueError(f"{len(missing)} samples are in no microbatch, first (job, global batch, sample): {missing[0]}")
    _check_distance(jobs, span, pipeline_depth)
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


def _check_distance(jobs: list[Job], span: dict[tuple[str, int], list[int]], pipeline_depth: int) -> None:
    for job in jobs:
        for g in range(len(job.global_batches) - 1):
            last, first = span[(job.name, g)][1], span[(job.name, g + 1)][0]
            if first - last < pipeline_depth:
                raise ValueError(
                    f"job {job.name!r} global batch {g + 1} starts at microbatch {first}, {first - last} after its "
                    f"global batch {g} ended at microbatch {last}; pipeline_depth={pipeline_depth} needs "
                    f"≥ {pipeline_depth} so the optimizer step comes first"
                )


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
