"""Core attention for megatron's `SelfAttention`: RoPE at per-token positions, then causal attention that never
crosses samples, in one call per layer whatever the number of samples packed in the row.

A packed microbatch holds several samples in one row (megatron's 'thd' layout). Everything attention needs to
know about that row is a `PackedLayout`, built once per microbatch (on the host, from the sample lengths, then
moved to the device) and shared by every layer:
- RoPE's cos/sin at each token's position within its sample (one broadcast multiply-add over all tokens; the
  model itself is built without RoPE so megatron never splits the row per sample);
- on CUDA with torch's varlen flash attention: `cu_seqlens` and the longest sample, one varlen call per layer;
- elsewhere, length buckets: samples of similar length (the same half-octave class: lengths within a factor
  √2) are gathered into one right-padded [samples, heads, length, d] batch and run through causal attention
  together (right padding needs no mask: a real token never attends to a later position), then one gather puts
  every token back in row order. The number of attention calls is the number of length classes present (at most
  ~2 log2 of the longest sample), not the number of samples; the padded work is under 2x Σ len².

A bucket's causal attention (`bucket_attention`) is torch's SDPA, except on CPU in fp32 for buckets up to
_CHUNKED_MAX_LEN tokens without attention dropout: there `chunked_causal_attention` (batched GEMMs over query
chunks, a GQA group's heads stacked into one GEMM) was faster than torch's CPU flash kernel at every length it
takes (docs/hot_path.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from lorafusion.ops.utils import ATTENTION_BACKENDS

__all__ = ["PackedCoreAttention", "PackedLayout", "PackedParams", "apply_rope", "rope_cos_sin", "attention_backend",
           "bucket_attention", "chunked_causal_attention", "uses_chunked_attention"]

# Samples up to this length share one bucket: below it SDPA's cost is its per-call overhead, not the padding.
_MIN_BUCKET = 16
# Length classes per doubling of the length: 2 pads less than 1 and makes fewer SDPA calls than 3, and was the
# fastest of the three on the end-to-end bench's length mix (python -m benchmarks.bench_attention, docs/hot_path.md).
_CLASSES_PER_OCTAVE = 2


# chunked_causal_attention's query chunk: each chunk attends to the keys up to its end, so the masked-out work is
# the upper half of one chunk-wide square per chunk. 128 and 96 measured alike on CPU; 128 makes fewer GEMMs.
_ATTN_CHUNK = 128
# Longest bucket chunked_causal_attention takes: it keeps each chunk's probabilities for the backward (heads · L²/2
# values per sample, where the flash kernel keeps O(L)), and was no faster than flash at 700 tokens.
_CHUNKED_MAX_LEN = 512


@functools.lru_cache(maxsize=64)
def _chunk_mask(start: int, rows: int, stop: int, repeat: int, dtype: torch.dtype, device: torch.device
                ) -> torch.Tensor:
    """Additive causal mask [repeat * rows, stop] of the queries start..start+rows against keys 0..stop: -inf where
    the key comes after the query, the block repeated for each head stacked in the GEMM."""
    block = torch.full((rows, stop), float("-inf"), dtype=dtype, device=device).triu(start + 1)
    return block.repeat(repeat, 1)


class _Softmax(torch.autograd.Function):
    """softmax over the last dim whose backward, P ⊙ (dP − Σ dP ⊙ P), gives the same bits at any thread count. torch's
    fused CPU softmax backward does not at some widths (100, 300 measured), which would make a fit's adapters depend
    on the threads it ran with; its forward does."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        out = grad * probs
        return out.addcmul_(probs, out.sum(dim=-1, keepdim=True), value=-1.0)


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             chunk: int = _ATTN_CHUNK) -> torch.Tensor:
    """Causal softmax(q kᵀ · scale) v, q [n, heads, L, d], k and v [n, groups, L, d] (GQA: heads a multiple of
    groups) -> [n, heads, L, d], as batched GEMMs: the heads of one group are stacked into one GEMM against their
    shared keys, and the queries go in chunks of `chunk`, each against the keys up to its last query only."""
    n, heads, length, dim = q.shape
    groups = k.shape[1]
    if heads % groups or k.shape != v.shape or k.shape[0] != n or k.shape[2:] != (length, dim):
        raise ValueError(f"chunked_causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "expected q [n, heads, L, d] and k, v [n, groups, L, d] with heads a multiple of groups")
    rep = heads // groups
    scale = dim ** -0.5 if scale is None else scale
    qg = q.reshape(n * groups, rep, length, dim)
    keys_t = k.reshape(n * groups, length, dim).transpose(1, 2)  # [n·g, d, L]
    values = v.reshape(n * groups, length, dim)
    outs = []
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        rows = stop - start
        mask = _chunk_mask(start, rows, stop, rep, q.dtype, q.device)
        scores = torch.baddbmm(mask, qg[:, :, start:stop].reshape(n * groups, rep * rows, dim), keys_t[..., :stop],
                               alpha=scale)  # [n·g, rep·rows, stop]
        probs = _Softmax.apply(scores)
        outs.append(torch.bmm(probs, values[:, :stop]).view(n * groups, rep, rows, dim))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.view(n, heads, length, dim)


@functools.cache
def _varlen_attn():
    """torch's varlen flash attention (CUDA only), or None where this torch has none (looked up once: every layer
    of every microbatch asks)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def uses_chunked_attention(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether a bucket's causal attention (q [n, heads, L, d]) runs as chunked_causal_attention rather than SDPA:
    on CPU, in fp32 (the only dtype it was measured in), up to _CHUNKED_MAX_LEN tokens, without attention dropout."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-2] <= _CHUNKED_MAX_LEN
            and dropout_p == 0.0)


def bucket_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of one bucket, q [n, heads, L, d], k and v [n, groups, L, d] (GQA) -> [n, heads, L, d]:
    chunked_causal_attention where uses_chunked_attention says so, torch's SDPA (its fused CPU flash kernel with a
    batch dimension, GQA taken directly) elsewhere."""
    if uses_chunked_attention(q, dropout_p):
        return chunked_causal_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_backend(requested: str, device: torch.device, dropout_p: float = 0.0) -> str:
    """'varlen' or 'buckets' for a requested backend on `device` (see ATTENTION_BACKENDS).

    'auto' takes varlen flash attention on CUDA when torch has it (one kernel over the whole row, no padding)
    and length buckets elsewhere; varlen has no attention dropout, so a run with one takes buckets.
    """
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {requested!r}; choose one of {list(ATTENTION_BACKENDS)}")
    varlen_ok = device.type == "cuda" and _varlen_attn() is not None and dropout_p == 0.0
    if requested == "varlen" and not varlen_ok:
        raise RuntimeError(f"varlen attention needs CUDA and torch.nn.attention.varlen without attention dropout "
                           f"(device {device}, dropout {dropout_p}); use attention backend 'auto' or 'buckets'")
    if requested == "auto":
        return "varlen" if varlen_ok else "buckets"
    return requested


@dataclass
class _Bucket:
    gather: torch.Tensor  # [n * length] long: the row of each padded position (padding repeats the sample's first)
    samples: int
    length: int


@dataclass
class PackedLayout:
    """Where each sample of a packed row lies, in the forms attention and RoPE use; built once per microbatch."""

    cu_seqlens: torch.Tensor  # [samples + 1] int32
    max_seqlen: int
    positions: torch.Tensor  # [T] long: each token's index within its sample
    buckets: list[_Bucket]
    unpack: torch.Tensor  # [T] long: each token's row in the buckets' outputs, concatenated in bucket order
    _rope: dict = field(default_factory=dict, repr=False)  # (base, dim, dtype) -> (cos, sin) [T, 1, dim]

    @classmethod
    def build(cls, lengths: list[int]) -> "PackedLayout":
        """The layout of samples of `lengths` (each ≥ 1) packed back to back, on the CPU."""
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a packed row needs samples of at least one token; got lengths {lengths}")
        lens = torch.tensor(lengths, dtype=torch.long)
        starts = torch.cumsum(lens, 0) - lens
        total = int(lens.sum())
        sample_of = torch.repeat_interleave(torch.arange(len(lengths)), lens)  # [T]
        positions = torch.arange(total) - starts[sample_of]
        # Length class: samples up to _MIN_BUCKET share class 0, then _CLASSES_PER_OCTAVE classes per doubling.
        classes = torch.ceil(_CLASSES_PER_OCTAVE * torch.log2(lens.clamp(min=_MIN_BUCKET).double() / _MIN_BUCKET)).long()
        buckets, out_row, offset = [], torch.empty(len(lengths), dtype=torch.long), 0
        for c in torch.unique(classes).tolist():
            members = torch.nonzero(classes == c).flatten()
            length = int(lens[members].max())
            cols = torch.arange(length)
            gather = starts[members, None] + cols  # [n, length]
            gather = torch.where(cols < lens[members, None], gather, starts[members, None])
            buckets.append(_Bucket(gather.flatten(), len(members), length))
            out_row[members] = offset + torch.arange(len(members)) * length  # first output row of each member
            offset += len(members) * length
        unpack = out_row[sample_of] + positions
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).int()])
        return cls(cu, int(lens.max()), positions, buckets, unpack)

    def to(self, device: torch.device) -> "PackedLayout":
        if self.positions.device == device:
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedLayout(move(self.cu_seqlens), self.max_seqlen, move(self.positions),
                            [_Bucket(move(b.gather), b.samples, b.length) for b in self.buckets], move(self.unpack))

    def rope(self, base: float, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) at every token's position, [T, 1, dim], computed once per microbatch."""
        key = (base, dim, dtype)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.positions, base, dim, dtype)
        return self._rope[key]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa) -> torch.Tensor:
        """Causal attention within each sample: q [T, heads, d], k, v [T, groups, d] -> [T, heads * d].

        `sdpa(q, k, v)` takes [n, heads, len, d] / [n, groups, len, d] and must be causal (see _BucketRows)."""
        gathers = [b.gather for b in self.buckets]
        qs, ks, vs = (_BucketRows.apply(t, self.unpack, *gathers) for t in (q, k, v))
        outs = []
        for b, *qkv in zip(self.buckets, qs, ks, vs):
            # [n * len, h, d] -> [n, h, len, d]
            out = sdpa(*(t.view(b.samples, b.length, *t.shape[1:]).transpose(1, 2) for t in qkv))
            outs.append(out.transpose(1, 2).reshape(b.samples * b.length, -1))
        flat = torch.cat(outs) if len(outs) > 1 else outs[0]
        return flat.index_select(0, self.unpack)  # [T, heads * d]


