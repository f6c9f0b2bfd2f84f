"""LoRA-Pro (Wang & Liang, ICLR'25): Adam on each module's low-rank equivalent gradient, projected back onto the
factors (`optimizer: {type: lorapro}`).

Per module, with W_eff = W + s·B A, G = ∂L/∂W_eff [N, K], g_A = s·BᵀG and g_B = s·G Aᵀ (all the runtime has; G
itself is never formed):
1. g̃_A = (1/s²)(BᵀB)⁻¹g_A, g̃_B = (1/s²)(I − P_B) g_B (AAᵀ)⁻¹, and the equivalent gradient
   ĝ = s(B g̃_A + g̃_B A) = P_B G + (I − P_B) G P_A   [N, K], with P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A;
2. full-size Adam moments on ĝ give the update u = m̂ / (√v̂ + ε)   [N, K];
3. u is split back onto the factors with its own g_A' = s·Bᵀu, g_B' = s·u Aᵀ:
   g̃_A = (1/s²)(BᵀB)⁻¹g_A' + X A,  g̃_B = (1/s²)(I − P_B) g_B'(AAᵀ)⁻¹ − B X, where X [r, r] solves the Sylvester
   equation BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A' Aᵀ (the split closest to LoRA's own gradients);
4. A ← A − lr·g̃_A and B ← B − lr·g̃_B (the authors' outer optimizer is SGD on g̃; their code:
   mrflogs/LoRA-Pro, DeepSpeed's stage_1_and_2.py::lorapro_full_adjustment).

The Gram inverses are (BᵀB + δI)⁻¹ and (AAᵀ + δI)⁻¹ (the authors' pinv(· + 1e-8·I)): B starts at zero, where the
first step is ĝ = G P_A. Both come from one fp64 eigendecomposition of each r × r Gram matrix, which also solves the
Sylvester equation. Clipping scales g_A and g_B before step 1 (ĝ is linear in them), so it bounds what enters the
moments, as for AdamW; the authors clip the final g̃ by the raw gradients' norm instead. Weight decay is
decoupled, A and B times (1 − lr·wd) before the step (the authors train with weight decay 0).
"""

from __future__ import annotations

import torch

from lorafusion.config import JobSpec
from runtime.optim.base import FactorGroup, FactorOptimizer, FactorPair

__all__ = ["FactorGrams", "LoRAProOptimizer", "equivalent_gradient", "project_update"]


