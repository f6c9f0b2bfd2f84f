"""LoRAFusion: many LoRA fine-tuning jobs on one shared frozen base model."""

import warnings
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorafusion")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# megatron-core warns at import that Transformer Engine / Apex are absent; we use its local modules
# on purpose (CPU path and our own kernels), so the warning is noise for our users.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*", category=UserWarning)

from lorafusion.adapters import (
    DoRAConfig,
    LoRAConfig,
    LoRAGAConfig,
    LoRASBConfig,
    LoRASqueezeConfig,
    RandLoRAConfig,
    RsLoRAConfig,
    SHiRAConfig,
    UniLoRAConfig,
    VeRAConfig,
    PaCAConfig,
    LoLDUConfig,
    HydraConfig,
    TeRAConfig,
)
from lorafusion.adapters import BlockLoRAConfig, DyLoRAConfig, MatryoshkaLoRAConfig
from lorafusion.config import JobSpec, RunConfig, load_config
from lorafusion.evaluate import EvalResult, evaluate
from lorafusion.federation import FederationConfig
from lorafusion.optimizers import AdamWConfig, AltLoRAConfig, LoRAProConfig
from lorafusion.result import FitInterrupted, FitResult, JobResult
from lorafusion.squeeze import SqueezeResult, squeeze

__all__ = [
    "__version__",
    "DoRAConfig",
    "EvalResult",
    "FederationConfig",
    "FitInterrupted",
    "FitResult",
    "JobResult",
    "JobSpec",
    "LoRAConfig",
    "LoRAGAConfig",
    "LoRASBConfig",
    "LoRASqueezeConfig",
    "RandLoRAConfig",
    "RsLoRAConfig",
    "RunConfig",
    "SHiRAConfig",
    "UniLoRAConfig",
    "VeRAConfig",
    "DyLoRAConfig",
    "MatryoshkaLoRAConfig",
    "BlockLoRAConfig",
    "evaluate",
    "AdamWConfig",
    "AltLoRAConfig",
    "LoRAProConfig",
    "fit",
    "load_config",
    "PaCAConfig",
    "LoLDUConfig",
    "HydraConfig",
    "TeRAConfig",
    "SqueezeResult",
    "squeeze",
]


def fit(jobs: list[JobSpec], run: RunConfig) -> FitResult:
    """Train every job together on one copy of `run.base_model`; write each job's PEFT adapter."""
    from runtime.fit import fit as _fit

    return _fit(jobs, run)
