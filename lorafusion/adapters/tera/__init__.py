from lorafusion.adapters.tera.config import TeRAConfig
from lorafusion.adapters.tera.layer import TeRALayer, TeRAShared, tensor_modes

__all__ = ["TeRAConfig", "TeRALayer", "TeRAShared", "tensor_modes"]
