"""Launch helpers shared by the fused LoRA ops: backend choice, lazy kernels, tile configs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "ATTENTION_BACKENDS", "BACKENDS", "TileConfig", "DEFAULT_CONFIG", "INTERPRET_CONFIG", "TUNE_CONFIGS", "interpret_mode",
    "autotune_enabled", "jit_helper", "lazy_kernel", "load_tiles", "next_pow2", "pick_config", "resolve_backend",
    "save_tiles", "split_length", "tile_key", "triton_available", "tuned",
]

BACKENDS = ("auto", "triton", "torch")
ATTENTION_BACKENDS = ("auto", "buckets", "varlen")  # RunConfig.attention, see models.attention.attention_backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1), read at launch time."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(kernels: str, device: torch.device) -> str:
    """'triton' or 'torch' for a RunConfig.kernels value on `device`; RuntimeError if Triton cannot run."""
    if kernels not in BACKENDS:
        raise ValueError(f"kernels={kernels!r}; choose one of {list(BACKENDS)}")
    if kernels == "torch":
        return "torch"
    on_gpu = device.type == "cuda"
    if kernels == "auto":
        return "triton" if on_gpu and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("kernels='triton' but triton is not installed; pip install triton==3.9.0 or use kernels='auto'")
    if not on_gpu and not interpret_mode():
        raise RuntimeError(
            f"kernels='triton' on a {device.type} tensor needs the Triton interpreter; set TRITON_INTERPRET=1 "
            "(slow, for tests) or use kernels='auto'/'torch' on CPU"
        )
    return "triton"


class _LazyKernel:
    """A Triton kernel compiled (or interpreted) on first launch.

    triton.jit reads TRITON_INTERPRET when it decorates, so a module imported before the variable is
    set would be stuck with the compiled path; resolving at launch lets one process run the interpreter
    in tests and import the ops anywhere.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled = None
        self._interpreted = None

    def __getitem__(self, grid):
        if interpret_mode():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted[grid]
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._compiled = JITFunction(self.fn)
        return self._compiled[grid]


def lazy_kernel(fn: Callable) -> _LazyKernel:
    """Decorator used instead of @triton.jit on every kernel of lorafusion.ops.

    The kernels call only Triton builtins and `jit_helper` functions: triton.language's own @jit helpers
    (tl.zeros, tl.cdiv, tl.philox, ...) are fixed to one mode when triton is imported.
    """
    return _LazyKernel(fn)


