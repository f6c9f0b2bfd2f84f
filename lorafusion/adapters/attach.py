"""Put many jobs' adapters on a megatron GPTModel (or pipeline chunk) and move them in and out as PEFT tensors."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.base import AdapterConfig, AdapterLayer, BaseView, JobShared, layer_generator
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
        self.shared: dict[str, JobShared] = {}  # job -> its tensors shared by all its layers (when its variant has some)
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
        shapes = config.target_shapes(self.arch)
        config.check_model(shapes)
        shared = None
        if variant.shared_cls is not None:
            shared = variant.shared_cls(config, shapes, self.arch.num_layers, seed).to(device)
            self.shared[name] = shared
        for index, sites in self.layers.items():
            for target in config.target_modules:
                _, attr, _ = SITES[target]
                rows = sites[attr].out_rows[target]
                layer = variant.layer_cls(config, sites[attr].weight.shape[1], len(rows),
                                          generator=layer_generator(seed, index, target),
                                          base=BaseView(sites[attr].base, rows), shared=shared,
                                          layer_index=index, target=target)
                sites[attr].add_adapter(name, target, layer.to(device))
        self.configs[name] = config

    def remove_job(self, name: str) -> None:
        for sites in self.layers.values():
            for wrapper in sites.values():
                wrapper.remove_adapter(name)
        self.configs.pop(name, None)
        self.shared.pop(name, None)

    def _job_layers(self, name: str):
        key = job_key(name)
        for index in sorted(self.layers):
            for target in self.configs[name].target_modules:
                _, attr, hf_parent = SITES[target]
                yield f"base_model.model.model.layers.{index}.{hf_parent}.{target}", self.layers[index][attr].adapters[key][target]

    def job_layers(self, name: str) -> dict[str, AdapterLayer]:
        """The job's layers held here by PEFT module name ('base_model.model.model.layers.<i>.self_attn.q_proj')."""
        return dict(self._job_layers(name))

    def collect_grads(self, name: str) -> None:
        """Hand the job's gradients summed over the microbatches since the last call to its parameters' .grad
        (each layer caches the job's factors per optimizer step; see MultiAdapterLinear.collect_grads)."""
        for sites in self.layers.values():
            for wrapper in sites.values():
                wrapper.collect_grads(name)

    def named_parameters(self, name: str, frozen: bool = False) -> dict[str, nn.Parameter]:
        """The job's trainable parameters in a fixed order: its shared ones ('shared.<name>'), then per layer
        and target ('layers.<global layer>.<target>.<name>'); the names do not depend on the pipeline cut.
        frozen: also the parameters that do not train but are part of the job's state (LoRA-GA's offset)."""
        named = {f"shared.{n}": p for n, p in self.shared[name].named_parameters()} if name in self.shared else {}
        for _, layer in self._job_layers(name):
            named.update({f"layers.{layer.layer_index}.{layer.target}.{n}": p for n, p in layer.named_parameters()})
        return {n: p for n, p in named.items() if frozen or p.requires_grad}

    def shared_parameters(self, name: str) -> list[nn.Parameter]:
        """The job's trainable tensors shared by all its layers (every pipeline stage holds a copy)."""
        return [p for p in self.shared[name].parameters() if p.requires_grad] if name in self.shared else []

    def transform_grads(self, name: str) -> None:
        """Run the job's layers' gradient hooks (AdapterLayer.transform_grads) once its gradients are complete."""
        for _, layer in self._job_layers(name):
            layer.transform_grads()

    def after_step(self, name: str, step: int) -> list[nn.Parameter]:
        """Run the job's after-step hooks: its shared module's, then its layers'; the parameters whose optimizer
        state the hooks invalidated (see AdapterLayer.after_step)."""
        reset = list(self.shared[name].after_step(step) or ()) if name in self.shared else []
        for _, layer in self._job_layers(name):
            reset.extend(layer.after_step(step) or ())
        return reset

    def init_pass_layers(self, name: str) -> list:
        """The job's layers that take a gradient init pass before its first step (see AdapterLayer.init_pass)."""
        return [layer for _, layer in self._job_layers(name) if layer.init_pass]

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The job's trainable parameters, in the order of `named_parameters`."""
        return list(self.named_parameters(name).values())

    def peft_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The job's adapter under PEFT's key names (`base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight`,
        and the job's shared tensors such as `base_model.vera_A`), as exported (AdapterLayer.export_tensors: with a
        truncated-SVD LoRA beside a variant's own tensors when its export is not exact)."""
        shared = self.shared[name].peft_tensors() if name in self.shared else {}
        layers = {f"{module}.{key}": tensor for module, layer in self._job_layers(name)
                  for key, tensor in layer.export_tensors().items()}
        return {key: tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype).contiguous()
                for key, tensor in {**shared, **layers}.items()}

    def load_peft_state_dict(self, name: str, tensors: dict[str, torch.Tensor], where: str = "adapter") -> None:
        """Load tensors written by `peft_state_dict` or by PEFT. Strict: a missing or misshapen tensor, or one this
        adapter does not have, is a ValueError naming it (another pipeline stage's layers are skipped)."""
        shared = self.shared.get(name)
        layers = dict(self._job_layers(name))
        picked_shared, picked = match_peft_tensors(self.configs[name], shared, layers, tensors, where,
                                                   self.arch.num_layers, set(self.layers))
        if shared is not None:
            shared.load_peft_tensors(picked_shared)
        for module, layer in layers.items():
            layer.load_peft_tensors(picked[module])
        self.drop_factors(name)  # buffers (index maps) may have changed without a parameter version

    def drop_factors(self, name: str) -> None:
        """Forget the job's cached factors at every site: tensors they depend on changed without an optimizer step."""
        for sites in self.layers.values():
            for wrapper in sites.values():
                wrapper.drop_factors(name)


