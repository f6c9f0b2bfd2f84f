from lorafusion.adapters.hydra.config import HydraConfig
from lorafusion.adapters.hydra.layer import HydraLayer

__all__ = ["HydraConfig", "HydraLayer"]
