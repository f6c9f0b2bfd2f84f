"""LoRA-Pro and AltLoRA (runtime/optim) against their formulas written here, on random factors (fp64)."""

from __future__ import annotations

import pytest
import torch

import lorafusion as lf
from runtime.optim import AltLoRAOptimizer, LoRAProOptimizer, build_optimizer
from runtime.optim.altlora import momentum_a, momentum_b
from runtime.optim.lorapro import FactorGrams, equivalent_gradient, project_update

SCALE = 2.0  # alpha / rank of the specs below


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def proj_b(b: torch.Tensor) -> torch.Tensor:
    """P_B = B (BᵀB)⁺ Bᵀ [N, N]."""
    return b @ torch.linalg.pinv(b)


def proj_a(a: torch.Tensor) -> torch.Tensor:
    """P_A = Aᵀ (AAᵀ)⁺ A [K, K]."""
    return torch.linalg.pinv(a) @ a


def spec(optimizer, **fields) -> lf.JobSpec:
    fields = {"learning_rate": 1e-2, "max_grad_norm": None, **fields}
    return lf.JobSpec(name="j", dataset="unused.jsonl", adapter=lf.LoRAConfig(rank=3, alpha=6.0), optimizer=optimizer,
                      **fields)


def named_pairs(shapes: list[tuple[int, int]], r: int = 3, zero_b: tuple[int, ...] = ()) -> dict[str, torch.nn.Parameter]:
    named = {}
    for i, (n, k) in enumerate(shapes):
        named[f"layers.{i}.q_proj.lora_A"] = torch.nn.Parameter(rand(r, k, seed=10 + i))
        b = torch.zeros(n, r, dtype=torch.float64) if i in zero_b else rand(n, r, seed=20 + i)
        named[f"layers.{i}.q_proj.lora_B"] = torch.nn.Parameter(b)
    return named


def set_lora_grads(named: dict[str, torch.nn.Parameter], gs: list[torch.Tensor]) -> None:
    """g_A = s·BᵀG, g_B = s·G Aᵀ at the current factors: the gradients LoRA's chain rule gives."""
    for i, g in enumerate(gs):
        a, b = named[f"layers.{i}.q_proj.lora_A"], named[f"layers.{i}.q_proj.lora_B"]
        a.grad, b.grad = SCALE * b.detach().t() @ g, SCALE * g @ a.detach().t()


# ----------------------------------------------------------------------------- LoRA-Pro


@pytest.mark.parametrize("zero_b", [False, True])
def test_lorapro_equivalent_gradient_is_the_tangent_projection(zero_b):
    n, k, r = 7, 5, 3
    a, g = rand(r, k, seed=1), rand(n, k, seed=3)
    b = torch.zeros(n, r, dtype=torch.float64) if zero_b else rand(n, r, seed=2)
    grams = FactorGrams(a, b, delta=1e-12)
    got = equivalent_gradient(grams, SCALE * b.t() @ g, SCALE * g @ a.t(), SCALE)
    want = proj_b(b) @ g + (torch.eye(n) - proj_b(b)) @ g @ proj_a(a)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_lorapro_x_solves_the_sylvester_equation_and_is_optimal():
    n, k, r = 8, 6, 3
    a, b, u = rand(r, k, seed=4), rand(n, r, seed=5), rand(n, k, seed=6)
    tilde_a, tilde_b, x = project_update(FactorGrams(a, b, delta=1e-14), u, SCALE)
    grad_a, grad_b = SCALE * b.t() @ u, SCALE * u @ a.t()
    inv_bb, inv_aa = torch.linalg.inv(b.t() @ b), torch.linalg.inv(a @ a.t())
    torch.testing.assert_close(b.t() @ b @ x + x @ a @ a.t(), -(inv_bb @ grad_a @ a.t()) / SCALE**2,
                               rtol=1e-9, atol=1e-10)
    # X minimises ‖g̃_A − g_A‖² + ‖g̃_B − g_B‖² over the family of splits of the same equivalent gradient
    free = x.clone().requires_grad_(True)
    fam_a = inv_bb @ grad_a / SCALE**2 + free @ a
    fam_b = (torch.eye(n) - proj_b(b)) @ grad_b @ inv_aa / SCALE**2 - b @ free
    loss = (fam_a - grad_a).pow(2).sum() + (fam_b - grad_b).pow(2).sum()
    (dx,) = torch.autograd.grad(loss, free)
    assert dx.abs().max() < 1e-9 * loss.item()
    torch.testing.assert_close(tilde_a, fam_a.detach())
    torch.testing.assert_close(tilde_b, fam_b.detach())
    # and every member of the family gives the tangent projection of u as its equivalent gradient
    want = proj_b(b) @ u + (torch.eye(n) - proj_b(b)) @ u @ proj_a(a)
    torch.testing.assert_close(SCALE * (b @ tilde_a + tilde_b @ a), want, rtol=1e-9, atol=1e-9)


