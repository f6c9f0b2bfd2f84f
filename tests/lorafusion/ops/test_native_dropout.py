"""csrc/lora_dropout.cpp: LoRA dropout drawn where it is applied, against the torch path's mask (adapters.dropout)
bit for bit, through a multi-job layer's forward and backward, in a fit, and its argument checks."""

from __future__ import annotations

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters.dropout import (SegmentDropout, _column_keys, _site_key, drop_threshold, dropped_entries,
                                         row_keys)
from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear, Segment
from lorafusion.ops import native

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def keys_of(rows: int, seed: int) -> torch.Tensor:
    """Row keys of a few samples of different lengths and seeds, as a microbatch has them."""
    cut = [0, rows // 3, rows // 2, rows]
    return row_keys(rows, [(s, e, seed + i) for i, (s, e) in enumerate(zip(cut, cut[1:])) if e > s])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,columns", [(1, 1), (7, 9), (129, 64), (40, 1377)])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.99])
def test_native_zeroing_and_masked_add_are_the_torch_paths_bits(native_cpu, dtype, rows, columns, p):
    """x̂ = where(dropped, 0, x) and out += t.masked_fill(dropped, 0), bit for bit, at even and odd widths (the last
    column of an odd width is half a pair), including a -0.0 in out (adding a dropped entry's +0.0 makes it +0.0)."""
    gen = torch.Generator().manual_seed(rows * columns)
    keys, site = keys_of(rows, seed=columns), 5
    dropped = dropped_entries(keys, site, columns, p)
    assert 0 < int(dropped.sum()) < dropped.numel() or dropped.numel() < 20, "a vacuous mask"
    args = (keys, _column_keys(-(-columns // 2), keys.device), _site_key(site), drop_threshold(p))
    x = torch.randn(rows, columns, generator=gen).to(dtype)
    assert torch.equal(bits(native.dropout_zeroed(x, *args)), bits(torch.where(dropped, 0.0, x)))
    t = torch.randn(rows, columns, generator=gen).to(dtype)
    out = torch.randn(rows, columns, generator=gen).to(dtype)
    out[0, 0] = -0.0
    expected = out.clone()
    expected += t.masked_fill(dropped, 0.0)
    native.dropout_add_kept_(out, t, *args)
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.parametrize("threads", [1, 2])
def test_native_masks_do_not_depend_on_the_thread_count(mode, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        keys = keys_of(300, seed=1)
        x = torch.randn(300, 96)
        mode("on")
        assert torch.equal(SegmentDropout(keys, 2, 96, 0.3).zeroed(x),
                           torch.where(dropped_entries(keys, 2, 96, 0.3), 0.0, x))
    finally:
        torch.set_num_threads(before)


def two_job_layer(kernels: str = "torch") -> tuple[MultiAdapterLinear, torch.Tensor]:
    """A frozen [48, 64] linear with two LoRA jobs of different dropout on segments of one microbatch."""
    from lorafusion.adapters.lora.layer import LoRALayer

    class Base(torch.nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

        def forward(self, x):
            return x @ self.weight.t(), None

    gen = torch.Generator().manual_seed(0)
    k, n = 64, 48
    layer = MultiAdapterLinear(Base(torch.randn(n, k, generator=gen)), {"q_proj": torch.arange(n)}, AdapterBatch(),
                               site_id=9, kernels=kernels)
    for job, p in (("a", 0.1), ("b", 0.4)):
        lora = LoRALayer(lf.LoRAConfig(rank=4, alpha=8, dropout=p), k, n, generator=gen)
        with torch.no_grad():
            lora.lora_B.copy_(torch.randn(n, 4, generator=gen))
        layer.add_adapter(job, "q_proj", lora)
    layer.batch.segments = [Segment("a", 0, 70, ((0, 30, 11), (30, 70, 12))), Segment("b", 70, 100, ((70, 100, 13),))]
    layer.train()
    return layer, torch.randn(100, k, generator=gen)


def test_layer_output_and_gradients_are_the_same_native_or_torch(mode, monkeypatch):
    """Forward, the input's gradient and every factor's gradient are bit-identical with run.native_ops on and off,
    and 'on' really takes the native ops (both of them), 'off' never."""
    calls = []
    for name in ("dropout_zeroed", "dropout_add_kept_"):
        monkeypatch.setattr(native, name, lambda *a, _f=getattr(native, name), _n=name: calls.append(_n) or _f(*a))
    results = {}
    for value in ("on", "off"):
        mode(value)
        calls.clear()
        layer, x = two_job_layer()
        x.requires_grad_(True)
        out, _ = layer(x)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        for job in ("a", "b"):
            layer.collect_grads(job)
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        results[value] = (out.detach(), x.grad, *grads)
        assert sorted(set(calls)) == ([] if value == "off" else ["dropout_add_kept_", "dropout_zeroed"])
    for on, off in zip(results["on"], results["off"]):
        assert torch.equal(bits(on), bits(off))


def test_segment_dropout_takes_torch_where_the_native_op_cannot(native_cpu):
    """float64, a strided input or out: the torch ops, with the same mask (the native ops would raise on each, see
    below); the native ops' own checks name the argument that is wrong."""
    keys = keys_of(20, seed=3)
    drop = SegmentDropout(keys, 1, 32, 0.5)
    x = torch.randn(20, 32, dtype=torch.float64)
    assert torch.equal(drop.zeroed(x), torch.where(dropped_entries(keys, 1, 32, 0.5), 0.0, x))
    wide = torch.randn(20, 64)
    assert torch.equal(drop.zeroed(wide[:, ::2]), torch.where(drop.mask(), 0.0, wide[:, ::2]))
    out = torch.zeros(20, 64)[:, :32]
    drop.add_kept_(out, torch.ones(20, 32))
    assert torch.equal(out, (~drop.mask()).float())
    args = (_column_keys(16, keys.device), _site_key(1), drop_threshold(0.5))
    with pytest.raises(RuntimeError, match="keys must be a contiguous int64 .rows. tensor with one key per row .19."):
        native.dropout_zeroed(torch.randn(19, 32), keys, *args)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Double"):
        native.dropout_zeroed(x, keys, *args)
    with pytest.raises(RuntimeError, match="column_keys must be .* one key per pair of columns .8."):
        native.dropout_zeroed(torch.randn(20, 16), keys, *args)
    with pytest.raises(RuntimeError, match="threshold must lie in"):
        native.dropout_zeroed(torch.randn(20, 32), keys, args[0], args[1], 1 << 16)


def fit_lora(checkpoint, data, out, native_ops: str) -> dict[str, torch.Tensor]:
    from lorafusion.adapter_io import read_peft_adapter

    job = lf.JobSpec(name="l", dataset=str(data), global_batch_size=4, learning_rate=1e-2, max_steps=2, seed=4,
                     adapter=lf.LoRAConfig(rank=2, alpha=4, dropout=0.3, target_modules=["q_proj", "down_proj"]))
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(out), progress=False, engine="local",
                       dtype="float32", native_ops=native_ops)
    result = lf.fit([job], run)
    assert result["l"].status == "finished", result["l"].error
    return read_peft_adapter(out / "l" / "adapter")[1]


def test_lora_fit_with_dropout_gives_the_same_adapter_native_or_torch(mode, train_checkpoint, examples_data,
                                                                    tmp_path, monkeypatch):
    """run.native_ops reaches the stage worker: 'on' draws every mask natively, 'off' never, same adapter bits."""
    calls = {"on": 0, "off": 0}
    adapters = {}
    zeroed = native.dropout_zeroed
    for value in calls:  # the fit's stage worker sets run.native_ops; the `mode` fixture sets 'auto' again
        def counted(*args, _value=value):
            calls[_value] += 1
            return zeroed(*args)

        monkeypatch.setattr(native, "dropout_zeroed", counted)
        adapters[value] = fit_lora(train_checkpoint, examples_data / "arith.jsonl", tmp_path / value, value)
    assert calls["on"] > 0 and calls["off"] == 0, calls
    on, off = adapters["on"], adapters["off"]
    assert on.keys() == off.keys() and on
    for key in on:
        assert torch.equal(on[key], off[key]), key


def test_the_stage_worker_builds_them_before_training_on_cpu_only(monkeypatch):
    """configure() is the stage worker's call before training: 'auto' builds (or loads) the ops there on a CPU, whose
    every step draws dropout through them, but not on a GPU (SHiRA builds them on first use); 'on' checks anywhere,
    'off' never builds."""
    asked = []
    monkeypatch.setattr(native, "available", lambda device: asked.append(torch.device(device).type) or True)
    monkeypatch.setitem(native._state, "mode", native._state["mode"])  # restored after the test
    for value, device in (("auto", "cpu"), ("auto", "cuda"), ("on", "cuda"), ("off", "cpu")):
        native.configure(value, device)
    assert asked == ["cpu", "cuda"]
