"""Per-job optimizers, one module per method (JobSpec.optimizer.type), all with JobOptimizer's interface: the
job's own LR schedule, gradient norm and clipping, checkpointable state per parameter."""

from __future__ import annotations

import torch

from lorafusion.config import JobSpec
from runtime.optim.adamw import AdamWOptimizer
from runtime.optim.altlora import AltLoRAOptimizer
from runtime.optim.base import FactorOptimizer, FactorPair, JobOptimizer
from runtime.optim.lorapro import LoRAProOptimizer

__all__ = ["AdamWOptimizer", "AltLoRAOptimizer", "FactorOptimizer", "FactorPair", "JobOptimizer", "LoRAProOptimizer",
           "build_optimizer"]


def build_optimizer(spec: JobSpec, named: dict[str, torch.nn.Parameter], total_steps: int) -> JobOptimizer:
    """The optimizer spec.optimizer names, over the job's trainable parameters held here (`named`, in the order of
    ModelAdapters.named_parameters: the order its state is checkpointed in)."""
    kind = spec.optimizer.type
    if kind == "adamw":
        return AdamWOptimizer(spec, list(named.values()), total_steps)
    if kind == "lorapro":
        return LoRAProOptimizer(spec, named, total_steps)
    if kind == "altlora":
        return AltLoRAOptimizer(spec, named, total_steps)
    raise ValueError(f"job '{spec.name}': optimizer.type={kind!r} has no optimizer in runtime/optim")
