"""What every adapter variant provides: a config class, a per-(job, target module) layer, optionally the job's
shared frozen (or trainable) tensors.

A variant's layer is told what it needs and nothing more (see DESIGN.md, "Adapter variants"):
- its config, the module's shape and a generator seeded from (job seed, global layer, module);
- `base`: a read-only view of the frozen base weight (and bias) rows of the HF module it adapts;
- `shared`: the job's `JobShared` module (VeRA's projections, Uni-LoRA's θ and index map, ...), built from the
  job's seed on every pipeline stage alike, never shipped between actors.

It computes one of two ways (`compute`):
- "factors": `effective_factors()` → (A [r, K], B [N, r], scale), plus an optional per-output-column scale
  (`column_scale`, DoRA's m / ‖W + sBA‖), run through the fused low-rank path with every other job;
- "delta": `forward_delta(x)` → the update [tokens, N] of the job's own token segment (SHiRA's sparse ΔW,
  RandLoRA's full-rank bases).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from lorafusion.adapters.svd import best_lora
from lorafusion.validation import check_positive_int, check_positive_number, check_probability, check_seed

__all__ = ["EXPORT_ERROR_KEY", "TARGET_MODULES", "AdapterConfig", "AdapterLayer", "BaseView", "JobShared",
           "layer_generator", "target_shapes", "truncated_lora"]

# Fields several variants share, checked alike wherever a config has them (the message's example is the
# field's default): name -> check(where, value, example).
_COMMON_CHECKS = {
    "rank": check_positive_int,
    "alpha": check_positive_number,
    "dropout": lambda where, value, example: check_probability(where, value),
    "projection_seed": lambda where, value, example: check_seed(where, value),
    "export_rank": check_positive_int,
}

EXPORT_ERROR_KEY = "lorafusion_relative_error"
"""Per-module key of the relative error a truncated-SVD export leaves (see AdapterLayer.export_tensors); the
writer moves it from the tensors into the export's report."""

# HF module names of a Llama-style decoder layer that an adapter can wrap.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every variant shares. Subclasses add their own and set `type`."""

    type: ClassVar[str] = ""
    peft_types: ClassVar[tuple[str, ...]] = ()
    """PEFT peft_type values this variant reads (for the message listing what lorafusion reads)."""
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    """HF module names to adapt, any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ValueError(f"adapter.target_modules is empty; list at least one of {list(TARGET_MODULES)}")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown:
            raise ValueError(
                f"adapter.target_modules has {unknown}, which the model does not have; "
                f"choose from {list(TARGET_MODULES)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"adapter.target_modules={self.target_modules} lists a module twice; list each once")
        self.target_modules = [m for m in TARGET_MODULES if m in self.target_modules]
        for f in fields(self):
            check = _COMMON_CHECKS.get(f.name)
            if f.default is None and getattr(self, f.name) is None:
                continue  # a field defaulting to None: the variant resolves it (DyLoRA's export_rank = its rank)
            if check is not None:
                example = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
                check(f"adapter.{f.name}", getattr(self, f.name), example)

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON view: `{type: ..., field: value, ...}`."""
        return {"type": self.type, **asdict(self)}

    @property
    def dropout_p(self) -> float:
        """Dropout probability on the adapter's input (0 for variants without dropout)."""
        return float(getattr(self, "dropout", 0.0))

    @property
    def init_pass_batches(self) -> int:
        """Global batches of the job's data the runtime runs through the layers' gradient probe before the job's
        first step (0: no init pass; see AdapterLayer.init_pass)."""
        return 0

    def export_config(self) -> AdapterConfig:
        """The config of the adapter this one exports as (LoRA-GA: a plain LoRA of rank 2r)."""
        return self

    @property
    def svd_export_rank(self) -> int | None:
        """Rank of the truncated-SVD LoRA exported for a variant whose update no PEFT adapter holds exactly (TeRA);
        its own tensors then go to lorafusion's native files beside it (see checkpoint.write_peft_adapter).
        None: the export is exact."""
        return None

    def target_shapes(self, arch) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each module this config adapts in a model of `arch`."""
        shapes = target_shapes(arch)
        return {t: shapes[t] for t in self.target_modules}

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        """ValueError when this config cannot adapt a model whose targets have these (out, in) shapes."""

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        """This variant's config from a PEFT adapter_config.json, or None when `data` is another variant's."""
        return None

    def peft_config(self) -> dict[str, Any]:
        """PEFT's adapter_config.json fields (peft_type, r, ...) of an adapter exported from this config (those of
        `export_config()` when the export is another variant's)."""
        exported = self.export_config()
        if exported is not self:
            return exported.peft_config()
        raise NotImplementedError(f"adapter type '{self.type}' does not export to PEFT")


