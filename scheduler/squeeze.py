"""Squeezing one microbatch out of a window's stream: guided local search on overflow.

A valid stream of N microbatches loses one position (later ones move up; `removable_positions` names the
positions whose removal keeps the distance rule), and that position's samples go where they overflow the
capacity least within the span their global batch may take. What is left is a stream of N - 1 positions that
keeps the distance rule but may overflow. The search then moves samples out of overflowing positions, to
another position or by swapping with a shorter sample, each move keeping the distance rule, taking the move that
cuts the weighted overflow Σ_q w[q] · max(0, load[q] - C) most (ties broken by a seeded rng). Where no move
cuts it, every overflowing position's weight grows by one: guided local search, so that a position that stays
over grows costly and the search leaves the local minimum. No overflow left is a valid stream of N - 1.

Why: with samples of about half the capacity, or under the distance rule at S = 4, the packers and fills leave
the stream one or two microbatches above the floor, with the room spread over many positions a few hundred
tokens each; CP-SAT on the whole window (`improve`) does not find the shorter stream in its time, and a CP-SAT
neighbourhood search did not either (a position removed there shortens the tight gaps of every job idle at
it). bench_scheduler, first windows, each in under 0.5 s here: wikisum-like C=4096 S=1 62 -> 61, S=4 62 -> 61;
mixed-like C=8192 S=4 64 -> 63; wikisum-like C=8192 S=4 64 -> 63.

Tokens only (pad_multiple 1, no cost capacity), as `fill`.
"""

from __future__ import annotations

import random

from scheduler.bound import WindowProblem
from scheduler.problem import Microbatch, batch_spans

__all__ = ["squeeze", "removable_positions"]


def removable_positions(microbatches: list[Microbatch], problem: WindowProblem) -> list[int]:
    """Positions whose removal (later positions moving up one) keeps the distance rule and the carry-in,
    lightest first (ties: earlier first)."""
    span = batch_spans(microbatches)
    depth = problem.pipeline_depth
    lengths = {item.ref: item.length for item in problem.items}

    def removable(p: int) -> bool:
        for (job, g), (first, last) in span.items():
            after = span.get((job, g + 1))
            if after is not None and last < p < after[0] and after[0] - last - 1 < depth:
                return False
            if g == problem.chains[job].start and first > p and first - 1 < problem.ready.get(job, 0):
                return False
        return True

    load = [sum(lengths[ref] for ref in mb.samples) for mb in microbatches]
    return [p for p in sorted(range(len(microbatches)), key=lambda q: (load[q], q)) if removable(p)]


def squeeze(microbatches: list[Microbatch], problem: WindowProblem, drop: int, *, rounds: int, work: int,
            seed: int = 0) -> list[Microbatch] | None:
    """A valid stream of at most len(microbatches) - 1 positions found by the search (see the module docstring)
    after removing position `drop` (one of `removable_positions`), or None when `rounds` rounds (one move or one
    raise of the weights each) or `work` move evaluations were not enough. The same arguments give the same
    stream."""
    return _Search(microbatches, problem, drop, random.Random(f"squeeze:{seed}:{drop}")).run(rounds, work)


