"""Packed attention (length buckets) and per-token RoPE against plain per-sample references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafusion.models import attention
from lorafusion.models.attention import (PackedLayout, apply_rope, attention_backend, chunked_causal_attention,
                                         rope_cos_sin, uses_chunked_attention)

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # fp32: summation order only; bf16: one rounding of the output


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _per_sample(q, k, v, lengths):
    """The reference: one causal SDPA per sample ([T, heads, d] in, [T, heads * d] out)."""
    outs, start = [], 0
    for length in lengths:
        sl = slice(start, start + length)
        out = _causal(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None])
        outs.append(out[0].transpose(0, 1).reshape(length, -1))
        start += length
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[7], [1, 1, 1], [3, 40, 17, 16, 17, 129, 2], [64] * 5 + [5] * 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buckets_match_one_call_per_sample(lengths, dtype):
    """Output and the gradients of q, k, v (GQA: 4 heads on 2 groups)."""
    gen = torch.Generator().manual_seed(len(lengths))
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 8, generator=gen).to(dtype).requires_grad_() for h in (4, 2, 2))
    dy = torch.randn(total, 32, generator=gen).to(dtype)
    layout = PackedLayout.build(lengths)
    got = layout.attend(q, k, v, _causal)
    got_grads = torch.autograd.grad(got, [q, k, v], dy)
    want = _per_sample(q, k, v, lengths)
    want_grads = torch.autograd.grad(want, [q, k, v], dy)
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=ATOL[dtype])
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=ATOL[dtype], rtol=ATOL[dtype], msg=f"d{name}")


def test_layout_buckets_by_length_class_and_pads_to_the_longest_member():
    """Classes: up to 16 tokens, then two per doubling (16-22, 23-32, 33-45, ..., 91-128)."""
    layout = PackedLayout.build([3, 16, 17, 30, 100, 5, 22, 91])
    assert [(b.samples, b.length) for b in layout.buckets] == [(3, 16), (2, 22), (1, 30), (2, 100)]
    assert layout.max_seqlen == 100 and layout.cu_seqlens.tolist() == [0, 3, 19, 36, 66, 166, 171, 193, 284]
    assert layout.positions.tolist()[:5] == [0, 1, 2, 0, 1]
    # Every token comes back from exactly one bucket row.
    assert sorted(layout.unpack.tolist()) == sorted(set(layout.unpack.tolist()))
    with pytest.raises(ValueError, match="at least one token"):
        PackedLayout.build([4, 0])


def test_rope_matches_rotate_half_at_each_tokens_position():
    """HF's formula, q·cos + rotate_half(q)·sin, at positions restarting per sample."""
    gen = torch.Generator().manual_seed(0)
    layout = PackedLayout.build([5, 3])
    q = torch.randn(8, 2, 6, generator=gen)
    cos, sin = layout.rope(10000.0, 6, torch.float32)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    inv = 1.0 / 10000.0 ** (torch.arange(0, 6, 2).float() / 6)
    emb = torch.cat([positions[:, None] * inv] * 2, dim=-1)[:, None, :]
    rotated = torch.cat([-q[..., 3:], q[..., :3]], dim=-1)
    torch.testing.assert_close(apply_rope(q, cos, sin), q * emb.cos() + rotated * emb.sin())
    assert layout.rope(10000.0, 6, torch.float32)[0] is cos  # built once per microbatch
    assert rope_cos_sin(positions, 10000.0, 6, torch.bfloat16)[0].dtype == torch.bfloat16


def test_backend_choice():
    cpu = torch.device("cpu")
    assert attention_backend("auto", cpu) == "buckets"
    assert attention_backend("buckets", cpu) == "buckets"
    with pytest.raises(RuntimeError, match="varlen attention needs CUDA"):
        attention_backend("varlen", cpu)
    with pytest.raises(ValueError, match="choose one of"):
        attention_backend("flash", cpu)


@pytest.mark.parametrize("length", [1, 5, 127, 128, 129, 300])
@pytest.mark.parametrize("heads, groups", [(4, 2), (3, 3)])
def test_chunked_causal_attention_matches_sdpa(length, heads, groups):
    """Output and the gradients of q, k, v against causal SDPA, across chunk boundaries (chunks of 128), with GQA
    and without, at a softmax scale of its own."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(2, heads, length, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, groups, length, 16, generator=gen, requires_grad=True) for _ in range(2))
    dy = torch.randn(2, heads, length, 16, generator=gen)
    got = chunked_causal_attention(q, k, v, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=heads != groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip("qkv", torch.autograd.grad(got, [q, k, v], dy), torch.autograd.grad(want, [q, k, v], dy)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"d{name}")
    with pytest.raises(ValueError, match="expected q"):
        chunked_causal_attention(q, k[..., :8], v)  # another head dim than q's


def test_buckets_take_chunked_attention_on_cpu_in_fp32_only(monkeypatch):
    """A CPU fp32 bucket up to 512 tokens without attention dropout runs chunked_causal_attention; bf16, dropout
    and longer buckets stay on SDPA. Packed through the model's core attention, the output is SDPA's."""
    q = torch.zeros(1, 2, 512, 8)
    assert uses_chunked_attention(q, 0.0)
    assert not uses_chunked_attention(q, 0.1)
    assert not uses_chunked_attention(q.to(torch.bfloat16), 0.0)
    assert not uses_chunked_attention(torch.zeros(1, 2, 513, 8), 0.0)

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0)
    core = attention.PackedCoreAttention(config, 1, AttnMaskType.causal, "self")
    calls = []
    real = attention.chunked_causal_attention
    monkeypatch.setattr(attention, "chunked_causal_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    lengths = [3, 40, 17, 600]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=gen) for h in (4, 2, 2))
    layout = PackedLayout.build(lengths)
    got = core(q, k, v, None, packed_seq_params=attention.PackedParams(layout))
    assert sorted(shape[-2] for shape in calls) == [3, 17, 40]  # the 600-token bucket went to SDPA
    cos, sin = layout.rope(10000.0, 8, torch.float32)
    want = _per_sample(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_causal_attention_gives_the_same_bits_at_any_thread_count():
    """A fit's adapters must not depend on the threads it ran with (a resume may run with others): the output and
    every gradient, at lengths where torch's own softmax backward differs between 1 and 2 threads."""
    before = torch.get_num_threads()
    try:
        for length in (100, 300):
            gen = torch.Generator().manual_seed(length)
            q = torch.randn(4, 8, length, 64, generator=gen, requires_grad=True)
            k, v = (torch.randn(4, 4, length, 64, generator=gen, requires_grad=True) for _ in range(2))
            dy = torch.randn(4, 8, length, 64, generator=gen)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out = chunked_causal_attention(q, k, v)
                results.append((out, *torch.autograd.grad(out, [q, k, v], dy)))
            for name, one, two in zip(("out", "dq", "dk", "dv"), *results):
                assert torch.equal(one, two), f"{name} at {length} tokens differs between 1 and 2 threads"
    finally:
        torch.set_num_threads(before)
