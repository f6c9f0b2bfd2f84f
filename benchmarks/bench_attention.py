"""Packed causal attention on one device: the ways to keep samples of one row apart, forward + backward.

Providers (q [T, heads, d], k/v [T, groups, d], GQA), all exact:
  per_sample  one SDPA call per sample (what the model ran before the PackedLayout);
  buckets     PackedLayout.attend: samples of one length class in one padded SDPA batch;
  buckets_chunked  the same buckets, each through what the model runs (bucket_attention: chunked batched GEMMs
              on CPU in fp32 up to 512 tokens, SDPA elsewhere);
  dense_mask  one SDPA over the whole row with a block-diagonal causal boolean mask (T² work);
  varlen      torch's varlen flash attention over cu_seqlens (CUDA only).
Length mixes: the end-to-end bench's (arith/greet/reverse/chat-like), many short samples, a few long ones.

    python -m benchmarks.bench_attention            # the device torch sees; rows -> benchmarks/results/attention.csv
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.results_csv import emit_rows
from lorafusion.models.attention import PackedLayout, _varlen_attn, bucket_attention

MIXES = {
    "bench_mix": lambda rng: [rng.choice([11, 28, 100, 350]) + rng.randint(-5, 5) for _ in range(24)],
    "short_200x10": lambda rng: [rng.randint(6, 14) for _ in range(200)],
    "long_5x400": lambda rng: [rng.randint(380, 420) for _ in range(5)],
}


def _causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _per_sample(q, k, v, layout):
    bounds = layout.cu_seqlens.tolist()
    outs = [_causal(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None])
            [0].transpose(0, 1).reshape(b - a, -1) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


def _dense_mask(q, k, v, layout):
    sample = torch.repeat_interleave(torch.arange(len(layout.cu_seqlens) - 1, device=q.device),
                                     layout.cu_seqlens.diff().long())
    allowed = (sample[:, None] == sample[None, :]).tril()  # [T, T]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _varlen(q, k, v, layout):
    out = _varlen_attn()(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
                         window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1])
    return out.reshape(q.shape[0], -1)


PROVIDERS = {"per_sample": _per_sample, "buckets": lambda q, k, v, lay: lay.attend(q, k, v, _causal),
             "buckets_chunked": lambda q, k, v, lay: lay.attend(q, k, v, bucket_attention),
             "dense_mask": _dense_mask, "varlen": _varlen}


def time_ms(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def bench_mix(name: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    lengths = MIXES[name](random.Random(0))
    layout = PackedLayout.build(lengths).to(device)
    total = sum(lengths)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(total, h, args.head_dim, generator=gen, device=device).to(dtype).requires_grad_()
               for h in (args.heads, args.groups, args.groups))
    dy = torch.randn(total, args.heads * args.head_dim, generator=gen, device=device).to(dtype)
    providers = [p for p in PROVIDERS if p != "varlen" or (device.type == "cuda" and _varlen_attn() is not None)]
    rows, times = [], {}
    for provider in providers:
        fn = PROVIDERS[provider]
        times[provider] = time_ms(lambda: torch.autograd.backward(fn(q, k, v, layout), dy), args.repeats, device)
    for provider, ms in times.items():
        rows.append({"mix": name, "samples": len(lengths), "tokens": total, "heads": args.heads, "groups": args.groups,
                     "head_dim": args.head_dim, "dtype": str(dtype).removeprefix("torch."), "provider": provider,
                     "fwd_bwd_ms": round(ms, 3), "speedup_vs_per_sample": round(times["per_sample"] / ms, 2)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    rows = [row for mix in args.mixes for row in bench_mix(mix, args, device, dtype)]
    return emit_rows("attention", rows, record=not args.no_record)


if __name__ == "__main__":
    main()
