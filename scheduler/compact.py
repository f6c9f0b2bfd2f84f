"""Compaction: empty the least-full microbatches of an ordered stream into others, and delete them.

Why: every (group, global batch) is packed on its own, so every pack leaves a partly full remainder,
and the ordering merges a remainder only into an earlier slot. After ordering, a sample may move to
any microbatch where its job's distance rule still holds. A sample of job j, global batch g may sit
at position q iff

    last(j, g - 1) + S  ≤  q  ≤  first(j, g + 1) - S

(ready[j], the carry-over of earlier windows, is the lower end for the window's first global batch
of j; the stream's end is the upper end for its last), the microbatch at q holds no other global
batch of j, and the sample still fits there (padded tokens, and cost units under a cost capacity).
The interval depends only on the neighbouring global batches, so moving a sample never makes
another sample of its own global batch illegal.

A microbatch left empty is deleted when, with the positions behind it shifted down by one, every
pair (j, g), (j, g + 1) straddling it stays ≥ S apart and no job starts before ready[j]; otherwise
the samples go back (a sample that finds no room may swap with a shorter one that can go elsewhere,
and samples that block the deletion may move away). When no microbatch can be emptied, load is
gathered (see _MODES): every accepted step deletes a microbatch or raises Σ load², so the search
ends; `max_steps` bounds it anyway. No randomness: the same stream gives the same result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scheduler.cost import CostBudget
from scheduler.greedy import subset_sum
from scheduler.problem import Microbatch, SampleRef, pad_up

__all__ = ["compact"]

_Key = tuple[str, int]
"""(job, global batch)."""

_MODES = ("move", "repack", "span")
"""How load is gathered when no microbatch can be emptied: single moves into fuller microbatches; pair
repacks (subset sum over two microbatches); pair repacks that keep every (job, g) inside its span. Each
is best on some instances (bench_scheduler, windows of 4 global batches: e.g. mixed C=8192 S=4 gave 67,
68, 65 microbatches; hetero C=8192 S=2 47, 45, 46), so all run and the shortest stream wins (first on
ties); together they cost ~0.1-0.5 s per window of 4 jobs x 4 global batches on a 2-core EPYC."""


@dataclass
class _Bin:
    """One microbatch while compacting."""

    samples: list[SampleRef] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    """Real tokens per job; a job is present iff it has tokens (lengths are positive)."""
    batch: dict[str, int] = field(default_factory=dict)
    """The one global batch of each job present."""
    padded: int = 0
    units: int = 0
    """Attention units under the cost budget (0 without one)."""


def compact(
    microbatches: list[Microbatch], lengths: dict[SampleRef, int], *, pipeline_depth: int, capacity_tokens: int,
    pad_multiple: int, budget: CostBudget | None = None, ready: dict[str, int] | None = None, max_steps: int = 2000,
) -> list[Microbatch]:
    """The stream with as few microbatches as the local search finds, then with its load levelled (see
    `_Stream.level`); every invariant kept.

    lengths[ref]: tokens of each sample. ready[job]: first position the job may take (see `order_packs`).
    max_steps: accepted improving steps at most (each deletes a microbatch or consolidates load).
    """
    fewest = -(-sum(lengths[ref] for mb in microbatches for ref in mb.samples) // capacity_tokens)
    best = microbatches  # kept unless a mode finds a shorter stream, or as long a one with fewer no-ops
    for mode in _MODES:
        if len(best) == fewest:
            break  # no stream can be shorter than its tokens over the capacity
        stream = _Stream(microbatches, lengths, pipeline_depth, capacity_tokens, pad_multiple, budget, ready or {}, mode)
        stream.drop_noops()
        for _ in range(max_steps):
            if len(stream.bins) == fewest or not (stream.empty_one() or stream.consolidate()):
                break
        out = stream.microbatches()
        if (len(out), _noops(out)) < (len(best), _noops(best)):
            best = out
    stream = _Stream(best, lengths, pipeline_depth, capacity_tokens, pad_multiple, budget, ready or {}, "move")
    stream.level()
    return stream.microbatches()


def _noops(microbatches: list[Microbatch]) -> int:
    return sum(mb.is_noop for mb in microbatches)


class _Stream:
    """The microbatches being compacted, with each (job, global batch)'s positions for the distance rule."""

    def __init__(self, microbatches: list[Microbatch], lengths: dict[SampleRef, int], depth: int, capacity: int,
                 pad: int, budget: CostBudget | None, ready: dict[str, int], mode: str) -> None:
        self.mode = mode
        """One of _MODES."""
        self.lengths, self.depth, self.capacity, self.pad, self.budget = lengths, depth, capacity, pad, budget
        self.ready = ready
        self.bins: list[_Bin] = []
        for mb in microbatches:
            self.bins.append(_Bin())
            for ref in mb.samples:
                self._add(ref, len(self.bins) - 1)
        self._index()

    # ----- bookkeeping -----

    def _index(self) -> None:
        """where[ref] and at[(job, g)] = Counter of positions, rebuilt after a deletion shifts positions."""
        self.where: dict[SampleRef, int] = {}
        self.at: dict[_Key, Counter[int]] = {}
        for q, b in enumerate(self.bins):
            for ref in b.samples:
                self.where[ref] = q
                self.at.setdefault(ref[:2], Counter())[q] += 1

    def _units(self, ref: SampleRef) -> int:
        return 0 if self.budget is None else self.budget.item_units(self.lengths[ref])

    def _add(self, ref: SampleRef, q: int) -> None:
        b, job, n = self.bins[q], ref[0], self.lengths[ref]
        before = b.tokens.get(job, 0)
        b.samples.append(ref)
        b.tokens[job] = before + n
        b.batch[job] = ref[1]
        b.padded += pad_up(before + n, self.pad) - pad_up(before, self.pad)
        b.units += self._units(ref)

    def _remove(self, ref: SampleRef, q: int) -> None:
        b, job, n = self.bins[q], ref[0], self.lengths[ref]
        before = b.tokens[job]
        b.samples.remove(ref)
        b.padded -= pad_up(before, self.pad) - pad_up(before - n, self.pad)
        b.units -= self._units(ref)
        if before == n:
            del b.tokens[job], b.batch[job]
        else:
            b.tokens[job] = before - n

    def move(self, ref: SampleRef, q: int, log: list[tuple[SampleRef, int]] | None = None) -> None:
        """Move `ref` to position q; `log` records (ref, old position) so the move can be undone."""
        p = self.where[ref]
        if log is not None:
            log.append((ref, p))
        self._remove(ref, p)
        self._add(ref, q)
        self.where[ref] = q
        counts = self.at[ref[:2]]
        counts[p] -= 1
        if counts[p] == 0:
            del counts[p]
        counts[q] += 1

    def undo(self, log: list[tuple[SampleRef, int]]) -> None:
        for ref, p in reversed(log):
            self.move(ref, p)
        log.clear()

    def microbatches(self) -> list[Microbatch]:
        return [Microbatch(samples=sorted(b.samples), is_noop=not b.samples) for b in self.bins]

    # ----- rules -----

    def interval(self, key: _Key) -> tuple[int, int]:
        """Positions a sample of (job, g) may take: the distance rule to its neighbouring global batches."""
        job, g = key
        before, after = self.at.get((job, g - 1)), self.at.get((job, g + 1))
        lo = max(before) + self.depth if before else self.ready.get(job, 0)
        hi = min(after) - self.depth if after else len(self.bins) - 1
        return lo, hi

    def fits(self, q: int, add: SampleRef, remove: SampleRef | None = None) -> bool:
        """Whether bin q holds `add` (taking `remove` out first): one global batch per job, capacity, cost.
        Computed from the bin's totals (the search calls this most)."""
        b, job, pad = self.bins[q], add[0], self.pad
        padded, units, present = b.padded, b.units + self._units(add), b.tokens.get(job, 0)
        if remove is not None:
            before, n = b.tokens[remove[0]], self.lengths[remove]
            padded -= pad_up(before, pad) - pad_up(before - n, pad)
            units -= self._units(remove)
            if remove[0] == job:
                present -= n
        if present and b.batch[job] != add[1]:
            return False
        padded += pad_up(present + self.lengths[add], pad) - pad_up(present, pad)
        return padded <= self.capacity and (self.budget is None or self.budget.fits(padded // pad, units))

    def best_target(self, ref: SampleRef, avoid: set[int], lo: int | None = None, hi: int | None = None) -> int | None:
        """The legal position (not in `avoid`, within [lo, hi] when given) where `ref` leaves the least room."""
        first, last = self.interval(ref[:2])
        first, last = max(first, lo if lo is not None else first), min(last, hi if hi is not None else last)
        best: tuple[int, int] | None = None
        for q in range(first, last + 1):
            if q in avoid or q == self.where[ref] or not self.fits(q, ref):
                continue
            key = (self.capacity - self.bins[q].padded, q)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]

    def violations(self, p: int) -> list[tuple[_Key, int, int]]:
        """What deleting the empty bin p would break: (key, position, direction) of each sample block that
        would have to leave its position (-1: move earlier, +1: move later) to make room."""
        found: list[tuple[_Key, int, int]] = []
        for (job, g), counts in self.at.items():
            first = min(counts)
            after = self.at.get((job, g + 1))
            if after is not None and max(counts) < p < min(after) and min(after) - max(counts) - 1 < self.depth:
                found.append(((job, g), max(counts), -1))
            if (job, g - 1) not in self.at and first > p and first - 1 < self.ready.get(job, 0):
                found.append(((job, g), first, +1))
        return found

    def delete(self, p: int) -> None:
        del self.bins[p]
        self._index()

    # ----- search -----

    def drop_noops(self) -> None:
        """Delete every empty microbatch the distance rule does not need, last first."""
        for p in reversed(range(len(self.bins))):
            if not self.bins[p].samples and not self.violations(p):
                self.delete(p)

    def empty_one(self) -> bool:
        """Empty and delete one microbatch, trying the least loaded first; False when none can go."""
        for p in sorted(range(len(self.bins)), key=lambda q: (self.bins[q].padded, q)):
            if self.try_empty(p):
                return True
        return False

    def try_empty(self, p: int) -> bool:
        log: list[tuple[SampleRef, int]] = []
        pool = sorted(self.bins[p].samples, key=lambda ref: (-self.lengths[ref], ref))
        if all(self.place(ref, {p}, log) for ref in pool) and self.clear_for_delete(p, log):
            self.delete(p)
            return True
        self.undo(log)
        return False

    def place(self, ref: SampleRef, avoid: set[int], log: list[tuple[SampleRef, int]]) -> bool:
        """Move `ref` to its best legal target, or swap it with a shorter sample that can go elsewhere."""
        q = self.best_target(ref, avoid)
        if q is not None:
            self.move(ref, q, log)
            return True
        return self.swap_in(ref, avoid, log)

    def swap_in(self, ref: SampleRef, avoid: set[int], log: list[tuple[SampleRef, int]]) -> bool:
        """Put `ref` at a legal q in place of a shorter sample t of q, t moving to its own best target."""
        lo, hi = self.interval(ref[:2])
        for q in range(lo, hi + 1):
            if q in avoid or q == self.where[ref]:
                continue
            for t in sorted(self.bins[q].samples, key=lambda r: (-self.lengths[r], r)):
                same_job_other_batch = t[0] == ref[0] and t[1] != ref[1]
                if same_job_other_batch or self.lengths[t] >= self.lengths[ref] or not self.fits(q, ref, t):
                    continue
                r = self.best_target(t, avoid | {q})
                if r is not None:
                    self.move(t, r, log)
                    self.move(ref, q, log)
                    return True
        return False

    def clear_for_delete(self, p: int, log: list[tuple[SampleRef, int]]) -> bool:
        """Move the sample blocks that keep the emptied bin p from being deleted, a few rounds at most."""
        for _ in range(4):
            found = self.violations(p)
            if not found:
                return True
            for key, position, direction in found:
                if not self.evacuate(key, position, direction, p, log):
                    return False
        return not self.violations(p)

    def evacuate(self, key: _Key, position: int, direction: int, p: int, log: list[tuple[SampleRef, int]]) -> bool:
        """Move every sample of `key` at `position` earlier (direction -1) or later (+1), never into p."""
        refs = sorted((ref for ref in self.bins[position].samples if ref[:2] == key), key=lambda r: (-self.lengths[r], r))
        bounds = (None, position - 1) if direction < 0 else (position + 1, None)
        for ref in refs:
            q = self.best_target(ref, {p}, *bounds)
            if q is None:
                return False
            self.move(ref, q, log)
        return True

    def level(self, max_passes: int = 8) -> None:
        """Spread the load at the same microbatch count: move samples out of the fullest microbatches into
        legal ones that stay lighter (each move lowers Σ padded²), until a pass moves nothing.

        Why: packing leaves full microbatches next to small remainders, and in 1F1B a stage waits whenever
        consecutive microbatches differ in size (bench_end_to_end's 4 jobs at 2 stages: sizes 2000, 800, 900
        tokens in turn simulated a 22% bubble)."""
        for _ in range(max_passes):
            moved = False
            for p in sorted(range(len(self.bins)), key=lambda q: (-self.bins[q].padded, q)):
                for ref in sorted(self.bins[p].samples, key=lambda r: (self.lengths[r], r)):
                    q = self.lighter_target(ref, p)
                    if q is not None:
                        self.move(ref, q)
                        moved = True
            if not moved:
                return

    def lighter_target(self, ref: SampleRef, p: int) -> int | None:
        """The lightest legal position for `ref` (now at p) where moving it lowers Σ padded², or None."""
        first, last = self.interval(ref[:2])
        load = self.bins[p].padded
        best: tuple[int, int] | None = None
        for q in range(first, last + 1):
            if q == p or self.bins[q].padded + self.lengths[ref] >= load or not self.fits(q, ref):
                continue
            if (best is None or (self.bins[q].padded, q) < best) and self._gain(ref, p, q) < 0:
                best = (self.bins[q].padded, q)
        return None if best is None else best[1]

    def consolidate(self) -> bool:
        """Gather load the way `mode` says; False when no step helps."""
        if self.mode == "move":
            return self.consolidate_moves()
        return self.consolidate_pairs()

    def consolidate_moves(self) -> bool:
        """One move of a sample from a less loaded into a more loaded microbatch (raises Σ load²)."""
        order = sorted(range(len(self.bins)), key=lambda q: (self.bins[q].padded, q))
        for p in order:
            for ref in sorted(self.bins[p].samples, key=lambda r: (self.lengths[r], r)):
                q = self.best_target(ref, set())
                if q is not None and self._gain(ref, p, q) > 0:
                    self.move(ref, q)
                    return True
        return False

    def _gain(self, ref: SampleRef, p: int, q: int) -> int:
        """Change of Σ padded² when `ref` moves from p to q (computed, not tried: the search calls it often)."""
        job, n, pad = ref[0], self.lengths[ref], self.pad
        source, target = self.bins[p], self.bins[q]
        had, has = source.tokens[job], target.tokens.get(job, 0)
        new_source = source.padded - (pad_up(had, pad) - pad_up(had - n, pad))
        new_target = target.padded + pad_up(has + n, pad) - pad_up(has, pad)
        return new_source ** 2 + new_target ** 2 - source.padded ** 2 - target.padded ** 2

    def consolidate_pairs(self) -> bool:
        """One pass of pair repacks, emptiest source first: fill a fuller microbatch q from the samples of q
        and a less full p. Each accepted repack raises Σ load², so the slack gathers in few microbatches."""
        improved = False
        for p in sorted(range(len(self.bins)), key=lambda q: (self.bins[q].padded, q)):
            for q in sorted(range(len(self.bins)), key=lambda q: (-self.bins[q].padded, q)):
                if self.bins[q].padded <= self.bins[p].padded or not self.bins[p].samples:
                    break
                improved |= self.repack_pair(q, p)
        return improved

    def repack_pair(self, q: int, p: int) -> bool:
        """Refill q with the subset of q's and p's samples that fills it most (subset sum over the samples
        that may sit at both), the rest to p; kept only if q got fuller and every rule holds."""
        samples = sorted(self.bins[q].samples + self.bins[p].samples)
        fixed = [r for r in samples if not self._allowed(r, q if self.where[r] == p else p)]
        free = [r for r in samples if r not in fixed]
        base = sum(self.lengths[r] for r in fixed if self.where[r] == q)
        chosen = subset_sum([self.lengths[r] for r in free], self.capacity - base)
        if not free or base + sum(self.lengths[free[i]] for i in chosen) <= self.bins[q].padded:
            return False
        before = self.bins[q].padded
        log: list[tuple[SampleRef, int]] = []
        for i, r in enumerate(free):
            target = q if i in chosen else p
            if self.where[r] != target:
                self.move(r, target, log)
        if self.bins[q].padded > before and self._valid(q) and self._valid(p) and self._distance_ok(
                {r[:2] for r, _ in log}):
            return True
        self.undo(log)
        return False

    def _allowed(self, ref: SampleRef, q: int) -> bool:
        lo, hi = self.interval(ref[:2])
        if self.mode == "span":  # never widen a span: a wider one can keep a no-op from being deleted
            counts = self.at[ref[:2]]
            lo, hi = max(lo, min(counts)), min(hi, max(counts))
        return lo <= q <= hi

    def _valid(self, q: int) -> bool:
        """Capacity, cost and one global batch per job in bin q (after a repack)."""
        b = self.bins[q]
        if len({(ref[0], ref[1]) for ref in b.samples}) != len(b.tokens):
            return False
        return b.padded <= self.capacity and (self.budget is None or self.budget.fits(b.padded // self.pad, b.units))

    def _distance_ok(self, keys: set[_Key]) -> bool:
        """The distance rule (and ready) around every (job, g) in `keys`."""
        for job, g in keys:
            counts = self.at[(job, g)]
            before, after = self.at.get((job, g - 1)), self.at.get((job, g + 1))
            lo = max(before) + self.depth if before else self.ready.get(job, 0)
            if min(counts) < lo or (after and min(after) - max(counts) < self.depth):
                return False
        return True

