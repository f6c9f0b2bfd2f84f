"""First-fit decreasing bin packing: the simple packer and the CP-SAT solver's fallback and hint."""

from __future__ import annotations

__all__ = ["first_fit_decreasing"]


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