def jit_helper(fn: Callable):
    """@triton.jit for a device function called from lazy kernels, interpreted when the caller is."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    class _Helper(JITFunction):
        _interpreted = None

        def __call__(self, *args, **kwargs):
            if interpret_mode():  # called from an interpreted kernel: run the Python body on the interpreter
                if self._interpreted is None:
                    self._interpreted = InterpretedFunction(self.fn)
                return self._interpreted(*args, **kwargs)
            return super().__call__(*args, **kwargs)

    return _Helper(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def split_length(total: int, block: int, programs: int, device: torch.device) -> int:
    """Length (a multiple of `block`) of each split of a reduction over `total`, for a grid of `programs` per split.

    The skinny products (T = x̂Aᵀ, G = dy B, dA, dB) have few output tiles; splitting their long reduction
    into fp32 partials that the host sums in order keeps them deterministic and gives ~2 programs per SM.
    The interpreter splits at every block, so the tests sum several partials.
    """
    if device.type != "cuda":
        return block
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = -(-total // block)
    splits = max(1, min(blocks, -(-2 * sms // max(programs, 1))))
    return -(-blocks // splits) * block


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the big GEMM kernels (xw_sb, dyw_dsa) and the rank-side kernels."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Sound on every CUDA GPU Triton supports (fits sm_70's shared memory at 3 stages in bf16: (64·64 + 64·64)·2 B·3
# = 48 KiB); used for unknown shapes and when tuning is off. Not yet measured against the tuned entries.
DEFAULT_CONFIG = TileConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
# The interpreter runs one program at a time in numpy; 16 is the smallest tile tl.dot accepts and keeps the
# small test shapes spread over several tiles (so tile edges and segment boundaries inside a tile are exercised).
INTERPRET_CONFIG = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1)
# Layers of 64+ features (the tiny test model) still span 2+ tiles at 32, and the interpreter's cost is per
# program: 32-wide tiles ran the kernels-on training-step test 3x faster than 16 (2-core CPU).
INTERPRET_CONFIG_WIDE = TileConfig(block_m=32, block_n=32, block_k=32, num_warps=1, num_stages=1)
# Candidates timed once per (GPU, N, K) by fused_lora.tune_tiles before training: the usual large-GEMM tiles
# for Ampere/Hopper (Triton's matmul tutorial list). Which wins is measured on the GPU, not here; a candidate
# that does not fit a smaller GPU's shared memory fails its probe and is dropped.
TUNE_CONFIGS = (
    DEFAULT_CONFIG,
    TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    TileConfig(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=4),
    TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    TileConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
)
_TUNED: dict[tuple, TileConfig] = {}


def autotune_enabled() -> bool:
    """LORAFUSION_AUTOTUNE=0 turns tuning off (every shape then runs DEFAULT_CONFIG)."""
    return os.environ.get("LORAFUSION_AUTOTUNE", "1") != "0"


def tuned(key: tuple, bench: Callable[[TileConfig], float] | None) -> TileConfig:
    """The config recorded for `key`, else the fastest candidate under `bench` (ms), else DEFAULT_CONFIG."""
    if key in _TUNED:
        return _TUNED[key]
    if bench is None or not autotune_enabled():
        return DEFAULT_CONFIG
    timings = {}
    for config in TUNE_CONFIGS:
        try:
            timings[config] = bench(config)
        except Exception:  # noqa: BLE001 - any failing probe (out of shared memory, compile error) drops the candidate
            continue
    _TUNED[key] = min(timings, key=timings.get) if timings else DEFAULT_CONFIG
    return _TUNED[key]


def tile_key(n: int, k: int, device: torch.device) -> tuple:
    """The key tiles are chosen by: the GPU and the layer's (N, K). Not the total rank, which changes with each
    microbatch's job mix: a layer keeps one tile choice for the whole run."""
    return (torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, n, k)


def pick_config(n: int, k: int, r: int, device: torch.device) -> TileConfig:
    """Tiles for a layer of shape (N, K) with total rank r on `device`; never times anything (tuning happens
    before training, fused_lora.tune_tiles).

    On CUDA: the config tuned (or loaded) for (GPU name, N, K), else DEFAULT_CONFIG. Off CUDA (the interpreter):
    INTERPRET_CONFIG, or the wide one for layers of 64+ features.
    """
    if device.type != "cuda":
        return INTERPRET_CONFIG_WIDE if min(n, k) >= 64 else INTERPRET_CONFIG
    return _TUNED.get(tile_key(n, k, device), DEFAULT_CONFIG)


def save_tiles(path: str | os.PathLike) -> None:
    """Write every tile choice of this process to `path` (JSON, replaced atomically)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"gpu": key[0], "n": key[1], "k": key[2], **asdict(config)}
               for key, config in sorted(_TUNED.items(), key=str) if len(key) == 3]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    os.replace(tmp, path)


def load_tiles(path: str | os.PathLike) -> int:
    """Take the tile choices saved at `path` (a resumed run computes with the tiles it started with); returns how
    many were read. ValueError naming the file when it cannot be read."""
    import json

    try:
        entries = json.loads(open(path).read())
        for entry in entries:
            _TUNED[(entry["gpu"], int(entry["n"]), int(entry["k"]))] = TileConfig(
                **{field: int(entry[field]) for field in ("block_m", "block_n", "block_k", "num_warps", "num_stages")})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: the saved tile choices cannot be read ({err}); delete the file to tune again") from err
    return len(entries)
