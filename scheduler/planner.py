"""`plan`: group the jobs, pack every (global batch, group) with CP-SAT, order, compact, shorten, verify.
`WindowPlanner`: the same, a few global batches at a time, for a runtime whose jobs join and leave;
`window_global_batches`: how many global batches such a window takes."""

from __future__ import annotations

import copy
import dataclasses
import math

from scheduler.bound import window_problem
from scheduler.compact import compact
from scheduler.cost import CostBudget, CostModel
from scheduler.cpsat import pack
from scheduler.greedy import first_fit_decreasing_padded, is_provably_optimal
from scheduler.improve import SHORTEN_TIME_LIMIT_S, shorten
from scheduler.order import Pack, choose_groups, group_problems, make_pack, order_packs
from scheduler.problem import (Job, Plan, PlanStats, SolverParams, positive_int, validate_limits, validate_problem,
                               waste_fraction)
from scheduler.simulate import microbatch_lengths, microbatch_padded_tokens
from scheduler.verify import cost_budget, verify

__all__ = ["plan", "WindowPlanner", "window_global_batches", "WINDOW_MICROBATCHES_PER_SLOT",
           "MIN_WINDOW_MICROBATCHES", "MAX_WINDOW_GLOBAL_BATCHES"]

WINDOW_MICROBATCHES_PER_SLOT = 16
"""A window holds at least this many microbatches per pipeline slot (stages x replicas): the 1F1B fill and
drain at its ends cost ~S - 1 slots, so 16 per slot keeps that under ~1/16 of the window."""

MIN_WINDOW_MICROBATCHES = 64
"""A window holds at least this many microbatches, however few slots: its last microbatches are partly empty
(the next window's samples cannot join them) and each (job, global batch) packed apart leaves a remainder.
bench_scheduler at one stage (4 jobs, 8 global batches each): windows of one global batch wasted 2.5-10.9%
of the capacity (5 of 10 cases over 5%), windows of 4 at most 3.8%."""

MAX_WINDOW_GLOBAL_BATCHES = 16
"""At most this many global batches of each job per window (jobs join and leave between windows)."""


def window_global_batches(round_tokens: int, capacity_tokens: int, slots: int,
                          most: int = MAX_WINDOW_GLOBAL_BATCHES) -> int:
    """Global batches of each job in the next window: enough for max(WINDOW_MICROBATCHES_PER_SLOT x slots,
    MIN_WINDOW_MICROBATCHES) microbatches, at most `most`. round_tokens: the tokens of one global batch of every
    job in the window (its next one); slots: pipeline stages x data-parallel replicas."""
    positive_int("round_tokens", round_tokens, "the tokens of the window's next global batch of every job")
    positive_int("capacity_tokens", capacity_tokens, "4096")
    positive_int("slots", slots, "4 (pipeline stages x data-parallel replicas)")
    positive_int("most", most, str(MAX_WINDOW_GLOBAL_BATCHES))
    wanted = max(WINDOW_MICROBATCHES_PER_SLOT * slots, MIN_WINDOW_MICROBATCHES)
    return min(most, math.ceil(wanted / math.ceil(round_tokens / capacity_tokens)))


def plan(
    jobs: list[Job],
    capacity_tokens: int,
    pipeline_depth: int,
    pad_multiple: int,
    time_limit_s: float = 1.0,
    num_workers: int = 1,
    seed: int = 0,
    deterministic: bool = True,
    cost_model: CostModel | None = None,
    capacity_cost: float | None = None,
    shorten_time_limit_s: float = SHORTEN_TIME_LIMIT_S,
) -> Plan:
    """Pack and order every global batch of `jobs` into one verified microbatch stream.

    capacity_tokens: padded tokens per microbatch. pipeline_depth: S, microbatches between the end of a
    job's global batch and the start of its next (pipeline stages x data-parallel ranks in flight).
    pad_multiple: each job's tokens in a microbatch are padded to a multiple of it (kernel tile rows).
    time_limit_s, num_workers, seed, deterministic: CP-SAT settings per (global batch, group) solve,
    see `SolverParams`. cost_model, capacity_cost: a second capacity, in cost units (see `CostModel`);
    each microbatch must fit both. shorten_time_limit_s: CP-SAT deterministic seconds of the whole-run step
    of `improve.shorten` (0 skips that step). The same arguments give the same plan.
    """
    params = SolverParams(time_limit_s=time_limit_s, num_workers=num_workers, seed=seed, deterministic=deterministic)
    budget = cost_budget(cost_model, capacity_cost, pad_multiple)
    result = _plan(jobs, capacity_tokens, pipeline_depth, pad_multiple, params, budget, ready={},
                   shorten_time_limit_s=_check_time(shorten_time_limit_s))
    verify(result, jobs, capacity_tokens=capacity_tokens, pipeline_depth=pipeline_depth, pad_multiple=pad_multiple,
           cost_model=cost_model, capacity_cost=capacity_cost)
    return result


