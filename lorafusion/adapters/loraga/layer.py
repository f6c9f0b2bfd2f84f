"""LoRA-GA's per-job layer: a gradient probe during the init pre-pass, then LoRA factors with a frozen offset."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.loraga.config import LoRAGAConfig

__all__ = ["LoRAGALayer", "gradient_init"]



_EXACT_SVD_MAX_DIM = 2048
"""Gradients whose smaller side is at most this get an exact SVD: the directions r..2r that B₀ takes are often close
in singular value, and torch's randomised SVD (4r directions, 4 power iterations, what the authors and PEFT use)
resolves them poorly (a tiny model's q_proj: B₀ moved by 0.4 between our gradient and transformers', which differ
by fp32 rounding).
Larger ones (a 4096-wide model's modules) take the randomised SVD, as the authors do: an exact one would cost
minutes per job."""


def gradient_init(grad: torch.Tensor, rank: int, gamma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ [r, K], B₀ [N, r]) of the authors' LoRA-GA init from the gradient G [N, K]: Vᵀ[:r]·ζ and U[:, r:2r]·ζ,
    ζ = N^¼ / √γ. Deterministic: an exact SVD (fp32) up to _EXACT_SVD_MAX_DIM, else the randomised one under a
    seeded RNG."""
    if min(grad.shape) <= _EXACT_SVD_MAX_DIM:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    else:
        devices = [grad.device] if grad.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, _, v = torch.svd_lowrank(grad.float(), q=min(4 * rank, min(grad.shape)), niter=4)
        vh = v.t()
    zeta = grad.shape[0] ** 0.25 / gamma ** 0.5
    return (vh[:rank] * zeta).float(), (u[:, rank:2 * rank] * zeta).float()


class LoRAGALayer(AdapterLayer):
    init_pass = True

    def __init__(self, config: LoRAGAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        r = config.rank
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))  # [r, K], A₀ after the init pass
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # [N, r], B₀ after the init pass
        self.lora_A0 = nn.Parameter(torch.zeros(r, in_features), requires_grad=False)  # frozen offset
        self.lora_B0 = nn.Parameter(torch.zeros(out_features, r), requires_grad=False)
        self.seed = int.from_bytes(hashlib.sha256(f"{self.layer_index}/{self.target}".encode()).digest()[:7], "little")
        # Until finish_init_pass the layer adds x·Pᵀ with P = 0 (made on the first forward, on the input's device),
        # so P's gradient is the base weight's.
        self.compute = "delta"
        self.__dict__["probe"] = None

    def finish_init_pass(self, grad: torch.Tensor | None) -> None:
        """Initialise A, B, A₀, B₀ from the summed gradient (None: initialised elsewhere, e.g. by a checkpoint)."""
        if grad is not None:
            a0, b0 = gradient_init(grad, self.config.rank, self.config.stable_gamma, self.seed)
            with torch.no_grad():
                for param, value in ((self.lora_A, a0), (self.lora_B, b0), (self.lora_A0, a0), (self.lora_B0, b0)):
                    param.copy_(value)
        self.compute = "factors"
        self.__dict__.pop("probe", None)

    def probe_grad(self) -> torch.Tensor:
        """The summed gradient of the base weight [N, K] over the init pass so far (fp32)."""
        probe = self.__dict__.get("probe")
        if probe is None or probe.grad is None:
            return torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        return probe.grad

    @property
    def dropout_p(self) -> float:
        return 0.0 if self.compute == "delta" else self.config.dropout_p  # the probe wants dL/dW itself

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.__dict__.get("probe") is None:
            self.__dict__["probe"] = torch.zeros(self.out_features, self.in_features, device=x.device,
                                                 requires_grad=True)
        return _GradProbe.apply(x, self.__dict__["probe"])

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (torch.cat([self.lora_A, self.lora_A0]), torch.cat([self.lora_B, -self.lora_B0], dim=1),
                self.config.scaling)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, _ = self.effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise ValueError("a LoRA-GA adapter is exported as a plain rank-2r LoRA; load it as 'lora' "
                         "(init_adapter reads it so)")


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
