"""bench_attention at a toy size: every provider computes the same attention, and a row per provider."""

from __future__ import annotations

import random

import torch

from benchmarks import bench_attention as bench
from lorafusion.models.attention import PackedLayout


def test_providers_agree():
    lengths = bench.MIXES["bench_mix"](random.Random(1))[:6]
    layout = PackedLayout.build(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=gen) for h in (4, 2, 2))
    want = bench.PROVIDERS["per_sample"](q, k, v, layout)
    for name in ("buckets", "buckets_chunked", "dense_mask"):
        torch.testing.assert_close(bench.PROVIDERS[name](q, k, v, layout), want, atol=1e-5, rtol=1e-5)


def test_main_prints_one_row_per_provider(capsys):
    rows = bench.main(["--heads", "2", "--groups", "1", "--head-dim", "8", "--repeats", "1", "--threads", "1",
                       "--mixes", "long_5x400", "--no-record"])
    assert [r["provider"] for r in rows] == ["per_sample", "buckets", "buckets_chunked", "dense_mask"]
    assert all(r["fwd_bwd_ms"] > 0 for r in rows) and rows[0]["speedup_vs_per_sample"] == 1.0
