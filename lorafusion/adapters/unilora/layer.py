"""Uni-LoRA's job-wide θ and index map, and its per-module factors gathered from θ."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, JobShared, layer_generator
from lorafusion.adapters.unilora.config import UniLoRAConfig

__all__ = ["UniLoRAShared", "UniLoRALayer", "balanced_indices"]


def balanced_indices(count: int, theta_dim: int, seed: int) -> torch.Tensor:
    """`count` indices into θ [theta_dim], each used ⌊count/d⌋ or ⌈count/d⌉ times, shuffled: PEFT's
    generate_index (numpy's default_rng(seed): the extra indices drawn first, then the shuffle)."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(theta_dim), count // theta_dim)
    if count % theta_dim:
        data = np.concatenate([data, rng.choice(theta_dim, size=count % theta_dim, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


class UniLoRAShared(JobShared):
    """θ (trainable) and the index map of every adapted module of the whole model, in HF module order (layer by
    layer; q, k, v, o, gate, up, down; each module's A entries, then its B entries)."""

    def __init__(self, config: UniLoRAConfig, shapes: dict[str, tuple[int, int]], num_layers: int, seed: int) -> None:
        super().__init__(config, shapes, num_layers, seed)
        generator = layer_generator(seed, -1, "unilora_theta")
        bound = float(config.init_bound)
        self.unilora_theta_d = nn.Parameter((torch.rand(config.theta_dim, generator=generator) * 2 - 1) * bound)
        per_layer = sum(config.rank * (out + inp) for out, inp in shapes.values())
        indices = balanced_indices(num_layers * per_layer, config.theta_dim, config.projection_seed)
        counts = torch.bincount(indices, minlength=config.theta_dim).float()
        self.register_buffer("indices", indices, persistent=False)
        self.register_buffer("inv_sqrt_counts", torch.where(counts > 0, counts.rsqrt(), torch.zeros_like(counts)),
                             persistent=False)
        self.shapes, self.offsets, cursor = shapes, {}, 0
        for layer in range(num_layers):
            for target, (out, inp) in shapes.items():
                self.offsets[layer, target] = cursor
                cursor += config.rank * (out + inp)

    def module_indices(self, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx_A [rank, in], idx_B [out, rank]) of one module."""
        (out, inp), r, start = self.shapes[target], self.config.rank, self.offsets[layer, target]
        idx_a = self.indices[start:start + r * inp].view(r, inp)
        return idx_a, self.indices[start + r * inp:start + r * (inp + out)].view(out, r)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"base_model.unilora_theta_d": self.unilora_theta_d.detach()}


class UniLoRALayer(AdapterLayer):
    peft_extra_keys = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")

    def __init__(self, config: UniLoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 shared: UniLoRAShared, layer_index: int, target: str, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, shared=shared,
                         layer_index=layer_index, target=target, **context)
        idx_a, idx_b = shared.module_indices(layer_index, target)
        self.register_buffer("idx_A", idx_a.clone(), persistent=False)  # [r, K] into θ
        self.register_buffer("idx_B", idx_b.clone(), persistent=False)  # [N, r] into θ
        self.register_buffer("scale_A", shared.inv_sqrt_counts[idx_a], persistent=False)
        self.register_buffer("scale_B", shared.inv_sqrt_counts[idx_b], persistent=False)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        theta = self.shared.unilora_theta_d
        return theta[self.idx_A] * self.scale_A, theta[self.idx_B] * self.scale_B, 1.0

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # θ is the job's shared tensor; the index map is regenerated from the seed

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """PEFT's save_indices=True also writes each module's index map and scales: use them as written."""
        with torch.no_grad():
            for key, mine in (("unilora_indices_A", self.idx_A), ("unilora_indices_B", self.idx_B),
                              ("unilora_scales_A", self.scale_A), ("unilora_scales_B", self.scale_B)):
                if key in tensors:
                    if tensors[key].shape != mine.shape:
                        raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(mine.shape)}")
                    mine.copy_(tensors[key])
