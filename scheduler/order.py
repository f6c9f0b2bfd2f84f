"""Grouping jobs and ordering their packed microbatches into one stream.

A job's optimizer step runs after the backward of the last microbatch of its global batch, so its
next global batch may start only `pipeline_depth` (S) microbatches later:

    position(first microbatch of g + 1) - position(last microbatch of g) ≥ S

Jobs are split into groups; the microbatches of one (group, global batch) — a *pack* — are emitted
together, and the other groups' packs fill the distance. A pack's smallest bin (its remainder) may be
merged into an earlier microbatch with room, when its jobs are already allowed there. A no-op
microbatch is inserted only when no pack can be placed without breaking the rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from scheduler.cost import CostBudget
from scheduler.greedy import first_fit_decreasing_padded
from scheduler.problem import Job, Microbatch, PackingProblem, SampleRef, packing_problem, padded_size

__all__ = ["Pack", "make_pack", "group_jobs", "group_problems", "choose_groups", "order_packs"]


@dataclass
class Pack:
    """The bins of one (group, global batch), largest first; the last one is the remainder."""

    group: int
    global_batch: int
    bins: list[list[SampleRef]]
    tokens: list[dict[str, int]]
    """tokens[b][job]: that job's tokens in bin b."""
    units: list[int] = field(default_factory=list)
    """units[b]: attention units of bin b under the problem's cost budget (empty without one)."""


def make_pack(problem: PackingProblem, bins: list[list[int]], group: int, global_batch: int) -> Pack:
    """A Pack from a packing of `problem` (bins of item indices, in canonical order)."""
    refs = [[problem.items[i].ref for i in b] for b in bins]
    budget = problem.budget
    units = [] if budget is None else [sum(budget.item_units(problem.items[i].length) for i in b) for b in bins]
    tokens: list[dict[str, int]] = []
    for b in bins:
        per_job: dict[str, int] = {}
        for i in b:
            per_job[problem.items[i].job] = per_job.get(problem.items[i].job, 0) + problem.items[i].length
        tokens.append(per_job)
    return Pack(group, global_batch, refs, tokens, units)


def group_jobs(jobs: list[Job], num_groups: int) -> list[list[str]]:
    """Split jobs into `num_groups` groups that each mix long and short jobs.

    Jobs sorted by mean sample length are dealt out in serpentine order (0, 1, .., G-1, G-1, .., 0),
    so the longest job shares a group with the shortest ones: short samples fill the room long ones
    leave in a microbatch.
    """
    def mean_length(job: Job) -> float:
        lengths = [n for batch in job.global_batches for n in batch]
        return sum(lengths) / len(lengths)

    ranked = sorted(jobs, key=lambda job: (-mean_length(job), job.name))
    groups: list[list[str]] = [[] for _ in range(num_groups)]
    for rank, job in enumerate(ranked):
        lap, offset = divmod(rank, num_groups)
        groups[offset if lap % 2 == 0 else num_groups - 1 - offset].append(job.name)
    return [g for g in groups if g]


def choose_groups(
    jobs: list[Job], capacity_tokens: int, pipeline_depth: int, pad_multiple: int,
    budget: CostBudget | None = None, ready: dict[str, int] | None = None, repeat: int = 1,
) -> list[list[str]]:
    """The grouping whose greedy plan looks fastest.

    Estimated time: padded tokens, plus one average microbatch for every no-op (the pipeline waits
    about that long there); ties: fewer microbatches, then fewer groups. More than S groups never
    helps the distance rule (S - 1 other packs of at least one microbatch each already fill it), and
    fewer groups pack better, so 1..min(jobs, S) groups are tried. `ready`: see `order_packs`.
    repeat: evaluate the stream of the jobs' global batches run `repeat` times in a row; a window
    planner passes 2, so a grouping that leaves no-ops at the next window's start is charged for them.
    """
    by_name = {job.name: job for job in jobs}
    best: tuple[tuple[float, int, int], list[list[str]]] | None = None
    for num_groups in range(1, min(len(jobs), pipeline_depth) + 1):
        groups = group_jobs(jobs, num_groups)
        packs = [_greedy_packs([by_name[name] for name in group], gi, capacity_tokens, pad_multiple, budget)
                 for gi, group in enumerate(groups)]
        packs = [[dataclasses.replace(p, global_batch=p.global_batch + r * len(group_packs))
                  for r in range(repeat) for p in group_packs] for group_packs in packs]
        slots = _Stream(pipeline_depth, capacity_tokens, pad_multiple, budget, ready).run(packs)
        padded = sum(padded_size(slot.tokens, pad_multiple) for slot in slots)
        noops = sum(not slot.samples for slot in slots)
        estimate = padded * len(slots) / (len(slots) - noops)  # = padded + noops * mean padded per microbatch
        key = (estimate, len(slots), len(groups))
        if best is None or key < best[0]:
            best = (key, groups)
    assert best is not None  # at least one job, so at least one grouping was tried
    return best[1]


