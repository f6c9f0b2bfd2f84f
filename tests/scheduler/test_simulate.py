"""1F1B simulator: hand-checked timelines, the optimizer-step dependency, and plans it can run."""

from __future__ import annotations

import pytest

from scheduler import CostModel, Job, Microbatch, plan, simulate_1f1b, simulate_plan, token_imbalance
from scheduler.simulate import microbatch_lengths, microbatch_padded_tokens, stage_order


def _mb(*refs: tuple[str, int]) -> Microbatch:
    return Microbatch([(job, g, 0) for job, g in refs], is_noop=not refs)


def test_stage_order_is_1f1b():
    assert stage_order(3, stages=2, stage=0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert stage_order(3, stages=2, stage=1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert stage_order(1, stages=4, stage=0) == [("F", 0), ("B", 0)]


def test_one_stage_runs_back_to_back():
    sim = simulate_1f1b([_mb(("a", 0)), _mb(("b", 0)), _mb(("a", 1))], [1, 1, 1], [2, 2, 2], stages=1)
    assert sim.makespan == 9 and sim.bubble_fraction == 0


def test_two_stages_hand_checked():
    # Stage 0: F0 [0,1] F1 [1,2] B0 [4,6] B1 [7,9]; stage 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7].
    sim = simulate_1f1b([_mb(("a", 0)), _mb(("b", 0))], [1, 1], [2, 2], stages=2)
    assert sim.makespan == 9
    assert sim.stage_span == [9, 6] and sim.stage_busy == [6, 6]
    assert sim.bubble_fraction == pytest.approx((3 / 9 + 0) / 2)
    assert sim.max_bubble_fraction == pytest.approx(3 / 9)


def test_next_global_batch_waits_for_the_optimizer_step():
    # [a0, no-op, a1] on 2 stages: F(2) on stage 0 waits for B(0) there (ends at 6), stage 1 for its B(0).
    # Stage 0: F0 [0,1] noop B0 [4,6] F2 [6,7] B2 [10,12]; stage 1: F0 [1,2] B0 [2,4] F2 [7,8] B2 [8,10].
    sim = simulate_1f1b([_mb(("a", 0)), _mb(), _mb(("a", 1))], [1, 0, 1], [2, 0, 2], stages=2)
    assert sim.makespan == 12
    assert sim.stage_span == [12, 9]
    assert sim.bubble_fraction == pytest.approx((6 / 12 + 3 / 9) / 2)


def test_too_close_global_batches_cannot_run():
    with pytest.raises(ValueError, match="pipeline_depth ≥ 2"):
        simulate_1f1b([_mb(("a", 0)), _mb(("a", 1))], [1, 1], [2, 2], stages=2)


@pytest.mark.parametrize("args, match", [
    (dict(fwd_cost=[1.0], bwd_cost=[1.0, 1.0], stages=1), "fwd_cost has 1 entries for 2"),
    (dict(fwd_cost=[1.0, -1.0], bwd_cost=[1.0, 1.0], stages=1), r"fwd_cost\[1\]=-1.0"),
    (dict(fwd_cost=[1.0, 1.0], bwd_cost=[1.0, 1.0], stages=0), "stages=0"),
])
def test_bad_simulator_input(args, match):
    with pytest.raises(ValueError, match=match):
        simulate_1f1b([_mb(("a", 0)), _mb(("b", 0))], **args)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_every_verified_plan_runs(stages):
    jobs = [Job(f"j{j}", [[40 + 13 * j + 7 * i for i in range(5)] for _ in range(3)]) for j in range(4)]
    p = plan(jobs, capacity_tokens=256, pipeline_depth=stages, pad_multiple=8, time_limit_s=0.02)
    sim = simulate_plan(p.microbatches, jobs, CostModel(), stages=stages, pad_multiple=8)
    work = sum(CostModel().cost(lengths) for lengths in microbatch_lengths(p.microbatches, jobs))
    assert sim.makespan >= 3 * work / stages  # forward + 2x backward, spread at best evenly over the stages
    assert 0 <= sim.bubble_fraction <= sim.max_bubble_fraction < 1
    if stages == 1:
        assert sim.bubble_fraction == 0


def test_token_imbalance():
    assert token_imbalance([[10, 10], [], [20]]) == 1.0
    assert token_imbalance([[30], [10]]) == 1.5


def test_padded_tokens_pad_each_job_separately():
    jobs = [Job("a", [[3, 5]]), Job("b", [[6]], first_global_batch=2)]
    mbs = [Microbatch([("a", 0, 0), ("a", 0, 1), ("b", 2, 0)]), Microbatch([], is_noop=True)]
    lengths = microbatch_lengths(mbs, jobs)
    assert lengths == [[3, 5, 6], []]
    assert microbatch_padded_tokens(mbs, lengths, pad_multiple=4) == [8 + 8, 0]  # a: 8 -> 8, b: 6 -> 8
    assert microbatch_padded_tokens(mbs, lengths, pad_multiple=1) == [14, 0]
