"""AltLoRA (Yu et al., arXiv 2505.12455, Alg. 1): alternating scaled-gradient steps with re-projected momentum
(`optimizer: {type: altlora}`).

Per (A, B) pair, in one optimizer step, A first, then B:
    m_A ← β₁·[(BᵀB + λI)⁻¹BᵀB_old]·m_A + (1 − β₁)(BᵀB + λI)⁻¹g_A        A ← A − lr/(1 − β₁ᵗ)·m_A
    m_B ← β₁·m_B·[A_old A'ᵀ(A'A'ᵀ + λI)⁻¹] + (1 − β₁)g_B(A'A'ᵀ + λI)⁻¹  B ← B − lr/(1 − β₁ᵗ)·m_B
where A' is the A just updated, A_old the A before this step, and B_old the B of the previous step's A-step:
the re-projection carries each momentum from the other factor's old basis into its new one. g_A and g_B are the
gradients of this step's one backward (at the old A and B). Without momentum an A-step moves W_eff = W + s·B A by
−lr·s²·B(BᵀB + λI)⁻¹BᵀG ≈ −lr·s²·P_B G and a B-step by −lr·s²·G P_A' (for g_B = s·G A'ᵀ).

The authors' code: LucasXinYu/AltLoRA, optimizer_new.py::altlora. As there, t counts the job's steps and the
first step's re-projection acts on zero momentum. Clipping scales g_A and g_B before the step (as for AdamW);
weight decay is decoupled, A and B times (1 − lr·wd) before each moves (the authors apply it just after).
"""

from __future__ import annotations

import torch

from lorafusion.config import JobSpec
from runtime.optim.base import FactorGroup, FactorOptimizer, FactorPair

__all__ = ["AltLoRAOptimizer", "momentum_a", "momentum_b"]


def _reg_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    """(gram + λI)⁻¹ for r × r Gram matrices [..., r, r], in fp64 (positive definite for λ > 0, so the inverse
    exists and is taken unchecked: no host sync on CUDA)."""
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    return torch.linalg.inv_ex(gram.double() + reg * eye).inverse.to(gram.dtype)


def momentum_a(b: torch.Tensor, b_old: torch.Tensor, m_a: torch.Tensor, grad_a: torch.Tensor, beta1: float,
               reg: float) -> torch.Tensor:
    """A's new momentum [..., r, K]: (BᵀB + λI)⁻¹[β₁·BᵀB_old·m_A + (1 − β₁)g_A], i.e. the momentum re-projected
    from B_old's basis into B's by (BᵀB + λI)⁻¹BᵀB_old, plus the scaled gradient (one inverse serves both)."""
    return _reg_inverse(b.mT @ b, reg) @ (beta1 * ((b.mT @ b_old) @ m_a) + (1 - beta1) * grad_a)


def momentum_b(a: torch.Tensor, a_old: torch.Tensor, m_b: torch.Tensor, grad_b: torch.Tensor, beta1: float,
               reg: float) -> torch.Tensor:
    """B's new momentum [..., N, r] with A the updated A: [β₁·m_B·A_old Aᵀ + (1 − β₁)g_B](AAᵀ + λI)⁻¹, i.e. the
    momentum re-projected from A_old's basis into A's by A_old Aᵀ(AAᵀ + λI)⁻¹, plus the scaled gradient."""
    return (beta1 * (m_b @ (a_old @ a.mT)) + (1 - beta1) * grad_b) @ _reg_inverse(a @ a.mT, reg)


class AltLoRAOptimizer(FactorOptimizer):
    """AltLoRA over the job's (A, B) pairs on this stage, batched per shape. State per pair: m_A [r, K] and
    B_old [N, r] (under A's name), m_B [N, r] (under B's); A_old is the A at the step's start, so it needs no
    state."""

    def __init__(self, spec: JobSpec, named: dict[str, torch.nn.Parameter], total_steps: int) -> None:
        super().__init__(spec, named, total_steps)
        self.beta1, self.reg = spec.optimizer.beta1, spec.optimizer.reg

    def _new_state(self, pair: FactorPair) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return ({"exp_avg": torch.zeros_like(pair.a), "b_old": torch.zeros_like(pair.b)},
                {"exp_avg": torch.zeros_like(pair.b)})

    @torch.no_grad()
    def _step_group(self, group: FactorGroup, lr: float) -> None:
        step_size = lr / (1 - self.beta1 ** (self.step_count + 1))
        decay = 1 - lr * self.spec.weight_decay
        a_old, b = group.factors()  # [P, r, K], [P, N, r]
        grad_a, grad_b = group.grads()
        m_a, b_old, m_b = group.state_a["exp_avg"], group.state_a["b_old"], group.state_b["exp_avg"]
        m_a.copy_(momentum_a(b, b_old, m_a, grad_a, self.beta1, self.reg))
        b_old.copy_(b)
        a = (a_old * decay).sub_(m_a, alpha=step_size)
        m_b.copy_(momentum_b(a, a_old, m_b, grad_b, self.beta1, self.reg))
        group.write_back(a, b.mul_(decay).sub_(m_b, alpha=step_size))