def _greedy_packs(
    jobs: list[Job], group: int, capacity_tokens: int, pad_multiple: int, budget: CostBudget | None
) -> list[Pack]:
    return [make_pack(problem, first_fit_decreasing_padded(problem), group, g)
            for g, problem in enumerate(group_problems(jobs, capacity_tokens, pad_multiple, budget))]


def group_problems(
    jobs: list[Job], capacity_tokens: int, pad_multiple: int, budget: CostBudget | None = None
) -> list[PackingProblem]:
    """One packing problem per round (each job's next global batch) of the group, while any job has one."""
    rounds = max(len(job.global_batches) for job in jobs)
    return [packing_problem(jobs, g, capacity_tokens, pad_multiple, budget) for g in range(rounds)]


def order_packs(
    packs: list[list[Pack]], *, pipeline_depth: int, capacity_tokens: int, pad_multiple: int,
    budget: CostBudget | None = None, ready: dict[str, int] | None = None,
) -> list[Microbatch]:
    """Interleave the groups' packs (packs[group] in global batch order) into one microbatch stream.

    ready[job]: the first position of this stream the job's first microbatch may take (a window
    planner's carry-over from the previous window; default 0).
    """
    slots = _Stream(pipeline_depth, capacity_tokens, pad_multiple, budget, ready).run(packs)
    return [Microbatch(samples=sorted(slot.samples), is_noop=not slot.samples) for slot in slots]


@dataclass
class _Slot:
    """One microbatch being built; no samples = a no-op."""

    samples: list[SampleRef] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    units: int = 0

    def add(self, samples: list[SampleRef], tokens: dict[str, int], units: int) -> None:
        self.samples.extend(samples)
        self.units += units
        for job, n in tokens.items():
            self.tokens[job] = self.tokens.get(job, 0) + n


@dataclass
class _Placement:
    """Where a pack's bins go: stream position of each bin (full bins in `order`, then the remainder)."""

    order: list[int]
    """Indices of the full bins in the order they are appended."""
    remainder_at: int | None
    """Position of an existing slot the remainder merges into; None: appended after the full bins."""


