"""GPU memory and utilisation through nvidia-ml-py (`pynvml`), when it is installed and a GPU is there."""

from __future__ import annotations

__all__ = ["gpu_sample", "summarise_gpu"]


def gpu_sample(device_index: int = 0) -> dict | None:
    """{memory_used_bytes, memory_total_bytes, utilization_percent} of one GPU now; None without NVML or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
    except pynvml.NVMLError:
        return None
    return {"memory_used_bytes": int(memory.used), "memory_total_bytes": int(memory.total),
            "utilization_percent": int(rates.gpu)}


def summarise_gpu(samples: list[dict]) -> dict | None:
    """The run's view of its samples (one per actor per window): peak memory used and mean utilisation."""
    if not samples:
        return None
    return {
        "max_memory_used_bytes": max(s["memory_used_bytes"] for s in samples),
        "memory_total_bytes": max(s["memory_total_bytes"] for s in samples),
        "mean_utilization_percent": round(sum(s["utilization_percent"] for s in samples) / len(samples), 1),
        "samples": len(samples),
    }
