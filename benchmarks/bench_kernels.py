"""Fused LoRA kernels against torch: one LoRA linear layer, forward and forward+backward.

Providers: ours_single (fused Triton, one adapter), ours_multi (fused Triton, 4 adapters of M/4 rows
each), torch_unfused (PEFT's layer: base linear + dropout + A + B + scale + add), torch_addmm (the LoRA-B
product accumulated into the base output with addmm), base (the frozen GEMM alone: the lower bound).

    python -m benchmarks.bench_kernels                 # GPU: every registry model, M in {2048, 4096, 8192}
    python -m benchmarks.bench_kernels --quick         # CPU smoke run: torch providers, small shapes

Tile configs are chosen before timing, as a fit chooses them before training (fused_lora.tune_tiles;
LORAFUSION_AUTOTUNE=0: default tiles). Rows go to benchmarks/results/kernels.csv (device, commit and date stamped by results_csv.append_rows).
Only GPU rows are performance numbers; --quick rows show the script runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.results_csv import RESULTS_DIR, append_rows
from benchmarks.shapes import MODELS, linear_shapes, scaled
from lorafusion.ops import SegmentTable, lora_linear_addmm, lora_linear_reference

PROVIDERS = ("base", "torch_unfused", "torch_addmm", "ours_single", "ours_multi")
MULTI_ADAPTERS = 4


def time_ms(fn: Callable[[], None], iters: int, warmup: int) -> float:
    """Median wall time of `fn` in ms over `iters` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bytes_moved(provider: str, m: int, n: int, k: int, r: int, elem: int, backward: bool) -> int:
    """Analytic HBM traffic, each tensor read or written once per kernel that touches it (no cache reuse).

    base: x, W -> y (bwd: dy, W -> dx). torch_unfused adds dropout (x -> x̂, 1-byte mask), x̂A (x̂ -> S),
    SB (S -> Z [M, N]), scale (Z -> Z) and add (y, Z -> y); torch_addmm replaces the last three by one
    addmm (y, S -> y). ours reads x twice (S kernel + xw_sb) and never forms an [M, N] LoRA tensor.
    The backward mirrors each forward (unfused: dZ, dS, dx̂, mask; ours: dy read twice + dS).
    """
    mk, mn, nk, mr = m * k, m * n, n * k, m * r
    factors = r * (k + n)
    base_fwd = mk + nk + mn
    base_bwd = mn + nk + mk
    if provider == "base":
        return elem * (base_fwd + (base_bwd if backward else 0))
    if provider == "torch_unfused":
        fwd = base_fwd + (2 * mk + mk // elem) + (mk + mr) + (mr + mn) + 2 * mn + 3 * mn + factors
        bwd = base_bwd + 2 * mn + (mn + mr) + (mr + mk) + (mk + mk // elem + mk) + 2 * mk + mn + mr + factors
    elif provider == "torch_addmm":
        fwd = base_fwd + (2 * mk + mk // elem) + (mk + mr) + (mn + mr + mn) + factors
        bwd = base_bwd + (mn + mr) + (mr + mk) + (mk + mk // elem + mk) + 2 * mk + mn + mr + factors
    else:
        fwd = base_fwd + mk + 2 * mr + factors
        bwd = base_bwd + mn + 3 * mr + mk + factors
    return elem * (fwd + (bwd if backward else 0))


def make_provider(name: str, x: torch.Tensor, weight: torch.Tensor, p: float, r: int, backward: bool):
    """A closure running one forward (and backward) of `name` on fresh adapter factors."""
    m, k = x.shape
    n = weight.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(0)
    count = MULTI_ADAPTERS if name == "ours_multi" else 1
    a_list = [(torch.randn(r, k, device=x.device, generator=gen) / k ** 0.5).to(x.dtype).requires_grad_(backward)
              for _ in range(count)]
    b_list = [(torch.randn(n, r, device=x.device, generator=gen) / r ** 0.5).to(x.dtype).requires_grad_(backward)
              for _ in range(count)]
    x = x.detach().requires_grad_(backward)
    dy = torch.randn(m, n, device=x.device, dtype=x.dtype, generator=gen)
    if name == "base":
        run = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
    elif name == "torch_unfused":
        run = lambda: lora_linear_reference(x, weight, a_list[0], b_list[0], scaling=2.0, dropout_p=p)  # noqa: E731
    elif name == "torch_addmm":
        run = lambda: lora_linear_addmm(x, weight, a_list[0], b_list[0], scaling=2.0, dropout_p=p)  # noqa: E731
    else:
        from lorafusion.ops import fused_multi_lora_linear
        from lorafusion.ops.fused_lora import tune_tiles

        tune_tiles([(n, k, r * count)], m, x.dtype, x.device)
        bounds = [(i * m // count, (i + 1) * m // count) for i in range(count)]
        table = SegmentTable.build(m, bounds, [((s, e, 17 + i),) for i, (s, e) in enumerate(bounds)], device=x.device)
        run = lambda: fused_multi_lora_linear(x, weight, a_list, b_list, table, scalings=[2.0] * count,  # noqa: E731
                                              dropout_ps=[p] * count)
    if not backward:
        return lambda: run()
    return lambda: run().backward(dy)


def bench_layer(model: str, layer: str, n: int, k: int, m: int, args, providers: tuple[str, ...]) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    rows = []
    for backward in (False, True):
        times = {}
        for name in providers:
            times[name] = time_ms(make_provider(name, x, weight, args.dropout, args.rank, backward), args.iters, args.warmup)
        for name, ms in times.items():
            moved = bytes_moved(name, m, n, k, args.rank, dtype.itemsize, backward)
            rows.append({
                "model": model, "layer": layer, "M": m, "N": n, "K": k, "rank": args.rank, "dropout": args.dropout,
                "dtype": args.dtype, "provider": name, "pass": "fwd+bwd" if backward else "fwd",
                "median_ms": round(ms, 4), "iters": args.iters, "bytes_moved": moved,
                "gb_per_s": round(moved / ms / 1e6, 1),
                "speedup_vs_unfused": round(times["torch_unfused"] / ms, 3),
                "time_vs_base": round(ms / times["base"], 3),
            })
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: torch providers, widths / 32, small M")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--m", type=int, nargs="+", default=None, help="token counts (default 2048 4096 8192)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per point (default 100)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.quick:
        args.m = args.m or [128, 256]
        args.dtype = args.dtype or "float32"  # CPUs without bf16 GEMMs would time the conversion, not the layer
        args.iters = args.iters or 5
        args.warmup = min(args.warmup, 1)
    args.m = args.m or [2048, 4096, 8192]
    args.dtype = args.dtype or "bfloat16"
    args.iters = args.iters or 100
    providers = PROVIDERS if gpu else tuple(p for p in PROVIDERS if not p.startswith("ours"))
    rows = []
    for key in args.models:
        model = scaled(MODELS[key], 32) if args.quick else MODELS[key]
        for layer, (n, k) in linear_shapes(model).items():
            for m in args.m:
                rows += bench_layer(model.name, layer, n, k, m, args, providers)
    append_rows("kernels", rows, results_dir=args.results_dir)
    return rows


if __name__ == "__main__":
    main()
