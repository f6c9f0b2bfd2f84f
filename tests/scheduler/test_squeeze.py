"""Squeezing a microbatch out of a window's stream: hand-checked cases, the distance rule kept, and every
invariant on random windows."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from scheduler import Job, Microbatch
from scheduler.bound import cheap_floor, window_problem
from scheduler.squeeze import removable_positions, squeeze
from tests.scheduler.test_fill import _verify, windows


def _stream(*microbatches: list[tuple[str, int, int]]) -> list[Microbatch]:
    return [Microbatch(sorted(samples), is_noop=not samples) for samples in microbatches]


def _loads(stream: list[Microbatch], jobs: list[Job]) -> list[int]:
    lengths = {(job.name, g, i): n for job in jobs for g, batch in enumerate(job.global_batches)
               for i, n in enumerate(batch)}
    return [sum(lengths[ref] for ref in mb.samples) for mb in stream]


def test_two_full_microbatches_from_three():
    # C=10, S=1: a = [6, 4], b = [4, 6]. a6 | a4 b4 | b6 is 3 long, the floor is 2. Removing position 0 (load 6,
    # the lightest) puts a6 with b6 (over by 2; with a4 b4 it would be over by 4), and one swap of the 6 against
    # a 4 clears it.
    jobs = [Job("a", [[6, 4]]), Job("b", [[4, 6]])]
    limits = dict(capacity_tokens=10, pipeline_depth=1, pad_multiple=1)
    problem = window_problem(jobs, **limits)
    stream = _stream([("a", 0, 0)], [("a", 0, 1), ("b", 0, 0)], [("b", 0, 1)])
    assert removable_positions(stream, problem) == [0, 2, 1]
    short = squeeze(stream, problem, 0, rounds=100, work=1000)
    assert short is not None and len(short) == 2 and _loads(short, jobs) == [10, 10]
    _verify(short, jobs, limits)
    assert squeeze(stream, problem, 0, rounds=100, work=1000) == short  # same arguments, same stream


def test_no_position_of_a_tight_gap_is_removed():
    # S=2: a0 | - | a1; position 1 keeps a1 two positions after a0, and without position 0 or 2 the
    # other global batch has nowhere to go.
    jobs = [Job("a", [[5], [5]])]
    problem = window_problem(jobs, capacity_tokens=10, pipeline_depth=2)
    stream = _stream([("a", 0, 0)], [], [("a", 1, 0)])
    assert removable_positions(stream, problem) == [0, 2]
    assert all(squeeze(stream, problem, drop, rounds=100, work=10_000) is None for drop in (0, 2))


def test_a_position_that_is_not_removable_gives_none():
    # S=2: a0 | a0 | b | a1 | b | b. Without position 2, a1 would follow a0 at once (and b's sample fits anywhere).
    jobs = [Job("a", [[5, 5], [5]]), Job("b", [[5, 5, 5]])]
    problem = window_problem(jobs, capacity_tokens=10, pipeline_depth=2)
    stream = _stream([("a", 0, 0)], [("a", 0, 1)], [("b", 0, 0)], [("a", 1, 0)], [("b", 0, 1)], [("b", 0, 2)])
    assert 2 not in removable_positions(stream, problem)
    assert squeeze(stream, problem, 2, rounds=100, work=10_000) is None


def test_the_carry_in_is_kept():
    # b may not start before position 1 (ready); a | b cannot become a b, although both fit one microbatch.
    jobs = [Job("a", [[4]]), Job("b", [[4]])]
    problem = window_problem(jobs, capacity_tokens=8, pipeline_depth=1, ready={"b": 1})
    stream = _stream([("a", 0, 0)], [("b", 0, 0)])
    drops = removable_positions(stream, problem)
    assert all(squeeze(stream, problem, drop, rounds=100, work=10_000) is None for drop in drops)


def test_a_search_out_of_work_gives_none():
    jobs = [Job("a", [[6, 4]]), Job("b", [[4, 6]])]
    problem = window_problem(jobs, capacity_tokens=10, pipeline_depth=1)
    stream = _stream([("a", 0, 0)], [("a", 0, 1), ("b", 0, 0)], [("b", 0, 1)])
    assert squeeze(stream, problem, 0, rounds=100, work=0) is None


def _one_sample_each(jobs: list[Job], depth: int, ready: dict[str, int]) -> list[Microbatch]:
    """A valid stream far above the floor: after the carry-in, job after job, one sample per microbatch, S - 1
    no-ops between a job's global batches."""
    stream = [Microbatch([], is_noop=True)] * max(ready.values(), default=0)
    for job in jobs:
        for g, batch in enumerate(job.global_batches):
            if g:
                stream += [Microbatch([], is_noop=True)] * (depth - 1)
            stream += [Microbatch([(job.name, g, i)]) for i in range(len(batch))]
    return stream


def test_random_squeezes_keep_every_invariant():
    shortened = []

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(windows())
    def check(case):
        jobs, limits, ready = case
        problem = window_problem(jobs, **limits, ready=ready)
        stream = _one_sample_each(jobs, limits["pipeline_depth"], ready)
        for drop in removable_positions(stream, problem)[:3]:
            short = squeeze(stream, problem, drop, rounds=200, work=20_000)
            if short is None:
                continue
            shortened.append(len(stream) - len(short))
            assert len(short) < len(stream) and len(short) >= cheap_floor(problem)
            _verify(short, jobs, limits)
            for position, mb in enumerate(short):
                assert all(position >= ready.get(job, 0) for job, _, _ in mb.samples)
            assert squeeze(stream, problem, drop, rounds=200, work=20_000) == short

    check()
    assert shortened  # the invariants were checked on streams the search did shorten
