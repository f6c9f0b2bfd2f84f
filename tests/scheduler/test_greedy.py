"""First-fit decreasing: hand-checked packings and invariants."""

import random

import pytest

from scheduler import first_fit_decreasing


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