def check_peft_adapter(config: AdapterConfig, tensors: dict[str, torch.Tensor], arch: Architecture,
                       where: str) -> None:
    """ValueError unless `tensors` are exactly an adapter of `config` on a model of `arch` (what
    load_peft_state_dict would accept), checked without building the model: one layer per target stands for all."""
    variant, targets = get_variant(config.type), config.target_shapes(arch)
    config.check_model(targets)
    shared = variant.shared_cls(config, targets, arch.num_layers, 0) if variant.shared_cls else None
    layers = {}
    for target, (out, inp) in targets.items():
        stub = _StubLinear(out, inp)
        layer = variant.layer_cls(config, inp, out, generator=torch.Generator().manual_seed(0),
                                  base=BaseView(stub, torch.arange(out)), shared=shared, layer_index=0, target=target)
        for index in range(arch.num_layers):
            layers[f"base_model.model.model.layers.{index}.{SITES[target][2]}.{target}"] = layer
    match_peft_tensors(config, shared, layers, tensors, where, arch.num_layers, set(range(arch.num_layers)))


class _StubLinear:
    """A weight of the right shape (zeros, one row stored) for building an adapter layer only to read its shapes."""

    def __init__(self, out: int, inp: int) -> None:
        self.weight, self.bias = torch.zeros(1, inp).expand(out, inp), None


def match_peft_tensors(config: AdapterConfig, shared: JobShared | None, layers: dict, tensors: dict[str, torch.Tensor],
                       where: str, num_layers: int, held: set[int]):
    """(the shared module's tensors, {module: its tensors}) picked from `tensors` for an adapter whose layers this
    model chunk holds (`layers`: PEFT module name -> layer; `held`: their layer numbers). ValueError on a missing or
    misshapen tensor, and on any tensor that is not part of the adapter (tensors of layers another pipeline stage
    holds are left to it)."""
    used: set[str] = set()
    picked_shared = {}
    if shared is not None:
        picked_shared = _pick(shared.peft_tensors(), tensors, "", where, shared.optional_peft_keys(), used)
    picked = {}
    for module, layer in layers.items():
        mine = _pick(layer.peft_tensors(), tensors, f"{module}.", where, (), used, layer.peft_key_aliases)
        extra = {key: tensors[f"{module}.{key}"] for key in layer.peft_extra_keys if f"{module}.{key}" in tensors}
        used.update(f"{module}.{key}" for key in extra)
        picked[module] = {**extra, **mine}

    def elsewhere(key: str) -> bool:  # a layer of the model that another pipeline stage holds
        layer = _layer_of(key)
        return layer is not None and layer.isdigit() and int(layer) < num_layers and int(layer) not in held

    unexpected = [key for key in tensors if key not in used and not elsewhere(key)]
    if unexpected:
        raise ValueError(f"{where}: tensor '{sorted(unexpected)[0]}' ({len(unexpected)} unexpected in all) is not "
                         f"part of a {config.type} adapter with this config on this model; "
                         "lorafusion does not drop tensors it does not understand")
    return picked_shared, picked


def _layer_of(key: str) -> str | None:
    """The layer number in 'base_model.model.model.layers.<i>....', else None."""
    parts = key.split(".")
    return parts[4] if len(parts) > 4 and parts[:4] == ["base_model", "model", "model", "layers"] else None


def _pick(mine: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], prefix: str, where: str, optional,
          used: set[str], aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `mine`'s keys (under `prefix`, or an alias) from `tensors`, shapes checked; optional ones may
    be absent."""
    picked = {}
    for key, current in mine.items():
        names = [f"{prefix}{key}"] + [f"{prefix}{alias}" for alias, real in (aliases or {}).items() if real == key]
        found = [n for n in names if n in tensors]
        if not found:
            if key in optional:
                continue
            raise ValueError(f"{where}: tensor '{names[0]}' is missing; the adapter does not match its config")
        full = found[0]
        if tensors[full].shape != current.shape:
            raise ValueError(f"{where}: tensor '{full}' has shape {tuple(tensors[full].shape)}, "
                             f"expected {tuple(current.shape)}")
        picked[key] = tensors[full]
        used.update(found)
    return picked