def target_shapes(arch) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every HF target module of a Llama-style decoder layer."""
    hidden, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


class BaseView:
    """Read-only view of the frozen base weight (and bias) rows of one HF module inside a megatron layer."""

    def __init__(self, linear: nn.Module, rows: torch.Tensor) -> None:
        self._linear, self._rows = linear, rows
        self._all = len(rows) == linear.weight.shape[0]

    def weight(self) -> torch.Tensor:
        """W [out, in], detached, in the model's dtype (a copy when the module is a row block of a fused layer)."""
        w = self._linear.weight.detach()
        return w if self._all else w[self._rows]

    def bias(self) -> torch.Tensor | None:
        b = getattr(self._linear, "bias", None)
        if b is None:
            return None
        return b.detach() if self._all else b.detach()[self._rows]


class JobShared(nn.Module):
    """Tensors one job shares across all its layers, built from (config, target shapes, layer count, seed).

    Buffers are frozen (regenerated, or read from an imported adapter); parameters train with the job. Its
    `after_step(step)` hook runs on every stage after each of the job's optimizer steps, before its layers'."""

    def after_step(self, step: int) -> list[nn.Parameter] | None:
        """Optimizer hook (see AdapterLayer.after_step): job-wide per-step state, e.g. a rank sampled per step."""

    def __init__(self, config: AdapterConfig, shapes: dict[str, tuple[int, int]], num_layers: int,
                 seed: int) -> None:
        super().__init__()
        self.config = config

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under their full PEFT key, e.g. {'base_model.vera_A': ...}."""
        return {}

    def optional_peft_keys(self) -> tuple[str, ...]:
        """Keys an imported adapter may leave out (they are regenerated from the seed instead)."""
        return ()

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `peft_tensors` (the caller checks keys and shapes); absent optional keys are kept."""
        copy_present(self.peft_tensors(), tensors)