def _plan(
    jobs: list[Job], capacity_tokens: int, pipeline_depth: int, pad_multiple: int, params: SolverParams,
    budget: CostBudget | None, ready: dict[str, int], windowed: bool = False, shorten_time_limit_s: float = 0.0,
    keep_carry: bool = False,
) -> Plan:
    """An unverified plan whose jobs may start no earlier than ready[job] (see `order_packs`); `windowed`:
    more windows like this one follow, so the grouping is chosen for a stream of two of them;
    shorten_time_limit_s: see `plan`; keep_carry: see `improve.shorten`."""
    validate_problem(jobs, capacity_tokens, pipeline_depth, pad_multiple, budget)
    groups = choose_groups(jobs, capacity_tokens, pipeline_depth, pad_multiple, budget, ready,
                           repeat=2 if windowed else 1)
    by_name = {job.name: job for job in jobs}
    problems = [group_problems([by_name[name] for name in group], capacity_tokens, pad_multiple, budget)
                for group in groups]
    if windowed:  # the window's time limit is shared by the packings greedy cannot prove optimal
        hard = sum(not is_provably_optimal(problem, first_fit_decreasing_padded(problem))
                   for group_problem in problems for problem in group_problem)
        params = dataclasses.replace(params, time_limit_s=params.time_limit_s / max(hard, 1))
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
                               pad_multiple=pad_multiple, budget=budget, ready=ready)
    lengths = {(job.name, g, i): n for job in jobs
               for g, batch in enumerate(job.global_batches, start=job.first_global_batch) for i, n in enumerate(batch)}
    microbatches = compact(microbatches, lengths, pipeline_depth=pipeline_depth, capacity_tokens=capacity_tokens,
                           pad_multiple=pad_multiple, budget=budget, ready=ready)
    problem = window_problem(jobs, capacity_tokens=capacity_tokens, pipeline_depth=pipeline_depth,
                             pad_multiple=pad_multiple, ready=ready, budget=budget)
    microbatches = shorten(microbatches, problem, time_limit_s=shorten_time_limit_s, seed=params.seed,
                           keep_carry=keep_carry)
    real = sum(n for job in jobs for batch in job.global_batches for n in batch)
    padded = sum(microbatch_padded_tokens(microbatches, microbatch_lengths(microbatches, jobs), pad_multiple))
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
    return Plan(microbatches, stats)


