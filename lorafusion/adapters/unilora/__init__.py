from lorafusion.adapters.unilora.config import UniLoRAConfig
from lorafusion.adapters.unilora.layer import UniLoRALayer, UniLoRAShared

__all__ = ["UniLoRAConfig", "UniLoRALayer", "UniLoRAShared"]
