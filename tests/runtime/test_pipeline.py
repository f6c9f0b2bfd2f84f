"""1F1B op order: one window, and a stream cut into windows that are not drained."""

from __future__ import annotations

import itertools

import pytest

from runtime.pipeline import OneFOneB, one_f_one_b


def test_one_window_order_by_hand():
    assert one_f_one_b(0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert one_f_one_b(2, 3, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert one_f_one_b(0, 4, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]  # fewer microbatches than warm-up


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("cuts", [(1,), (3,), (2, 3), (1, 2, 5), (4, 6)])
def test_windows_continue_the_stream_without_a_flush(stages, cuts):
    total = 7
    for stage in range(stages):
        schedule, ops = OneFOneB(stage, stages), []
        for end in cuts:
            ops += schedule.ops(end, drain=False)
            warmup = stages - 1 - stage
            assert schedule.in_flight == min(warmup, end)  # only the last forwards' backwards are owed
            assert schedule.next_forward == end  # every received microbatch went forward
        ops += schedule.ops(total, drain=True)
        assert ops == one_f_one_b(stage, stages, total), (stage, cuts)
        assert schedule.in_flight == 0


def test_no_stage_waits_on_an_op_its_neighbour_has_not_reached():
    """Cut at the same microbatch on every stage, stage i + 1 has done every forward stage i's backwards of
    this window need, and stage i every forward stage i + 1 needs: the windows cannot deadlock."""
    stages = 4
    for end in range(1, 9):
        done = []
        for stage in range(stages):
            schedule = OneFOneB(stage, stages)
            done.append(schedule.ops(end, drain=False))
        for stage, nxt in itertools.pairwise(range(stages)):
            backwards = {i for kind, i in done[stage] if kind == "B"}
            assert backwards <= {i for kind, i in done[nxt] if kind == "B"}  # their gradients were sent
            assert {i for kind, i in done[nxt] if kind == "F"} <= {i for kind, i in done[stage] if kind == "F"}
