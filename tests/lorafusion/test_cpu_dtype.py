"""A 16-bit run.dtype on a CPU without native 16-bit matrix instructions is flagged before any compute: torch
then multiplies in a slow fallback (measured 0.3 GFLOP/s for bfloat16 where float32 ran at 95)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorafusion.models import builder

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
BF16 = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path
    return write


def test_bfloat16_without_the_instructions_is_slow(cpuinfo):
    why = builder.slow_cpu_dtype(torch.bfloat16, cpuinfo(AVX2_ONLY))
    assert why is not None
    assert "bfloat16 on AMD EPYC" in why and "avx512_bf16, amx_bf16" in why and "run.dtype: float32" in why
    assert "avx512_fp16" in builder.slow_cpu_dtype(torch.float16, cpuinfo(AVX2_ONLY))


def test_float32_or_native_instructions_or_no_cpuinfo_are_fine(cpuinfo, tmp_path):
    assert builder.slow_cpu_dtype(torch.float32, cpuinfo(AVX2_ONLY)) is None
    assert builder.slow_cpu_dtype(torch.bfloat16, cpuinfo(BF16)) is None
    assert builder.slow_cpu_dtype(torch.bfloat16, tmp_path / "missing") is None


def test_warn_if_slow_on_cpu(cpuinfo, monkeypatch):
    path = cpuinfo(AVX2_ONLY)
    real = builder.slow_cpu_dtype
    monkeypatch.setattr(builder, "slow_cpu_dtype", lambda dtype: real(dtype, path))
    with pytest.warns(RuntimeWarning, match="bfloat16 on AMD EPYC: the CPU has none of"):
        builder.warn_if_slow_on_cpu(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        builder.warn_if_slow_on_cpu(torch.float32)
