"""CP-SAT packing of one (global batch, group of jobs) into microbatches.

    x[s, b] ∈ {0, 1}        sample s is in bin b
    k[a, b] ∈ ℕ             padded blocks of job a in bin b:  Σ_{s ∈ a} len_s · x[s, b] ≤ P · k[a, b]
    load[b] = Σ_a k[a, b] ≤ C // P
    with a cost budget:  u_blk · load[b] + Σ_s u_s · x[s, b] ≤ U   (integer cost units, see CostBudget)
    minimise, lexicographically: bins used; then the load of the last (smallest) bin; then Σ_b load[b]

Integer data only. First-fit decreasing gives the number of bins the model may use, the solution
hint and the fallback; the packing returned is never worse than greedy's (`packing_cost`).
The lexicographic objective is solved in two phases (bins alone proves optimal fast; the rest then
gets the time left), the OR-Tools way: fix the first objective's value, re-hint, re-minimise.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

from ortools.sat.python import cp_model

from scheduler.greedy import (
    bin_blocks,
    canonical_bins,
    first_fit_decreasing_padded,
    is_provably_optimal,
    lower_bounds,
    packing_cost,
)
from scheduler.problem import Packing, PackingProblem, SolverParams

__all__ = ["PackingModel", "build_model", "solve", "pack", "GREEDY_OPTIMAL"]

GREEDY_OPTIMAL = "GREEDY_OPTIMAL"
"""Status of a packing where greedy met the lower bound and CP-SAT was not run."""

_SOLVED = (cp_model.OPTIMAL, cp_model.FEASIBLE)


@dataclass
class PackingModel:
    """A built CP-SAT model (objective: bins used), its variables, and the greedy packing it was hinted with."""

    problem: PackingProblem
    model: cp_model.CpModel
    x: dict[tuple[int, int], cp_model.IntVar]
    """x[s, b]: sample s in bin b."""
    k: dict[tuple[int, int], cp_model.IntVar]
    """k[a, b]: padded blocks of job a in bin b."""
    used: list[cp_model.IntVar]
    """used[b]: bin b holds a sample; used bins come first."""
    load: list[cp_model.IntVar]
    """load[b]: padded blocks of bin b, non-increasing in b."""
    remainder: cp_model.IntVar
    """Blocks of the last used bin."""
    greedy_bins: list[list[int]]
    """The hint and the fallback."""


def build_model(problem: PackingProblem, greedy_bins: list[list[int]] | None = None) -> PackingModel:
    """The CP-SAT model of `problem`, with as many bins as greedy used, hinted with greedy's packing."""
    if greedy_bins is None:
        greedy_bins = first_fit_decreasing_padded(problem)
    greedy_bins = canonical_bins(problem, greedy_bins)
    model = cp_model.CpModel()

    # Data
    items, pad, capacity = problem.items, problem.pad_multiple, problem.capacity_blocks
    jobs = problem.jobs
    samples_of = {a: [s for s, item in enumerate(items) if item.job == job] for a, job in enumerate(jobs)}
    job_blocks = {a: -(-sum(items[s].length for s in samples_of[a]) // pad) for a in samples_of}
    S, B, A = range(len(items)), range(len(greedy_bins)), range(len(jobs))

    # Variables
    x = {(s, b): model.new_bool_var(f"x[{s},{b}]") for s in S for b in B}
    k = {(a, b): model.new_int_var(0, min(capacity, job_blocks[a]), f"k[{a},{b}]") for a in A for b in B}
    used = [model.new_bool_var(f"used[{b}]") for b in B]
    load = [model.new_int_var(0, capacity, f"load[{b}]") for b in B]
    remainder = model.new_int_var(0, capacity, "remainder")

    # Constraints
    for s in S:
        model.add_exactly_one(x[s, b] for b in B)
    for b in B:
        for a in A:
            model.add(sum(items[s].length * x[s, b] for s in samples_of[a]) <= pad * k[a, b])
        model.add(load[b] == sum(k[a, b] for a in A))
        model.add(load[b] <= capacity * used[b])
        model.add(sum(items[s].length * x[s, b] for s in S) <= pad * capacity * used[b])  # redundant cut
        if problem.budget is not None:
            budget = problem.budget
            model.add(budget.block_units * load[b] + sum(budget.item_units(items[s].length) * x[s, b] for s in S)
                      <= budget.capacity_units * used[b])
        for s in S:
            model.add_implication(x[s, b], used[b])
    for a in A:
        model.add(sum(k[a, b] for b in B) >= job_blocks[a])  # redundant: splitting a job only adds padding
    _break_symmetry(model, problem, x, used, load)
    last = [used[b] - (used[b + 1] if b + 1 < len(B) else 0) for b in B]  # 1 exactly at the last used bin
    for b in B:
        model.add(remainder >= load[b] - capacity * (1 - last[b]))

    # Objective (first phase; `solve` adds the others)
    model.minimize(sum(used))

    packing_model = PackingModel(problem, model, x, k, used, load, remainder, greedy_bins)
    _add_hint(packing_model, greedy_bins)
    return packing_model


def _break_symmetry(
    model: cp_model.CpModel,
    problem: PackingProblem,
    x: dict[tuple[int, int], cp_model.IntVar],
    used: list[cp_model.IntVar],
    load: list[cp_model.IntVar],
) -> None:
    """Bins are interchangeable, and so are samples of one job with equal length: fix one order of each."""
    B = range(len(used))
    for b in B[:-1]:
        model.add(used[b] >= used[b + 1])
        model.add(load[b] >= load[b + 1])
    previous: dict[tuple[str, int], int] = {}
    for s, item in enumerate(problem.items):
        twin = previous.get((item.job, item.length))
        if twin is not None:
            model.add(sum(b * x[twin, b] for b in B) <= sum(b * x[s, b] for b in B))
        previous[(item.job, item.length)] = s


def _add_hint(packing_model: PackingModel, bins: list[list[int]]) -> None:
    """Hint every variable with its value in `bins` (canonical, as the symmetry breaking needs)."""
    problem, model = packing_model.problem, packing_model.model
    jobs = problem.jobs
    model.clear_hints()
    where = {s: b for b, members in enumerate(bins) for s in members}
    for (s, b), var in packing_model.x.items():
        model.add_hint(var, where[s] == b)
    for (a, b), var in packing_model.k.items():
        members = bins[b] if b < len(bins) else []
        tokens = sum(problem.items[s].length for s in members if problem.items[s].job == jobs[a])
        model.add_hint(var, -(-tokens // problem.pad_multiple))
    for b, var in enumerate(packing_model.used):
        model.add_hint(var, b < len(bins))
    for b, var in enumerate(packing_model.load):
        model.add_hint(var, bin_blocks(problem, bins[b]) if b < len(bins) else 0)
    model.add_hint(packing_model.remainder, packing_cost(problem, bins)[1])


def solve(packing_model: PackingModel, params: SolverParams) -> Packing:
    """Minimise bins, then (bins fixed, re-hinted) the remainder and the padding; never worse than greedy.

    The second phase gets the time the first one left and adds constraints to `packing_model`, so a
    model is solved once. The status is OPTIMAL only when both phases proved optimality; statuses
    without a solution fall back to the greedy packing.
    """
    problem, greedy = packing_model.problem, packing_model.greedy_bins
    start = time.perf_counter()
    if len(greedy) == lower_bounds(problem)[0]:  # greedy's bin count is optimal: go to the second phase
        status, bins, spent = cp_model.OPTIMAL, greedy, 0.0
    else:
        status, bins, spent = _run(packing_model, params, params.time_limit_s)
    if bins is None:
        _warn_if_broken(packing_model, status)
        return Packing(greedy, status.name, time.perf_counter() - start)
    if len(bins) > 1:  # with one bin the remainder and the padding are fixed
        second = cp_model.UNKNOWN
        if params.time_limit_s > spent:
            _set_second_objective(packing_model, bins)
            second, refined, _ = _run(packing_model, params, params.time_limit_s - spent)
            _warn_if_broken(packing_model, second)
            bins = refined or bins
        status = cp_model.OPTIMAL if status == second == cp_model.OPTIMAL else cp_model.FEASIBLE
    if packing_cost(problem, bins) > packing_cost(problem, greedy):
        bins = greedy
    return Packing(bins, status.name, time.perf_counter() - start)


def _run(
    packing_model: PackingModel, params: SolverParams, time_limit_s: float
) -> tuple[cp_model.CpSolverStatus, list[list[int]] | None, float]:
    """One CP-SAT solve: (status, canonical bins or None without a solution, time spent)."""
    solver = cp_model.CpSolver()
    if params.deterministic:
        solver.parameters.max_deterministic_time = time_limit_s
        solver.parameters.interleave_search = params.num_workers > 1
    else:
        solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = params.num_workers
    solver.parameters.random_seed = params.seed
    status = solver.solve(packing_model.model)
    bins = _extract(packing_model, solver) if status in _SOLVED else None
    return status, bins, solver.deterministic_time if params.deterministic else solver.wall_time


def _set_second_objective(packing_model: PackingModel, bins: list[list[int]]) -> None:
    """Keep the number of bins of `bins`; minimise the last bin's load, then the padded blocks."""
    model, capacity = packing_model.model, packing_model.problem.capacity_blocks
    model.add(sum(packing_model.used) <= len(bins))
    remainder_weight = len(packing_model.load) * capacity + 1  # more than all padded blocks together
    model.minimize(remainder_weight * packing_model.remainder + sum(packing_model.load))
    _add_hint(packing_model, bins)


def _warn_if_broken(packing_model: PackingModel, status: cp_model.CpSolverStatus) -> None:
    """INFEASIBLE or MODEL_INVALID mean a bug here (greedy's packing satisfies the model): say so."""
    if status == cp_model.INFEASIBLE:
        warnings.warn("CP-SAT found the packing model infeasible; using the best packing known", RuntimeWarning)
    elif status == cp_model.MODEL_INVALID:
        detail = packing_model.model.validate()
        warnings.warn(f"CP-SAT rejected the packing model ({detail}); using the best packing known", RuntimeWarning)
    elif status not in (*_SOLVED, cp_model.UNKNOWN):
        raise RuntimeError(f"unexpected CP-SAT status {status}; OR-Tools may be newer than this code")


def _extract(packing_model: PackingModel, solver: cp_model.CpSolver) -> list[list[int]]:
    bins: dict[int, list[int]] = {}
    for (s, b), var in packing_model.x.items():
        if solver.boolean_value(var):
            bins.setdefault(b, []).append(s)
    return canonical_bins(packing_model.problem, [bins[b] for b in sorted(bins)])


def pack(problem: PackingProblem, params: SolverParams) -> Packing:
    """Greedy first; CP-SAT only when greedy's packing misses the lower bound."""
    start = time.perf_counter()
    greedy = first_fit_decreasing_padded(problem)
    if is_provably_optimal(problem, greedy):
        return Packing(greedy, GREEDY_OPTIMAL, time.perf_counter() - start)
    result = solve(build_model(problem, greedy), params)
    result.solve_time_s = time.perf_counter() - start
    return result
