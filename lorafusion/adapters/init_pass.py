"""What the variants initialised from their job's gradient share (LoRA-GA, LoRA-SB): a layer that starts as a
probe of its base weight's gradient during the init pre-pass (see AdapterLayer.init_pass), and a deterministic
truncated SVD of that gradient (or of a matrix made from it)."""

from __future__ import annotations

import hashlib

import torch

from lorafusion.adapters.base import AdapterConfig, AdapterLayer
from lorafusion.adapters.svd import randomized_svd

__all__ = ["EXACT_SVD_MAX_DIM", "GradientInitLayer", "module_seed", "top_singular"]

EXACT_SVD_MAX_DIM = 2048
"""Matrices whose smaller side is at most this get an exact SVD: the directions r..2r that LoRA-GA's B₀ takes are
often close in singular value, and torch's randomised SVD (4r directions, 4 power iterations, what the LoRA-GA
authors and PEFT use) resolves them poorly (a tiny model's q_proj: B₀ moved by 0.4 between our gradient and
transformers', which differ by fp32 rounding).
Larger ones (a 4096-wide model's modules) take the randomised SVD, as the LoRA-GA and LoRA-SB authors do: an exact
one would cost minutes per job."""


def module_seed(layer_index: int, target: str) -> int:
    """The seed of a module's randomised SVD: from its global position only (not the job's seed), so two jobs with
    the same gradient and config get the same factors on any stage (Fed-SB's clients share LoRA-SB's A and B)."""
    return int.from_bytes(hashlib.sha256(f"{layer_index}/{target}".encode()).digest()[:7], "little")


def top_singular(matrix: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [N, k], S [k], Vᵀ [k, K]) of the k largest singular values of `matrix` [N, K], in fp32. Deterministic: an
    exact SVD up to EXACT_SVD_MAX_DIM, else torch's randomised SVD (2k directions, 4 power iterations) under a
    generator seeded with `seed` that leaves the global RNG as it was."""
    if min(matrix.shape) > EXACT_SVD_MAX_DIM:
        return randomized_svd(matrix, k, seed, width=2 * k)
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


class GradientInitLayer(AdapterLayer):
    """A layer initialised from the summed gradient G [N, K] of its base weight over the job's first
    `config.init_pass_batches` global batches. Until then it computes by `forward_delta`, adding x·Pᵀ for P = 0 (made
    on the first forward, on the input's device), so that P's gradient is the base weight's; `finish_init_pass` hands
    G to the subclass's `init_from_gradient` and switches the layer to its factors."""

    init_pass = True

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        self.seed = module_seed(self.layer_index, self.target)
        self.compute = "delta"
        self.__dict__["probe"] = None

    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """Set the layer's tensors (under no_grad) from the summed gradient of its base weight [N, K]."""
        raise NotImplementedError

    def finish_init_pass(self, grad: torch.Tensor | None) -> None:
        """Initialise from the summed gradient (None: initialised elsewhere, e.g. by a checkpoint)."""
        if grad is not None:
            with torch.no_grad():
                self.init_from_gradient(grad)
        self.compute = "factors"
        self.__dict__.pop("probe", None)

    def probe_grad(self) -> torch.Tensor:
        """The summed gradient of the base weight [N, K] over the init pass so far (fp32)."""
        probe = self.__dict__.get("probe")
        if probe is None or probe.grad is None:
            return torch.zeros(self.out_features, self.in_features, device=next(self.parameters()).device)
        return probe.grad

    @property
    def dropout_p(self) -> float:
        return 0.0 if self.compute == "delta" else self.config.dropout_p  # the probe wants dL/dW itself

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("probe") is None:
            self.__dict__["probe"] = torch.zeros(self.out_features, self.in_features, device=x.device,
                                                 requires_grad=True)
        return _GradProbe.apply(x, self.__dict__["probe"])


class _GradProbe(torch.autograd.Function):
    """x [T, K] ↦ x Pᵀ for P = 0, i.e. zeros [T, N], whose backward gives P the base weight's gradient dyᵀ x (summed
    in fp32) and passes nothing on to x (P is 0): one GEMM per probed module instead of three."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.new_zeros(x.shape[0], probe.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        return None, dy.t().float() @ x.float()
