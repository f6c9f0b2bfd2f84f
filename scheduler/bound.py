"""A provable floor: the fewest microbatches any valid schedule of one window can have.

A window is its jobs' global batches and ready[job], the first position of the window the job may take
(the carry-in of earlier windows, `WindowPlanner.ready`). A schedule is valid when every sample sits in
one microbatch, each microbatch's padded tokens fit the capacity, and a job's global batch g + 1 starts
≥ S microbatches after g ended (so no microbatch holds two global batches of one job). Its length counts
every microbatch up to the last one used, no-ops included.

Cheap bounds, each a theorem (C' = capacity rounded down to a multiple of P; m[j, g] = the fewest
microbatches (j, g) needs on its own, `greedy.lower_bounds` of its samples):
    tokens      N ≥ ceil(Σ_(j,g) pad_up(tokens(j, g)) / C')   (splitting a job's tokens only adds padding)
    bin packing N ≥ Martello-Toth L2 of all sample lengths      (a microbatch's raw tokens fit C'; covers
                                                                  the samples longer than C'/2, one each)
    chains      N ≥ ready[j] + Σ_g m[j, g] + (G_j − 1)·(S − 1)  (per job: its own microbatches and the
                                                                  S − 1 positions between its global batches)
CP-SAT then tries to refute N microbatches for N = cheap floor, cheap floor + 1, ... (`build_window_model`):

    x[s, q] ∈ {0, 1}     sample s at position q, q in the span [est(j, g), lft(j, g)] its chain leaves it
    y[j, g, q] ∈ {0, 1}  (j, g) present at q;  f[j, g] ≤ q ≤ l[j, g] when present
    Σ_s len_s · x[s, q] ≤ C'  (P > 1: blocks k[j, q], P·k[j, q] ≥ job j's tokens at q, Σ_j k[j, q] ≤ C'/P;
                              with a cost budget also block_units · blocks + Σ_s units_s · x[s, q] ≤ U)
    f[j, g + 1] ≥ l[j, g] + S,  f[j, first] ≥ ready[j],  l[j, g] ≤ N − 1

Each INFEASIBLE raises the floor by one; the first count CP-SAT does not refute in the time left is the
floor (OPTIMAL when it found a schedule of that length). Without the cost budget the floor is still a
floor under one: dropping a constraint can only lower the optimum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from scheduler.cost import CostBudget
from scheduler.greedy import lower_bounds
from scheduler.problem import Item, Job, PackingProblem, pad_up, validate_problem

__all__ = ["WindowProblem", "WindowModel", "Floor", "window_problem", "cheap_floor", "bin_packing_bound",
           "build_window_model", "solve_window_model", "window_floor"]

_Key = tuple[str, int]
"""(job, absolute global batch)."""


@dataclass(frozen=True)
class WindowProblem:
    """One window in integer units: its samples, each job's chain of global batches and the carry-in."""

    items: tuple[Item, ...]
    """Every sample, with its absolute global batch index."""
    chains: dict[str, range]
    """Absolute global batch indices of each job in the window, in order."""
    ready: dict[str, int]
    """First position each job may take (absent: 0)."""
    least: dict[_Key, int]
    """least[(job, g)]: microbatches (job, g) needs on its own (bin packing bound of its samples)."""
    capacity_tokens: int
    """Capacity rounded down to a multiple of pad_multiple (padded sizes are multiples of it)."""
    pad_multiple: int
    pipeline_depth: int
    budget: CostBudget | None = None

    def span(self, key: _Key, num_microbatches: int) -> tuple[int, int]:
        """[earliest first, latest last] position of (job, g) in num_microbatches positions: its chain's
        global batches before it must fit in front of it, those after it behind it."""
        job, g = key
        chain, step = self.chains[job], self.pipeline_depth - 1
        before = sum(self.least[(job, h)] + step for h in range(chain.start, g))
        after = sum(self.least[(job, h)] + step for h in range(g + 1, chain.stop))
        return self.ready.get(job, 0) + before, num_microbatches - 1 - after


@dataclass(frozen=True)
class Floor:
    """A lower bound on a window's microbatches and how it was obtained."""

    microbatches: int
    """No valid schedule of the window has fewer microbatches."""
    cheap: int
    """The best of the cheap bounds alone."""
    status: str
    """CHEAP: CP-SAT refuted no count (or did not run); PROVEN: it refuted every count below `microbatches`;
    OPTIMAL: a schedule of `microbatches` exists (found by CP-SAT, or the `upper` given)."""
    solve_time_s: float = 0.0
    """Wall time of the CP-SAT part."""


