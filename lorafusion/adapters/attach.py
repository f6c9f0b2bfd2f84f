"""Put many jobs' adapters on a megatron GPTModel (or pipeline chunk) and move them in and out as PEFT tensors."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.base import AdapterConfig, layer_generator
from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear, job_key
from lorafusion.adapters.registry import get_variant
from lorafusion.models.builder import fc1_rows, qkv_rows
from lorafusion.models.hf import Architecture

__all__ = ["ModelAdapters", "SITES"]

# HF target -> (megatron submodule, linear attribute, HF parent module name).
SITES = {
    "q_proj": ("self_attention", "linear_qkv", "self_attn"),
    "k_proj": ("self_attention", "linear_qkv", "self_attn"),
    "v_proj": ("self_attention", "linear_qkv", "self_attn"),
    "o_proj": ("self_attention", "linear_proj", "self_attn"),
    "gate_proj": ("mlp", "linear_fc1", "mlp"),
    "up_proj": ("mlp", "linear_fc1", "mlp"),
    "down_proj": ("mlp", "linear_fc2", "mlp"),
}


def _out_rows(arch: Architecture, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Rows of each HF target in its megatron layer's output, on the model's device (indexed every forward)."""
    q, k, v = qkv_rows(arch)
    gate, up = fc1_rows(arch)
    rows = {
        "linear_qkv": {"q_proj": q, "k_proj": k, "v_proj": v},
        "linear_proj": {"o_proj": torch.arange(arch.hidden_size)},
        "linear_fc1": {"gate_proj": gate, "up_proj": up},
        "linear_fc2": {"down_proj": torch.arange(arch.hidden_size)},
    }
    return {site: {t: r.to(device) for t, r in targets.items()} for site, targets in rows.items()}


class ModelAdapters:
    """Wraps every adaptable linear of `model` once; jobs are then added and removed by name."""

    def __init__(self, model: nn.Module, arch: Architecture, kernels: str = "auto") -> None:
        """kernels: 'auto' (Triton on CUDA, torch elsewhere), 'triton' or 'torch', see RunConfig.kernels."""
        self.model, self.arch = model, arch
        self.batch = AdapterBatch()
        self.configs: dict[str, AdapterConfig] = {}
        rows = _out_rows(arch, next(model.parameters()).device)
        self.layers: dict[int, dict[str, MultiAdapterLinear]] = {}  # global layer index -> site -> wrapper
        site_names = sorted({(s[0], s[1]) for s in SITES.values()})
        for layer in model.decoder.layers:
            sites = {}
            for number, (parent_name, attr) in enumerate(site_names):
                parent = getattr(layer, parent_name)
                site_id = (layer.layer_number - 1) * len(site_names) + number
                wrapper = MultiAdapterLinear(getattr(parent, attr), rows[attr], self.batch, site_id=site_id,
                                            kernels=kernels)
                setattr(parent, attr, wrapper)
                sites[attr] = wrapper
            self.layers[layer.layer_number - 1] = sites

    def add_job(self, name: str, config: AdapterConfig, seed: int) -> None:
        """Create `name`'s adapter on every target of every layer this model chunk holds."""
        if name in self.configs:
            raise ValueError(f"job '{name}' already has an adapter on this model; job names must be unique")
        variant = get_variant(config.type)
        device = next(self.model.parameters()).device
        for index, sites in self.layers.items():
            for target in config.target_modules:
                _, attr, _ = SITES[target]
                n_out = len(sites[attr].out_rows[target])
                in_features = sites[attr].weight.shape[1]
                layer = variant.layer_cls(config, in_features, n_out, generator=layer_generator(seed, index, target))
                sites[attr].add_adapter(name, target, layer.to(device))
        self.configs[name] = config

    def remove_job(self, name: str) -> None:
        for sites in self.layers.values():
            for wrapper in sites.values():
                wrapper.remove_adapter(name)
        self.configs.pop(name, None)

    def _job_layers(self, name: str):
        key = job_key(name)
        for index in sorted(self.layers):
            for target in self.configs[name].target_modules:
                _, attr, hf_parent = SITES[target]
                yield f"base_model.model.model.layers.{index}.{hf_parent}.{target}", self.layers[index][attr].adapters[key][target]

    def collect_grads(self, name: str) -> None:
        """Hand the job's gradients summed over the microbatches since the last call to its parameters' .grad
        (each layer caches the job's factors per optimizer step; see MultiAdapterLinear.collect_grads)."""
        for sites in self.layers.values():
            for wrapper in sites.values():
                wrapper.collect_grads(name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The job's trainable parameters, in a fixed order (layer, target, parameter)."""
        return [p for _, layer in self._job_layers(name) for p in layer.parameters()]

    def peft_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The job's adapter under PEFT's key names (`base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight`)."""
        return {
            f"{module}.{key}": tensor.detach().to("cpu", torch.float32).contiguous()
            for module, layer in self._job_layers(name)
            for key, tensor in layer.peft_tensors().items()
        }

    def load_peft_state_dict(self, name: str, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
        """Load tensors written by `peft_state_dict` (or PEFT); ValueError on a missing or misshapen one."""
        for module, layer in self._job_layers(name):
            mine = layer.peft_tensors()
            picked = {}
            for key, current in mine.items():
                full = f"{module}.{key}"
                if full not in tensors:
                    raise ValueError(f"{where}: tensor '{full}' is missing; the adapter does not match its config")
                if tensors[full].shape != current.shape:
                    raise ValueError(
                        f"{where}: tensor '{full}' has shape {tuple(tensors[full].shape)}, expected {tuple(current.shape)}"
                    )
                picked[key] = tensors[full]
            layer.load_peft_tensors(picked)
