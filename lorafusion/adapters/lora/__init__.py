from lorafusion.adapters.lora.config import LoRAConfig, RsLoRAConfig, read_lora_fields
from lorafusion.adapters.lora.layer import LoRALayer, kaiming_a

__all__ = ["LoRAConfig", "LoRALayer", "RsLoRAConfig", "kaiming_a", "read_lora_fields"]