class _Stream:
    """List scheduling: repeatedly place the first pack (by global batch, then least recent group)
    whose jobs are all allowed at their first position; a no-op when none is."""

    def __init__(self, pipeline_depth: int, capacity_tokens: int, pad_multiple: int,
                 budget: CostBudget | None = None, ready: dict[str, int] | None = None) -> None:
        self.depth, self.capacity, self.pad, self.budget = pipeline_depth, capacity_tokens, pad_multiple, budget
        self.slots: list[_Slot] = []
        self.ready: dict[str, int] = dict(ready or {})  # job -> first position its next global batch may use

    def run(self, packs: list[list[Pack]]) -> list[_Slot]:
        heads = [0] * len(packs)
        last_turn = [-1] * len(packs)
        for turn in range(sum(map(len, packs))):
            gi, placement = self._next(packs, heads, last_turn)
            pack = packs[gi][heads[gi]]
            heads[gi] += 1
            last_turn[gi] = turn
            pending = [packs[g][heads[g]] for g in range(len(packs)) if heads[g] < len(packs[g])]
            if placement.remainder_at is not None and not self._merge_keeps_pace(pack, placement, pending):
                placement = _Placement(placement.order, None)
            self.place(pack, placement)
        return self.slots

    def _next(self, packs: list[list[Pack]], heads: list[int], last_turn: list[int]) -> tuple[int, _Placement]:
        """The group whose pack goes next and where; no-ops first while no pack may start."""
        pending = [gi for gi in range(len(packs)) if heads[gi] < len(packs[gi])]
        pending.sort(key=lambda gi: (packs[gi][heads[gi]].global_batch, last_turn[gi], gi))
        while True:
            for gi in pending:
                placement = self.try_place(packs[gi][heads[gi]])
                if placement is not None:
                    return gi, placement
            self.slots.append(_Slot())  # a no-op: nothing may start here without breaking the rule

    def _merge_keeps_pace(self, pack: Pack, placement: _Placement, pending: list[Pack]) -> bool:
        """Merging the remainder saves a slot only if a pending pack can use it; else the remainder takes
        the slot a no-op would have taken."""
        if not pending or placement.remainder_at is None:
            return True
        target = self.slots[placement.remainder_at]
        saved = (len(self.slots), list(target.samples), dict(target.tokens), target.units, dict(self.ready))
        self.place(pack, placement)
        keeps = any(self.try_place(p) is not None for p in pending)
        del self.slots[saved[0]:]
        target.samples, target.tokens, target.units, self.ready = saved[1], saved[2], saved[3], saved[4]
        return keeps

    def try_place(self, pack: Pack) -> _Placement | None:
        """Where `pack` goes if placed now, or None if some job's first microbatch would come too early."""
        pos = len(self.slots)
        full = range(len(pack.bins) - 1)
        order = sorted(full, key=lambda b: (max(self.ready.get(j, 0) for j in pack.tokens[b]), b))
        remainder_at = self._merge_target(pack.tokens[-1], pack.units[-1] if pack.units else 0)
        first: dict[str, int] = {}
        for offset, b in enumerate(order):
            for job in pack.tokens[b]:
                first.setdefault(job, pos + offset)
        at = remainder_at if remainder_at is not None else pos + len(order)
        for job in pack.tokens[-1]:
            first[job] = min(first.get(job, at), at)
        if any(position < self.ready.get(job, 0) for job, position in first.items()):
            return None
        return _Placement(order, remainder_at)

    def _merge_target(self, tokens: dict[str, int], units: int) -> int | None:
        """An earlier slot the remainder fits in where its jobs are allowed: a no-op first, else the fullest."""
        start = max((self.ready.get(job, 0) for job in tokens), default=0)
        best: tuple[tuple[int, int, int], int] | None = None
        for q in range(start, len(self.slots)):
            merged = dict(self.slots[q].tokens)
            for job, n in tokens.items():
                merged[job] = merged.get(job, 0) + n
            size = padded_size(merged, self.pad)
            if size <= self.capacity and (
                    self.budget is None or self.budget.fits(size // self.pad, self.slots[q].units + units)):
                key = (bool(self.slots[q].samples), -size, -q)
                if best is None or key < best[0]:
                    best = (key, q)
        return None if best is None else best[1]

    def place(self, pack: Pack, placement: _Placement) -> None:
        last: dict[str, int] = {}
        for b in placement.order:
            self.slots.append(_Slot(list(pack.bins[b]), dict(pack.tokens[b]), pack.units[b] if pack.units else 0))
            last.update(dict.fromkeys(pack.tokens[b], len(self.slots) - 1))
        if placement.remainder_at is None:
            self.slots.append(_Slot())
            at = len(self.slots) - 1
        else:
            at = placement.remainder_at
        self.slots[at].add(pack.bins[-1], pack.tokens[-1], pack.units[-1] if pack.units else 0)
        for job in pack.tokens[-1]:
            last[job] = max(last.get(job, at), at)
        for job, position in last.items():
            self.ready[job] = position + self.depth
