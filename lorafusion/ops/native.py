"""The native ops of csrc/, built on first use, with their torch fallback: SHiRA's sparse ΔW (`lorafusion_sparse`,
CPU and CUDA) and LoRA dropout's masks drawn where they are applied (`lorafusion_dropout`, CPU).

The C++ (and, where torch has CUDA and `nvcc` is found, CUDA) sources are compiled by
`torch.utils.cpp_extension.load` the first time a process asks for them, into
`$LORAFUSION_CACHE/native/<torch version>-<hash>` (default `~/.cache/lorafusion/native/...`; the hash covers
the sources, the flags, this CPU's instruction sets and Python's version), and loaded from there by every later
process. Building at install time would run in pip's isolated build environment, which has no torch (or pulls a
CUDA one), so the build happens here, where the user's own torch is. Two processes (Ray actors) starting at once
take turns on a file lock; the second loads what the first built.

Without a compiler, or when the build fails, one RuntimeWarning per process says why and every caller takes the
torch path (`run.native_ops='auto'`); `'on'` turns that into an error before training, `'off'` never builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["MODES", "available", "build_error", "cache_dir", "configure", "dropout_add_kept_", "dropout_zeroed",
           "enabled", "sparse_backward_input", "sparse_backward_values", "sparse_forward", "sparse_restore",
           "sparse_switch"]

MODES = ("auto", "on", "off")  # run.native_ops
CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CPU_SOURCES = (CSRC / "sparse_adapter.cpp", CSRC / "lora_dropout.cpp")
_CUDA_SOURCE = CSRC / "sparse_adapter_cuda.cu"
# -march=native: the kernels' inner loops are fixed-width FMAs the compiler vectorises for this CPU's widest unit;
# the cache key includes this CPU's flags, so a cache shared between different hosts never mixes binaries.
# -fopenmp without linking libgomp: at::parallel_for's pragmas then run on the OpenMP runtime torch itself loaded.
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_CUDA_FLAGS = ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]

_lock = threading.Lock()
_state: dict[str, object] = {"devices": None, "error": None, "mode": "auto"}


def _with_cuda() -> bool:
    """Whether the build includes the CUDA kernels: torch has CUDA, nvcc is found and the source exists."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return bool(torch.version.cuda and nvcc and _CUDA_SOURCE.is_file())


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def cache_dir(with_cuda: bool | None = None) -> Path:
    """Where this torch, these sources and this CPU's build lives (see the module docstring)."""
    with_cuda = _with_cuda() if with_cuda is None else with_cuda
    sources = [*_CPU_SOURCES, _CUDA_SOURCE] if with_cuda else list(_CPU_SOURCES)
    digest = hashlib.sha256()
    for part in [*(p.read_bytes() for p in sources), repr((_CFLAGS, _CUDA_FLAGS, with_cuda)).encode(),
                 _cpu_flags().encode(), f"{sys.version_info[:2]}".encode()]:
        digest.update(part)
    root = Path(os.environ.get("LORAFUSION_CACHE", Path.home() / ".cache" / "lorafusion")).expanduser()
    return root / "native" / f"{torch.__version__.replace('+', '_')}-{digest.hexdigest()[:16]}"