def window_problem(
    jobs: list[Job], *, capacity_tokens: int, pipeline_depth: int, pad_multiple: int = 1,
    ready: dict[str, int] | None = None, budget: CostBudget | None = None,
) -> WindowProblem:
    """The WindowProblem of a window's jobs (validated as `plan` validates them)."""
    validate_problem(jobs, capacity_tokens, pipeline_depth, pad_multiple, budget)
    capacity = capacity_tokens // pad_multiple * pad_multiple
    items, least = [], {}
    for job in jobs:
        for g, batch in enumerate(job.global_batches, start=job.first_global_batch):
            batch_items = tuple(Item(job.name, g, i, n) for i, n in enumerate(batch))
            items.extend(batch_items)
            least[(job.name, g)] = lower_bounds(PackingProblem(batch_items, capacity, pad_multiple, budget))[0]
    chains = {job.name: range(job.first_global_batch, job.first_global_batch + len(job.global_batches))
              for job in jobs}
    carry = {job: at for job, at in (ready or {}).items() if job in chains and at > 0}
    return WindowProblem(tuple(items), chains, carry, least, capacity, pad_multiple, pipeline_depth, budget)


def bin_packing_bound(sizes: list[int], capacity: int) -> int:
    """Martello and Toth's L2: for each K ≤ C/2, the items > C − K need a bin each, the items in
    (C/2, C − K] too, and the items in [K, C/2] fill what those leave before opening more bins."""
    best = 0
    for k in sorted({0, *(n for n in sizes if 2 * n <= capacity)}):
        alone = sum(n > capacity - k for n in sizes)
        big = [n for n in sizes if capacity - k >= n and 2 * n > capacity]
        medium = sum(n for n in sizes if k <= n and 2 * n <= capacity)
        left = medium - (len(big) * capacity - sum(big))
        best = max(best, alone + len(big) + max(0, -(-left // capacity)))
    return best


def cheap_floor(problem: WindowProblem) -> int:
    """The best of the tokens, bin packing and chains bounds (see the module docstring)."""
    tokens: dict[_Key, int] = {}
    for item in problem.items:
        tokens[(item.job, item.global_batch)] = tokens.get((item.job, item.global_batch), 0) + item.length
    capacity = problem.capacity_tokens
    by_tokens = -(-sum(pad_up(t, problem.pad_multiple) for t in tokens.values()) // capacity)
    packing = bin_packing_bound([item.length for item in problem.items], capacity)
    chains = max(problem.ready.get(job, 0) + sum(problem.least[(job, g)] for g in chain)
                 + (len(chain) - 1) * (problem.pipeline_depth - 1) for job, chain in problem.chains.items())
    return max(by_tokens, packing, chains)


@dataclass
class WindowModel:
    """The CP-SAT model of a window in `num_microbatches` positions; its solutions are the valid schedules."""

    problem: WindowProblem
    model: cp_model.CpModel
    num_microbatches: int
    x: dict[tuple[int, int], cp_model.IntVar]
    """x[s, q]: sample s at position q."""
    y: dict[tuple[str, int, int], cp_model.IntVar]
    """y[j, g, q]: global batch g of job j present at position q."""
    last: dict[_Key, cp_model.IntVar]
    """last[(j, g)]: the last position of global batch g of job j."""

    def positions(self, solver: cp_model.CpSolver) -> list[int]:
        """The position of every sample in the solver's solution."""
        where = [0] * len(self.problem.items)
        for (s, q), var in self.x.items():
            if solver.boolean_value(var):
                where[s] = q
        return where


def build_window_model(problem: WindowProblem, num_microbatches: int) -> WindowModel | None:
    """The window's model in `num_microbatches` positions (no objective); None when a chain cannot fit."""
    model = cp_model.CpModel()

    # Data
    N, S = num_microbatches, problem.pipeline_depth
    spans = {key: problem.span(key, N) for key in problem.least}
    if any(last - first + 1 < problem.least[key] for key, (first, last) in spans.items()):
        return None
    positions = {key: range(first, last + 1) for key, (first, last) in spans.items()}

    # Variables
    x = {(s, q): model.new_bool_var(f"x[{s},{q}]")
         for s, item in enumerate(problem.items) for q in positions[(item.job, item.global_batch)]}
    y = {(j, g, q): model.new_bool_var(f"y[{j},{g},{q}]") for (j, g), qs in positions.items() for q in qs}
    first = {key: model.new_int_var(*span, f"f[{key}]") for key, span in spans.items()}
    last = {key: model.new_int_var(*span, f"l[{key}]") for key, span in spans.items()}

    # Constraints
    for s, item in enumerate(problem.items):
        key = (item.job, item.global_batch)
        model.add_exactly_one(x[s, q] for q in positions[key])
        for q in positions[key]:
            model.add_implication(x[s, q], y[(*key, q)])
    for (j, g), qs in positions.items():
        for q in qs:
            model.add(first[(j, g)] <= q).only_enforce_if(y[j, g, q])
            model.add(last[(j, g)] >= q).only_enforce_if(y[j, g, q])
        model.add(sum(y[j, g, q] for q in qs) >= problem.least[(j, g)])  # redundant: its own packing bound
        if g + 1 in problem.chains[j]:
            model.add(first[(j, g + 1)] >= last[(j, g)] + S)
    for q in range(N):
        _add_capacity(model, problem, [(s, item, x[s, q]) for s, item in enumerate(problem.items) if (s, q) in x], q)
        for j, chain in problem.chains.items():  # redundant: the spans are disjoint
            present = [y[j, g, q] for g in chain if (j, g, q) in y]
            if len(present) > 1:
                model.add_at_most_one(present)
    return WindowModel(problem, model, N, x, y, last)


def solve_window_model(built: WindowModel, time_limit_s: float, seed: int, *, probing: bool = True
                       ) -> tuple[cp_model.CpSolver, cp_model.CpSolverStatus]:
    """CP-SAT on `built` for `time_limit_s` deterministic seconds with one worker (the same input, the same
    answer); probing=False skips CP-SAT's probing (it can take most of the time to a first solution). Returns
    the solver (for the solution and the deterministic time spent) and the status; RuntimeError when CP-SAT
    rejects the model."""
    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = time_limit_s
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    if not probing:
        solver.parameters.cp_model_probing_level = 0
    status = solver.solve(built.model)
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError(f"CP-SAT rejected the window model: {built.model.validate()}")
    return solver, status


def _add_capacity(model: cp_model.CpModel, problem: WindowProblem, at_q: list, q: int) -> None:
    """Position q's padded tokens ≤ C' (raw tokens when P = 1, else padded blocks per job), and its cost."""
    pad, capacity, budget = problem.pad_multiple, problem.capacity_tokens, problem.budget
    tokens = sum(item.length * var for _, item, var in at_q)
    if pad == 1:
        blocks = tokens
        model.add(tokens <= capacity)
    else:
        per_job = []
        for job in problem.chains:
            job_tokens = [(item.length, var) for _, item, var in at_q if item.job == job]
            if job_tokens:
                k = model.new_int_var(0, capacity // pad, f"k[{job},{q}]")
                model.add(sum(n * var for n, var in job_tokens) <= pad * k)
                per_job.append(k)
        blocks = sum(per_job)
        model.add(blocks <= capacity // pad)
    if budget is not None:
        units = sum(budget.item_units(item.length) * var for _, item, var in at_q)
        model.add(budget.block_units * blocks + units <= budget.capacity_units)


def window_floor(
    jobs: list[Job], *, capacity_tokens: int, pipeline_depth: int, pad_multiple: int = 1,
    ready: dict[str, int] | None = None, upper: int | None = None, time_limit_s: float = 1.0, seed: int = 0,
) -> Floor:
    """The floor of a window (see the module docstring).

    ready[job]: first position of the window the job may take (`WindowPlanner.ready` before the window
    is planned). upper: microbatches of a known valid schedule; the search stops there. time_limit_s:
    CP-SAT deterministic seconds over all counts tried (one worker: the same input, the same floor).
    """
    problem = window_problem(jobs, capacity_tokens=capacity_tokens, pipeline_depth=pipeline_depth,
                             pad_multiple=pad_multiple, ready=ready)
    cheap = cheap_floor(problem)
    floor, status, spent, start = cheap, "CHEAP", 0.0, time.perf_counter()
    while (upper is None or floor < upper) and spent < time_limit_s:
        outcome, used = _refute(problem, floor, time_limit_s - spent, seed)
        spent += used
        if outcome != cp_model.INFEASIBLE:
            status = "OPTIMAL" if outcome in (cp_model.OPTIMAL, cp_model.FEASIBLE) else status
            break
        floor, status = floor + 1, "PROVEN"
    if floor == upper:
        status = "OPTIMAL"
    return Floor(floor, cheap, status, time.perf_counter() - start)


def _refute(problem: WindowProblem, num_microbatches: int, time_limit_s: float, seed: int
            ) -> tuple[cp_model.CpSolverStatus, float]:
    """(CP-SAT status of the window in num_microbatches positions, deterministic seconds spent)."""
    built = build_window_model(problem, num_microbatches)
    if built is None:
        return cp_model.INFEASIBLE, 0.0
    solver, status = solve_window_model(built, time_limit_s, seed)
    return status, solver.deterministic_time
