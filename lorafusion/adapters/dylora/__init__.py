from lorafusion.adapters.dylora.config import DyLoRAConfig
from lorafusion.adapters.dylora.layer import DyLoRALayer, DyLoRAShared, sampled_rank

__all__ = ["DyLoRAConfig", "DyLoRALayer", "DyLoRAShared", "sampled_rank"]
