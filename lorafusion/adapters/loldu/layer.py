"""LoLDU's per-job layer: frozen LU factors of the module's W, a trainable diagonal z."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, BaseView
from lorafusion.adapters.loldu.config import LoLDUConfig

__all__ = ["LoLDULayer", "ldu_factors"]


def ldu_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r [N, r], U_r [r, K], z₀ = D[:r] [r]) of W [N, K] = P L D U (fp32 LU with partial pivoting, L unit
    lower [N, min(N, K)], U unit upper [min(N, K), K]); W may be rectangular. The dense P [N, N] is never built:
    P L_r is L_r with its rows permuted by the pivots."""
    lu, pivots, _ = torch.linalg.lu_factor_ex(weight.float())  # a zero pivot is reported below, naming the fix
    n, k = lu.shape[0], min(weight.shape)
    l_r = lu[:, :rank].tril(-1)  # [N, r]: L's unit diagonal added below
    l_r[:rank].diagonal().fill_(1.0)
    u_r = lu[:rank].triu()  # [r, K]
    diag = u_r.diagonal().clone()  # [r]
    if (diag == 0).any():
        raise ValueError(f"adapter.rank={rank}: the LU of this {n}×{weight.shape[1]} weight has a zero pivot among "
                         f"its first {rank} (the weight is rank-deficient there); use a smaller rank")
    perm = list(range(n))  # LAPACK's pivots are row swaps in order: rows of L land at these positions
    for i, p in enumerate(pivots[:k].tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    rows = torch.empty(n, dtype=torch.long, device=lu.device)
    rows[torch.tensor(perm, device=lu.device)] = torch.arange(n, device=lu.device)
    return l_r[rows], u_r / diag[:, None], diag


class LoLDULayer(AdapterLayer):
    def __init__(self, config: LoLDUConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 base: BaseView, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, base=base, **context)
        pl, u, z0 = ldu_factors(base.weight(), config.rank)
        # Frozen parameters, not buffers: they are part of the job's state, so a checkpoint restores them bit for
        # bit whatever device computed the LU.
        self.loldu_PL = nn.Parameter(pl, requires_grad=False)  # [N, r]
        self.loldu_U = nn.Parameter(u, requires_grad=False)  # [r, K]
        self.loldu_z0 = nn.Parameter(z0, requires_grad=False)  # [r]
        self.loldu_z = nn.Parameter(z0.clone())  # [r], the only trainable tensor

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.loldu_U, self.loldu_PL * (self.loldu_z - self.loldu_z0), self.config.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, _ = self.effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}
