"""Make megatron-core run on a machine without CUDA, and set up its parallel state for one process.

megatron-core 0.16 assumes CUDA in three places that our CPU path reaches:
- `torch.cuda.current_device()` is used as a device for RoPE frequencies and some buffers;
- the global memory buffer's `get_tensor` allocates on the current CUDA device;
- the CUDA RNG tracker's `fork()` swaps CUDA generator states around embedding dropout.
Without CUDA we give each a CPU stand-in. With CUDA nothing is patched.
"""

from __future__ import annotations

import contextlib
import socket

import torch
import torch.distributed as dist

__all__ = ["patch_megatron_for_cpu", "ensure_model_parallel", "free_port"]

_PATCHED = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:
    # Buffers are reused by name; a plain allocation is as good on CPU and has no aliasing risk.
    return torch.empty(tuple(tensor_shape), dtype=dtype, device="cpu")


@contextlib.contextmanager
def _cpu_fork(self, name: str = "model-parallel-rng"):
    # On CPU there is one generator; dropout draws from it directly.
    yield


def patch_megatron_for_cpu() -> None:
    """Install the CPU stand-ins once per process (no-op when CUDA is available)."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_current_device
    mcore_utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    mcore_random.CudaRNGStatesTracker.fork = _cpu_fork
    _PATCHED = True


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_model_parallel(pipeline_stages: int = 1) -> None:
    """Initialise torch.distributed (one gloo process) and megatron's parallel state if not done yet.

    The Ray runtime creates its own process groups inside each actor before calling this; then only
    the CPU stand-ins are installed.
    """
    patch_megatron_for_cpu()
    from megatron.core import parallel_state

    if not dist.is_initialized():
        # A world of one needs no rendezvous: an in-process store, no port (and no MASTER_PORT that child
        # processes such as Ray workers would inherit and then collide on).
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pipeline_stages)
