"""Cost model: values, least-squares fit, and a cost capacity honoured by packer, planner and verifier."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import CostModel, Job, Microbatch, Plan, fit_cost_model, plan, verify
from scheduler.cost import CostBudget
from scheduler.cpsat import pack
from scheduler.greedy import first_fit_decreasing_padded, lower_bounds, packing_cost
from scheduler.problem import Item, PackingProblem, PlanStats, SolverParams, waste_fraction


def test_cost_is_tokens_plus_attention_plus_overhead():
    model = CostModel(token_coef=2.0, attn_coef=0.5, overhead=3.0)
    assert model.cost([4, 2]) == 3 + 2 * 6 + 0.5 * (16 + 4)
    assert model.cost([4, 2], padded_tokens=8) == 3 + 2 * 8 + 0.5 * 20  # padding adds GEMM rows, not attention
    assert model.cost([]) == 0.0  # a no-op


@pytest.mark.parametrize("kwargs, field", [
    (dict(token_coef=-1.0), "token_coef"),
    (dict(attn_coef=math.nan), "attn_coef"),
    (dict(overhead="1"), "overhead"),
    (dict(token_coef=0.0, attn_coef=0.0), "both 0"),
])
def test_bad_cost_model(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CostModel(**kwargs)


def test_fit_recovers_the_coefficients():
    true = CostModel(token_coef=1e-4, attn_coef=3e-8, overhead=2e-3)
    shapes = [[100], [400, 50], [1000], [300, 300, 300], [2000, 10], [64] * 16]
    fitted = fit_cost_model([(lengths, true.cost(lengths)) for lengths in shapes])
    for name in ("token_coef", "attn_coef", "overhead"):
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-6)


def test_fit_keeps_coefficients_non_negative():
    # Times linear in tokens with a little noise that an unconstrained fit turns into attn_coef < 0.
    shapes = [[100], [200], [400], [800], [1600]]
    noise = [0.0, 0.001, 0.0, -0.001, -0.004]
    fitted = fit_cost_model([(lengths, 0.01 * sum(lengths) + e) for lengths, e in zip(shapes, noise)])
    assert fitted.attn_coef >= 0 and fitted.overhead >= 0
    assert fitted.token_coef == pytest.approx(0.01, rel=0.01)


@pytest.mark.parametrize("measurements, match", [
    ([([100], 1.0), ([200], 2.0)], "at least 3"),
    ([([100], 1.0), ([], 2.0), ([300], 3.0)], "measurement 1"),
    ([([100], 1.0), ([200], -2.0), ([300], 3.0)], "measurement 1: seconds"),
    ([([100], 1.0), ([200], 1.0), ([300], 1.0)], "do not grow"),
])
def test_bad_measurements(measurements, match):
    with pytest.raises(ValueError, match=match):
        fit_cost_model(measurements)


# ------------------------------------------------------------------ cost capacity

# 1 per token + 0.01 per token²: a sample of 100 costs 200, of 50 costs 75. capacity_cost 201.
MODEL = CostModel(token_coef=1.0, attn_coef=0.01)


def test_cost_capacity_splits_what_tokens_alone_would_pack_together():
    jobs = [Job("a", [[100, 50, 50]])]
    by_tokens = plan(jobs, capacity_tokens=1000, pipeline_depth=1, pad_multiple=1, time_limit_s=1.0)
    assert by_tokens.stats.num_microbatches == 1
    by_cost = plan(jobs, capacity_tokens=1000, pipeline_depth=1, pad_multiple=1, time_limit_s=1.0,
                   cost_model=MODEL, capacity_cost=201.0)
    assert sorted(mb.samples for mb in by_cost.microbatches) == [[("a", 0, 0)], [("a", 0, 1), ("a", 0, 2)]]
    with pytest.raises(ValueError, match="microbatch 0 costs 350 > capacity_cost=201"):
        verify(by_tokens, jobs, capacity_tokens=1000, pipeline_depth=1, pad_multiple=1,
               cost_model=MODEL, capacity_cost=201.0)


def test_budget_rounds_conservatively():
    budget = CostBudget.from_model(MODEL, 201.0, pad_multiple=4)
    # 200 cost: 25 blocks of 4 tokens (100 tokens) and 100² attention; fits 201 and stays below it in units.
    assert budget.fits(25, budget.item_units(100))
    assert not budget.fits(26, budget.item_units(100) + budget.item_units(2))  # 204 + 0.04 > 201


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity_cost=100.0), "needs a cost_model"),
    (dict(cost_model=MODEL, capacity_cost=-1.0), "capacity_cost=-1.0 must be"),
    (dict(cost_model=MODEL, capacity_cost=150.0), "job 'a' global batch 0 sample 0 of 100 tokens costs more"),
])
def test_bad_cost_capacity(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan([Job("a", [[100, 50]])], capacity_tokens=1000, pipeline_depth=1, pad_multiple=1, **kwargs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=5), min_size=1, max_size=3),
       pad=st.sampled_from([1, 4]), attn=st.sampled_from([0.0, 0.05, 0.5]))
def test_cost_capacity_cpsat_never_worse_than_greedy(lengths, pad, attn):
    model = CostModel(token_coef=1.0, attn_coef=attn)
    capacity_cost = 64.0 + attn * 32 * 32
    budget = CostBudget.from_model(model, capacity_cost, pad)
    items = tuple(Item(f"j{j}", 0, i, n) for j, batch in enumerate(lengths) for i, n in enumerate(batch))
    problem = PackingProblem(items, 64, pad, budget)
    greedy = first_fit_decreasing_padded(problem)
    packed = pack(problem, SolverParams(time_limit_s=0.2, num_workers=1))
    assert lower_bounds(problem) <= packing_cost(problem, packed.bins) <= packing_cost(problem, greedy)
    jobs = [Job(f"j{j}", [batch]) for j, batch in enumerate(lengths)]
    microbatches = [Microbatch([items[i].ref for i in b]) for b in packed.bins]
    real = sum(map(sum, lengths))
    stats = PlanStats(num_microbatches=len(microbatches), num_noops=0, real_tokens=real,
                      padded_tokens=sum(packing_cost(problem, [b])[2] * pad for b in packed.bins),
                      waste_fraction=waste_fraction(real, len(microbatches), 64), groups=[])
    verify(Plan(microbatches, stats), jobs, capacity_tokens=64, pipeline_depth=1, pad_multiple=pad,
           cost_model=model, capacity_cost=capacity_cost)
