"""Every fused LoRA kernel against the torch reference: the output and every gradient (dx, dA, dB)."""

from __future__ import annotations

import random

import pytest
import torch

from lorafusion.ops import (
    SegmentTable, dropout_keep_mask, fused_lora_linear, fused_multi_lora_linear, layer_params,
    multi_lora_linear_reference, pick_config,
)

NORMAL = (32, 32, 48)  # (M, K, N): whole tiles of the interpreter's 16
ODD = (37, 29, 23)  # primes: partial tiles on every axis


def _factors(n: int, k: int, ranks: list[int | None], dtype: torch.dtype, device, gen: torch.Generator):
    """Adapter factors of order 1 per output element (B is non-zero, unlike a fresh PEFT init, so dA is tested)."""
    a_list, b_list = [], []
    for r in ranks:
        if r is None:
            a_list.append(None)
            b_list.append(None)
            continue
        a = torch.randn(r, k, generator=gen) / k ** 0.5
        b = torch.randn(n, r, generator=gen) / r ** 0.5
        a_list.append(a.to(device, dtype).requires_grad_())
        b_list.append(b.to(device, dtype).requires_grad_())
    return a_list, b_list


def _run_both(m, k, n, segments, samples, ranks, scalings, ps, dtype, device, *, bias, deterministic, site_id=5, seed=0,
              scaled=None):
    """Kernel output and gradients, and the fp32 reference on the same rounded inputs with the kernel's mask.
    scaled: per segment whether it has a column scale c [N] (DoRA), around 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b0 = (torch.randn(n, generator=gen) * 0.1).to(device, dtype) if bias else None
    a_list, b_list = _factors(n, k, ranks, dtype, device, gen)
    c_list = [(1 + 0.5 * torch.randn(n, generator=gen)).to(device, dtype).requires_grad_() if on else None
              for on in (scaled or [False] * len(segments))]
    table = SegmentTable.build(m, segments, samples, device=device)
    y = fused_multi_lora_linear(x, weight, a_list, b_list, table, scalings=scalings, dropout_ps=ps, site_id=site_id,
                                bias=b0, deterministic=deterministic, column_scales=c_list if scaled else None)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    leaves = [x] + [t for t in a_list + b_list + c_list if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)

    keep = dropout_keep_mask(table, layer_params(table, a_list, scalings, ps), k, site_id)
    up = [t.detach().float().requires_grad_() if t is not None else None for t in [x] + a_list + b_list + c_list]
    count = len(a_list)
    x32, a32, b32, c32 = up[0], up[1:1 + count], up[1 + count:1 + 2 * count], up[1 + 2 * count:]
    y_ref = multi_lora_linear_reference(x32, weight.float(), a32, b32, segments, scalings=scalings, dropout_ps=ps,
                                        bias=b0.float() if bias else None, keep_mask=keep, column_scales=c32)
    ref_leaves = [x32] + [t for t in a32 + b32 + c32 if t is not None]
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.float())
    names = ["dx"] + [f"dA[{i}]" for i, a in enumerate(a_list) if a is not None] \
        + [f"dB[{i}]" for i, b in enumerate(b_list) if b is not None] \
        + [f"dc[{i}]" for i, c in enumerate(c_list) if c is not None]
    return (y, y_ref), list(zip(names, grads, ref_grads)), keep


def _compare(check, outputs, grads, dtype):
    check("y", outputs[0], outputs[1], dtype)
    for name, got, want in grads:
        check(name, got, want, dtype)


SINGLE_CASES = [
    # (shape, dtype, rank, dropout p, bias)
    (ODD, torch.float32, 1, 0.0, True),
    (ODD, torch.float32, 8, 0.1, False),
    (ODD, torch.float32, 16, 0.0, False),
    (ODD, torch.float32, 24, 0.1, True),
    (NORMAL, torch.float32, 16, 0.1, True),
    (NORMAL, torch.float32, 72, 0.1, False),  # 3 x 24: a fused q/k/v site, rank past one 64-wide rank block
    ((1, 29, 23), torch.float32, 8, 0.1, True),  # M = 1
    ((2, 17, 19), torch.float32, 16, 0.0, False),  # M prime, K and N primes below one tile
    (ODD, torch.bfloat16, 16, 0.1, True),
    (NORMAL, torch.bfloat16, 8, 0.0, False),
    (ODD, torch.float16, 16, 0.1, False),
    (NORMAL, torch.float16, 24, 0.0, True),
]


@pytest.mark.parametrize("shape,dtype,rank,p,bias", SINGLE_CASES)
def test_single_adapter_matches_reference(shape, dtype, rank, p, bias, device, check):
    m, k, n = shape
    outputs, grads, keep = _run_both(m, k, n, [(0, m)], [((0, m, 1234),)], [rank], [2.0], [p], dtype, device,
                                     bias=bias, deterministic=True)
    _compare(check, outputs, grads, dtype)
    if p == 0.0:
        assert bool(keep.all())


def _random_segments(m: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """`count` sorted segments of any lengths over [0, m), with a few padding rows left out between some."""
    cuts = sorted(rng.sample(range(1, m), 2 * count - 1))
    bounds = [0] + cuts + [m]
    segments = []
    for i in range(count):
        start, end = bounds[2 * i], bounds[2 * i + 2]
        gap = rng.choice([0, 0, 1, 2]) if end - start > 3 else 0  # padding rows at the segment's end
        segments.append((start, end - gap))
    return segments


@pytest.mark.parametrize("count", [1, 3, 7])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("deterministic", [True, False])
def test_multi_adapter_matches_reference(count, p, deterministic, device, check):
    m, k, n = 45, 29, 23
    rng = random.Random(count * 10 + int(p * 10))
    segments = _random_segments(m, count, rng)
    samples = []
    for start, end in segments:  # one or two samples per segment, each with its own dropout seed
        mid = rng.randint(start, end)
        samples.append(((start, mid, rng.randrange(2**62)), (mid, end, rng.randrange(2**62))))
    ranks = [rng.choice([1, 8, 16, 24]) for _ in segments]
    if count == 7:
        ranks[3] = None  # a job with no adapter on this layer
    scalings = [rng.choice([0.5, 1.0, 2.0]) for _ in segments]
    ps = [p * rng.choice([1, 2]) for _ in segments]  # per-segment dropout p
    outputs, grads, _ = _run_both(m, k, n, segments, samples, ranks, scalings, ps, torch.float32, device,
                                  bias=count == 3, deterministic=deterministic, seed=count)
    _compare(check, outputs, grads, torch.float32)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_column_scales_match_reference(deterministic, p, device, check):
    """DoRA's per-segment column scale in the kernels: output and every gradient (dx, dA, dB, dc), with segments
    with and without a scale, padding rows, a segment with a scale and no adapter rows' rank, and a bias."""
    m, k, n = 45, 29, 23
    segments = [(0, 9), (9, 20), (22, 40), (40, 45)]
    samples = [((s, e, 7 + i),) for i, (s, e) in enumerate(segments)]
    outputs, grads, _ = _run_both(m, k, n, segments, samples, [8, 16, None, 4], [2.0, 0.5, 1.0, 1.0], [p, 0.0, 0.0, p],
                                  torch.float32, device, bias=True, deterministic=deterministic,
                                  scaled=[True, False, True, True])
    _compare(check, outputs, grads, torch.float32)


