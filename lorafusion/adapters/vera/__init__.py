from lorafusion.adapters.vera.config import VeRAConfig
from lorafusion.adapters.vera.layer import VeRALayer, VeRAShared

__all__ = ["VeRAConfig", "VeRALayer", "VeRAShared"]
