from lorafusion.adapters.lora.config import LoRAConfig, RsLoRAConfig
from lorafusion.adapters.lora.layer import LoRALayer, lora_peft_config

__all__ = ["LoRAConfig", "LoRALayer", "RsLoRAConfig", "lora_peft_config"]
