"""`plan`: group the jobs, pack every (global batch, group) with CP-SAT, order, verify."""

from __future__ import annotations

from scheduler.cpsat import pack
from scheduler.order import Pack, choose_groups, group_problems, make_pack, order_packs
from scheduler.problem import Job, Microbatch, Plan, PlanStats, SolverParams, padded_size, validate_problem, waste_fraction
from scheduler.verify import verify

__all__ = ["plan"]


def plan(
    jobs: list[Job],
    capacity_tokens: int,
    pipeline_depth: int,
    pad_multiple: int,
    time_limit_s: float = 1.0,
    num_workers: int = 2,
    seed: int = 0,
    deterministic: bool = True,
) -> Plan:
    """Pack and order every global batch of `jobs` into one verified microbatch stream.

    capacity_tokens: padded tokens per microbatch. pipeline_depth: S, microbatches between the end of a
    job's global batch and the start of its next (pipeline stages x data-parallel ranks in flight).
    pad_multiple: each job's tokens in a microbatch are padded to a multiple of it (kernel tile rows).
    time_limit_s, num_workers, seed, deterministic: CP-SAT settings per (global batch, group) solve,
    see `SolverParams`. The same arguments give the same plan.
    """
    validate_problem(jobs, capacity_tokens, pipeline_depth, pad_multiple)
    params = SolverParams(time_limit_s=time_limit_s, num_workers=num_workers, seed=seed, deterministic=deterministic)
    groups = choose_groups(jobs, capacity_tokens, pipeline_depth, pad_multiple)
    by_name = {job.name: job for job in jobs}
    problems = [group_problems([by_name[name] for name in group], capacity_tokens, pad_multiple) for group in groups]
    packs: list[list[Pack]] = [[] for _ in groups]
    times: list[float] = []
    statuses: list[str] = []
    for g in range(max(map(len, problems))):  # global batch major, so stats read in stream order
        for gi, group_problem in enumerate(problems):
            if g < len(group_problem):
                packing = pack(group_problem[g], params)
                packs[gi].append(make_pack(group_problem[g], packing.bins, gi, g))
                times.append(packing.solve_time_s)
                statuses.append(packing.status)
    microbatches = order_packs(packs, pipeline_depth=pipeline_depth, capacity_tokens=capacity_tokens,
                               pad_multiple=pad_multiple)
    real = sum(n for job in jobs for batch in job.global_batches for n in batch)
    padded = _padded_tokens(microbatches, by_name, pad_multiple)
    stats = PlanStats(
        num_microbatches=len(microbatches),
        num_noops=sum(mb.is_noop for mb in microbatches),
        real_tokens=real,
        padded_tokens=padded,
        waste_fraction=waste_fraction(real, len(microbatches), capacity_tokens),
        groups=groups,
        solve_times_s=times,
        solver_statuses=statuses,
    )
    result = Plan(microbatches, stats)
    verify(result, jobs, capacity_tokens=capacity_tokens, pipeline_depth=pipeline_depth, pad_multiple=pad_multiple)
    return result


def _padded_tokens(microbatches: list[Microbatch], by_name: dict[str, Job], pad_multiple: int) -> int:
    total = 0
    for mb in microbatches:
        tokens: dict[str, int] = {}
        for job, g, i in mb.samples:
            tokens[job] = tokens.get(job, 0) + by_name[job].global_batches[g][i]
        total += padded_size(tokens, pad_multiple)
    return total