class FactorGrams:
    """The r × r Gram matrices BᵀB and AAᵀ of one pair, or of a batch of pairs (A [..., r, K], B [..., N, r]; every
    function here works on either), their eigendecompositions (fp64) and regularised inverses."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, delta: float) -> None:
        self.a, self.b = a, b
        self.bb_vals, self.bb_vecs = torch.linalg.eigh(b.double().mT @ b.double())  # BᵀB = U Λ Uᵀ
        self.aa_vals, self.aa_vecs = torch.linalg.eigh(a.double() @ a.double().mT)  # AAᵀ = V M Vᵀ
        self.inv_bb = self._inverse(self.bb_vals, self.bb_vecs, delta)  # (BᵀB + δI)⁻¹ [r, r]
        self.inv_aa = self._inverse(self.aa_vals, self.aa_vecs, delta)  # (AAᵀ + δI)⁻¹ [r, r]

    def _inverse(self, vals: torch.Tensor, vecs: torch.Tensor, delta: float) -> torch.Tensor:
        # A Gram matrix's eigenvalues are ≥ 0 up to rounding: clamp so + δ stays positive.
        return ((vecs / (vals.clamp_min(0) + delta).unsqueeze(-2)) @ vecs.mT).to(self.a.dtype)

    def off_b(self, m: torch.Tensor) -> torch.Tensor:
        """(I − P_B) m for m [N, ·], without the N × N projector."""
        return m - self.b @ (self.inv_bb @ (self.b.mT @ m))

    def sylvester(self, c: torch.Tensor) -> torch.Tensor:
        """X [r, r] with BᵀB X + X AAᵀ = c: in the eigenbases, Y = UᵀcV divided elementwise by λ_i + μ_j."""
        u, v = self.bb_vecs, self.aa_vecs
        denom = self.bb_vals.clamp_min(0).unsqueeze(-1) + self.aa_vals.clamp_min(0).unsqueeze(-2)
        denom = denom.clamp_min(torch.finfo(denom.dtype).tiny)  # 0 only where A and B are both rank-deficient
        return (u @ ((u.mT @ c.double() @ v) / denom) @ v.mT).to(self.a.dtype)


def equivalent_gradient(grams: FactorGrams, grad_a: torch.Tensor, grad_b: torch.Tensor, scale: float) -> torch.Tensor:
    """ĝ = s(B g̃_A + g̃_B A) [N, K] from g_A [r, K] and g_B [N, r]: P_B G + (I − P_B) G P_A."""
    a, b = grams.a, grams.b
    tilde_a = grams.inv_bb @ grad_a / scale**2  # [r, K]
    tilde_b = grams.off_b(grad_b) @ grams.inv_aa / scale**2  # [N, r]
    return scale * (b @ tilde_a + tilde_b @ a)


def project_update(grams: FactorGrams, update: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g̃_A [r, K], g̃_B [N, r], X [r, r]): the factor gradients whose equivalent gradient is `update` [N, K]
    projected onto the tangent space, with the Sylvester-optimal X."""
    a, b = grams.a, grams.b
    grad_a, grad_b = scale * (b.mT @ update), scale * (update @ a.mT)  # g_A' [r, K], g_B' [N, r]
    base_a = grams.inv_bb @ grad_a / scale**2  # (1/s²)(BᵀB)⁻¹ g_A'
    x = grams.sylvester(-(base_a @ a.mT))
    tilde_a = base_a + x @ a
    tilde_b = grams.off_b(grad_b) @ grams.inv_aa / scale**2 - b @ x
    return tilde_a, tilde_b, x


class LoRAProOptimizer(FactorOptimizer):
    """LoRA-Pro over the job's (A, B) pairs on this stage; Adam's β and ε are the JobSpec's adam_betas, adam_eps."""

    def __init__(self, spec: JobSpec, named: dict[str, torch.nn.Parameter], total_steps: int) -> None:
        super().__init__(spec, named, total_steps)
        self.delta = spec.optimizer.delta

    def _new_state(self, pair: FactorPair) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        full = (pair.b.shape[0], pair.a.shape[1])  # [N, K]
        zeros = dict(device=pair.a.device, dtype=pair.a.dtype)
        return {"full_exp_avg": torch.zeros(full, **zeros), "full_exp_avg_sq": torch.zeros(full, **zeros)}, {}

    @torch.no_grad()
    def _step_group(self, group: FactorGroup, lr: float) -> None:
        (beta1, beta2), eps = self.spec.adam_betas, self.spec.adam_eps
        t = self.step_count + 1
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t
        a, b = group.factors()  # [P, r, K], [P, N, r]
        grams = FactorGrams(a, b, self.delta)
        g_hat = equivalent_gradient(grams, *group.grads(), self.scale)  # [P, N, K]
        m, v = group.state_a["full_exp_avg"], group.state_a["full_exp_avg_sq"]
        m.lerp_(g_hat, 1 - beta1)
        v.mul_(beta2).addcmul_(g_hat, g_hat, value=1 - beta2)
        update = (m / correction1) / ((v / correction2).sqrt_().add_(eps))  # [P, N, K]
        tilde_a, tilde_b, _ = project_update(grams, update, self.scale)
        decay = 1 - lr * self.spec.weight_decay
        group.write_back(a.mul_(decay).sub_(tilde_a, alpha=lr), b.mul_(decay).sub_(tilde_b, alpha=lr))
