"""First-fit decreasing, plain and padded per job: hand-checked packings and invariants."""

import random

import pytest

from scheduler import first_fit_decreasing
from scheduler.greedy import (
    bin_blocks,
    canonical_bins,
    first_fit_decreasing_padded,
    is_provably_optimal,
    packing_cost,
)
from scheduler.problem import Item, PackingProblem


def test_hand_checked_packing():
    # sizes 7,5,4,3,1 into 10: FFD puts 7+3, 5+4+1.
    bins = first_fit_decreasing([4, 7, 1, 5, 3], capacity=10)
    assert sorted(map(sorted, bins)) == [[0, 2, 3], [1, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_every_item_once_and_within_capacity(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 100) for _ in range(60)]
    bins = first_fit_decreasing(sizes, capacity=128)
    assert sorted(i for b in bins for i in b) == list(range(60))
    assert all(sum(sizes[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 2 * -(-sum(sizes) // 128)  # FFD never needs more than twice the optimum


def test_errors_name_the_item_and_the_fix():
    with pytest.raises(ValueError, match=r"item 1 has size 20 > capacity 10"):
        first_fit_decreasing([5, 20], capacity=10)
    with pytest.raises(ValueError, match="capacity=0"):
        first_fit_decreasing([1], capacity=0)


# ------------------------------------------------- padded packing (the CP-SAT fallback and hint)


def _problem(jobs: dict[str, list[int]], capacity: int, pad: int) -> PackingProblem:
    items = tuple(Item(job, 0, i, n) for job, lengths in jobs.items() for i, n in enumerate(lengths))
    return PackingProblem(items, capacity, pad)


def test_padded_ffd_counts_each_jobs_padding():
    # P=4, C=8 (2 blocks). Taken a3 b3 b3 a2 b2: a3+b3 fill bin 0 (1 block each); the second b3 opens
    # bin 1, a2 joins it; b2 would make b's 5 tokens there 2 blocks, so it opens bin 2. Packing by job
    # needs 2: {a3, a2} = 5 tokens = 2 blocks, {b3, b3, b2} = 8 tokens = 2 blocks (see test_cpsat).
    problem = _problem({"a": [3, 2], "b": [3, 3, 2]}, capacity=8, pad=4)
    bins = first_fit_decreasing_padded(problem)
    assert bins == [[0, 2], [1, 3], [4]]
    assert packing_cost(problem, bins) == (3, 1, 5)
    assert not is_provably_optimal(problem, bins)


def test_padded_ffd_shares_a_block_within_a_job():
    # a3 + a1 = 4 tokens = one block of 4; b3 + b1 another: one bin of 2 blocks.
    problem = _problem({"a": [3, 1], "b": [3, 1]}, capacity=8, pad=4)
    assert first_fit_decreasing_padded(problem) == [[0, 1, 2, 3]]
    assert is_provably_optimal(problem, [[0, 1, 2, 3]])


def test_bin_blocks_pads_each_job_separately():
    problem = _problem({"a": [5, 2], "b": [1]}, capacity=16, pad=4)
    assert bin_blocks(problem, [0, 1, 2]) == 2 + 1  # a: 7 tokens -> 2 blocks, b: 1 -> 1 block
    assert bin_blocks(problem, []) == 0


def test_canonical_bins_orders_bins_and_twins():
    # Items 1 and 2 are twins (same job, same length): the lower index goes to the earlier bin.
    problem = _problem({"a": [6, 3, 3, 1]}, capacity=10, pad=1)
    assert canonical_bins(problem, [[1, 3], [0, 2]]) == [[0, 1], [2, 3]]  # loads 9, 4; twins swapped
    assert canonical_bins(problem, [[3], [], [0, 1, 2]]) == [[0, 1, 2], [3]]


def test_provably_optimal_needs_every_bound():
    problem = _problem({"a": [4, 1, 4, 7]}, capacity=10, pad=1)
    assert not is_provably_optimal(problem, [[0, 2], [1, 3]])  # remainder 8, but {7} | {4,4,1} leaves 7
    # No two items above half a bin share one: three bins are the bound, not ceil(18 / 10) = 2.
    big = _problem({"a": [6, 6, 6]}, capacity=10, pad=1)
    assert is_provably_optimal(big, [[0], [1], [2]])


@pytest.mark.parametrize("seed", range(5))
def test_padded_ffd_invariants(seed):
    rng = random.Random(seed)
    jobs = {f"j{j}": [rng.randint(1, 60) for _ in range(rng.randint(1, 12))] for j in range(4)}
    problem = _problem(jobs, capacity=64, pad=rng.choice([1, 4, 8]))
    bins = first_fit_decreasing_padded(problem)
    assert sorted(i for b in bins for i in b) == list(range(len(problem.items)))
    assert all(bin_blocks(problem, b) <= problem.capacity_blocks for b in bins)
    assert canonical_bins(problem, bins) == bins
