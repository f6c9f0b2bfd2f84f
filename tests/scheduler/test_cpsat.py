"""CP-SAT packing: hand-checked optima, brute-force optima, every solver status, never worse than greedy."""

from __future__ import annotations

import random

import pytest
from ortools.sat.python import cp_model

from scheduler import cpsat
from scheduler.cpsat import GREEDY_OPTIMAL, build_model, pack, solve
from scheduler.greedy import bin_blocks, first_fit_decreasing_padded, packing_cost
from scheduler.problem import Item, PackingProblem, SolverParams

FAST = SolverParams(time_limit_s=5.0, num_workers=1)  # tiny models prove optimality in milliseconds


def _problem(jobs: dict[str, list[int]], capacity: int, pad: int) -> PackingProblem:
    items = tuple(Item(job, 0, i, n) for job, lengths in jobs.items() for i, n in enumerate(lengths))
    return PackingProblem(items, capacity, pad)


def _lengths(problem: PackingProblem, bins: list[list[int]]) -> list[list[int]]:
    return [sorted((problem.items[i].length for i in b), reverse=True) for b in bins]


# ------------------------------------------------------------------ hand-checked optima


def test_fewer_bins_than_first_fit_decreasing():
    # C=12: FFD puts 6+5, 4+3+3, 3 (3 bins); 6+3+3 and 5+4+3 fill two bins exactly.
    problem = _problem({"a": [6, 5, 4, 3, 3, 3]}, capacity=12, pad=1)
    assert len(first_fit_decreasing_padded(problem)) == 3
    result = pack(problem, FAST)
    assert result.status == "OPTIMAL"
    assert sorted(_lengths(problem, result.bins)) == [[5, 4, 3], [6, 3, 3]]
    assert packing_cost(problem, result.bins) == (2, 12, 24)


def test_padding_per_job_decides_the_packing():
    # P=4, C=8: FFD needs 3 bins (see test_greedy); a's 5 tokens = 2 blocks and b's 8 tokens = 2 blocks,
    # so keeping each job in its own bin gives 2 full bins, and 4 blocks is the least possible.
    problem = _problem({"a": [3, 2], "b": [3, 3, 2]}, capacity=8, pad=4)
    result = pack(problem, FAST)
    assert result.status == "OPTIMAL"
    assert sorted(result.bins) == [[0, 1], [2, 3, 4]]
    assert packing_cost(problem, result.bins) == (2, 2, 4)


def test_small_remainder():
    # C=10, items 7 4 4 1: 2 bins either way. FFD: 7+1, 4+4 (remainder 8). No subset sums to 10,
    # the best is 4+4+1 = 9, so the smallest possible remainder is {7}.
    problem = _problem({"a": [4, 1, 4, 7]}, capacity=10, pad=1)
    assert packing_cost(problem, first_fit_decreasing_padded(problem)) == (2, 8, 16)
    result = pack(problem, FAST)
    assert result.status == "OPTIMAL"
    assert result.bins == [[0, 1, 2], [3]]  # the remainder last
    assert packing_cost(problem, result.bins) == (2, 7, 16)


def test_greedy_at_the_lower_bound_skips_the_solver():
    problem = _problem({"a": [5, 5], "b": [3]}, capacity=16, pad=1)
    result = pack(problem, FAST)
    assert result.status == GREEDY_OPTIMAL
    assert result.bins == [[0, 1, 2]]


def _brute_force(problem: PackingProblem) -> tuple[int, int, int]:
    """The best packing_cost over every assignment of items to bins (tiny problems only)."""
    best: tuple[int, int, int] | None = None
    bins: list[list[int]] = []

    def place(i: int) -> None:
        nonlocal best
        if i == len(problem.items):
            cost = packing_cost(problem, bins)
            best = cost if best is None or cost < best else best
            return
        for b in [*bins, None]:
            if b is None:
                bins.append([i])
                place(i + 1)
                bins.pop()
            else:
                b.append(i)
                if bin_blocks(problem, b) <= problem.capacity_blocks:
                    place(i + 1)
                b.pop()

    place(0)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(12))
def test_optimum_matches_brute_force(seed):
    rng = random.Random(seed)
    capacity, pad = rng.choice([(8, 4), (12, 4), (10, 1), (16, 2)])
    jobs = {job: [rng.randint(1, capacity) for _ in range(rng.randint(1, 4))] for job in "abc"[: rng.randint(1, 3)]}
    problem = _problem(jobs, capacity, pad)
    result = pack(problem, FAST)
    assert result.status in ("OPTIMAL", GREEDY_OPTIMAL)
    assert packing_cost(problem, result.bins) == _brute_force(problem)


# ------------------------------------------------------------------ model, hint, statuses


