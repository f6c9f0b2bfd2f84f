"""Compaction after ordering: hand-checked streams, and invariants on random ones."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import CostModel, Job, Microbatch, Plan, PlanStats, verify
from scheduler.compact import compact
from scheduler.greedy import first_fit_decreasing_padded
from scheduler.order import group_problems, make_pack, order_packs
from scheduler.problem import SampleRef, waste_fraction
from scheduler.simulate import microbatch_lengths, microbatch_padded_tokens
from scheduler.verify import cost_budget


def _stream(*microbatches: list[SampleRef]) -> list[Microbatch]:
    return [Microbatch(list(samples), is_noop=not samples) for samples in microbatches]


def _lengths(jobs: list[Job]) -> dict[SampleRef, int]:
    return {(job.name, g, i): n for job in jobs
            for g, batch in enumerate(job.global_batches, start=job.first_global_batch) for i, n in enumerate(batch)}


def _plan(stream: list[Microbatch], jobs: list[Job], capacity: int, pad: int) -> Plan:
    """`stream` with the stats `verify` expects."""
    real = sum(_lengths(jobs).values())
    padded = sum(microbatch_padded_tokens(stream, microbatch_lengths(stream, jobs), pad))
    stats = PlanStats(num_microbatches=len(stream), num_noops=sum(mb.is_noop for mb in stream), real_tokens=real,
                      padded_tokens=padded, waste_fraction=waste_fraction(real, len(stream), capacity), groups=[])
    return Plan(stream, stats)


def test_a_remainder_moves_and_its_microbatch_goes():
    # C=16: a0's remainder (4 tokens, alone at 2) fits beside a0's other sample at 0 (10 + 4; the tie with b0's
    # microbatch goes to the earlier one), so microbatch 2 is emptied and deleted.
    jobs = [Job("a", [[10, 4]]), Job("b", [[10]])]
    stream = _stream([("a", 0, 0)], [("b", 0, 0)], [("a", 0, 1)])
    out = compact(stream, _lengths(jobs), pipeline_depth=2, capacity_tokens=16, pad_multiple=1)
    assert [mb.samples for mb in out] == [[("a", 0, 0), ("a", 0, 1)], [("b", 0, 0)]]


def test_no_deletion_that_breaks_the_distance_rule():
    # S=2: a0 at 0 and a1 at 2 must stay two apart. b0 (4 tokens) fits beside a0 or a1, but its microbatch
    # cannot be deleted (a1 would start one after a0 ended), and a no-op in its place saves nothing: unchanged.
    jobs = [Job("a", [[10], [10]]), Job("b", [[4]])]
    stream = _stream([("a", 0, 0)], [("b", 0, 0)], [("a", 1, 0)])
    assert compact(stream, _lengths(jobs), pipeline_depth=2, capacity_tokens=16, pad_multiple=1) == stream


def test_a_job_never_moves_before_its_ready_position():
    # ready[a] = 1 (the previous window's carry-over): a's sample may not join b's microbatch at 0, and deleting
    # microbatch 0 after b joined a would start a at 0; so nothing changes.
    jobs = [Job("a", [[4]]), Job("b", [[10]])]
    stream = _stream([("b", 0, 0)], [("a", 0, 0)])
    assert compact(stream, _lengths(jobs), pipeline_depth=1, capacity_tokens=16, pad_multiple=1, ready={"a": 1}) == stream


def test_cost_capacity_is_kept():
    # 1 per token + 0.01 per token²: [100] costs 200, [100, 50] 275 > 201, [50, 50] 150. Tokens alone (C=1000)
    # would merge all three microbatches; the cost capacity merges only the two short samples.
    model = CostModel(token_coef=1.0, attn_coef=0.01)
    budget = cost_budget(model, 201.0, 1)
    jobs = [Job("a", [[100, 50, 50]])]
    stream = _stream([("a", 0, 0)], [("a", 0, 1)], [("a", 0, 2)])
    out = compact(stream, _lengths(jobs), pipeline_depth=1, capacity_tokens=1000, pad_multiple=1, budget=budget)
    assert [mb.samples for mb in out] == [[("a", 0, 0)], [("a", 0, 1), ("a", 0, 2)]]
    verify(_plan(out, jobs, 1000, 1), jobs, capacity_tokens=1000, pipeline_depth=1, pad_multiple=1,
           cost_model=model, capacity_cost=201.0)


def test_padding_counts_against_the_capacity():
    # pad 8, C=16: a's 5 and b's 3 + 3 pad to 8 + 8 = 16, full. Three jobs never share a microbatch (8 x 3 = 24
    # padded although 14 real tokens would fit), so of three microbatches two stay, c apart from a or b.
    jobs = [Job("a", [[5]]), Job("b", [[3, 3]]), Job("c", [[3]])]
    stream = _stream([("a", 0, 0), ("b", 0, 0)], [("b", 0, 1)], [("c", 0, 0)])
    out = compact(stream, _lengths(jobs), pipeline_depth=1, capacity_tokens=16, pad_multiple=8)
    assert len(out) == 2 and all(len({job for job, _, _ in mb.samples}) <= 2 for mb in out)
    verify(_plan(out, jobs, 16, 8), jobs, capacity_tokens=16, pipeline_depth=1, pad_multiple=8)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Job], dict[str, int], dict[str, int]]:
    """Random jobs, limits and ready positions; the stream comes from greedy packs and `order_packs`."""
    capacity = draw(st.sampled_from([16, 32, 64]))
    limits = dict(capacity_tokens=capacity, pipeline_depth=draw(st.integers(1, 4)),
                  pad_multiple=draw(st.sampled_from([1, 2, 4])))
    lengths = st.lists(st.integers(1, capacity), min_size=1, max_size=6)
    jobs = [Job(f"j{j}", draw(st.lists(lengths, min_size=1, max_size=4))) for j in range(draw(st.integers(1, 5)))]
    ready = {job.name: draw(st.integers(0, 3)) for job in jobs if draw(st.booleans())}
    return jobs, limits, ready


def _ordered(jobs: list[Job], limits: dict[str, int], ready: dict[str, int]) -> list[Microbatch]:
    packs = [[make_pack(problem, first_fit_decreasing_padded(problem), gi, g)
              for g, problem in enumerate(group_problems([job], limits["capacity_tokens"], limits["pad_multiple"]))]
             for gi, job in enumerate(jobs)]
    return order_packs(packs, **limits, ready=ready)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_random_streams_stay_valid_and_never_grow(case):
    jobs, limits, ready = case
    before = _ordered(jobs, limits, ready)
    after = compact(before, _lengths(jobs), **limits, ready=ready)
    verify(_plan(after, jobs, limits["capacity_tokens"], limits["pad_multiple"]), jobs, **limits)
    # waste = 1 - real / (microbatches x capacity) never grows, nor no-ops at the same length
    assert (len(after), sum(mb.is_noop for mb in after)) <= (len(before), sum(mb.is_noop for mb in before))
    for position, mb in enumerate(after):
        assert all(position >= ready.get(job, 0) for job, _, _ in mb.samples)
    assert compact(before, _lengths(jobs), **limits, ready=ready) == after  # same input, same stream


def test_load_is_levelled_at_the_same_count():
    # C=16, 18 tokens: two microbatches either way. a0's 2-token sample moves beside b0 (14 + 4 → 12 + 6):
    # Σ load² falls from 212 to 180; the 12-token sample cannot follow (6 + 12 > 16).
    jobs = [Job("a", [[12, 2]]), Job("b", [[4]])]
    stream = _stream([("a", 0, 0), ("a", 0, 1)], [("b", 0, 0)])
    out = compact(stream, _lengths(jobs), pipeline_depth=1, capacity_tokens=16, pad_multiple=1)
    assert [mb.samples for mb in out] == [[("a", 0, 0)], [("a", 0, 1), ("b", 0, 0)]]


def test_levelling_keeps_the_distance_rule():
    # S=2: a0's 2-token sample would level 12, 3, 10 better beside b0, but a0 would then end at 1, one before a1.
    jobs = [Job("a", [[10, 2], [10]]), Job("b", [[3]])]
    stream = _stream([("a", 0, 0), ("a", 0, 1)], [("b", 0, 0)], [("a", 1, 0)])
    assert compact(stream, _lengths(jobs), pipeline_depth=2, capacity_tokens=16, pad_multiple=1) == stream
