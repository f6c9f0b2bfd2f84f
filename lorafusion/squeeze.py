"""Post-hoc LoRA-Squeeze (Vulić et al., arXiv 2602.10993): the best rank-R plain LoRA of any adapter.

Each adapted module's update ΔW (the variant's `delta_weight`: DoRA's c ⊙ (W + sBA) − W, SHiRA's sparse matrix,
VeRA's and RandLoRA's products with their job-wide shared bases...) is replaced by its rank-R truncated SVD
U_R S_R V_Rᵀ, exported as PEFT's `convert_to_lora` does: B = U_R S_R, A = V_Rᵀ, lora_alpha = R (scaling 1). By
Eckart-Young this is the rank-R matrix nearest to ΔW in Frobenius norm; each module's relative error
‖ΔW − ΔW_R‖_F / ‖ΔW‖_F is measured against ΔW itself and reported.

How the SVD is computed (lorafusion/adapters/svd.py): for variants that compute by plain factors
(LoRA, rsLoRA, VeRA, Uni-LoRA) exactly from thin QRs of the factors; for the others from the dense ΔW, exactly, or by
a seeded randomized SVD where the module is large and R small (svd_method).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafusion.adapters import LoRAConfig
from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.svd import SVD_METHODS, best_lora

__all__ = ["SqueezeResult", "squeeze", "squeeze_layer", "REPORT_NAME"]

REPORT_NAME = "squeeze_report.json"
"""The per-module errors, written into the output adapter's folder."""
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class SqueezeResult:
    output_dir: Path
    """The folder of the rank-`rank` PEFT LoRA (and REPORT_NAME)."""
    rank: int
    """The squeezed adapter's rank R."""
    source_type: str
    """The variant of the adapter that was squeezed ('lora', 'dora', 'vera', ...)."""
    errors: dict[str, float]
    """Module ('model.layers.0.self_attn.q_proj') -> ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F (0 where ΔW = 0)."""
    methods: dict[str, str]
    """Module -> how its SVD was computed: 'factors', 'exact' or 'randomized'."""

    @property
    def max_error(self) -> float:
        return max(self.errors.values())

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors)

    def worst(self, count: int = 3) -> list[tuple[str, float]]:
        """The `count` modules of largest relative error, largest first."""
        return sorted(self.errors.items(), key=lambda item: -item[1])[:count]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "source_type": self.source_type, "max_error": self.max_error,
                "mean_error": self.mean_error,
                "modules": {m: {"relative_error": e, "svd": self.methods[m]} for m, e in self.errors.items()}}

    def summary(self) -> str:
        """A few lines: where the adapter went, the max/mean relative error, the worst modules."""
        worst = ", ".join(f"{module} {error:.3g}" for module, error in self.worst())
        return (f"squeezed a {self.source_type} adapter to a rank-{self.rank} LoRA in {self.output_dir}\n"
                f"relative error ‖ΔW − ΔW_R‖/‖ΔW‖ over {len(self.errors)} modules: max {self.max_error:.3g}, "
                f"mean {self.mean_error:.3g}\nworst: {worst}\n(per module: {self.output_dir / REPORT_NAME})")


