"""SHiRA's sparse ΔW: the native ops of csrc/ vs the torch fallback vs a dense ΔW, side by side in one process.

For Llama-3.1-8B's o_proj (4096×4096) and down_proj (out 4096 × in 14336) at SHiRA's 1% and 2% density: the
forward + backward (y = x ΔWᵀ, dx, dv) of --tokens tokens, in tokens/s (median of --repeats) and in CPU seconds
over all threads (steadier on a shared host), for
- native: the SHiRA layer with run.native_ops 'on';
- fallback: the same layer with 'off' (torch's sparse CSR kernels);
- dense: ΔW scattered into a dense [N, K] tensor, then x ΔWᵀ and autograd through both;
and the time to switch 1 and 16 adapters' deltas into the base weight and restore it (native vs fallback).

Every op each path dispatches is watched by a TorchDispatchMode that records the largest tensor it produces: a
dense [N, K] anywhere (N·K elements or more, far above T·N and T·K at T < min(N, K)) makes the row's
`dense_nk` true (the dense path shows that the check can fire). The watch sees the tensors torch makes, not
the C++ kernels' own buffers: for the native path it checks the Python side around the ops (their buffers are
token tiles, T·max(N, K) floats at most, by construction in csrc/sparse_adapter.cpp).

    python -m benchmarks.bench_sparse                 # rows -> benchmarks/results/sparse.csv
    python -m benchmarks.bench_sparse --tokens 256 --shapes o_proj --no-record   # a quick look
    python -m benchmarks.bench_sparse --device cuda   # on a GPU (benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.results_csv import emit_rows
from benchmarks.shapes import MODELS, linear_shapes
from lorafusion.adapters.shira.config import SHiRAConfig
from lorafusion.adapters.shira.layer import SHiRALayer
from lorafusion.adapters.shira.switch import restore_entries, switch_entries
from lorafusion.ops import native

DENSITIES = (0.01, 0.02)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any dispatched op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def shira_layer(n: int, k: int, density: float, device: torch.device) -> SHiRALayer:
    """A SHiRA layer on `device` whose rank gives `density` of the [n, k] entries, with random values."""
    rank = max(1, round(density * n * k / (n + k)))
    layer = SHiRALayer(SHiRAConfig(rank=rank, mask_seed=0, target_modules=["o_proj"]), k, n,
                       generator=torch.Generator())
    with torch.no_grad():
        layer.shira_weight.normal_(generator=torch.Generator().manual_seed(1))
    return layer.to(device)


def native_or_fallback(layer: SHiRALayer, x: torch.Tensor, dy: torch.Tensor) -> None:
    layer.shira_weight.grad = None
    layer.forward_delta(x).backward(dy)


def dense_delta(layer: SHiRALayer, x: torch.Tensor, dy: torch.Tensor) -> None:
    values = layer.shira_weight
    delta = values.new_zeros(layer.out_features, layer.in_features).index_put((layer.rows, layer.cols), values)  # [N, K]
    (x @ delta.t()).backward(dy)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, repeats: int) -> tuple[float, float, int]:
    """(median wall seconds of `step` after one warm-up, its median CPU seconds over all threads, the largest tensor
    it produced). CPU seconds barely move when other processes share the cores; wall seconds do (on a GPU only
    the wall seconds mean anything)."""
    step()
    _sync()
    watch, wall, cpu = LargestTensor(), [], []
    for i in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        if i == 0:
            with watch:
                step()
        else:
            step()
        _sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), watch.largest


def fwd_bwd_rows(name: str, n: int, k: int, tokens: int, repeats: int, device: torch.device) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=gen).to(device).requires_grad_(True)
    dy = torch.randn(tokens, n, generator=gen).to(device)
    for density in DENSITIES:
        layer = shira_layer(n, k, density, device)
        seconds, cpu = {}, {}
        for path in ("native", "fallback", "dense"):
            if path == "dense":
                step = lambda: dense_delta(layer, x, dy)  # noqa: E731
            else:
                native.configure("on" if path == "native" else "off", device)
                step = lambda: native_or_fallback(layer, x, dy)  # noqa: E731
            seconds[path], cpu[path], largest = timed(step, repeats)
            rows.append({"op": "fwd_bwd", "module": name, "n": n, "k": k, "density": density,
                         "nnz": layer.shira_weight.numel(), "tokens": tokens, "path": path,
                         "seconds": round(seconds[path], 4), "tokens_per_s": round(tokens / seconds[path], 1),
                         "cpu_s": round(cpu[path], 4),
                         "largest_tensor": largest, "dense_nk": largest >= n * k})
        for row in rows[-3:]:
            row["speedup_vs_fallback"] = round(seconds["fallback"] / row["seconds"], 2)
            row["speedup_vs_dense"] = round(seconds["dense"] / row["seconds"], 2)
            row["cpu_speedup_vs_fallback"] = round(cpu["fallback"] / row["cpu_s"], 2)
        native.configure("auto", device)
    return rows


def switch_rows(name: str, n: int, k: int, repeats: int, device: torch.device) -> list[dict]:
    """Switch and restore of 1 and 16 adapters at 2% density (the 16 supports overlap where they meet)."""
    rows = []
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(2)).to(device)
    density = DENSITIES[-1]
    layer = shira_layer(n, k, density, device)
    index1 = layer.rows * k + layer.cols  # [nnz], one adapter's support
    for adapters in (1, 16):
        gen = torch.Generator().manual_seed(adapters)
        index = torch.cat([index1] + [torch.randperm(n * k, generator=gen)[:index1.numel()].to(device)
                                      for _ in range(adapters - 1)])
        values = (torch.randn(index.numel(), generator=gen) * 1e-3).to(device)
        for path in ("native", "fallback"):
            native.configure("on" if path == "native" else "off", device)
            switch_s, restore_s = [], []
            for _ in range(repeats + 1):
                _sync()
                start = time.perf_counter()
                saved = switch_entries(weight, index, values)
                _sync()
                middle = time.perf_counter()
                restore_entries(weight, index, saved)
                _sync()
                switch_s.append(middle - start)
                restore_s.append(time.perf_counter() - middle)
            rows.append({"op": "switch", "module": name, "n": n, "k": k, "density": density, "adapters": adapters,
                         "nnz": index.numel(), "path": path, "seconds": round(statistics.median(switch_s[1:]), 4),
                         "restore_s": round(statistics.median(restore_s[1:]), 4)})
        rows[-2]["speedup_vs_fallback"] = round(rows[-1]["seconds"] / rows[-2]["seconds"], 2)
    native.configure("auto", device)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=["o_proj", "down_proj"], choices=["o_proj", "down_proj"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-record", action="store_true", help="print the rows only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA GPU")
    if not native.available(device):
        raise RuntimeError(f"the native ops did not build here: {native.build_error()}")
    shapes = linear_shapes(MODELS["llama-3.1-8b"])
    rows = []
    for name in args.shapes:
        n, k = shapes[name]
        rows += fwd_bwd_rows(name, n, k, args.tokens, args.repeats, device)
        rows += switch_rows(name, n, k, args.repeats, device)
    for row in rows:
        row["threads"] = torch.get_num_threads()
    native_rows = [r for r in rows if r["op"] == "fwd_bwd" and r["path"] == "native"]
    if any(r["dense_nk"] for r in native_rows):
        raise AssertionError(f"the native path produced a dense [N, K] tensor: {native_rows}")
    return emit_rows("sparse", rows, record=not args.no_record)


if __name__ == "__main__":
    main()
