"""The window floor: hand-checked tight instances, the bin packing bound, and floor ≤ the optimum (brute
force) and ≤ every plan on random windows."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import Job, WindowPlanner
from scheduler.bound import bin_packing_bound, cheap_floor, window_floor, window_problem
from scheduler.problem import pad_up


def _floor(jobs: list[Job], **kwargs):
    return window_floor(jobs, time_limit_s=5.0, **kwargs)


# ------------------------------------------------------------------ hand-checked floors


def test_tokens_bound_is_tight():
    # 16 tokens in microbatches of 8: two, and 4+4 | 4+4 reaches it.
    floor = _floor([Job("a", [[4, 4, 4, 4]])], capacity_tokens=8, pipeline_depth=1)
    assert (floor.microbatches, floor.cheap, floor.status) == (2, 2, "OPTIMAL")


def test_chain_with_carry_in():
    # a may start at 2; a1 starts ≥ 3 after a0 ends: a0 at 2, a1 at 5 -> 6 microbatches.
    floor = _floor([Job("a", [[5], [5]], first_global_batch=4)], capacity_tokens=16, pipeline_depth=3,
                   ready={"a": 2, "gone": 9})
    assert (floor.microbatches, floor.cheap, floor.status) == (6, 6, "OPTIMAL")


def test_cp_sat_refutes_what_the_cheap_bounds_allow():
    # C=16, S=3, every sample 10 tokens: two never share a microbatch (cheap bound 4: four samples), and
    # a1 ≥ a0 + 3, b1 ≥ b0 + 3 with a0 ≠ b0 put the later of a1, b1 at ≥ 4: 5 microbatches.
    jobs = [Job("a", [[10], [10]]), Job("b", [[10], [10]])]
    floor = _floor(jobs, capacity_tokens=16, pipeline_depth=3)
    assert (floor.microbatches, floor.cheap, floor.status) == (5, 4, "OPTIMAL")
    assert _floor(jobs, capacity_tokens=16, pipeline_depth=3, upper=5).status == "OPTIMAL"


def test_padding_per_job():
    # P=4, C=8: a's 3+3 = 6 tokens pad to 8 and fill a microbatch; b's 3 pad to 4: 2 microbatches, tight.
    floor = _floor([Job("a", [[3, 3]]), Job("b", [[3]])], capacity_tokens=8, pipeline_depth=1, pad_multiple=4)
    assert (floor.microbatches, floor.cheap, floor.status) == (2, 2, "OPTIMAL")


def test_bin_packing_bound_counts_what_tokens_miss():
    # C=10: 27 tokens need 3 bins by volume, but 6 fits with no 5 and 5+5+5 > 10: 6 | 6 | 5+5 | 5.
    assert bin_packing_bound([6, 6, 5, 5, 5], 10) == 4
    problem = window_problem([Job("a", [[6, 6, 5, 5, 5]])], capacity_tokens=10, pipeline_depth=1)
    assert cheap_floor(problem) == 4
    assert bin_packing_bound([], 10) == 0


# ------------------------------------------------------------------ random windows


def _brute_force(jobs: list[Job], capacity: int, depth: int, pad: int, ready: dict[str, int]) -> int:
    """The fewest microbatches of any valid schedule, by trying every position of every sample."""
    samples = [(job.name, g, n) for job in jobs for g, batch in enumerate(job.global_batches) for n in batch]
    for length in itertools.count(1):
        for where in itertools.product(range(length), repeat=len(samples)):
            if _valid(samples, where, capacity, depth, pad, ready):
                return length
    raise AssertionError("unreachable")


def _valid(samples, where, capacity, depth, pad, ready) -> bool:
    tokens: dict[tuple[int, str], int] = {}
    span: dict[tuple[str, int], list[int]] = {}
    for (job, g, n), q in zip(samples, where):
        tokens[(q, job)] = tokens.get((q, job), 0) + n
        span.setdefault((job, g), [q, q])
        span[(job, g)] = [min(span[(job, g)][0], q), max(span[(job, g)][1], q)]
    for q in set(where):
        if sum(pad_up(t, pad) for (p, _), t in tokens.items() if p == q) > capacity:
            return False
    for (job, g), (first, last) in span.items():
        if g == 0 and first < ready.get(job, 0):
            return False
        if (job, g + 1) in span and span[(job, g + 1)][0] - last < depth:
            return False
    return True


@st.composite
def tiny_windows(draw: st.DrawFn):
    limits = dict(capacity_tokens=draw(st.sampled_from([8, 12])), pipeline_depth=draw(st.integers(1, 3)),
                  pad_multiple=draw(st.sampled_from([1, 2])))
    jobs, total = [], 0
    for j in range(draw(st.integers(1, 2))):
        batches = draw(st.lists(st.lists(st.integers(1, 8), min_size=1, max_size=2), min_size=1, max_size=2))
        total += sum(map(len, batches))
        jobs.append(Job(f"j{j}", batches))
    ready = {job.name: draw(st.integers(0, 2)) for job in jobs}
    return jobs, limits, ready, total


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(tiny_windows())
def test_floor_is_the_optimum_of_tiny_windows(case):
    jobs, limits, ready, samples = case
    if samples > 5:
        return  # brute force over positions^samples
    optimum = _brute_force(jobs, limits["capacity_tokens"], limits["pipeline_depth"], limits["pad_multiple"], ready)
    floor = _floor(jobs, **limits, ready=ready)
    problem = window_problem(jobs, **limits, ready=ready)
    assert cheap_floor(problem) <= floor.microbatches == optimum  # CP-SAT settles tiny windows
    assert floor.status == "OPTIMAL"


@st.composite
def window_runs(draw: st.DrawFn):
    capacity = draw(st.sampled_from([16, 32]))
    limits = dict(capacity_tokens=capacity, pipeline_depth=draw(st.integers(1, 4)),
                  pad_multiple=draw(st.sampled_from([1, 4])))
    lengths = st.lists(st.integers(1, capacity), min_size=1, max_size=5)
    names = [f"j{j}" for j in range(draw(st.integers(1, 4)))]
    windows = [[Job(name, draw(st.lists(lengths, min_size=1, max_size=3)), first_global_batch=3 * w) for name in names]
               for w in range(2)]
    return windows, limits


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window_runs())
def test_floor_never_exceeds_a_planned_window(run):
    windows, limits = run
    for w in windows[1]:
        w.first_global_batch = len(next(j for j in windows[0] if j.name == w.name).global_batches)
    planner = WindowPlanner(**limits, time_limit_s=0.05)
    for jobs in windows:
        ready = planner.ready
        planned = len(planner.next_window(jobs).microbatches)
        floor = window_floor(jobs, **limits, ready=ready, time_limit_s=0.5)
        assert floor.cheap <= floor.microbatches <= planned


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="has 20 tokens"):
        window_floor([Job("a", [[20]])], capacity_tokens=16, pipeline_depth=1)
