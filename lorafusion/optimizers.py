"""Per-job optimizer configs: `JobSpec.optimizer`, in YAML `optimizer: {type: lorapro}`.

The optimizers themselves live in runtime/optim/ (one module per method); these dataclasses only say which one a
job uses and with what settings, and check that the job's adapter is one the method can step.

- `adamw` (default): AdamW on every trainable tensor, with the job's adam_betas, adam_eps and weight_decay.
- `lorapro` (Wang & Liang, ICLR'25): the factors' gradients are turned into the low-rank equivalent gradient
  ĝ = P_B G + (I − P_B) G P_A of the full weight, Adam runs on ĝ with full-size (N × K) moments per module, and
  the Adam update is projected back onto the factors with the Sylvester-optimal split.
- `altlora` (Yu et al., arXiv 2505.12455): per (A, B) pair, A then B in one step, each with its gradient scaled by
  the other factor's regularised Gram inverse, and momenta re-projected when the other factor moves.

Both factor methods need a layer whose trainable tensors are exactly lora_A [r, K] and lora_B [N, r], with
ΔW = s·(B A + a frozen part): see FACTOR_ADAPTERS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from lorafusion.validation import is_number

__all__ = ["OptimizerConfig", "AdamWConfig", "LoRAProConfig", "AltLoRAConfig", "FACTOR_ADAPTERS",
           "OPTIMIZER_TYPES", "optimizer_config_from_dict"]

FACTOR_ADAPTERS = ("lora", "rslora", "loraga")
"""Adapter types whose trainable tensors are one (lora_A [r, K], lora_B [N, r]) pair per module with
ΔW = scaling·B A (+ LoRA-GA's frozen −scaling·B₀A₀, which does not change the factors' gradients). DoRA is not
one: its magnitude vector trains too and its column scale makes the factors' gradients other than s·BᵀG and s·GAᵀ;
VeRA, RandLoRA, SHiRA and Uni-LoRA train no such pair."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """Fields every optimizer shares (none yet). Subclasses set `type`."""

    type: ClassVar[str] = ""
    factor_pairs: ClassVar[bool] = False
    """True: the method steps (lora_A, lora_B) pairs, so only FACTOR_ADAPTERS can use it."""

    def to_dict(self) -> dict[str, Any]:
        """The YAML view: `{type: ..., field: value, ...}`."""
        return {"type": self.type, **asdict(self)}

    def check_adapter(self, adapter_type: str, job: str) -> None:
        """ValueError (naming the job, optimizer.type and the adapter type) when this method cannot step the adapter."""
        if self.factor_pairs and adapter_type not in FACTOR_ADAPTERS:
            raise ValueError(
                f"job '{job}': optimizer.type='{self.type}' steps adapters that train only LoRA factor pairs "
                f"(lora_A, lora_B with ΔW = s·B A), and adapter type '{adapter_type}' is not one; use adapter type "
                f"{' / '.join(FACTOR_ADAPTERS)} with it, or optimizer {{type: adamw}} for '{adapter_type}'")


@dataclass(kw_only=True)
class AdamWConfig(OptimizerConfig):
    """AdamW on every trainable tensor of the job (torch's fused or foreach AdamW). Its settings are the JobSpec's
    adam_betas, adam_eps and weight_decay."""

    type: ClassVar[str] = "adamw"


def _check_fraction(name: str, value: Any, example: str) -> None:
    if not is_number(value) or not 0 <= value < 1:
        raise ValueError(f"optimizer.{name}={value!r} must be a number in [0, 1), e.g. {name}: {example}")


def _check_positive(name: str, value: Any, example: str) -> None:
    if not is_number(value) or value <= 0:
        raise ValueError(f"optimizer.{name}={value!r} must be a number > 0, e.g. {name}: {example}")


@dataclass(kw_only=True)
class LoRAProConfig(OptimizerConfig):
    """LoRA-Pro: Adam on the equivalent gradient ĝ [N, K] of each module (moments of that full size, with the JobSpec's
    adam_betas and adam_eps), its update projected back onto A and B (the authors' outer optimizer is SGD on the
    projected gradients: the factors move by −lr times them). Costs 2·N·K fp32 numbers of state per module."""

    type: ClassVar[str] = "lorapro"
    factor_pairs: ClassVar[bool] = True
    delta: float = 1e-8
    """Regulariser of the r × r Gram inverses (BᵀB + δI)⁻¹ and (AAᵀ + δI)⁻¹: B starts at zero, where BᵀB is singular
    (the authors' pinv(· + 1e-8·I))."""

    def __post_init__(self) -> None:
        _check_positive("delta", self.delta, "1e-8")


@dataclass(kw_only=True)
class AltLoRAConfig(OptimizerConfig):
    """AltLoRA (Alg. 1): per (A, B) pair, A steps with m_A ← β₁·(BᵀB+λI)⁻¹BᵀB_old·m_A + (1−β₁)(BᵀB+λI)⁻¹g_A, then B
    symmetrically with (AAᵀ+λI)⁻¹ of the updated A; each moves by −lr/(1−β₁ᵗ) times its momentum. No second
    moment: the authors' default betas (0.999, 0.98) has a β₂ that only their AltLoRA+ variant uses, which
    lorafusion does not implement."""

    type: ClassVar[str] = "altlora"
    factor_pairs: ClassVar[bool] = True
    beta1: float = 0.999
    """Momentum coefficient β₁ in [0, 1) (the authors' default); 0 = no momentum (plain scaled gradient steps)."""
    reg: float = 1e-3
    """λ of the Gram inverses (BᵀB + λI)⁻¹ and (AAᵀ + λI)⁻¹ (the authors' default)."""

    def __post_init__(self) -> None:
        _check_fraction("beta1", self.beta1, "0.999")
        _check_positive("reg", self.reg, "1e-3")


_CONFIGS: dict[str, type[OptimizerConfig]] = {cls.type: cls for cls in (AdamWConfig, LoRAProConfig, AltLoRAConfig)}
OPTIMIZER_TYPES = tuple(_CONFIGS)


def optimizer_config_from_dict(data: Any, where: str = "job") -> OptimizerConfig:
    """`{type: lorapro, delta: 1e-8}` → its config (ValueError prefixed by `where`, naming the bad key or value);
    `type` defaults to adamw."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: optimizer={data!r} must be a mapping like {{type: adamw}}")
    data = dict(data)
    kind = data.pop("type", "adamw")
    if not isinstance(kind, str) or kind not in _CONFIGS:
        raise ValueError(f"{where}: optimizer.type={kind!r} is unknown; choose one of {list(OPTIMIZER_TYPES)}")
    cls = _CONFIGS[kind]
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown optimizer field(s) {unknown} for optimizer.type '{kind}'; known fields: "
                         f"{sorted(known) or 'none'}")
    try:
        return cls(**data)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
