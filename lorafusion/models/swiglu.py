"""SwiGLU of megatron's fused `linear_fc1` output, [gate | up] → silu(gate) · up, as one autograd node.

megatron's unfused path (every CUDA-only fusion is off so CPU and GPU run one path) computes
silu(gate) * (up + glu_linear_offset): the offset's add copies `up` whatever its value, and the backward of its
`chunk` concatenates the two halves' gradients into a third tensor. This node keeps only its input for the
backward and writes both halves' gradients straight into one [tokens, 2F] tensor; the products are the ones
megatron's path computes, so the values are the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "swiglu"]


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # [..., F] each, views of x
        ctx.save_for_backward(x)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)  # [..., 2F]
        d_gate, d_up = dx.chunk(2, dim=-1)
        act = F.silu(gate)
        torch.mul(grad, act, out=d_up)
        torch.mul(grad, up, out=act)  # act's buffer now holds the gradient reaching silu's output
        torch.ops.aten.silu_backward.grad_input(act, gate, grad_input=d_gate)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of x [..., 2F] = [gate | up] → [..., F]."""
    return _SwiGLUFunction.apply(x)


class SwiGLU(nn.Module):
    """megatron's MLP activation slot (`MLPSubmodules.activation_func`, used with config.use_te_activation_func):
    called on the whole fc1 output."""

    def __init__(self, config=None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)
