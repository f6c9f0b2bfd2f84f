"""SHiRA's per-job layer: trainable values on a fixed sparse support, applied to the job's rows as a sparse
product (CSR), never as a dense [out, in] ΔW."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.shira.config import SHiRAConfig
from lorafusion.ops import native

__all__ = ["SHiRALayer", "shira_support"]

warnings.filterwarnings("ignore", message=r"Sparse (CSR tensor support is in beta|invariant checks)")


@functools.lru_cache(maxsize=16)
def shira_support(out_features: int, in_features: int, count: int, seed: int | None) -> torch.Tensor:
    """Flat indices row·in + col of PEFT's random mask, ascending: the first `count` of a randperm of out·in from
    a fresh CPU generator (seeded when `seed` is given, so every module of one shape gets the same support)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    return torch.randperm(out_features * in_features, generator=generator)[:count].sort().values


def _csr_rows(rows: torch.Tensor, size: int) -> torch.Tensor:
    """CSR row pointers [size + 1] of entries whose (sorted) row indices are `rows`."""
    crow = torch.zeros(size + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=size).cumsum(0)
    return crow


class SHiRALayer(AdapterLayer):
    compute = "delta"

    def __init__(self, config: SHiRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        count = config.rank * (in_features + out_features)
        self.shira_weight = nn.Parameter(torch.zeros(count))  # [nnz], in row-major order of the support
        self._set_support(shira_support(out_features, in_features, count, config.mask_seed))

    def _set_support(self, flat: torch.Tensor) -> None:
        """The support as CSR of ΔW [N, K] and of ΔWᵀ [K, N] (for dx), from ascending flat indices."""
        device = self.shira_weight.device
        flat = flat.to(device)
        rows, cols = flat // self.in_features, flat % self.in_features
        by_col = torch.argsort(cols * self.out_features + rows)
        for name, value in (("rows", rows), ("cols", cols), ("crow", _csr_rows(rows, self.out_features)),
                            ("t_perm", by_col), ("t_crow", _csr_rows(cols[by_col], self.in_features)),
                            ("t_cols", rows[by_col])):
            self.register_buffer(name, value, persistent=False)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseDelta.apply(x, self.shira_weight, self)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """ΔW [N, K] as a torch sparse CSR tensor with fp32 `values` on the support."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values.float(), (self.out_features, self.in_features))

    def delta_weight(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, device=self.shira_weight.device)
        dense[self.rows, self.cols] = self.shira_weight
        return dense

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"shira_weight": self.shira_weight.detach(),
                "shira_indices": torch.stack([self.rows, self.cols]).to(torch.int32)}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Any support PEFT wrote (its order need not be ours): sorted row-major, values permuted alike."""
        indices = tensors["shira_indices"].to(torch.int64)
        rows, cols = indices[0], indices[1]
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.out_features or cols.min() < 0
                             or cols.max() >= self.in_features):
            raise ValueError(f"shira_indices point outside the module's {self.out_features}×{self.in_features} weight")
        flat = rows * self.in_features + cols
        order = torch.argsort(flat)
        if (flat[order][1:] == flat[order][:-1]).any():
            raise ValueError("shira_indices lists an entry twice; each entry of the support must be unique")
        self._set_support(flat[order])
        with torch.no_grad():
            self.shira_weight.copy_(tensors["shira_weight"].to(self.shira_weight.device)[order.to(self.shira_weight.device)])


class _SparseDelta(torch.autograd.Function):
    """x [T, K] ↦ x ΔWᵀ [T, N] for ΔW sparse on the layer's support with `values`: forward and dx as CSR products,
    the values' gradient sampled at the support (dv_k = Σ_t dy[t, row_k] · x[t, col_k]), accumulated in fp32 and
    rounded once to x's dtype. The native ops of csrc/ where they are built for x's device (run.native_ops), else
    torch's sparse kernels, the reference (which compute in fp32 copies: torch's CPU sparse kernels have no bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, layer: SHiRALayer) -> torch.Tensor:
        ctx.native, ctx.layer = native.enabled(x.device), layer
        if ctx.native:
            x = x.contiguous()
            ctx.save_for_backward(x, values)
            return native.sparse_forward(x, layer.crow, layer.cols, values)  # [T, N]
        xf = x.float()
        ctx.save_for_backward(xf, values)
        return torch.sparse.mm(layer.csr(values), xf.t()).t().to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, values = ctx.saved_tensors
        layer = ctx.layer
        dx = dv = None
        if ctx.native:
            dy = dy.to(x.dtype).contiguous()
            if ctx.needs_input_grad[0]:
                dx = native.sparse_backward_input(dy, layer.t_crow, layer.t_cols, values[layer.t_perm])  # [T, K]
            if ctx.needs_input_grad[1]:
                dv = native.sparse_backward_values(dy, x, layer.rows, layer.cols).to(values.dtype)
            return dx, dv, None
        dyf = dy.float()
        if ctx.needs_input_grad[0]:
            transposed = torch.sparse_csr_tensor(layer.t_crow, layer.t_cols, values.float()[layer.t_perm],
                                                 (layer.in_features, layer.out_features))
            dx = torch.sparse.mm(transposed, dyf.t()).t().to(dy.dtype)
        if ctx.needs_input_grad[1]:  # the support's pattern, its values ignored (beta = 0)
            dv = torch.sparse.sampled_addmm(layer.csr(values), dyf.t(), x, beta=0.0).values().to(values.dtype)
        return dx, dv, None
