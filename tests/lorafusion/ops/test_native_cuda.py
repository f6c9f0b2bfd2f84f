"""The CUDA kernels of the lorafusion_sparse ops (csrc/sparse_adapter_cuda.cu) against dense float64 maths written
here: forward, dx and the values' gradient at odd shapes and supports (empty rows, one entry, no entry, rows wider
than a staged tile, a strided output), and the switch / restore round trip bit-exact with duplicates across jobs."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Unit roundoff of the output's dtype: the kernels round their fp32 result once into it.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_UNIT_ROUNDOFF = 2.0**-24


@pytest.fixture(scope="module")
def ops():
    """torch.ops.lorafusion_sparse once the loader has built and loaded the extension with its CUDA kernels."""
    native = pytest.importorskip("lorafusion.ops.native")
    native.available("cuda")  # builds (with the CUDA kernels where nvcc is found) and loads them
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lorafusion_sparse::sparse_forward", "CUDA"):
        if shutil.which("nvcc") is None:
            pytest.skip("no nvcc on this machine: the extension was built without its CUDA kernels")
        pytest.fail("nvcc is here but lorafusion_sparse has no CUDA kernels: the CUDA build failed "
                    "(see the loader's notice)")
    return torch.ops.lorafusion_sparse


def random_support(out_features: int, in_features: int, density: float, seed: int,
                   empty_rows: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (rows, cols) of a duplicate-free random support, with the given rows left empty."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_features, in_features, generator=generator) < density  # [N, K]
    mask[list(empty_rows)] = False
    return mask.nonzero(as_tuple=True)  # lexicographic: rows ascending, columns ascending within a row


def row_pointers(sorted_rows: torch.Tensor, size: int) -> torch.Tensor:
    crow = torch.zeros(size + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(sorted_rows, minlength=size).cumsum(0)
    return crow


def dense(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    matrix = torch.zeros(shape, dtype=torch.float64)
    matrix[rows, cols] = values.double().cpu()
    return matrix


def assert_within_rounding(name: str, actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor,
                           terms: int, dtype: torch.dtype) -> None:
    """|actual - expected| ≤ u·|expected| + 2·(terms + 2)·2⁻²⁴·magnitude elementwise.

    The kernels multiply and add in fp32 in their own order: the error of a sum of n products is at most about
    n·2⁻²⁴·Σ|terms| (`magnitude`, summed in float64 here), plus one fp32 add of the old output. The result is
    then rounded once into the output's dtype, at most u = UNIT_ROUNDOFF[dtype] relative. Inputs are the same
    rounded tensors on both sides, so nothing else differs; a factor 2 covers the rounding of the error terms.
    """
    actual, expected, magnitude = actual.double().cpu(), expected.double().cpu(), magnitude.double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = UNIT_ROUNDOFF[dtype] * expected.abs() + 2 * (terms + 2) * FP32_UNIT_ROUNDOFF * magnitude
    bad = (actual - expected).abs() > bound
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        pairs = [(actual[tuple(i)].item(), expected[tuple(i)].item()) for i in where]
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements off beyond rounding; "
                             f"first (actual, expected) at {where}: {pairs}")


# (tokens, out N, in K, density, empty rows): odd sizes; 37 tokens is not a multiple of any tile; 600 rows span
# several row blocks; K = 4099 stages 4 fp32 / 8 bf16 tokens, K = 12007 bf16 stages 2, K = 21001 fp32 rows are
# too wide to stage (gathered from global memory); one entry; no entry; no token.
SHAPES = [
    (37, 29, 53, 0.2, (0, 7, 28)),
    (5, 600, 4099, 0.01, (3,)),
    (9, 17, 12007, 0.01, ()),
    (3, 11, 21001, 0.002, (5,)),
    (7, 13, 19, "one", ()),
    (7, 13, 19, 0.0, ()),
    (0, 13, 19, 0.3, ()),
]
# (activations, values): every combination the kernels are instantiated for.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.float16, torch.float16)]


def make_case(shape, dtype, values_dtype, seed: int = 0):
    tokens, n, k, density, empty_rows = shape
    if density == "one":
        rows, cols = torch.tensor([n // 2]), torch.tensor([k - 1])
    else:
        rows, cols = random_support(n, k, density, seed, empty_rows)
    generator = torch.Generator().manual_seed(seed + 1)
    values = torch.randn(rows.numel(), generator=generator).to(values_dtype)  # [nnz]
    x = torch.randn(tokens, k, generator=generator).to(dtype)  # [T, K]
    dy = torch.randn(tokens, n, generator=generator).to(dtype)  # [T, N]
    return rows, cols, values, x, dy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-N{s[1]}-K{s[2]}-{s[3]}")
@pytest.mark.parametrize("dtype, values_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_forward_and_input_gradient_match_dense_maths(ops, shape, dtype, values_dtype):
    rows, cols, values, x, dy = make_case(shape, dtype, values_dtype)
    tokens, n, k = shape[:3]
    s = dense(rows, cols, values, (n, k))  # [N, K]
    cuda = torch.device("cuda")

    # The input is a column slice of a wider tensor (row stride K + 3): the kernel reads rows at any stride.
    x_wide = torch.randn(tokens, k + 3, generator=torch.Generator().manual_seed(5)).to(dtype)
    x_wide[:, 1:k + 1] = x
    y = ops.sparse_forward(x_wide.to(cuda)[:, 1:k + 1], row_pointers(rows, n).to(cuda), cols.to(cuda),
                           values.to(cuda))
    assert y.shape == (tokens, n) and y.dtype == dtype and y.is_contiguous()
    max_row = int(torch.bincount(rows, minlength=n).max()) if rows.numel() else 0
    assert_within_rounding("y", y, x.double() @ s.T, x.double().abs() @ s.abs().T, max_row, dtype)

    order = torch.argsort(cols * n + rows)  # the support in column-major order: CSR of Sᵀ [K, N]
    dx = ops.sparse_backward_input(dy.to(cuda), row_pointers(cols[order], k).to(cuda), rows[order].to(cuda),
                                   values[order].to(cuda))
    assert dx.shape == (tokens, k) and dx.dtype == dtype
    max_col = int(torch.bincount(cols, minlength=k).max()) if cols.numel() else 0
    assert_within_rounding("dx", dx, dy.double() @ s, dy.double().abs() @ s.abs(), max_col, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-N{s[1]}-K{s[2]}-{s[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_values_gradient_is_the_sampled_product(ops, shape, dtype):
    rows, cols, _, x, dy = make_case(shape, dtype, dtype)
    cuda = torch.device("cuda")
    dv = ops.sparse_backward_values(dy.to(cuda), x.to(cuda), rows.to(cuda), cols.to(cuda))
    assert dv.dtype == torch.float32 and dv.shape == rows.shape
    # Products of two bf16/fp16 numbers are exact in fp32, so only the fp32 sums over tokens round, whatever the
    # inputs' dtype: fp32's bound for all.
    expected = (dy.double().T @ x.double())[rows, cols]  # [nnz] sampled from the dense [N, K] (small here)
    magnitude = (dy.double().abs().T @ x.double().abs())[rows, cols]
    assert_within_rounding("dv", dv, expected, magnitude, shape[0], torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that comparisons are bit-exact (-0.0 differs from 0.0)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).cpu()


@pytest.mark.parametrize("dtype, values_dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_switch_adds_every_jobs_deltas_and_restore_is_bit_exact(ops, dtype, values_dtype):
    n, k = 37, 53
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(n, k, generator=generator).to(dtype)  # [N, K]
    # Three jobs' supports (flat row·K + col) concatenated: the first two overlap by chance, the third repeats
    # part of the first, so some positions get two or three deltas.
    first = torch.randperm(n * k, generator=generator)[:400].sort().values
    second = torch.randperm(n * k, generator=generator)[:400].sort().values
    index = torch.cat([first, second, first[::3]])  # [m]
    values = torch.randn(index.numel(), generator=generator).to(values_dtype)  # [m]
    weight.view(-1)[index[0]] = -0.0
    values[0] = -0.0  # -0.0 + -0.0 stays -0.0
    assert index.unique().numel() < index.numel()

    expected = weight.clone().view(-1)
    for position, value in zip(index.tolist(), values.float()):  # each addition in list order, rounded once
        expected[position] = (expected[position].float() + value).to(dtype)

    cuda = torch.device("cuda")
    on_device = weight.to(cuda)
    saved = torch.empty(index.numel(), dtype=dtype, device=cuda)
    ops.sparse_switch(on_device, index.to(cuda), values.to(cuda), saved)
    assert torch.equal(bits(saved), bits(weight.view(-1)[index])), "saved must hold the weights from before any add"
    assert torch.equal(bits(on_device.view(-1)), bits(expected))
    ops.sparse_restore(on_device, index.to(cuda), saved)
    assert torch.equal(bits(on_device), bits(weight))


def test_bad_arguments_are_named(ops):
    cuda = torch.device("cuda")
    x = torch.randn(4, 6, device=cuda)
    crow, cols = torch.tensor([0, 1, 2], device=cuda), torch.tensor([0, 5], device=cuda)
    values = torch.ones(2, device=cuda)
    with pytest.raises(RuntimeError, match="crow is empty"):
        ops.sparse_forward(x, torch.zeros(0, dtype=torch.int64, device=cuda), cols, values)
    with pytest.raises(RuntimeError, match="values has dtype"):
        ops.sparse_forward(x, crow, cols, values.half())
    with pytest.raises(RuntimeError, match="cols is on cpu"):
        ops.sparse_forward(x, crow, cols.cpu(), values)
    weight = torch.zeros(3, 3, device=cuda)
    with pytest.raises(RuntimeError, match="saved must be contiguous 1-D"):
        ops.sparse_switch(weight, cols, values, torch.empty(3, device=cuda))
