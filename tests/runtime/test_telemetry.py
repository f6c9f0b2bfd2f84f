"""GPU telemetry through nvidia-ml-py: read when present (a stand-in module here), absent otherwise."""

import sys
import types

from runtime.telemetry import gpu_sample, summarise_gpu


def fake_pynvml(used: int, total: int, util: int, fail: bool = False) -> types.ModuleType:
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if fail:
            raise NVMLError("driver not loaded")

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=used, total=total, free=total - used)
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=util, memory=0)
    return module


def test_sample_reads_memory_and_utilisation(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(used=3 << 30, total=80 << 30, util=87))
    assert gpu_sample(0) == {"memory_used_bytes": 3 << 30, "memory_total_bytes": 80 << 30, "utilization_percent": 87}


def test_no_driver_or_no_module_gives_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(1, 2, 3, fail=True))
    assert gpu_sample(0) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert gpu_sample(0) is None


def test_summary_is_peak_memory_and_mean_utilisation():
    samples = [{"memory_used_bytes": 5, "memory_total_bytes": 10, "utilization_percent": 90},
               {"memory_used_bytes": 7, "memory_total_bytes": 10, "utilization_percent": 60}]
    assert summarise_gpu(samples) == {"max_memory_used_bytes": 7, "memory_total_bytes": 10,
                                      "mean_utilization_percent": 75.0, "samples": 2}
    assert summarise_gpu([]) is None