class WindowPlanner:
    """Plans a running fit window by window: each call gets the active jobs with the global batches of
    the next window only, and returns that window's verified Plan.

    The planner remembers where each job's last global batch ended in the stream (positions counted
    over all windows, no-ops included), so a job's first microbatch in a window is still ≥ pipeline_depth
    after its last one in an earlier window. Jobs may join (first_global_batch anything) or leave
    between windows; a job that comes back must continue at the global batch after its last one.
    Arguments as `plan`, except time_limit_s: the CP-SAT limit of a whole window, shared evenly by its
    packings that greedy cannot prove optimal (deterministic time when `deterministic`, see SolverParams).
    The default 0.2 took 0.55 s of CPU (median, max 0.79; compaction and levelling ~0.05 s of it) per window
    of 8 jobs x 16 samples, capacity 8192, S=4, on an idle 2-core EPYC (benchmarks/bench_scheduler.py,
    solve_8x16); 0.3 took 0.79 s (max 1.11), over the 1 s a window may take, for about the same waste.
    shorten_time_limit_s: see `plan`; with the default, solve_8x16 took 0.60-0.62 s (max 0.77-0.80) where the
    planner without the shorten step took 0.68-0.73 s (max 0.79-1.04), side by side on the same 2-core EPYC
    shared with other work (load ~2.7; the bench run at commit 2198c01 there: 0.72 s, max 0.96); with the
    perturbed fills of commit d8eaf15, 0.76 s (max 0.93) in the bench run, again on a shared machine.
    """

    def __init__(
        self, *, capacity_tokens: int, pipeline_depth: int, pad_multiple: int = 1, time_limit_s: float = 0.2,
        num_workers: int = 1, seed: int = 0, deterministic: bool = True,
        cost_model: CostModel | None = None, capacity_cost: float | None = None,
        shorten_time_limit_s: float = SHORTEN_TIME_LIMIT_S,
    ) -> None:
        validate_limits(capacity_tokens, pipeline_depth, pad_multiple)
        self.shorten_time_limit_s = _check_time(shorten_time_limit_s)
        """CP-SAT deterministic seconds of a window's whole-window step (`improve.shorten`; 0 skips it)."""
        self.params = SolverParams(time_limit_s=time_limit_s, num_workers=num_workers, seed=seed,
                                   deterministic=deterministic)
        self.budget = cost_budget(cost_model, capacity_cost, pad_multiple)
        self.limits = dict(capacity_tokens=capacity_tokens, pipeline_depth=pipeline_depth, pad_multiple=pad_multiple)
        """capacity_tokens, pipeline_depth and pad_multiple, as given (keyword arguments of `verify`)."""
        self.cost = dict(cost_model=cost_model, capacity_cost=capacity_cost)
        """cost_model and capacity_cost, as given (keyword arguments of `verify`)."""
        self.position = 0
        """Microbatches planned so far, all windows together."""
        self._ready: dict[str, int] = {}  # job -> first stream position its next global batch may take
        self._next_batch: dict[str, int] = {}  # job -> the global batch it must continue with

    def with_capacity(self, capacity_tokens: int) -> "WindowPlanner":
        """A planner that continues this stream (same position, carry-over and global-batch order) but packs its
        later windows into `capacity_tokens`; this planner is left as it is. The runtime tries several
        capacities on a window and keeps the planner of the one it picks."""
        validate_limits(capacity_tokens, self.limits["pipeline_depth"], self.limits["pad_multiple"])
        other = copy.copy(self)
        other.limits = dict(self.limits, capacity_tokens=capacity_tokens)
        other._ready, other._next_batch = dict(self._ready), dict(self._next_batch)
        return other

    @property
    def ready(self) -> dict[str, int]:
        """ready[job]: the first position of the next window the job may take (the distance rule after
        its last global batch in earlier windows); jobs free from position 0 are left out."""
        return {job: at - self.position for job, at in self._ready.items() if at > self.position}

    def next_window(self, jobs: list[Job], *, last: bool = False) -> Plan:
        """The verified plan of `jobs`' global batches, to run right after the previous window. last: no
        window follows, so how late the jobs end does not matter (see `improve.shorten`'s keep_carry)."""
        for job in jobs:
            expected = self._next_batch.get(getattr(job, "name", None))
            if expected is not None and job.first_global_batch != expected:
                raise ValueError(
                    f"job {job.name!r} first_global_batch={job.first_global_batch}, but its previous window ended "
                    f"at global batch {expected - 1}; give it first_global_batch={expected}"
                )
        ready = self.ready
        window = _plan(jobs, **self.limits, params=self.params, budget=self.budget, ready=ready, windowed=True,
                       shorten_time_limit_s=self.shorten_time_limit_s, keep_carry=not last)
        verify(window, jobs, **self.limits, **self.cost)
        _check_ready(window, ready)
        depth = self.limits["pipeline_depth"]
        for pos, mb in enumerate(window.microbatches, start=self.position):
            for job, _, _ in mb.samples:
                self._ready[job] = pos + depth
        for job in jobs:
            self._next_batch[job.name] = job.first_global_batch + len(job.global_batches)
        self.position += len(window.microbatches)
        self._ready = {job: at for job, at in self._ready.items() if at > self.position}
        return window


def _check_time(seconds: float) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"shorten_time_limit_s={seconds!r} must be a number of seconds ≥ 0, "
                         "e.g. 0.15 (0 skips the whole-window CP-SAT step)")
    return float(seconds)


def _check_ready(window: Plan, ready: dict[str, int]) -> None:
    """Every job's first microbatch at or after the position the previous windows allow."""
    for pos, mb in enumerate(window.microbatches):
        for job, g, _ in mb.samples:
            if pos < ready.get(job, 0):
                raise ValueError(f"job {job!r} global batch {g} starts at microbatch {pos} of its window, before "
                                 f"{ready[job]}, which the distance rule after the previous window needs")