def sylvester_by_kronecker(m: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with M X + X N = C, from the r²×r² linear system (row-major vec: vec(MX) = (M⊗I)x, vec(XN) = (I⊗Nᵀ)x)."""
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return torch.linalg.solve(torch.kron(m, eye) + torch.kron(eye, n.t().contiguous()), c.reshape(-1)).reshape(c.shape)


def lorapro_reference(a, b, g, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8):
    """One LoRA-Pro step as the paper writes it: full-size Adam on ĝ, then the projected SGD step."""
    n = b.shape[0]
    g_hat = proj_b(b) @ g + (torch.eye(n) - proj_b(b)) @ g @ proj_a(a)
    m = betas[0] * m + (1 - betas[0]) * g_hat
    v = betas[1] * v + (1 - betas[1]) * g_hat**2
    u = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    grad_a, grad_b = SCALE * b.t() @ u, SCALE * u @ a.t()
    inv_bb, inv_aa = torch.linalg.pinv(b.t() @ b), torch.linalg.inv(a @ a.t())
    x = sylvester_by_kronecker(b.t() @ b, a @ a.t(), -(inv_bb @ grad_a @ a.t()) / SCALE**2)
    tilde_a = inv_bb @ grad_a / SCALE**2 + x @ a
    tilde_b = (torch.eye(n) - proj_b(b)) @ grad_b @ inv_aa / SCALE**2 - b @ x
    return a - lr * tilde_a, b - lr * tilde_b, m, v


def test_lorapro_three_steps_match_a_full_size_adam_reference():
    shapes = [(7, 5), (4, 9), (7, 5)]  # modules 0 and 2 are stepped as one batch
    named = named_pairs(shapes, zero_b=(0,))  # module 0 starts at B = 0, as LoRA does
    opt = build_optimizer(spec(lf.LoRAProConfig(delta=1e-14)), named, total_steps=3)
    assert isinstance(opt, LoRAProOptimizer)
    ref = [[named[f"layers.{i}.q_proj.lora_A"].detach().clone(), named[f"layers.{i}.q_proj.lora_B"].detach().clone(),
            torch.zeros(n, k), torch.zeros(n, k)] for i, (n, k) in enumerate(shapes)]
    for t in range(1, 4):
        gs = [rand(n, k, seed=100 * t + i) for i, (n, k) in enumerate(shapes)]
        set_lora_grads(named, gs)
        opt.step(0.0)
        for i, g in enumerate(gs):
            ref[i] = list(lorapro_reference(*ref[i][:2], g, *ref[i][2:], t=t, lr=1e-2))
            torch.testing.assert_close(named[f"layers.{i}.q_proj.lora_A"].detach(), ref[i][0], rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(named[f"layers.{i}.q_proj.lora_B"].detach(), ref[i][1], rtol=1e-7, atol=1e-9)
    assert opt.state_bytes() == sum(2 * n * k * 8 for n, k in shapes)


def lorapro_one_step(job: lf.JobSpec, grad_scale: float = 1.0) -> tuple[LoRAProOptimizer, dict, float]:
    named = named_pairs([(6, 5)])
    opt = build_optimizer(job, named, total_steps=1)
    set_lora_grads(named, [grad_scale * rand(6, 5, seed=0)])
    norm = float(opt.grad_norm_sq()) ** 0.5
    opt.step(norm)
    return opt, named, norm


def test_lorapro_clips_the_raw_gradients_and_decays_decoupled():
    clipped, _, norm = lorapro_one_step(spec(lf.LoRAProConfig(), max_grad_norm=1e-3))
    by_hand, _, _ = lorapro_one_step(spec(lf.LoRAProConfig()), grad_scale=1e-3 / (norm + 1e-6))
    for key in ("full_exp_avg", "full_exp_avg_sq"):  # the clipped gradient is what enters the moments
        torch.testing.assert_close(clipped.pairs[0].state_a[key], by_hand.pairs[0].state_a[key])
    init = named_pairs([(6, 5)])
    _, plain, _ = lorapro_one_step(spec(lf.LoRAProConfig()))
    _, decayed, _ = lorapro_one_step(spec(lf.LoRAProConfig(), weight_decay=0.5))
    for key in plain:  # p ← p·(1 − lr·wd) − lr·g̃, with g̃ from the factors before the decay
        torch.testing.assert_close(decayed[key].detach() - plain[key].detach(), -1e-2 * 0.5 * init[key].detach())


# ----------------------------------------------------------------------------- AltLoRA


def test_altlora_without_momentum_moves_w_by_the_two_projections():
    n, k, r, lr, reg = 7, 6, 3, 1e-2, 1e-12
    named = named_pairs([(n, k)], r)
    a, b = named["layers.0.q_proj.lora_A"], named["layers.0.q_proj.lora_B"]
    a0, b0, g = a.detach().clone(), b.detach().clone(), rand(n, k, seed=7)
    opt = build_optimizer(spec(lf.AltLoRAConfig(beta1=0.0, reg=reg), learning_rate=lr), named, total_steps=1)
    assert isinstance(opt, AltLoRAOptimizer)
    grad_a = SCALE * b0.t() @ g
    a1 = a0 - lr * torch.linalg.solve(b0.t() @ b0, grad_a)  # the A-step, written out
    a.grad, b.grad = grad_a, SCALE * g @ a1.t()  # B's gradient at the updated A: its step is then G P_A1
    opt.step(0.0)
    w0, w_after_a, w_after_b = SCALE * b0 @ a0, SCALE * b0 @ a.detach(), SCALE * b.detach() @ a.detach()
    torch.testing.assert_close(w_after_a - w0, -lr * SCALE**2 * proj_b(b0) @ g, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w_after_b - w_after_a, -lr * SCALE**2 * g @ proj_a(a.detach()), rtol=1e-8, atol=1e-10)


def test_altlora_momenta_reproject_by_the_papers_matrices():
    n, k, r, reg, beta1 = 9, 5, 3, 1e-3, 0.8
    b, b_old, a, a_old = rand(n, r, seed=1), rand(n, r, seed=2), rand(r, k, seed=3), rand(r, k, seed=4)
    m_a, g_a, m_b, g_b = rand(r, k, seed=5), rand(r, k, seed=6), rand(n, r, seed=7), rand(n, r, seed=8)
    eye = torch.eye(r, dtype=torch.float64)
    inv_b, inv_a = torch.linalg.inv(b.t() @ b + reg * eye), torch.linalg.inv(a @ a.t() + reg * eye)
    reproject_a, reproject_b = inv_b @ b.t() @ b_old, a_old @ a.t() @ inv_a
    torch.testing.assert_close(momentum_a(b, b_old, m_a, g_a, beta1, reg),
                               beta1 * reproject_a @ m_a + (1 - beta1) * inv_b @ g_a)
    torch.testing.assert_close(momentum_b(a, a_old, m_b, g_b, beta1, reg),
                               beta1 * m_b @ reproject_b + (1 - beta1) * g_b @ inv_a)


def altlora_reference(named_init, grads, beta1, reg, lr):
    """Alg. 1 written out for one pair: m_A, m_B re-projected, A then B, B's scaling from the updated A."""
    a, b = named_init
    r = a.shape[0]
    eye = torch.eye(r, dtype=torch.float64)
    m_a, m_b, b_old = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(b)
    for t, (grad_a, grad_b) in enumerate(grads, start=1):
        inv_b = torch.linalg.inv(b.t() @ b + reg * eye)
        m_a = beta1 * inv_b @ b.t() @ b_old @ m_a + (1 - beta1) * inv_b @ grad_a
        b_old, a_old = b, a
        a = a - lr / (1 - beta1**t) * m_a
        inv_a = torch.linalg.inv(a @ a.t() + reg * eye)
        m_b = beta1 * m_b @ a_old @ a.t() @ inv_a + (1 - beta1) * grad_b @ inv_a
        b = b - lr / (1 - beta1**t) * m_b
    return a, b


def test_altlora_three_steps_match_algorithm_1():
    shapes = [(7, 6), (5, 4), (7, 6)]  # modules 0 and 2 are stepped as one batch
    named = named_pairs(shapes, zero_b=(0,))
    factors = [(named[f"layers.{i}.q_proj.lora_A"], named[f"layers.{i}.q_proj.lora_B"]) for i in range(len(shapes))]
    init = [(a.detach().clone(), b.detach().clone()) for a, b in factors]
    opt = build_optimizer(spec(lf.AltLoRAConfig(beta1=0.9)), named, total_steps=3)
    grads = [[] for _ in shapes]
    for t in range(3):
        for i, ((n, k), (a, b)) in enumerate(zip(shapes, factors)):
            grads[i].append((rand(3, k, seed=50 + 10 * i + t), rand(n, 3, seed=60 + 10 * i + t)))
            a.grad, b.grad = (x.clone() for x in grads[i][-1])
        opt.step(0.0)
    for (a, b), start, module_grads in zip(factors, init, grads):
        want_a, want_b = altlora_reference(start, module_grads, beta1=0.9, reg=1e-3, lr=1e-2)
        torch.testing.assert_close(a.detach(), want_a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.detach(), want_b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("optimizer", [lf.LoRAProConfig(), lf.AltLoRAConfig(beta1=0.9)], ids=lambda o: o.type)
def test_factor_optimizer_state_round_trip_is_exact(optimizer):
    job = spec(optimizer, weight_decay=0.1, warmup_steps=1, lr_schedule="cosine", max_grad_norm=1.0)
    shapes = [(6, 5), (4, 7), (6, 5)]

    def make() -> tuple[object, dict[str, torch.nn.Parameter]]:
        named = named_pairs(shapes, zero_b=(1,))
        return build_optimizer(job, named, total_steps=5), named

    def run(opt, named, steps) -> None:
        for t in steps:
            set_lora_grads(named, [rand(n, k, seed=1000 * t + i) for i, (n, k) in enumerate(shapes)])
            opt.step(float(opt.grad_norm_sq()) ** 0.5)

    (straight, named_s), (resumed, named_r) = make(), make()
    run(straight, named_s, range(2))
    state = straight.state_dict()
    assert state["step_count"] == 2 and len(state["state"]) == 6
    with torch.no_grad():
        for mine, theirs in zip(resumed.params, straight.params):
            mine.copy_(theirs)
    resumed.load_state_dict(state)
    run(straight, named_s, range(2, 5))
    run(resumed, named_r, range(2, 5))
    assert all(torch.equal(x, y) for x, y in zip(resumed.params, straight.params))
    bad = [dict(s) for s in state["state"]]
    bad[0] = {"exp_avg": torch.zeros(1)}
    with pytest.raises(ValueError, match="parameter #0 has state"):
        resumed.load_state_dict({"step_count": 2, "state": bad})


@pytest.mark.parametrize("optimizer", [lf.LoRAProConfig(), lf.AltLoRAConfig(beta1=0.9)], ids=lambda o: o.type)
def test_factor_optimizer_ops_do_not_grow_with_the_modules_of_one_shape(optimizer):
    """The pairs of one shape are stepped as one batch: a step of 6 same-shape modules runs as many aten ops as a
    step of 2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def ops_per_step(modules: int) -> int:
        named = named_pairs([(6, 5)] * modules)
        opt = build_optimizer(spec(optimizer), named, total_steps=2)
        set_lora_grads(named, [rand(6, 5, seed=i) for i in range(modules)])
        with CountOps() as counter:
            opt.step(0.0)
        return counter.ops

    assert ops_per_step(6) == ops_per_step(2)