def _compile(directory: Path, with_cuda: bool) -> None:
    """Build (or load the existing build) under a file lock: concurrent processes build once, in turn."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    name = f"lorafusion_native_{directory.name.rsplit('-', 1)[1]}"
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if the holder dies mid-build
        library = directory / f"{name}.so"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
                return
            except OSError:  # a build cut off while linking: build again below
                library.unlink()
        (directory / "lock").unlink(missing_ok=True)  # torch's own baton, stale if a builder was killed
        print(f"lorafusion: building the native ops of {CSRC} for this host into {directory} (once per host; "
              "csrc/README.md has the build time)", file=sys.stderr, flush=True)
        sources = [str(path) for path in _CPU_SOURCES] + ([str(_CUDA_SOURCE)] if with_cuda else [])
        cpp_extension.load(name=name, sources=sources, build_directory=str(directory), extra_cflags=_CFLAGS,
                           extra_cuda_cflags=_CUDA_FLAGS, with_cuda=with_cuda, is_python_module=False,
                           verbose=False)


def _missing_tool() -> str | None:
    """Why no build can start here (no sources, compiler or ninja), else None; puts pip's ninja on PATH when only it
    has one (a venv's python run without activating the venv, as Ray actors are)."""
    missing = [str(path) for path in _CPU_SOURCES if not path.is_file()]
    if missing:
        return f"{', '.join(missing)} missing (the sources ship with a clone of the repository: pip install -e .)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX or install g++)"
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    return None


def _load() -> frozenset[str]:
    """The device types the native ops were built for, building them on the first call of this process;
    empty, with one RuntimeWarning saying why, when they cannot be built."""
    if _state["devices"] is not None:  # every call after the first (each SHiRA forward asks)
        return _state["devices"]
    with _lock:
        if _state["devices"] is not None:
            return _state["devices"]
        with_cuda = _with_cuda()
        error = _missing_tool()
        if error is None:
            try:
                _compile(cache_dir(with_cuda), with_cuda)
            except Exception as err:  # a compiler error, a broken toolchain: all mean the fallback
                error = f"building csrc/ failed ({type(err).__name__}: {str(err).strip()[-2000:]})"
        _state["error"] = error
        _state["devices"] = frozenset() if error else frozenset({"cpu", "cuda"} if with_cuda else {"cpu"})
        if error:
            warnings.warn(f"lorafusion: native ops unavailable, using the torch fallback: {error}",
                          RuntimeWarning, stacklevel=3)
        return _state["devices"]


def available(device: torch.device | str) -> bool:
    """Whether the native ops run on tensors of `device` (building them on the first call of the process)."""
    return torch.device(device).type in _load()


def build_error() -> str | None:
    """Why the native ops are unavailable (None when they built, or before the first attempt)."""
    return _state["error"]


def configure(mode: str, device: torch.device | str) -> None:
    """Set run.native_ops for this process: 'auto' uses the native ops where they built, 'off' never, 'on'
    demands them on `device` (RuntimeError naming the reason when they did not build). The stage worker calls this
    before training: 'on', and 'auto' on a CPU (whose every step draws LoRA dropout through them), build or load
    them here rather than inside a step; on a GPU 'auto' leaves that to SHiRA's first use, their only user there."""
    if mode not in MODES:
        raise ValueError(f"native_ops={mode!r}; choose one of {list(MODES)}")
    device = torch.device(device)
    if mode == "on" and not available(device):
        raise RuntimeError(f"run.native_ops='on' but the native ops are unavailable on "
                           f"{device.type}: {build_error() or 'not built for this device'}; "
                           "fix that, or use native_ops 'auto' (torch fallback) or 'off'")
    if mode == "auto" and device.type == "cpu":
        available(device)
    _state["mode"] = mode


def enabled(device: torch.device) -> bool:
    """Whether callers should take the native path for tensors on `device` under the configured mode."""
    return _state["mode"] != "off" and available(device)


def sparse_forward(x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y [T, N] = x [T, K] · Sᵀ (a new tensor of x's dtype), S [N, K] as CSR (crow [N+1], cols [nnz], values [nnz])."""
    return torch.ops.lorafusion_sparse.sparse_forward(x, crow, cols, values)


def sparse_backward_input(dy: torch.Tensor, t_crow: torch.Tensor, t_cols: torch.Tensor,
                          t_values: torch.Tensor) -> torch.Tensor:
    """dx [T, K] = dy [T, N] · S (a new tensor of dy's dtype), S given as CSR of Sᵀ [K, N]."""
    return torch.ops.lorafusion_sparse.sparse_backward_input(dy, t_crow, t_cols, t_values)


def sparse_backward_values(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """dv [nnz] (fp32), dv_k = Σ_t dy[t, rows_k] · x[t, cols_k]."""
    return torch.ops.lorafusion_sparse.sparse_backward_values(dy, x, rows, cols)


def sparse_switch(weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor, saved: torch.Tensor) -> None:
    """saved = weight.view(-1)[index], then weight.view(-1)[index] += values (duplicates add up)."""
    torch.ops.lorafusion_sparse.sparse_switch(weight, index, values, saved)


def sparse_restore(weight: torch.Tensor, index: torch.Tensor, saved: torch.Tensor) -> None:
    """weight.view(-1)[index] = saved, the bits from before sparse_switch."""
    torch.ops.lorafusion_sparse.sparse_restore(weight, index, saved)


def dropout_zeroed(x: torch.Tensor, keys: torch.Tensor, column_keys: torch.Tensor, site_key: int,
                   threshold: int) -> torch.Tensor:
    """x [rows, K] (CPU, float32 or bfloat16, contiguous) with the entries dropout drops zeroed, a new tensor: the
    mask of adapters.dropout.dropped_entries for row keys `keys` [rows], the layer key `site_key`, the column pairs'
    keys `column_keys` [ceil(K / 2)] and `threshold` (drop_threshold(p))."""
    return torch.ops.lorafusion_dropout.dropout_zeroed(x, keys, column_keys, site_key, threshold)


def dropout_add_kept_(out: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, column_keys: torch.Tensor,
                      site_key: int, threshold: int) -> None:
    """out += t with the entries dropout drops skipped (as adding +0.0), same mask and arguments as dropout_zeroed."""
    torch.ops.lorafusion_dropout.dropout_add_kept_(out, t, keys, column_keys, site_key, threshold)
