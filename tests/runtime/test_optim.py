"""Per-job learning-rate schedules and gradient clipping (runtime/optim), checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

import lorafusion as lf
from lorafusion.schedule import lr_at
from runtime.optim import AdamWOptimizer


def spec(**kwargs) -> lf.JobSpec:
    return lf.JobSpec(name="j", dataset="unused.jsonl", **kwargs)


# Convention (see lr_at): warmup step i (0-based) has peak·(i+1)/warmup, so the last warmup step is at
# the peak; the decay runs from the first post-warmup step (progress 0, the peak) and reaches the floor
# (min_lr_ratio·peak) at step total_steps, one past the last step, so the last step still learns.
C1, C2, C3 = (0.5 * (1 + math.cos(math.pi * 0.25))), (0.5 * (1 + math.cos(math.pi * 0.5))), (0.5 * (1 + math.cos(math.pi * 0.75)))


@pytest.mark.parametrize("schedule, min_ratio, expected", [
    # peak 0.1, warmup 2, total 6 -> steps 2..5 have progress 0, 1/4, 2/4, 3/4; step 6 is at the floor
    ("constant", 0.0, [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
    ("linear", 0.0, [0.05, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0]),
    ("linear", 0.1, [0.05, 0.1, 0.1, 0.0775, 0.055, 0.0325, 0.01]),
    ("cosine", 0.0, [0.05, 0.1, 0.1, 0.1 * C1, 0.1 * C2, 0.1 * C3, 0.0]),
    ("cosine", 0.2, [0.05, 0.1, 0.1, 0.1 * (0.2 + 0.8 * C1), 0.1 * (0.2 + 0.8 * C2), 0.1 * (0.2 + 0.8 * C3), 0.02]),
])
def test_lr_schedule_with_warmup(schedule, min_ratio, expected):
    job = spec(learning_rate=0.1, warmup_steps=2, lr_schedule=schedule, min_lr_ratio=min_ratio)
    got = [lr_at(job, step, total_steps=6) for step in range(7)]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_without_warmup_starts_at_the_peak(schedule):
    job = spec(learning_rate=3e-4, lr_schedule=schedule)
    assert lr_at(job, 0, total_steps=10) == pytest.approx(3e-4)


def test_cosine_midpoint_is_half_the_peak():
    job = spec(learning_rate=1.0, lr_schedule="cosine")  # decay over steps 0..9, floor at step 10
    assert lr_at(job, 5, total_steps=10) == pytest.approx(0.5)
    values = [lr_at(job, s, total_steps=10) for s in range(10)]
    assert values[-1] > 0.0
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_one_step_job_uses_the_peak():
    for schedule in ("linear", "cosine"):
        assert lr_at(spec(learning_rate=0.5, lr_schedule=schedule), 0, total_steps=1) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- clipping


def _params_with_grads(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def _grad_seen_by_adam(opt: AdamWOptimizer) -> list[torch.Tensor]:
    """After one AdamW step exp_avg = (1 - beta1)·g, so g (after clipping) can be read back."""
    beta1 = opt.spec.adam_betas[0]
    return [opt.optimizer.state[p]["exp_avg"] / (1 - beta1) for p in opt.params]


def test_clipping_scales_the_gradient_to_max_grad_norm():
    params = _params_with_grads([3.0, 0.0], [0.0, 4.0])  # global norm 5
    opt = AdamWOptimizer(spec(learning_rate=0.1, max_grad_norm=1.0), params, total_steps=10)
    norm = opt.grad_norm_sq() ** 0.5
    assert norm == pytest.approx(5.0)
    opt.step(norm)
    seen = _grad_seen_by_adam(opt)
    assert torch.allclose(seen[0], torch.tensor([0.6, 0.0]), atol=1e-6)
    assert torch.allclose(seen[1], torch.tensor([0.0, 0.8]), atol=1e-6)
    assert math.sqrt(sum(float(s.pow(2).sum()) for s in seen)) == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad is None for p in params), "gradients are cleared after the step"


def test_no_clipping_below_the_limit_or_when_disabled():
    for max_norm in (10.0, None):
        params = _params_with_grads([3.0, 0.0], [0.0, 4.0])
        opt = AdamWOptimizer(spec(learning_rate=0.1, max_grad_norm=max_norm), params, total_steps=10)
        opt.step(opt.grad_norm_sq() ** 0.5)
        seen = _grad_seen_by_adam(opt)
        assert torch.allclose(seen[0], torch.tensor([3.0, 0.0]))
        assert torch.allclose(seen[1], torch.tensor([0.0, 4.0]))


def test_step_applies_the_scheduled_lr():
    """AdamW's first update is lr·sign(g) per element (m̂/√v̂ = g/|g|), so the LR is visible in the weights."""
    params = _params_with_grads([2.0, -0.5, 0.0])
    job = spec(learning_rate=0.1, warmup_steps=4, lr_schedule="linear", max_grad_norm=None)
    opt = AdamWOptimizer(job, params, total_steps=10)
    lr = opt.step(opt.grad_norm_sq() ** 0.5)
    assert lr == pytest.approx(0.025)  # warmup step 0 of 4
    assert torch.allclose(params[0].detach(), torch.tensor([-0.025, 0.025, 0.0]), atol=1e-7)
    assert opt.step_count == 1
