"""Windowed planning: the distance rule across windows, jobs joining and leaving, stream verification."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import CostModel, Job, WindowPlanner, plan, verify_windows, window_global_batches

LIMITS = dict(capacity_tokens=16, pipeline_depth=3, pad_multiple=1)


def _stream(windows) -> list[str]:
    return ["+".join(sorted({f"{j}{g}" for j, g, _ in mb.samples})) or "-" for w in windows for mb in w.microbatches]


def test_distance_rule_holds_across_windows():
    # One job, one microbatch per global batch, S=3: the second window opens with two no-ops.
    planner = WindowPlanner(**LIMITS, time_limit_s=0.1)
    windows = [planner.next_window([Job("a", [[5]], first_global_batch=g)]) for g in range(3)]
    assert _stream(windows) == ["a0", "-", "-", "a1", "-", "-", "a2"]
    assert planner.position == 7
    verify_windows(windows, [[Job("a", [[5]], first_global_batch=g)] for g in range(3)], **LIMITS)


def test_jobs_join_and_leave_between_windows():
    planner = WindowPlanner(**LIMITS, time_limit_s=0.1)
    w0 = [Job("a", [[10], [10]]), Job("b", [[9]])]
    w1 = [Job("b", [[9]], first_global_batch=1), Job("c", [[8], [8]], first_global_batch=4)]  # a left, c joined
    windows = [planner.next_window(w0), planner.next_window(w1)]
    verify_windows(windows, [w0, w1], **LIMITS)
    second = {(j, g) for mb in windows[1].microbatches for j, g, _ in mb.samples}
    assert second == {("b", 1), ("c", 4), ("c", 5)}


def test_a_job_must_continue_where_it_stopped():
    planner = WindowPlanner(**LIMITS, time_limit_s=0.1)
    planner.next_window([Job("a", [[5], [5]])])
    with pytest.raises(ValueError, match="job 'a' first_global_batch=3, .* give it first_global_batch=2"):
        planner.next_window([Job("a", [[5]], first_global_batch=3)])


def test_verify_windows_catches_a_boundary_violation():
    # Two windows planned without a planner: a1 right after a0, 1 < S apart.
    jobs = [[Job("a", [[5]])], [Job("a", [[5]], first_global_batch=1)]]
    windows = [plan(js, **LIMITS, time_limit_s=0.1) for js in jobs]
    with pytest.raises(ValueError, match="job 'a' global batch 1 starts at microbatch 1, 1 after"):
        verify_windows(windows, jobs, **LIMITS)
    with pytest.raises(ValueError, match="planned in window 1 and in an earlier one"):
        verify_windows([windows[0], windows[0]], [jobs[0], jobs[0]], **LIMITS)


def test_bad_planner_arguments():
    with pytest.raises(ValueError, match="pipeline_depth=0"):
        WindowPlanner(capacity_tokens=16, pipeline_depth=0)
    with pytest.raises(ValueError, match="time_limit_s=0"):
        WindowPlanner(capacity_tokens=16, pipeline_depth=1, time_limit_s=0)
    with pytest.raises(ValueError, match="shorten_time_limit_s=-1 must be a number of seconds ≥ 0"):
        WindowPlanner(capacity_tokens=16, pipeline_depth=1, shorten_time_limit_s=-1)


def test_ready_is_the_carry_in_of_the_next_window():
    planner = WindowPlanner(**LIMITS, time_limit_s=0.1)
    assert planner.ready == {}
    planner.next_window([Job("a", [[5]]), Job("b", [[16]])])  # a and b cannot share: a | b, or b | a
    assert sorted(planner.ready.values()) == [1, 2]  # S=3 after positions 0 and 1 of a 2-long window


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[list[Job]], dict[str, int]]:
    """Windows of 1-2 global batches per active job; jobs start and stop at random windows."""
    limits = dict(capacity_tokens=32, pipeline_depth=draw(st.integers(1, 4)), pad_multiple=draw(st.sampled_from([1, 4])))
    num_windows = draw(st.integers(1, 4))
    spans = [sorted(draw(st.lists(st.integers(0, num_windows), min_size=2, max_size=2, unique=True)))
             for _ in range(draw(st.integers(1, 4)))]
    next_batch = [0] * len(spans)
    windows: list[list[Job]] = []
    for w in range(num_windows):
        jobs = []
        for j, (start, stop) in enumerate(spans):
            if start <= w < stop:
                batches = draw(st.lists(st.lists(st.integers(1, 32), min_size=1, max_size=4), min_size=1, max_size=2))
                jobs.append(Job(f"j{j}", batches, first_global_batch=next_batch[j]))
                next_batch[j] += len(batches)
        windows.append(jobs)
    return [w for w in windows if w], limits


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_random_window_streams_verify(run):
    jobs_per_window, limits = run
    planner = WindowPlanner(**limits, time_limit_s=0.05, num_workers=1)
    windows = [planner.next_window(jobs) for jobs in jobs_per_window]
    verify_windows(windows, jobs_per_window, **limits)
    assert planner.position == sum(len(w.microbatches) for w in windows)


def test_window_planner_keeps_a_cost_capacity():
    # 1 per token + 0.01 per token²: 100 tokens cost 200, 50 cost 75; capacity 201 splits what 1000 tokens would not.
    model = CostModel(token_coef=1.0, attn_coef=0.01)
    limits = dict(capacity_tokens=1000, pipeline_depth=1, pad_multiple=1)
    planner = WindowPlanner(**limits, time_limit_s=0.1, cost_model=model, capacity_cost=201.0)
    jobs = [[Job("a", [[100, 50, 50]])], [Job("a", [[100, 50, 50]], first_global_batch=1)]]
    windows = [planner.next_window(js) for js in jobs]
    assert [len(w.microbatches) for w in windows] == [2, 2]
    verify_windows(windows, jobs, **limits, cost_model=model, capacity_cost=201.0)


def test_window_global_batches_fills_every_slot_and_64_microbatches():
    # 5 microbatches a round: 64 / 5 -> 13 at one slot, as at 4 (16 x 4 = 64); 8 slots want 128 -> 26, capped.
    assert [window_global_batches(37_000, 8192, slots) for slots in (1, 4, 8)] == [13, 13, 16]
    assert window_global_batches(100_000, 4096, 1) == 3  # 25 microbatches a round: 2 rounds fall short of 64
    assert window_global_batches(10**7, 8192, 2) == 1  # one round is more than enough
    assert window_global_batches(1, 8192, 1) == 16
    assert window_global_batches(37_000, 8192, 4, most=1) == 1
    for bad in (dict(round_tokens=0), dict(round_tokens=-1), dict(capacity_tokens=0), dict(slots=True),
                dict(most=1.5)):
        args = {**dict(round_tokens=100, capacity_tokens=64, slots=1, most=16), **bad}
        name, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=f"{name}={value!r} must be a positive integer"):
            window_global_batches(**args)
