"""Shortening a window's compacted stream when it is above the window's cheap floor (`bound.cheap_floor`).

Three steps, each kept only when it gives fewer microbatches (or as many with fewer no-ops):
1. Filling (`fill.FILL_ORDERS`, tokens only): the position-by-position streams, plain and then perturbed
   (FILL_RESTARTS), the best compacted. Why: every pack leaves a remainder and the packs fix which global
   batches meet; at S ≤ 2 filling often reaches the floor where packing did not (bench_scheduler, cnndm-like,
   C=8192: 35 -> 34 per window), and a perturbed order now and then where the plain ones did not (wikisum-like
   C=8192 S=2 31 -> 30, mixed-like C=8192 S=2 33 -> 32: a few in a hundred perturbed fills reach it).
2. Squeezing (`squeeze`, tokens only): remove a light position and search out the overflow its samples
   cause elsewhere, one microbatch at a time, from the first SQUEEZE_DROPS removable positions. Why: where
   the room is a few hundred tokens in each of many microbatches, a shorter stream needs many samples to
   move at once; the overflow search finds such moves where steps 1 and 3 do not (bench_scheduler, first
   windows: wikisum-like C=4096 S=1 62 -> 61, mixed-like C=8192 S=4 64 -> 63, ~0.1-0.5 s each).
3. CP-SAT on the whole window (`bound.build_window_model`) in one microbatch fewer, hinted with the stream
   minus its lightest removable microbatch, each global batch kept near its place in the stream (see
   MAX_SPAN_MARGIN); each schedule found is compacted and taken and the next count tried, while
   deterministic time is left and the count is above the floor. Why: under the distance rule
   the best schedules stagger the jobs' global batches so that every microbatch mixes the jobs allowed
   there (xsum-like, C=8192, S=4, first window: CP-SAT finds 21 and 20 microbatches where the stream had 22,
   0.1-0.2 deterministic seconds each).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ortools.sat.python import cp_model

from scheduler.bound import WindowModel, WindowProblem, build_window_model, cheap_floor, solve_window_model
from scheduler.compact import compact
from scheduler.fill import FILL_ORDERS, fill
from scheduler.problem import Microbatch, SampleRef, batch_spans
from scheduler.squeeze import removable_positions, squeeze

__all__ = ["shorten", "blocked_start", "SHORTEN_TIME_LIMIT_S", "MAX_PLACEMENTS", "FILL_RESTARTS"]

SQUEEZE_ROUNDS = 1000
SQUEEZE_WORK = 300_000
"""`squeeze.squeeze` stops after this many rounds or move evaluations (~0.3 s of CPU here), whichever comes
first, for each removed position. On bench_scheduler's first windows it found its shorter streams after 58-756
rounds and 24000-137000 evaluations, and one (wikisum-like C=4096 S=4) after 4941 and 908000."""

SQUEEZE_DROPS = 4
"""The lightest removable positions tried for each microbatch `squeeze` takes out."""

MAX_SPAN_MARGIN = 2
"""Step 2 keeps each (job, global batch) within 1 position of where the hinted stream has it, and within 2
when CP-SAT proves 1 infeasible. bench_scheduler's windows at commit 2198c01 (0.15 deterministic s): margin 1
shortened hetero-like C=8192 S=2 23 -> 22 and xsum-like C=8192 S=2 21 -> 20; 2 missed the first but
shortened hetero-like S=4 24 -> 23 (after 1 was refuted in 0.03 s) and xsum-like S=4 22 -> 21; the whole
span (no margin) shortened none of these in the same time."""

FILL_RESTARTS = 64
"""Perturbed fills (`fill`'s rng, seeded by the planner's seed and the restart) tried after the three plain
ones, stopping at the first that reaches the cheap floor."""

SHORTEN_TIME_LIMIT_S = 0.15
"""Default CP-SAT deterministic seconds of step 2 per window (plan and WindowPlanner). A window of 8 jobs x
16 samples takes ~0.5 s of CPU before this step, and a deterministic second took 1.5-2.3 s of CPU here
(2-core EPYC, shared), so 0.15 keeps such a window under 1 s even where the step runs to its limit. 0.3
shortened bench_scheduler's xsum-like C=8192 S=4 stream to 42 microbatches where 0.15 gives 44, and
changed no other case."""

MAX_PLACEMENTS = 3000
"""Step 2 is skipped when the model has more sample-position variables x[s, q] than this, or when one
microbatch fewer leaves less than half a microbatch of room over the tokens. On bench_scheduler's windows
(4 jobs x 4 global batches) CP-SAT found a schedule one microbatch shorter in 0.5 deterministic seconds in
5 of the 44 windows above the cheap floor, all with 1200-2800 variables and ≥ 0.75 microbatches of room,
and in none of the 30 with more variables (3000-7200: C=4096, or S=1); those only spent the time."""


def shorten(microbatches: list[Microbatch], problem: WindowProblem, *, time_limit_s: float, seed: int = 0,
            keep_carry: bool = False) -> list[Microbatch]:
    """The shortest valid stream of the window the two steps find (`microbatches` when none is shorter).

    time_limit_s: CP-SAT deterministic seconds of step 2 (0 skips it); one worker, so the same input gives
    the same stream. keep_carry: a window with the same jobs follows, so a stream counts as its length plus
    the no-ops it forces on the next window (`blocked_start`), and on a tie the one forcing fewer wins
    (those no-ops are the least it costs the next window); bench_scheduler, hetero-like, C=8192, S=4: a
    23-microbatch window that ended every job late made the next one 26 long, where 24 + 23 was possible.
    """
    def key(stream: list[Microbatch]) -> tuple[int, int, int]:
        blocked = blocked_start(stream, problem) if keep_carry else 0
        return len(stream) + blocked, blocked, sum(mb.is_noop for mb in stream)

    floor, best = cheap_floor(problem), microbatches
    if len(best) > floor and problem.pad_multiple == 1 and problem.budget is None:
        candidate = _best_fill(problem, len(best), key, floor, seed)
        best = candidate if candidate is not None and key(candidate) < key(best) else best
        best = _squeezed(best, problem, key, floor, seed)
    spent, margin = 0.0, 1
    while len(best) > floor and spent < time_limit_s:
        limit = blocked_start(best, problem) if keep_carry else None
        found, used, refuted = _solve(problem, best, time_limit_s - spent, seed, limit, margin)
        spent += used
        if found is None:
            if not refuted or margin == MAX_SPAN_MARGIN:
                break
            margin += 1
            continue
        best = min(best, _compact(found, problem), found, key=key)  # compaction's levelling may end jobs later
    return best


def blocked_start(microbatches: list[Microbatch], problem: WindowProblem) -> int:
    """Positions at the start of the next window where none of this window's jobs may run yet: the least,
    over the jobs, of last position + S - length (0 when some job is free at once)."""
    last: dict[str, int] = {}
    for (job, _), (_, end) in batch_spans(microbatches).items():
        last[job] = max(last.get(job, 0), end)
    return max(0, min(last.values(), default=0) + problem.pipeline_depth - len(microbatches))


def _best_fill(problem: WindowProblem, length: int, key: Callable[[list[Microbatch]], tuple], floor: int,
               seed: int) -> list[Microbatch] | None:
    """The best filled stream by `key`, compacted; None when even uncompacted it is over length + 1 (compaction
    rarely removes more than one microbatch from those, and costs most of the time here). The plain orders
    come first, then FILL_RESTARTS perturbed ones, until a stream reaches the floor."""
    best, best_key = None, None
    for k in range(len(FILL_ORDERS) + FILL_RESTARTS):
        rng = None if k < len(FILL_ORDERS) else random.Random(f"fill:{seed}:{k}")
        stream = fill(problem, FILL_ORDERS[k % len(FILL_ORDERS)], rng)
        stream_key = key(stream)
        if best_key is None or stream_key < best_key:
            best, best_key = stream, stream_key
        if k >= len(FILL_ORDERS) - 1 and len(best) <= floor:
            break
    assert best is not None  # FILL_ORDERS is not empty
    return _compact(best, problem) if len(best) <= length + 1 else None


def _squeezed(microbatches: list[Microbatch], problem: WindowProblem, key: Callable[[list[Microbatch]], tuple],
              floor: int, seed: int) -> list[Microbatch]:
    """`microbatches` shortened by `squeeze.squeeze` one microbatch at a time, each from the lightest of the first
    SQUEEZE_DROPS removable positions that gives a shorter stream by `key`, while above the floor."""
    best = microbatches
    while len(best) > floor:
        for drop in removable_positions(best, problem)[:SQUEEZE_DROPS]:
            found = squeeze(best, problem, drop, rounds=SQUEEZE_ROUNDS, work=SQUEEZE_WORK, seed=seed)
            if found is not None:
                found = min(_compact(found, problem), found, key=key)
                if key(found) < key(best):
                    best = found
                    break
        else:
            return best
    return best


def _compact(microbatches: list[Microbatch], problem: WindowProblem) -> list[Microbatch]:
    lengths = {item.ref: item.length for item in problem.items}
    return compact(microbatches, lengths, pipeline_depth=problem.pipeline_depth,
                   capacity_tokens=problem.capacity_tokens, pad_multiple=problem.pad_multiple,
                   budget=problem.budget, ready=problem.ready)


def _solve(problem: WindowProblem, microbatches: list[Microbatch], time_limit_s: float, seed: int,
           limit: int | None, margin: int) -> tuple[list[Microbatch] | None, float, bool]:
    """(A stream of len(microbatches) - 1 microbatches or fewer whose blocked_start is ≤ limit and whose global
    batches stay within `margin` positions of where `microbatches` has them, None when CP-SAT finds none;
    deterministic seconds spent; whether CP-SAT proved there is none)."""
    room = (len(microbatches) - 1) * problem.capacity_tokens - sum(item.length for item in problem.items)
    if 2 * room < problem.capacity_tokens:
        return None, 0.0, False
    built = build_window_model(problem, len(microbatches) - 1)
    if built is None or len(built.x) > MAX_PLACEMENTS:
        return None, 0.0, False
    index = {item.ref: s for s, item in enumerate(problem.items)}
    removable = removable_positions(microbatches, problem)
    drop = removable[0] if removable else _lightest(microbatches, problem)
    _near_spans(built, microbatches, drop, margin)
    if limit is not None:
        _limit_blocked_start(built, limit)
    _hint(built, microbatches, index, drop)
    solver, status = solve_window_model(built, time_limit_s, seed, probing=False)  # probing: most of the time here
    found = _stream(built, built.positions(solver)) if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None
    return found, solver.deterministic_time, status == cp_model.INFEASIBLE


def _limit_blocked_start(built: WindowModel, limit: int) -> None:
    """blocked_start ≤ limit: some job j ends early enough, last(j) + S - N ≤ limit."""
    model, problem = built.model, built.problem
    early = []
    for job, chain in problem.chains.items():
        ends_early = model.new_bool_var(f"early[{job}]")
        model.add(built.last[(job, chain.stop - 1)] + problem.pipeline_depth - built.num_microbatches <= limit
                  ).only_enforce_if(ends_early)
        early.append(ends_early)
    model.add_bool_or(early)


def _near_spans(built: WindowModel, microbatches: list[Microbatch], drop: int, margin: int) -> None:
    """Keep each (job, g) within `margin` positions of its span in `microbatches` once position `drop` is
    removed (later positions moving up one)."""
    span = batch_spans(microbatches)
    for (s, q), var in built.x.items():
        item = built.problem.items[s]
        first, last = (p if p < drop else p - 1 for p in span[(item.job, item.global_batch)])
        if not first - margin <= q <= last + margin:
            built.model.add(var == 0)


def _hint(built: WindowModel, microbatches: list[Microbatch], index: dict[SampleRef, int], drop: int) -> None:
    """Hint every sample with its position in `microbatches` once position `drop` is removed (its samples
    are left to the solver)."""
    for q, mb in enumerate(microbatches):
        if q != drop:
            for ref in mb.samples:
                var = built.x.get((index[ref], q if q < drop else q - 1))
                if var is not None:
                    built.model.add_hint(var, True)


def _lightest(microbatches: list[Microbatch], problem: WindowProblem) -> int:
    lengths = {item.ref: item.length for item in problem.items}
    return min(range(len(microbatches)), key=lambda q: (sum(lengths[ref] for ref in microbatches[q].samples), q))


def _stream(built: WindowModel, where: list[int]) -> list[Microbatch]:
    """Microbatches of a solution: no-ops where a position is empty, none after the last sample."""
    samples: list[list[SampleRef]] = [[] for _ in range(max(where) + 1)]
    for s, q in enumerate(where):
        samples[q].append(built.problem.items[s].ref)
    return [Microbatch(samples=sorted(refs), is_noop=not refs) for refs in samples]
