"""benchmarks/bench_kernels.py runs (reduced, on CPU) and writes one stamped row per provider, shape and pass."""

from __future__ import annotations

import csv

import torch

from benchmarks.bench_kernels import bytes_moved, main


def test_quick_run_appends_rows(tmp_path):
    rows = main(["--quick", "--models", "llama-3.1-8b", "--m", "8", "--iters", "2", "--warmup", "0",
                 "--results-dir", str(tmp_path)])
    providers = {"base", "torch_unfused", "torch_addmm"} | ({"ours_single", "ours_multi"} if torch.cuda.is_available() else set())
    assert {r["provider"] for r in rows} == providers
    assert len(rows) == len(providers) * 3 * 2  # 3 layers (o, up, down) x fwd, fwd+bwd
    with (tmp_path / "kernels.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and all(r["device"] and r["commit"] and r["date"] for r in written)


def test_bytes_model_orders_providers():
    args = dict(m=8192, n=4096, k=4096, r=16, elem=2)
    for backward in (False, True):
        moved = {p: bytes_moved(p, backward=backward, **args) for p in ("base", "ours_single", "torch_addmm", "torch_unfused")}
        assert moved["base"] < moved["ours_single"] < moved["torch_addmm"] < moved["torch_unfused"]
        # the fused layer's extra traffic is re-reads of x (S kernel; dA) and dy (dS, dB): never an [M, N] LoRA
        # tensor written and read back (here M·K = M·N, so each re-read is one "big" tensor)
        big = 2 * 8192 * 4096
        assert moved["ours_single"] - moved["base"] < (3.05 if backward else 1.05) * big