class AdapterLayer(nn.Module):
    """One job's adapter on one HF target module (in_features K → out_features N)."""

    compute: ClassVar[str] = "factors"
    """'factors' (effective_factors, through the fused low-rank path) or 'delta' (forward_delta)."""
    init_pass: ClassVar[bool] = False
    """True: the layer is built in a gradient-probe mode (probe_grad / finish_init_pass) that the runtime runs over
    config.init_pass_batches global batches before the job's first step."""
    peft_key_aliases: ClassVar[dict[str, str]] = {}
    """Other names PEFT may save one of our tensors under: {alias: key of peft_tensors}."""
    peft_extra_keys: ClassVar[tuple[str, ...]] = ()
    """Keys PEFT may write per module besides ours (copies of shared tensors, optional index maps): accepted on
    import and handed to `load_peft_tensors` when present, never exported."""
    config: AdapterConfig

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, *,
                 generator: torch.Generator, base: BaseView | None = None, shared: JobShared | None = None,
                 layer_index: int = 0, target: str = "") -> None:
        super().__init__()
        self.config, self.in_features, self.out_features = config, in_features, out_features
        self.base, self.layer_index, self.target = base, layer_index, target
        # kept out of the module tree: the job's shared module is one per job, not one per layer
        self.__dict__["shared"] = shared

    @property
    def dropout_p(self) -> float:
        return self.config.dropout_p

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r, K], B [N, r], scale) with delta(x) = scale · dropout(x) Aᵀ Bᵀ (before any column scale)."""
        raise NotImplementedError

    def column_scale(self) -> torch.Tensor | None:
        """Per-output-column scale c [N] applied to the whole module output: y = c ⊙ (W x + delta(x)) + bias,
        differentiable in the parameters it trains; None = no scale."""
        return None

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update [tokens, N] for the job's input rows x [tokens, K] (dropout already applied)."""
        raise NotImplementedError

    def transform_grads(self) -> None:
        """Optimizer hook: change this layer's parameters' .grad in place before the job's step (after the
        gradients are complete: summed over microbatches and replicas; before the norm and clipping). LoRA-Pro's
        equivalent gradient, AltLoRA's projection. Default: none."""

    def after_step(self, step: int) -> list[nn.Parameter] | None:
        """Optimizer hook: called on every stage after the job's optimizer step `step` (1-based), before any
        microbatch of its next global batch runs (DyLoRA's per-step rank). Returns the parameters it re-parametrised
        (LoRA-Squeeze's re-factorised A and B), whose optimizer state no longer applies: the runtime resets it, as
        for a parameter that never stepped. Default: none."""

    def watched_parameters(self) -> list[nn.Parameter]:
        """Parameters whose change invalidates this layer's cached factors (its own and the job's shared ones)."""
        shared = self.__dict__["shared"]
        return [*self.parameters(), *(shared.parameters() if shared is not None else ())]

    def delta_weight(self) -> torch.Tensor:
        """ΔW [N, K] that this adapter adds to the frozen weight (without any column scale)."""
        a, b, scale = self.effective_factors()
        return scale * (b @ a)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under the PEFT module name, e.g. {'lora_A.weight': A, 'lora_B.weight': B}."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """What an exported adapter holds for this module: `peft_tensors()`, and when the config exports a
        truncated-SVD LoRA (`svd_export_rank`) also that LoRA's factors and the relative error it leaves."""
        rank = self.config.svd_export_rank
        if rank is None:
            return self.peft_tensors()
        return {**self.peft_tensors(), **truncated_lora(self.delta_weight(), rank)}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `peft_tensors` (the caller checks keys and shapes). A variant exported exactly as another one
        (LoRA-GA, DyLoRA, ... as a plain LoRA) is never read back as itself: its export reads back as that one."""
        exported = self.config.export_config()
        if exported is not self.config and self.config.svd_export_rank is None:
            raise ValueError(f"a '{self.config.type}' adapter is exported as a plain '{exported.type}' adapter, which "
                             f"is what reads back; load it as '{exported.type}' (init_adapter reads it so)")
        copy_present(self.peft_tensors(), tensors)


def copy_present(current: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy each of `tensors` into the live tensor of `current` under the same key (views of parameters and
    buffers: the copy bumps their version, so cached factors are rebuilt)."""
    with torch.no_grad():
        for key, live in current.items():
            if key in tensors:
                live.copy_(tensors[key])


def truncated_lora(delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """The best rank-`rank` LoRA of ΔW [N, K] (svd.best_lora, for lora_alpha = rank) under PEFT's keys, and the
    relative Frobenius error it leaves under EXPORT_ERROR_KEY."""
    a, b, error, _ = best_lora(delta, rank)
    return {"lora_A.weight": a, "lora_B.weight": b, EXPORT_ERROR_KEY: torch.tensor(error)}


def layer_generator(seed: int, layer_index: int, target: str) -> torch.Generator:
    """A generator for one (job seed, global layer, target) adapter init.

    Derived only from the job's own seed and the layer's global position, so a job's initial adapter
    does not depend on which other jobs share the run, nor on how layers are split into stages.
    """
    digest = hashlib.sha256(f"{seed}/{layer_index}/{target}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
