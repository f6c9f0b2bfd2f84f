"""First-fit decreasing bin packing: the simple packer and the CP-SAT solver's fallback and hint."""

from __future__ import annotations

from collections import defaultdict

from scheduler.problem import PackingProblem

__all__ = [
    "first_fit_decreasing",
    "first_fit_decreasing_padded",
    "bin_blocks",
    "packing_cost",
    "canonical_bins",
    "is_provably_optimal",
    "lower_bounds",
    "subset_sum",
]


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Pack item indices into bins of `capacity`; longest items first, each into the first bin it fits.

    Returns bins as lists of item indices (each bin's items in their original order).
    """
    if capacity <= 0:
        raise ValueError(f"capacity={capacity} must be a positive number of tokens")
    for index, size in enumerate(sizes):
        if size > capacity:
            raise ValueError(f"item {index} has size {size} > capacity {capacity}; raise the capacity or shorten it")
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for b, free in enumerate(room):
            if sizes[index] <= free:
                bins[b].append(index)
                room[b] -= sizes[index]
                break
        else:
            bins.append([index])
            room.append(capacity - sizes[index])
    return [sorted(b) for b in bins]


def bin_blocks(problem: PackingProblem, bin_items: list[int]) -> int:
    """Padded size of one bin in blocks of pad_multiple tokens (each job's tokens padded separately)."""
    tokens: dict[str, int] = defaultdict(int)
    for i in bin_items:
        tokens[problem.items[i].job] += problem.items[i].length
    return sum(-(-t // problem.pad_multiple) for t in tokens.values())


def packing_cost(problem: PackingProblem, bins: list[list[int]]) -> tuple[int, int, int]:
    """(bins, blocks of the smallest bin, padded blocks): compared lexicographically, smaller is better.

    The second term is the "small remainder": all bins but one full, so the one left over can be merged
    with another group's remainder when the microbatches are ordered. Padding breaks the remaining ties.
    """
    loads = [bin_blocks(problem, b) for b in bins]
    return (len(bins), min(loads, default=0), sum(loads))


def first_fit_decreasing_padded(problem: PackingProblem) -> list[list[int]]:
    """First-fit decreasing where an item's cost in a bin is the growth of its job's padded tokens there
    (and, with a cost budget, its attention units too).

    Returns canonical bins (see `canonical_bins`), so it can be used directly as a CP-SAT hint.
    """
    items, pad, budget = problem.items, problem.pad_multiple, problem.budget
    bins: list[list[int]] = []
    tokens: list[dict[str, int]] = []  # per bin: job -> tokens
    loads: list[int] = []  # per bin: padded blocks
    units: list[int] = []  # per bin: attention units of the budget
    for index in sorted(range(len(items)), key=lambda i: (-items[i].length, i)):
        item = items[index]
        extra = budget.item_units(item.length) if budget is not None else 0
        for b in range(len(bins)):
            before = tokens[b].get(item.job, 0)
            growth = -(-(before + item.length) // pad) - -(-before // pad)
            if _fits(problem, loads[b] + growth, units[b] + extra):
                break
        else:
            b, growth = len(bins), -(-item.length // pad)
            bins.append([])
            tokens.append({})
            loads.append(0)
            units.append(0)
        if not _fits(problem, loads[b] + growth, units[b] + extra):
            raise ValueError(f"item {index} has size {item.length} > capacity {problem.capacity_tokens}")
        bins[b].append(index)
        tokens[b][item.job] = tokens[b].get(item.job, 0) + item.length
        loads[b] += growth
        units[b] += extra
    return canonical_bins(problem, bins)


def _fits(problem: PackingProblem, blocks: int, units: int) -> bool:
    return blocks <= problem.capacity_blocks and (problem.budget is None or problem.budget.fits(blocks, units))


def canonical_bins(problem: PackingProblem, bins: list[list[int]]) -> list[list[int]]:
    """The same packing in the form the CP-SAT model's symmetry breaking expects.

    Bins by padded size, largest first (ties: smallest item index first); among interchangeable items
    (same job, same length) the lower index sits in the earlier bin; each bin's items ascending.
    """
    ordered = sorted((sorted(b) for b in bins if b), key=lambda b: (-bin_blocks(problem, b), b[0]))
    where = {i: position for position, b in enumerate(ordered) for i in b}
    classes: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, item in enumerate(problem.items):
        classes[(item.job, item.length)].append(i)
    for members in classes.values():
        for i, position in zip(members, sorted(where[i] for i in members)):
            where[i] = position
    result: list[list[int]] = [[] for _ in ordered]
    for i in sorted(where):
        result[where[i]].append(i)
    return result


def lower_bounds(problem: PackingProblem) -> tuple[int, int, int]:
    """Lower bounds on the three terms of `packing_cost`, each valid on its own.

    blocks ≥ Σ_jobs ceil(tokens/P) (splitting a job only adds padding); bins ≥ ceil(blocks/C), ≥ the
    number of items longer than half a bin (no two of them share one) and, with a cost budget, ≥ the
    least total cost over the capacity; smallest bin ≥ what is left after the other bins are full,
    and ≥ the smallest item.
    """
    tokens: dict[str, int] = defaultdict(int)
    for item in problem.items:
        tokens[item.job] += item.length
    capacity = problem.capacity_blocks
    blocks = sum(-(-t // problem.pad_multiple) for t in tokens.values())
    half_full = sum(2 * item.length > capacity * problem.pad_multiple for item in problem.items)
    num_bins = max(-(-blocks // capacity), half_full)
    budget = problem.budget
    if budget is not None:
        least = budget.block_units * blocks + sum(budget.item_units(item.length) for item in problem.items)
        num_bins = max(num_bins, -(-least // budget.capacity_units))
    smallest_item = min((-(-item.length // problem.pad_multiple) for item in problem.items), default=0)
    return num_bins, max(blocks - (num_bins - 1) * capacity, smallest_item), blocks


def is_provably_optimal(problem: PackingProblem, bins: list[list[int]]) -> bool:
    """True when `bins` meets every bound of `lower_bounds`, so no solver can do better."""
    return packing_cost(problem, bins) == lower_bounds(problem)


def subset_sum(sizes: list[int], room: int) -> set[int]:
    """Indices of a subset of `sizes` with the largest sum ≤ room (bitset dynamic programme, exact);
    among the best subsets, the one that uses the earliest indices (later items only where needed)."""
    if room < 0:
        return set()
    mask = (1 << (room + 1)) - 1
    reach = [1]
    for n in sizes:
        reach.append((reach[-1] | (reach[-1] << n)) & mask)
    total = reach[-1].bit_length() - 1
    chosen: set[int] = set()
    for i in reversed(range(len(sizes))):
        if not (reach[i] >> total) & 1:
            chosen.add(i)
            total -= sizes[i]
    return chosen
