from lorafusion.adapters.blocklora.config import BlockLoRAConfig
from lorafusion.adapters.blocklora.layer import BlockLoRALayer

__all__ = ["BlockLoRAConfig", "BlockLoRALayer"]
