"""PaCA's per-job layer: r trainable columns of W, computed on the job's rows by a node that keeps x[:, idx] only."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, BaseView
from lorafusion.adapters.paca.config import PaCAConfig

__all__ = ["PaCALayer"]


class PaCALayer(AdapterLayer):
    compute = "delta"

    def __init__(self, config: PaCAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 base: BaseView, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, base=base, **context)
        idx = torch.randperm(in_features, generator=generator)[:config.rank].sort().values
        weight = base.weight()
        columns = weight[:, idx.to(weight.device)].float()  # [N, r]
        self.register_buffer("paca_idx", idx.to(columns.device), persistent=False)  # [r]
        self.register_buffer("paca_W", columns, persistent=False)  # [N, r], W's own columns
        self.paca_P = nn.Parameter(columns / config.scaling)  # [N, r]: s·P = W[:, idx] at init

    def column_delta(self) -> torch.Tensor:
        """s·P − W[:, idx] [N, r]: ΔW's only non-zero columns."""
        return self.config.scaling * self.paca_P - self.paca_W

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        return _ColumnDelta.apply(x, self.paca_P, self.paca_W, self.paca_idx, self.config.scaling)

    def delta_weight(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, device=self.paca_P.device)
        return dense.index_copy(1, self.paca_idx, self.column_delta())

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        one_hot = torch.zeros(self.config.rank, self.in_features, device=self.paca_P.device)  # [r, K]
        one_hot[torch.arange(self.config.rank, device=one_hot.device), self.paca_idx] = 1.0
        return {"lora_A.weight": one_hot, "lora_B.weight": self.column_delta().detach()}


class _ColumnDelta(torch.autograd.Function):
    """x [T, K] ↦ x[:, idx] (s·P − W_idx)ᵀ [T, N]. Saves x[:, idx] [T, r] and the r columns, not x: the point of
    PaCA against LoRA, whose backward needs the whole x for dA. dP = s·dyᵀ x[:, idx]; dx is dy (s·P − W_idx) in
    the columns idx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, w_idx: torch.Tensor, idx: torch.Tensor,
                scale: float) -> torch.Tensor:
        x_idx = x.index_select(1, idx)  # [T, r]
        columns = (scale * p - w_idx).to(x.dtype)  # [N, r]
        ctx.save_for_backward(x_idx, columns, idx)
        ctx.scale, ctx.in_features, ctx.p_dtype = scale, x.shape[1], p.dtype
        return x_idx @ columns.t()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_idx, columns, idx = ctx.saved_tensors
        dx = dp = None
        if ctx.needs_input_grad[0]:
            dx = dy.new_zeros(dy.shape[0], ctx.in_features).index_copy_(1, idx, dy @ columns)  # [T, K]
        if ctx.needs_input_grad[1]:
            dp = (ctx.scale * (dy.t() @ x_idx)).to(ctx.p_dtype)  # [N, r]
        return dx, dp, None, None, None
