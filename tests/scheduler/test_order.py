"""Grouping and ordering: hand-checked streams (no-ops, merged remainders, jobs leaving)."""

from __future__ import annotations

from scheduler import Job, plan
from scheduler.order import Pack, choose_groups, group_jobs, order_packs

ORDER = dict(capacity_tokens=16, pad_multiple=1)


def _pack(group: int, global_batch: int, job: str, *bins: int) -> Pack:
    """A pack of one job whose bins hold one sample each, of the given lengths."""
    return Pack(group, global_batch, [[(job, global_batch, i)] for i in range(len(bins))],
                [{job: n} for n in bins])


def _stream(microbatches) -> list[str]:
    """'a0+b0' for a microbatch with samples of a's and b's global batch 0, '-' for a no-op."""
    return ["+".join(sorted({f"{j}{g}" for j, g, _ in mb.samples})) or "-" for mb in microbatches]


def _job(name: str, mean: int) -> Job:
    return Job(name, [[mean - 1, mean + 1]])


def test_groups_pair_long_with_short_jobs():
    jobs = [_job(f"j{i}", 100 * i) for i in range(1, 7)]  # j6 longest
    # Serpentine over j6..j1: groups 0 1 1 0 0 1 for two groups, 0 1 2 2 1 0 for three.
    assert group_jobs(jobs, 2) == [["j6", "j3", "j2"], ["j5", "j4", "j1"]]
    assert group_jobs(jobs, 3) == [["j6", "j1"], ["j5", "j2"], ["j4", "j3"]]
    assert group_jobs(jobs, 1) == [["j6", "j5", "j4", "j3", "j2", "j1"]]


def test_one_job_waits_with_no_ops():
    # Each global batch is one microbatch; S=4 needs 3 empty slots between them, and nothing else can run.
    p = plan([Job("a", [[5], [5], [5]])], capacity_tokens=16, pipeline_depth=4, pad_multiple=1, time_limit_s=0.1)
    assert _stream(p.microbatches) == ["a0", "-", "-", "-", "a1", "-", "-", "-", "a2"]
    assert (p.stats.num_microbatches, p.stats.num_noops) == (9, 6)


def test_remainder_merges_into_an_earlier_microbatch():
    # C=16, S=2. A0 = [a:10][a:2] at 0, 1. B0's remainder (b:3) fits at 0 (13 tokens, the fullest
    # choice) and b is allowed there; A1 may start at 1 + 2 = 3, right after B0's full bin at 2.
    packs = [[_pack(0, 0, "a", 10, 2), _pack(0, 1, "a", 12)], [_pack(1, 0, "b", 10, 3)]]
    stream = order_packs(packs, pipeline_depth=2, **ORDER)
    assert [mb.samples for mb in stream] == [
        [("a", 0, 0), ("b", 0, 1)], [("a", 0, 1)], [("b", 0, 0)], [("a", 1, 0)],
    ]


def test_no_merge_that_would_leave_a_no_op():
    # a0 and b0 would fit one microbatch, but then a1 and b1 must wait a slot (S=2): b0 takes it instead.
    packs = [[_pack(0, g, "a", 5) for g in range(2)], [_pack(1, g, "b", 5) for g in range(2)]]
    assert _stream(order_packs(packs, pipeline_depth=2, **ORDER)) == ["a0", "b0", "a1", "b1"]


def test_no_op_only_where_nothing_can_run():
    # S=3 with two one-microbatch jobs: every job needs 3 slots per global batch, two are real.
    packs = [[_pack(0, g, "a", 5) for g in range(2)], [_pack(1, g, "b", 5) for g in range(2)]]
    assert _stream(order_packs(packs, pipeline_depth=3, **ORDER)) == ["a0", "b0", "-", "a1", "b1"]


def test_two_small_jobs_are_interleaved_rather_than_packed_together():
    # One group: [a0+b0, -, a1+b1] (a no-op each round at S=2). Two groups: a0 b0 a1 b1, no waiting.
    jobs = [Job("a", [[5], [5]]), Job("b", [[5], [5]])]
    assert choose_groups(jobs, capacity_tokens=16, pipeline_depth=2, pad_multiple=1) == [["a"], ["b"]]
    packs = [[_pack(0, g, "a", 5) for g in range(2)], [_pack(1, g, "b", 5) for g in range(2)]]
    assert _stream(order_packs(packs, pipeline_depth=2, **ORDER)) == ["a0", "b0", "a1", "b1"]
    # Compaction then counts slots, no-ops included: three (a0+b0, -, a1+b1) waste less capacity than four.
    p = plan(jobs, capacity_tokens=16, pipeline_depth=2, pad_multiple=1, time_limit_s=0.1)
    assert _stream(p.microbatches) == ["a0+b0", "-", "a1+b1"]


def test_without_a_pipeline_everything_is_one_group():
    jobs = [Job("a", [[5], [5]]), Job("b", [[5], [5]])]
    p = plan(jobs, capacity_tokens=16, pipeline_depth=1, pad_multiple=1, time_limit_s=0.1)
    assert p.stats.groups == [["a", "b"]]
    assert _stream(p.microbatches) == ["a0+b0", "a1+b1"]


def test_a_finished_job_leaves_and_the_others_continue():
    # short has one global batch, long four (one microbatch each, S=2). Once short is done, long alone
    # needs a no-op between its global batches; nothing is truncated to the shorter job.
    jobs = [Job("long", [[6, 6]] * 4), Job("short", [[3]])]
    p = plan(jobs, capacity_tokens=16, pipeline_depth=2, pad_multiple=1, time_limit_s=0.1)
    assert _stream(p.microbatches) == ["long0", "short0", "long1", "-", "long2", "-", "long3"]
    assert p.stats.real_tokens == 4 * 12 + 3
