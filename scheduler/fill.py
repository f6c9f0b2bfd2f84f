"""Position-by-position filling: a second way to build a window's stream, without packing rounds first.

Packing each (group, global batch) on its own leaves a remainder per pack, and which global batches
meet in a microbatch is fixed before the ordering sees the distance rule. Filling builds the stream in
order instead: at each position, the samples of every job allowed there (its current global batch, once
`ready` lets it start) are candidates, and an exact subset sum takes the set that fills the capacity
most, preferring samples in the order `FILL_ORDERS` names. A job whose global batch is used up may start
the next one S positions later; a position where no job is allowed is a no-op.

Tokens only: with pad_multiple > 1 or a cost capacity the planner does not use it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from scheduler.bound import WindowProblem
from scheduler.greedy import subset_sum
from scheduler.problem import Item, Microbatch, SampleRef

__all__ = ["FILL_ORDERS", "fill"]

FILL_ORDERS = ("critical", "started", "shortest")
"""Which samples a position prefers among the equally full choices:
critical: jobs with the most work left in the window first (remaining tokens, then the least microbatches
and S - 1 gaps of their later global batches), longer samples first; started: global batches already
started first (finish them, so their next one may start), longer first; shortest: shorter samples first
(keeps long ones together for later positions). On bench_scheduler's windows each was the best of the
three on some windows."""

JITTER_MICROBATCHES = 2.0
"""With an rng, `critical` adds up to this much random work (in microbatches) to each sample's job's: jobs whose
work differs by less may swap places."""


class _Chain:
    """One job's global batches in the window, consumed in order."""

    def __init__(self, problem: WindowProblem, job: str) -> None:
        batches: dict[int, list[Item]] = {g: [] for g in problem.chains[job]}
        for item in problem.items:
            if item.job == job:
                batches[item.global_batch].append(item)
        self.batches = [batches[g] for g in problem.chains[job]]
        self.least = [problem.least[(job, g)] for g in problem.chains[job]]
        self.current = 0
        self.left = list(self.batches[0])
        self.started = False
        self.ready = problem.ready.get(job, 0)

    def take(self, items: list[Item], position: int, depth: int) -> None:
        """Remove `items` (placed at `position`); when the global batch is used up, move to the next one."""
        for item in items:
            self.left.remove(item)
        self.started = True
        if not self.left:
            self.current += 1
            self.started = False
            self.ready = position + depth
            self.left = list(self.batches[self.current]) if self.current < len(self.batches) else []

    def work(self, capacity: int, depth: int) -> float:
        """Microbatches of the chain still ahead, gaps included (a lower estimate)."""
        later = range(self.current + 1, len(self.batches))
        return sum(item.length for item in self.left) / capacity + sum(self.least[g] + depth - 1 for g in later)


def fill(problem: WindowProblem, order: str, rng: random.Random | None = None) -> list[Microbatch]:
    """The window's stream built position by position (see the module docstring); `order` from FILL_ORDERS.

    rng: a perturbed `order` (see `_preference`): each seed gives another stream, the same seed the same one.
    """
    if order not in FILL_ORDERS:
        raise ValueError(f"order={order!r} is not one of {FILL_ORDERS}")
    rank = None if rng is None else {item.ref: rng.random() for item in problem.items}
    chains = {job: _Chain(problem, job) for job in problem.chains}
    capacity, depth = problem.capacity_tokens, problem.pipeline_depth
    stream: list[Microbatch] = []
    while any(chain.left for chain in chains.values()):
        position = len(stream)
        allowed = {job: chain for job, chain in chains.items() if chain.left and chain.ready <= position}
        candidates = [item for chain in allowed.values() for item in chain.left]
        candidates.sort(key=_preference(order, allowed, capacity, depth, rank))
        chosen = [candidates[i] for i in sorted(subset_sum([item.length for item in candidates], capacity))]
        for job, chain in allowed.items():
            taken = [item for item in chosen if item.job == job]
            if taken:
                chain.take(taken, position, depth)
        stream.append(Microbatch(samples=sorted(item.ref for item in chosen), is_noop=not chosen))
    return stream


def _preference(order: str, allowed: dict[str, _Chain], capacity: int, depth: int,
                rank: dict[SampleRef, float] | None) -> Callable[[Item], tuple]:
    """Sort key of the candidates: preferred samples first (subset_sum uses later ones only where needed).

    rank[ref] ∈ [0, 1), when given, perturbs the order: `critical` adds JITTER_MICROBATCHES · rank to each
    sample's work; `started` and `shortest` sort by rank where they sort by length (so `shortest` becomes a
    random order)."""
    if order == "critical":
        work = {job: chain.work(capacity, depth) for job, chain in allowed.items()}
        if rank is not None:
            return lambda item: (-work[item.job] + JITTER_MICROBATCHES * rank[item.ref], -item.length, item.ref)
        return lambda item: (-work[item.job], -item.length, item.ref)
    if order == "started":
        if rank is not None:
            return lambda item: (not allowed[item.job].started, rank[item.ref], item.ref)
        return lambda item: (not allowed[item.job].started, -item.length, item.ref)
    if rank is not None:
        return lambda item: (rank[item.ref], item.ref)
    return lambda item: (item.length, item.ref)