def squeeze(adapter_dir: str | Path, rank: int, output_dir: str | Path, base_model: str | Path | None = None, *,
            force: bool = False, svd: str = "auto") -> SqueezeResult:
    """Write the best rank-`rank` PEFT LoRA of the adapter in `adapter_dir` (any variant lorafusion reads) to
    `output_dir`, with REPORT_NAME beside it.

    base_model: the HF checkpoint folder the adapter was trained on (default: its adapter_config.json's
    base_model_name_or_path); its weights are needed where ΔW depends on them (DoRA) and its shapes always. It is
    built in fp32 on the CPU (4 bytes per parameter of memory).
    force: replace a non-empty output_dir. svd: 'auto' (see svd_method), 'exact' or 'randomized' for the variants
    squeezed from their dense ΔW. Nothing is written unless every module was squeezed; the folder appears whole.
    """
    from lorafusion.adapters.attach import ModelAdapters
    from lorafusion.adapter_io import read_peft_adapter, write_peft_adapter
    from lorafusion.models import build_model, read_architecture

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank={rank!r} must be a positive integer (the squeezed LoRA's rank), e.g. rank=8 "
                         "(lorafusion squeeze: --rank 8)")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd={svd!r}; choose one of {list(SVD_METHODS)}")
    output_dir = Path(output_dir)
    _check_output(output_dir, force)
    config, tensors = read_peft_adapter(adapter_dir)
    given = base_model is not None
    base_model = _base_model(Path(adapter_dir), base_model)
    try:
        arch = read_architecture(base_model)
    except ValueError as err:
        source = "given" if given else f"the adapter's base_model_name_or_path={base_model!r}"
        raise ValueError(f"{err} ({source}); pass the checkpoint the adapter was trained on as base_model= "
                         "(lorafusion squeeze: --base-model PATH)") from None
    _check_rank(rank, config.target_shapes(arch), config.type)
    model, arch = build_model(base_model, dtype=torch.float32)
    adapters = ModelAdapters(model, arch, kernels="torch")
    adapters.add_job("squeeze", config, seed=0)
    adapters.load_peft_state_dict("squeeze", tensors, where=str(adapter_dir))
    squeezed, errors, methods = {}, {}, {}
    with torch.no_grad():
        for module, layer in adapters.job_layers("squeeze").items():
            a, b, error, method = squeeze_layer(layer, rank, svd)
            squeezed[f"{module}.lora_A.weight"], squeezed[f"{module}.lora_B.weight"] = a, b
            errors[module.removeprefix(_PREFIX)], methods[module.removeprefix(_PREFIX)] = error, method
    result = SqueezeResult(output_dir=output_dir, rank=rank, source_type=config.type, errors=errors, methods=methods)
    report = {"source": str(Path(adapter_dir).resolve()), "base_model": str(base_model), **result.to_dict()}
    target = LoRAConfig(rank=rank, alpha=float(rank), target_modules=list(config.target_modules))
    write_peft_adapter(output_dir, squeezed, target, base_model=str(base_model),
                       extra_files={REPORT_NAME: json.dumps(report, indent=2)})
    return result


def squeeze_layer(layer: AdapterLayer, rank: int, svd: str = "auto") -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(A [rank, K], B [N, rank], relative error, method) of one layer's best rank-`rank` LoRA at scaling 1: from
    its factors where ΔW is s·B A (the exact small-core SVD), else from its dense ΔW (see svd.best_lora)."""
    plain = layer.compute == "factors" and layer.column_scale() is None
    return best_lora(layer.delta_weight(), rank, factors=layer.effective_factors() if plain else None, method=svd)


def _check_output(output_dir: Path, force: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output '{output_dir}' is a file; choose a folder path for the squeezed adapter")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise ValueError(f"output '{output_dir}' already holds files; choose another folder, or replace it with "
                         "force=True (lorafusion squeeze: --force)")


def _base_model(adapter_dir: Path, base_model: str | Path | None) -> str:
    """The base model (a folder or a Hub id, resolved where it is read): the one given, else the adapter's
    base_model_name_or_path (ValueError naming the file when it has none)."""
    from lorafusion.adapter_io import CONFIG_NAME

    if base_model is not None:
        return str(base_model)
    config_path = adapter_dir / CONFIG_NAME
    found = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not found:
        raise ValueError(f"{config_path}: base_model_name_or_path is not set; pass the HF checkpoint folder or Hub id "
                         "it was trained on as base_model= (lorafusion squeeze: --base-model PATH)")
    return str(found)


def _check_rank(rank: int, shapes: dict[str, tuple[int, int]], source_type: str) -> None:
    """ValueError unless a rank-`rank` LoRA fits every target (rank ≤ min(out, in)), naming the smallest."""
    target, (out, inp) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(out, inp):
        raise ValueError(f"rank={rank} is larger than {target}'s {out}×{inp} weight allows; a rank-R LoRA of it needs "
                         f"R ≤ min(out, in) = {min(out, inp)}: choose rank ≤ {min(out, inp)} (the {source_type} "
                         f"adapter targets {list(shapes)})")