def test_hint_is_a_complete_feasible_solution():
    problem = _problem({"a": [6, 5, 4, 3, 3, 3], "b": [7, 2, 2]}, capacity=12, pad=2)
    model = build_model(problem)
    solver = cp_model.CpSolver()
    solver.parameters.fix_variables_to_their_hinted_value = True
    solver.parameters.num_workers = 1
    assert solver.solve(model.model) == cp_model.OPTIMAL  # the only assignment left is the hint
    assert solver.objective_value == len(model.greedy_bins)


def test_variables_named_like_the_maths():
    model = build_model(_problem({"a": [3, 2], "b": [4]}, capacity=8, pad=4))
    assert model.x[1, 0].name == "x[1,0]"
    assert model.k[1, 0].name == "k[1,0]"
    assert len(model.x) == 3 * len(model.greedy_bins)


def _medium_problem(seed: int) -> PackingProblem:
    rng = random.Random(seed)
    jobs = {f"j{j}": [max(1, min(4096, int(rng.lognormvariate(0, 0.6) * rng.choice([200, 600, 1500]))))
                      for _ in range(16)] for j in range(4)}
    return _problem(jobs, capacity=4096, pad=128)


def test_unknown_status_falls_back_to_greedy():
    problem = _medium_problem(1)  # greedy 14 bins, lower bound 13: the first phase has to run
    result = solve(build_model(problem), SolverParams(time_limit_s=1e-9, num_workers=1))
    assert result.status == "UNKNOWN"
    assert result.bins == first_fit_decreasing_padded(problem)


def test_infeasible_model_falls_back_to_greedy_with_a_warning():
    problem = _problem({"a": [6, 5, 4, 3, 3, 3]}, capacity=12, pad=1)
    model = build_model(problem)
    model.model.add(sum(model.used) == 0)  # no bin may be used: nothing fits
    with pytest.warns(RuntimeWarning, match="infeasible"):
        result = solve(model, FAST)
    assert result.status == "INFEASIBLE"
    assert result.bins == model.greedy_bins


def test_invalid_model_falls_back_to_greedy_with_a_warning():
    problem = _problem({"a": [6, 5, 4, 3, 3, 3]}, capacity=12, pad=1)
    model = build_model(problem)
    model.model.add(model.used[0] * 2**62 + model.used[1] * 2**62 <= 1)  # may overflow int64
    with pytest.warns(RuntimeWarning, match="rejected the packing model"):
        result = solve(model, FAST)
    assert result.status == "MODEL_INVALID"
    assert result.bins == model.greedy_bins


def test_feasible_but_worse_than_greedy_returns_greedy(monkeypatch):
    problem = _problem({"a": [6, 5, 4, 3, 3, 3]}, capacity=12, pad=1)
    one_per_bin = [[i] for i in range(len(problem.items))]
    monkeypatch.setattr(cpsat, "_extract", lambda model, solver: one_per_bin)
    result = solve(build_model(problem), FAST)
    assert result.status in ("OPTIMAL", "FEASIBLE")
    assert result.bins == first_fit_decreasing_padded(problem)


def test_time_limit_leaves_a_feasible_packing():
    # Greedy's 20 bins meet the bound, so only the second phase runs, and it cannot prove the
    # remainder and padding optimal in 0.05 s.
    problem = _medium_problem(0)
    result = solve(build_model(problem), SolverParams(time_limit_s=0.05, num_workers=1))
    assert result.status == "FEASIBLE"
    assert packing_cost(problem, result.bins) <= packing_cost(problem, first_fit_decreasing_padded(problem))


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_greedy(seed):
    problem = _medium_problem(seed)
    result = pack(problem, SolverParams(time_limit_s=0.1, num_workers=2))
    greedy = first_fit_decreasing_padded(problem)
    assert packing_cost(problem, result.bins) <= packing_cost(problem, greedy)
    assert sorted(i for b in result.bins for i in b) == list(range(len(problem.items)))
    assert all(bin_blocks(problem, b) <= problem.capacity_blocks for b in result.bins)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_same_problem_same_packing(num_workers):
    problem = _medium_problem(3)
    params = SolverParams(time_limit_s=0.1, num_workers=num_workers, seed=7)
    first, second = pack(problem, params), pack(problem, params)
    assert (first.bins, first.status) == (second.bins, second.status)


def test_wall_clock_mode_respects_the_limit():
    problem = _medium_problem(1)
    result = pack(problem, SolverParams(time_limit_s=0.2, num_workers=2, deterministic=False))
    assert result.solve_time_s < 2.0
    assert packing_cost(problem, result.bins) <= packing_cost(problem, first_fit_decreasing_padded(problem))
