from lorafusion.adapters.dora.config import DoRAConfig
from lorafusion.adapters.dora.layer import DoRALayer

__all__ = ["DoRAConfig", "DoRALayer"]