class _BucketRows(torch.autograd.Function):
    """t [T, ...] -> each bucket's padded rows t[gather] [n * len, ...], one tensor per bucket.

    The backward reads each token's gradient from its own padded row (`unpack`, the same map that takes the
    outputs back) instead of scattering every bucket's rows into a zeroed [T, ...] and summing those: a padding
    row's gradient is zero, since attention is causal, padding follows its sample's tokens (no real query sees it)
    and its outputs are dropped (no gradient reaches its query)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, unpack: torch.Tensor, *gathers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(unpack)
        return tuple(t.index_select(0, gather) for gather in gathers)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (unpack,) = ctx.saved_tensors
        flat = torch.cat(grads) if len(grads) > 1 else grads[0]  # [Σ n * len, ...], in the outputs' bucket order
        return flat.index_select(0, unpack), None, *(None for _ in grads)


class PackedParams(PackedSeqParams):
    """megatron's PackedSeqParams ('thd') carrying the row's PackedLayout to our core attention."""

    def __init__(self, layout: PackedLayout) -> None:
        super().__init__(qkv_format="thd", cu_seqlens_q=layout.cu_seqlens, cu_seqlens_kv=layout.cu_seqlens,
                         max_seqlen_q=layout.max_seqlen, max_seqlen_kv=layout.max_seqlen)
        self.layout = layout


def rope_cos_sin(positions: torch.Tensor, base: float, dim: int, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [*positions.shape, 1, dim] of RoPE (HF's and megatron's non-interleaved layout), computed in
    fp32 and cast to `dtype` as both do; sin carries rotate-half's sign (-sin on the first half)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    angles = positions.float()[..., None] * inv_freq  # [..., dim / 2]
    emb = torch.cat([angles, angles], dim=-1)[..., None, :]  # [..., 1, dim]
    sign = torch.ones(dim, device=positions.device)
    sign[: dim // 2] = -1.0
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t·cos + rotate_half(t)·sin over the whole tensor (t [..., heads, dim], cos/sin [..., 1, dim] from
    rope_cos_sin): rotating by half the dimension is a roll, whose sign rode into `sin`."""
    return torch.addcmul(t * cos, t.roll(t.shape[-1] // 2, dims=-1), sin)


class PackedCoreAttention(MegatronModule):
    """Drop-in for megatron's `DotProductAttention` (same constructor and forward signature) that also applies
    RoPE (the model is built with position_embedding_type 'none'): at per-token positions from the row's
    PackedLayout for packed rows, at 0..s-1 for ordinary [s, b] batches."""

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
        rotary_base: float = 10000.0,
        backend: str = "auto",
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise RuntimeError("PackedCoreAttention does not support context parallelism; set it to 1.")
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or config.num_attention_heads
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.rotary_base = rotary_base
        self.backend = backend

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [batch, heads, len, d]; k, v: [batch, groups, len, d]
        return bucket_attention(q, k, v, self.softmax_scale, self.dropout_p if self.training else 0.0)

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
            if not isinstance(packed_seq_params, PackedParams):
                raise TypeError("packed rows need lorafusion's PackedParams (Microbatch.packed_seq_params()), which "
                                f"carries the row's layout; got {type(packed_seq_params).__name__}")
            return self._forward_packed(query, key, value, packed_seq_params.layout)
        # query: [s, b, heads, d]
        cos, sin = rope_cos_sin(torch.arange(query.shape[0], device=query.device)[:, None], self.rotary_base,
                                query.shape[-1], query.dtype)  # [s, 1, 1, d]
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        out = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads*d]

    def _forward_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        layout: PackedLayout) -> torch.Tensor:
        # query: [t, heads, d]; key, value: [t, groups, d]
        cos, sin = layout.rope(self.rotary_base, query.shape[-1], query.dtype)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        dropout = self.dropout_p if self.training else 0.0
        if attention_backend(self.backend, query.device, dropout) == "varlen":
            out = _varlen_attn()(query, key, value, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                                 layout.max_seqlen, scale=self.softmax_scale, window_size=(-1, 0),
                                 enable_gqa=self.num_groups != self.num_heads)
            return out.reshape(out.shape[0], -1)  # [t, heads*d]
        return layout.attend(query, key, value, self._attend)