def test_column_scales_bf16(device, check):
    outputs, grads, _ = _run_both(50, 29, 23, [(0, 13), (13, 31), (33, 50)], None, [8, 24, 16], [2.0, 1.0, 0.5],
                                  [0.1, 0.0, 0.2], torch.bfloat16, device, bias=False, deterministic=True,
                                  scaled=[False, True, True])
    _compare(check, outputs, grads, torch.bfloat16)


def test_multi_adapter_bf16(device, check):
    m = 50
    segments = [(0, 13), (13, 31), (33, 50)]
    outputs, grads, _ = _run_both(m, 29, 23, segments, None, [8, 24, 16], [2.0, 1.0, 0.5], [0.1, 0.0, 0.2],
                                  torch.bfloat16, device, bias=True, deterministic=False)
    _compare(check, outputs, grads, torch.bfloat16)


def test_padding_rows_get_base_output_only(device):
    m, k, n = 40, 29, 23
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device).requires_grad_()
    weight = torch.randn(n, k, generator=gen).to(device)
    a = torch.randn(8, k, generator=gen).to(device).requires_grad_()
    b = torch.randn(n, 8, generator=gen).to(device).requires_grad_()
    table = SegmentTable.build(m, [(5, 20), (25, 33)], device=device)
    y = fused_multi_lora_linear(x, weight, [a, a], [b, b], table, scalings=[1.0, 1.0], dropout_ps=[0.5, 0.5])
    dy = torch.randn(m, n, generator=gen).to(device)
    (dx,) = torch.autograd.grad(y, [x], dy)
    pad = torch.tensor([r for r in range(m) if not (5 <= r < 20 or 25 <= r < 33)], device=device)
    torch.testing.assert_close(y[pad], (x @ weight.t())[pad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx[pad], (dy @ weight)[pad], atol=1e-5, rtol=1e-5)


def test_dropout_mask_depends_only_on_sample_seed_site_and_position(device):
    k = 40
    alone = SegmentTable.build(30, [(0, 30)], [((0, 30, 77),)], device=device)
    # The same sample (seed 77) after another job's rows and behind padding, split across two samples' table.
    shared = SegmentTable.build(64, [(0, 20), (22, 64)], [((0, 20, 5),), ((22, 34, 9), (34, 64, 77))], device=device)
    p_alone = alone.layer_params((8,), (1.0,), (0.5,))
    p_shared = shared.layer_params((8, 8), (1.0, 1.0), (0.3, 0.5))
    mask_alone = dropout_keep_mask(alone, p_alone, k, site_id=3)
    assert torch.equal(dropout_keep_mask(shared, p_shared, k, site_id=3)[34:64], mask_alone)
    assert not torch.equal(dropout_keep_mask(alone, p_alone, k, site_id=4), mask_alone)
    assert abs(mask_alone.float().mean().item() - 0.5) < 0.06  # 1200 draws: 4 standard deviations


def test_deterministic_mode_is_bitwise_reproducible(device):
    m, k, n = 45, 29, 23
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(device).requires_grad_()
    weight = torch.randn(n, k, generator=gen).to(device)
    a_list, b_list = _factors(n, k, [8, 16], torch.float32, device, gen)
    table = SegmentTable.build(m, [(0, 20), (20, 45)], device=device)

    def grads():
        y = fused_multi_lora_linear(x, weight, a_list, b_list, table, scalings=[1.0, 2.0], dropout_ps=[0.1, 0.1])
        return torch.autograd.grad(y.square().sum(), [x, *a_list, *b_list])

    assert all(torch.equal(u, v) for u, v in zip(grads(), grads()))


def test_single_entry_point_peft_shapes_and_seed(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 29, generator=gen).to(device)  # [batch, seq, K]
    weight = torch.randn(23, 29, generator=gen).to(device)
    a = torch.randn(8, 29, generator=gen).to(device)
    b = torch.randn(23, 8, generator=gen).to(device)
    y1 = fused_lora_linear(x, weight, a, b, scaling=2.0, dropout_p=0.1, seed=3, kernels="triton")
    y2 = fused_lora_linear(x, weight, a, b, scaling=2.0, dropout_p=0.1, seed=3, kernels="triton")
    assert y1.shape == (2, 5, 23) and torch.equal(y1, y2)
    y0 = fused_lora_linear(x, weight, a, b, scaling=2.0, kernels="triton")
    torch.testing.assert_close(y0, x @ weight.t() + 2.0 * (x @ a.t()) @ b.t(), atol=1e-4, rtol=1e-4)


def test_bad_input_is_rejected(device):
    x = torch.randn(4, 8, device=device)
    weight = torch.randn(6, 8, device=device)
    a, b = torch.randn(2, 8, device=device), torch.randn(6, 2, device=device)
    table = SegmentTable.build(4, [(0, 4)], device=device)
    with pytest.raises(ValueError, match="lora_b"):
        fused_multi_lora_linear(x, weight, [a], [b.t()], table, scalings=[1.0], dropout_ps=[0.0])
    with pytest.raises(ValueError, match="dropout"):
        fused_lora_linear(x, weight, a, b, scaling=1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="rows"):
        fused_multi_lora_linear(torch.randn(5, 8, device=device), weight, [a], [b], table, scalings=[1.0], dropout_ps=[0.0])
    with pytest.raises(ValueError, match="frozen"):
        fused_multi_lora_linear(x, weight.requires_grad_(), [a], [b], table, scalings=[1.0], dropout_ps=[0.0])
    with pytest.raises(ValueError, match="sorted"):
        SegmentTable.build(10, [(4, 8), (2, 6)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_realistic_shape_bf16(deterministic, device, check):
    """Compiled kernels at a layer-sized shape: default tiles, several K/N tiles, segments inside M tiles."""
    m = 1531
    segments = [(0, 300), (300, 301), (305, 1100), (1100, 1531)]
    outputs, grads, _ = _run_both(m, 1024, 1000, segments, None, [16, 1, 48, 256], [2.0, 1.0, 0.5, 1.0],
                                  [0.1, 0.0, 0.1, 0.05], torch.bfloat16, device, bias=True, deterministic=deterministic)
    _compare(check, outputs, grads, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_unknown_shape_gets_default_tiles(device):
    from lorafusion.ops.utils import DEFAULT_CONFIG

    assert pick_config(12345, 678, 9, device) == DEFAULT_CONFIG


def test_job_rows_do_not_depend_on_co_batched_jobs(device):
    """DESIGN promise 1 on the Triton path: a job's output and gradients are the same alone or packed with
    others (dropout 0.1, so its masks must follow its own samples' seeds, not its rows' places)."""
    k, n = 29, 23
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(n, k, generator=gen).to(device) / k ** 0.5
    x_job = torch.randn(21, k, generator=gen).to(device)
    x_other = torch.randn(30, k, generator=gen).to(device)
    (a_job, a_other), (b_job, b_other) = _factors(n, k, [8, 16], torch.float32, device, gen)
    samples = ((0, 9, 111), (9, 21, 222))

    alone = SegmentTable.build(21, [(0, 21)], [samples], device=device)
    y_alone = fused_multi_lora_linear(x_job, weight, [a_job], [b_job], alone, scalings=[2.0], dropout_ps=[0.1], site_id=7)
    grads_alone = torch.autograd.grad(y_alone.square().sum(), [a_job, b_job])

    shifted = tuple((s + 32, e + 32, seed) for s, e, seed in samples)  # after the other job and 2 padding rows
    packed = SegmentTable.build(53, [(0, 30), (32, 53)], [((0, 30, 5),), shifted], device=device)
    x = torch.cat([x_other, torch.zeros(2, k, device=device), x_job])
    y = fused_multi_lora_linear(x, weight, [a_other, a_job], [b_other, b_job], packed, scalings=[1.0, 2.0],
                                dropout_ps=[0.3, 0.1], site_id=7)
    grads_packed = torch.autograd.grad(y[32:].square().sum(), [a_job, b_job])
    torch.testing.assert_close(y[32:], y_alone, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads_packed, grads_alone):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
