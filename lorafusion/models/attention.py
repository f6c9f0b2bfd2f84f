"""Core attention for megatron's `SelfAttention`: causal SDPA, block-diagonal for packed rows.

A packed microbatch holds several samples in one row (megatron's 'thd' layout with `cu_seqlens`).
Each sample attends only to its own earlier tokens, so we run causal SDPA per sample segment: the
work is Σ len² instead of T², and no token can see another sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["PackedCoreAttention"]


class PackedCoreAttention(MegatronModule):
    """Drop-in for megatron's `DotProductAttention` (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise RuntimeError("PackedCoreAttention does not support context parallelism; set it to 1.")
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or config.num_attention_heads
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [batch, heads, len, d]; k, v: [batch, groups, len, d]
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            enable_gqa=self.num_groups != self.num_heads,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention takes no attention_bias; pass None.")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params.cu_seqlens_q)
        # query: [s, b, heads, d] -> [b, heads, s, d]
        out = self._sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads*d]

    def _forward_packed(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        # query: [t, heads, d]; key, value: [t, groups, d]
        bounds = cu_seqlens.tolist()
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [1, heads, len, d]: with a batch dimension torch runs its fused CPU (flash) kernel, which also takes
            # GQA directly; 3-D inputs fall back to the unfused math path (about 2x slower at 1000 tokens).
            q = query[start:end].transpose(0, 1).unsqueeze(0)
            k = key[start:end].transpose(0, 1).unsqueeze(0)
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            pieces.append(self._sdpa(q, k, v)[0].transpose(0, 1))  # [len, heads, d]
        out = torch.cat(pieces, dim=0)
        return out.reshape(out.shape[0], -1)  # [t, heads*d]
