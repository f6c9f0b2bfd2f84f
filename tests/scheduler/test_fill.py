"""Position-by-position filling: hand-checked streams, and every invariant on random windows."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import Job, Microbatch, Plan, PlanStats, verify
from scheduler.bound import window_problem
from scheduler.fill import FILL_ORDERS, fill
from scheduler.problem import waste_fraction


def _refs(stream: list[Microbatch]) -> list[list[str]]:
    return [[f"{job}{g}.{i}" for job, g, i in mb.samples] for mb in stream]


def _verify(stream: list[Microbatch], jobs: list[Job], limits: dict[str, int]) -> None:
    real = sum(n for job in jobs for batch in job.global_batches for n in batch)
    stats = PlanStats(num_microbatches=len(stream), num_noops=sum(mb.is_noop for mb in stream), real_tokens=real,
                      padded_tokens=real, waste_fraction=waste_fraction(real, len(stream), limits["capacity_tokens"]),
                      groups=[])
    verify(Plan(stream, stats), jobs, **limits)


def test_each_position_takes_the_fullest_set():
    # C=8, S=1. Position 0: a0 (5 + 3) and b0 (8) both fill it; `critical` prefers a, which has a second
    # global batch ahead. Position 1: a1 and b0 tie (8 each, one microbatch of work); a comes first by name.
    problem = window_problem([Job("a", [[5, 3], [8]]), Job("b", [[8]])], capacity_tokens=8, pipeline_depth=1)
    assert _refs(fill(problem, "critical")) == [["a0.0", "a0.1"], ["a1.0"], ["b0.0"]]


def test_a_no_op_where_no_job_is_allowed():
    # S=3: a1 may start 3 positions after a0, and b is not allowed before 1.
    problem = window_problem([Job("a", [[4], [4]])], capacity_tokens=8, pipeline_depth=3)
    assert _refs(fill(problem, "shortest")) == [["a0.0"], [], [], ["a1.0"]]
    problem = window_problem([Job("b", [[4]], first_global_batch=2)], capacity_tokens=8, pipeline_depth=3,
                             ready={"b": 1})
    assert _refs(fill(problem, "started")) == [[], ["b2.0"]]


def test_unknown_order():
    problem = window_problem([Job("a", [[4]])], capacity_tokens=8, pipeline_depth=1)
    with pytest.raises(ValueError, match="order='longest' is not one of"):
        fill(problem, "longest")


@st.composite
def windows(draw: st.DrawFn):
    capacity = draw(st.sampled_from([16, 32, 64]))
    limits = dict(capacity_tokens=capacity, pipeline_depth=draw(st.integers(1, 4)), pad_multiple=1)
    lengths = st.lists(st.integers(1, capacity), min_size=1, max_size=6)
    jobs = [Job(f"j{j}", draw(st.lists(lengths, min_size=1, max_size=4))) for j in range(draw(st.integers(1, 5)))]
    ready = {job.name: draw(st.integers(0, 3)) for job in jobs if draw(st.booleans())}
    return jobs, limits, ready


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows())
def test_random_fills_keep_every_invariant(case):
    jobs, limits, ready = case
    problem = window_problem(jobs, **limits, ready=ready)
    for order in FILL_ORDERS:
        for seed in (None, 0, 1):
            stream = fill(problem, order, None if seed is None else random.Random(seed))
            _verify(stream, jobs, limits)
            for position, mb in enumerate(stream):
                assert all(position >= ready.get(job, 0) for job, _, _ in mb.samples)
            assert stream and not stream[-1].is_noop
            again = fill(problem, order, None if seed is None else random.Random(seed))
            assert again == stream  # same input and seed, same stream