class _Search:
    """The state of one search: each sample's position, each position's load and samples, and each (job, g)'s
    allowed positions [lo, hi] (from its neighbours in the chain, the carry-in and the stream's end)."""

    def __init__(self, microbatches: list[Microbatch], problem: WindowProblem, drop: int,
                 rng: random.Random) -> None:
        self.problem, self.rng = problem, rng
        self.size = len(microbatches) - 1
        self.capacity, self.depth = problem.capacity_tokens, problem.pipeline_depth
        index = {item.ref: s for s, item in enumerate(problem.items)}
        self.length = [item.length for item in problem.items]
        self.key = [(item.job, item.global_batch) for item in problem.items]
        self.members: dict[tuple[str, int], list[int]] = {}
        for s, key in enumerate(self.key):
            self.members.setdefault(key, []).append(s)
        self.weight = [1] * self.size
        self.load = [0] * self.size
        self.bins: list[list[int]] = [[] for _ in range(self.size)]
        self.position = [-1] * len(problem.items)
        loose = []
        for q, mb in enumerate(microbatches):
            for ref in mb.samples:
                if q == drop:
                    loose.append(index[ref])
                else:
                    self._put(index[ref], q if q < drop else q - 1)
        self.lo: dict[tuple[str, int], int] = {}
        self.hi: dict[tuple[str, int], int] = {}
        for key in self.members:
            self._bounds(key)
        self.valid = all(self.lo[self.key[s]] <= q <= self.hi[self.key[s]]
                         for s, q in enumerate(self.position) if q >= 0)
        for s in sorted(loose, key=lambda s: (-self.length[s], s)):
            lo, hi = self.lo[self.key[s]], self.hi[self.key[s]]
            self.valid = self.valid and lo <= hi
            if not self.valid:
                return
            self._put(s, min(range(lo, hi + 1), key=lambda q: (max(0, self.load[q] + self.length[s] - self.capacity),
                                                               self.load[q], q)))
            self._moved(self.key[s])

    def _put(self, s: int, q: int) -> None:
        self.position[s] = q
        self.load[q] += self.length[s]
        self.bins[q].append(s)

    def _take(self, s: int) -> int:
        q = self.position[s]
        self.load[q] -= self.length[s]
        self.bins[q].remove(s)
        return q

    def _bounds(self, key: tuple[str, int]) -> None:
        """[lo, hi] of `key` from the placed samples of its chain neighbours."""
        job, g = key
        chain = self.problem.chains[job]
        before = [self.position[t] for t in self.members.get((job, g - 1), ()) if self.position[t] >= 0]
        after = [self.position[t] for t in self.members.get((job, g + 1), ()) if self.position[t] >= 0]
        if before:
            self.lo[key] = max(before) + self.depth
        else:  # the chain's first global batch, or one whose previous one's samples are all still to place
            self.lo[key] = self.problem.ready.get(job, 0) if g == chain.start else 0
        self.hi[key] = min(min(after) - self.depth, self.size - 1) if after else self.size - 1

    def _moved(self, key: tuple[str, int]) -> None:
        """A sample of `key` moved: its neighbours' bounds may change."""
        job, g = key
        for neighbour in ((job, g - 1), (job, g + 1)):
            if neighbour in self.members:
                self._bounds(neighbour)

    def _over(self, q: int, load: int) -> int:
        return self.weight[q] * max(0, load - self.capacity)

    def run(self, rounds: int, work: int) -> list[Microbatch] | None:
        if not self.valid:
            return None
        length, key, load = self.length, self.key, self.load
        spent = 0
        for _ in range(rounds):
            if spent >= work:
                break
            over = [q for q in range(self.size) if load[q] > self.capacity]
            if not over:
                return self._stream()
            best, moves = 0, []
            for a in over:
                here = self._over(a, load[a])
                for s in self.bins[a]:
                    for b in range(self.lo[key[s]], self.hi[key[s]] + 1):
                        if b == a:
                            continue
                        spent += 1 + len(self.bins[b])
                        there = self._over(b, load[b])
                        for t in (-1, *self.bins[b]):  # -1: s moves alone; else s and t trade places
                            shift = length[s] - (length[t] if t >= 0 else 0)
                            if t >= 0 and (shift <= 0 or not self.lo[key[t]] <= a <= self.hi[key[t]]
                                           or key[t][0] == key[s][0] and key[t] != key[s]):
                                continue  # (two global batches of one job cannot trade places)
                            gain = self._over(a, load[a] - shift) + self._over(b, load[b] + shift) - here - there
                            if gain < best:
                                best, moves = gain, [(s, b, t)]
                            elif gain == best < 0:
                                moves.append((s, b, t))
            if not moves:
                for q in over:
                    self.weight[q] += 1
                continue
            s, b, t = moves[self.rng.randrange(len(moves))]
            a = self._take(s)
            self._put(s, b)
            if t >= 0:
                self._take(t)
                self._put(t, a)
                self._moved(key[t])
            self._moved(key[s])
        return None

    def _stream(self) -> list[Microbatch]:
        refs = [sorted(self.problem.items[s].ref for s in samples) for samples in self.bins]
        while refs and not refs[-1]:
            refs.pop()
        return [Microbatch(samples=samples, is_noop=not samples) for samples in refs]
