"""Shortening a window's stream: filling and the whole-window CP-SAT step reach hand-checked optima, and a
window that a later one follows is not shortened at the next one's cost."""

from __future__ import annotations

from scheduler import Job, Microbatch
from scheduler.bound import window_problem
from scheduler.improve import _solve, _squeezed, blocked_start, shorten


def _stream(*microbatches: list[tuple[str, int, int]]) -> list[Microbatch]:
    return [Microbatch(sorted(samples), is_noop=not samples) for samples in microbatches]


# a and b: two global batches of one 5-token sample each; C=16, S=3. a0 + b0 share position 0 and a1 + b1
# position 3 (4 microbatches, the chain bound); the stream below keeps them apart (5).
JOBS = [Job("a", [[5], [5]]), Job("b", [[5], [5]])]
APART = _stream([("a", 0, 0)], [("b", 0, 0)], [], [("a", 1, 0)], [("b", 1, 0)])
TOGETHER = [["a0", "b0"], [], [], ["a1", "b1"]]


def _names(stream: list[Microbatch]) -> list[list[str]]:
    return [[f"{job}{g}" for job, g, _ in mb.samples] for mb in stream]


def test_filling_reaches_the_floor():
    problem = window_problem(JOBS, capacity_tokens=16, pipeline_depth=3)
    assert _names(shorten(APART, problem, time_limit_s=0.0)) == TOGETHER


def test_cp_sat_reaches_the_floor_where_filling_does_not_run():
    # pad_multiple=2 (5 tokens pad to 6): filling is tokens-only, so the CP-SAT step does it.
    problem = window_problem(JOBS, capacity_tokens=16, pipeline_depth=3, pad_multiple=2)
    assert len(shorten(APART, problem, time_limit_s=0.0)) == 5
    assert _names(shorten(APART, problem, time_limit_s=5.0)) == TOGETHER


def test_a_window_that_a_later_one_follows_keeps_its_carry():
    # C=8, S=3, a0 and b0 of 8 tokens each: a0 | b0 is 2 long but blocks both jobs at the next window's first
    # position (b0 ends at 1, 1 + 3 - 2 = 2 > 0, a: 0 + 3 - 2 = 1); a0 | - | b0 is 3 long and blocks none.
    jobs = [Job("a", [[8]]), Job("b", [[8]])]
    problem = window_problem(jobs, capacity_tokens=8, pipeline_depth=3)
    spread = _stream([("a", 0, 0)], [], [("b", 0, 0)])
    assert blocked_start(spread, problem) == 0
    assert shorten(spread, problem, time_limit_s=1.0, keep_carry=True) == spread
    short = shorten(spread, problem, time_limit_s=1.0)
    assert len(short) == 2 and blocked_start(short, problem) == 1


def test_never_longer_and_deterministic():
    problem = window_problem(JOBS, capacity_tokens=16, pipeline_depth=3)
    best = _stream([("a", 0, 0), ("b", 0, 0)], [], [], [("a", 1, 0), ("b", 1, 0)])
    assert shorten(best, problem, time_limit_s=1.0) == best  # at the floor already: untouched
    assert shorten(APART, problem, time_limit_s=1.0) == shorten(APART, problem, time_limit_s=1.0)


def test_cp_sat_widens_the_margin_when_the_near_one_is_refuted():
    # C=8, S=1, pad_multiple=2 (no filling): a and e of 3 tokens (4 padded), b, c, d of 7 (8 padded). The stream
    # a | b | c | d | e is one too long: a and e must share a microbatch. Dropping position 0 (the lightest),
    # margin 1 keeps a at position 0 and e at 2 or 3, which CP-SAT refutes; margin 2 lets both take position 1.
    jobs = [Job(name, [[n]]) for name, n in zip("abcde", [3, 7, 7, 7, 3])]
    problem = window_problem(jobs, capacity_tokens=8, pipeline_depth=1, pad_multiple=2)
    stream = _stream(*([(name, 0, 0)] for name in "abcde"))
    found, _, refuted = _solve(problem, stream, 5.0, 0, None, margin=1)
    assert found is None and refuted
    assert [len(mb.samples) for mb in shorten(stream, problem, time_limit_s=5.0)] == [1, 2, 1, 1]


def test_squeezing_takes_out_microbatches_while_above_the_floor():
    # C=10, S=1: a = [6, 4], b = [4, 6], one sample per microbatch (4 long); the floor is 2 (a6 b4 | a4 b6).
    jobs = [Job("a", [[6, 4]]), Job("b", [[4, 6]])]
    problem = window_problem(jobs, capacity_tokens=10, pipeline_depth=1)
    stream = _stream([("a", 0, 0)], [("a", 0, 1)], [("b", 0, 0)], [("b", 0, 1)])
    short = _squeezed(stream, problem, key=lambda s: (len(s),), floor=2, seed=0)
    assert len(short) == 2 and sorted(map(len, _names(short))) == [2, 2]
    assert _squeezed(stream, problem, key=lambda s: (len(s),), floor=4, seed=0) == stream  # at the floor: kept
