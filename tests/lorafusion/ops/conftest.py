"""Kernel tests: Triton runs in its CPU interpreter when there is no GPU.

The ops resolve TRITON_INTERPRET when a kernel launches (lorafusion.ops.utils.lazy_kernel), so setting it
per test here works whatever imported triton or lorafusion.ops first, and leaks into no other test.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lorafusion.ops import native

HAS_CUDA = torch.cuda.is_available()

# dtype -> (atol, rtol) of the kernels against the fp32 reference evaluated on the same (rounded) inputs.
# atol is relative to the tensor's largest magnitude (see assert_close): a gradient summed over M rows
# carries rounding errors the size of its terms, however much the terms cancel in one element.
TOLERANCES = {
    # Only summation order differs (fp32 accumulators, full-precision dot on both sides): a few fp32 ulps
    # grown by sums of ≤ 70 terms.
    torch.float32: (1e-5, 1e-5),
    # The kernels round T = s·x̂Aᵀ and G = s·dy B to bf16 (8-bit mantissa, ulp 2^-8 ≈ 3.9e-3 at 1) before the
    # second product, and the output once more: three roundings of relative 2^-9 each, plus the same on
    # intermediate gradient sums, stay under 2·2^-8 ≈ 8e-3 relative; atol covers entries near 0.
    torch.bfloat16: (2e-2, 2e-2),
    # fp16 has a 11-bit mantissa (ulp 2^-11 ≈ 4.9e-4 at 1): the same three roundings, 8x tighter than bf16.
    torch.float16: (4e-3, 4e-3),
}


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """|actual - expected| ≤ atol·max(1, max|expected|) + rtol·|expected| elementwise; on failure say how many
    elements differ and where."""
    atol, rtol = TOLERANCES[dtype]
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    scale = max(1.0, expected.abs().max().item())
    bad = diff > atol * scale + rtol * expected.abs()
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"max |diff| {diff.max().item():.3e}, max |expected| {scale:.3e}; first at {where}: "
            f"{[(actual[tuple(i)].item(), expected[tuple(i)].item()) for i in where]}"
        )


@pytest.fixture
def check():
    """The mismatch-reporting comparison, as a fixture (test modules here do not import each other)."""
    return assert_close


@pytest.fixture(scope="session")
def native_cpu() -> None:
    """The native ops, built once for the session; a compiler without a working build is a failure."""
    if not native.available("cpu"):
        if shutil.which(os.environ.get("CXX", "c++")) is not None:
            pytest.fail(f"a C++ compiler is present but the native ops did not build: {native.build_error()}")
        pytest.skip(f"no native build here: {native.build_error()}")


@pytest.fixture
def mode(native_cpu):
    """Sets run.native_ops for the test (the stage worker's call); 'auto' again afterwards."""
    yield lambda value: native.configure(value, "cpu")
    native.configure("auto", "cpu")
