"""A CPU stage's freed tensors kept in glibc's heap for the next microbatch, instead of handed back to the kernel.

torch's CPU allocator is glibc's malloc. By default glibc serves a block above its mmap threshold (128 KiB, raised
up to 32 MiB by the blocks freed) with a fresh mmap and unmaps it when freed, and gives the heap's free top back to
the kernel beyond the trim threshold. A training step allocates and frees activations of many sizes, so every
step touched fresh pages again: 8k–180k minor page faults per 2000-token microbatch of the bench model, ~2.6 µs
each on the CPU hosts here (docs/hot_path.md). With both thresholds at 1 GiB the heap keeps what the first
microbatch grew, and later microbatches fault almost never.

The settings are process-wide and stay: a stage worker sets them for a CPU stage (a Ray actor's process is the
stage's; the local engine's is the caller's), and glibc has no way back to its adaptive thresholds (setting either
ends the adaptation), so whatever the process runs later keeps the heap too. The local engine hands the heap's
free memory back to the kernel (`malloc_trim`) when its fit ends. Elsewhere (not Linux, not glibc) both calls do
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

__all__ = ["hold_freed_memory", "trim_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_HOLD = 1 << 30
_lock = threading.Lock()


def _libc():
    """glibc's handle, or None where malloc is not glibc's."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def hold_freed_memory() -> bool:
    """Keep freed blocks in the heap (see the module docstring); whether the setting took."""
    libc = _libc()
    if libc is None:
        return False
    with _lock:
        # a glibc that caps the mmap threshold at half its heap size (32 MiB) refuses 1 GiB: take the cap there
        held = bool(libc.mallopt(_M_MMAP_THRESHOLD, _HOLD) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20))
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, _HOLD)) and held


def trim_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel (malloc_trim), e.g. when a fit that held it ends."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
