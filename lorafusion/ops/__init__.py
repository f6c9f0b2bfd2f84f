"""Fused LoRA kernels (Triton) and their pure-torch references.

`fused_lora_linear` is one adapter with PEFT shapes; `fused_multi_lora_linear` runs a microbatch whose
rows are split into per-adapter segments described by a `SegmentTable` (built once per microbatch).
"""

from lorafusion.ops.fused_lora_dropout_xa import dropout_keep_mask
from lorafusion.ops.fused_lora_linear import FusedMultiLoRAFunction, fused_lora_linear, fused_multi_lora_linear, layer_params
from lorafusion.ops.reference import lora_linear_addmm, lora_linear_reference, multi_lora_linear_reference
from lorafusion.ops.segments import LayerParams, SegmentTable
from lorafusion.ops.utils import BACKENDS, pick_config, resolve_backend

__all__ = [
    "BACKENDS", "FusedMultiLoRAFunction", "LayerParams", "SegmentTable", "dropout_keep_mask", "fused_lora_linear",
    "fused_multi_lora_linear", "layer_params", "lora_linear_addmm", "lora_linear_reference",
    "multi_lora_linear_reference", "pick_config", "resolve_backend",
]
