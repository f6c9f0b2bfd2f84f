from lorafusion.adapters.lorasb.config import LoRASBConfig
from lorafusion.adapters.lorasb.layer import LoRASBLayer, sign_gradient_init

__all__ = ["LoRASBConfig", "LoRASBLayer", "sign_gradient_init"]
