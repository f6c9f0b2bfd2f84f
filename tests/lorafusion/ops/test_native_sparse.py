"""csrc/'s native sparse ops (SHiRA) against dense float64 formulas written here, native vs the torch fallback, the
switching round trip, a SHiRA fit with run.native_ops on and off, and the fallback when no build is possible.

The build runs once per test session (the `native_cpu` fixture, into the shared cache directory); where a C++
compiler is on PATH (CI has g++) a failed build fails the tests instead of skipping them.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import lorafusion as lf
from lorafusion.adapters.shira.config import SHiRAConfig
from lorafusion.adapters.shira.layer import SHiRALayer
from lorafusion.adapters.shira.switch import restore_entries, switch_entries, switched
from lorafusion.ops import native

# dtype -> (atol relative to the largest |reference|, rtol) of an output against float64 on the same inputs.
OUTPUT_TOLERANCES = {
    # fp32 accumulation in another order than the reference's: a few fp32 ulps grown by sums of ≤ ~100 terms.
    torch.float32: (1e-6, 1e-5),
    # One rounding of the fp32 sum to bf16: half an ulp, which is at most 2^-8 of the value (bf16 keeps 7 bits
    # after the leading one, so an ulp is 2^-8 to 2^-7 of a value in its binade).
    torch.bfloat16: (1e-5, 2 ** -8),
}
# Native against fallback: both round an fp32 sum (summed in different orders) once, so a sum near a rounding
# boundary may round up in one and down in the other: one ulp apart, at most 2^-7 of the value in bf16.
BETWEEN_PATHS_TOLERANCES = {torch.float32: OUTPUT_TOLERANCES[torch.float32], torch.bfloat16: (1e-5, 2 ** -7)}
# The values' gradient is fp32 whatever the activations' dtype: bf16 inputs are exact in fp32, so fp32's bound.
DV_TOLERANCE = OUTPUT_TOLERANCES[torch.float32]


def close(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: tuple[float, float]) -> None:
    atol, rtol = tolerance
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    bad = (actual - expected).abs() > atol * scale + rtol * expected.abs()
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} differ beyond atol={atol}·{scale:.3g}, "
                           f"rtol={rtol}; first at {bad.nonzero()[:3].tolist()}")


def sparse_layer(out_features: int, in_features: int, flat: torch.Tensor, seed: int) -> SHiRALayer:
    """A SHiRA layer on the given support (ascending flat indices row·in + col) with random values."""
    layer = SHiRALayer(SHiRAConfig(rank=1, target_modules=["q_proj"]), in_features, out_features,
                       generator=torch.Generator())
    layer.shira_weight = nn.Parameter(torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed)))
    layer._set_support(flat)
    return layer


def support(case: str, n: int, k: int) -> torch.Tensor:
    """Ascending, duplicate-free flat indices of one support shape."""
    gen = torch.Generator().manual_seed(len(case))
    if case == "random":
        return torch.randperm(n * k, generator=gen)[: n * k // 7].sort().values
    if case == "empty_rows":  # rows 0, 2, 4, ... hold nothing; column k - 1 is full
        rows = torch.arange(1, n, 2)
        return torch.cat([rows * k + (k - 1), rows * k + rows % k]).unique()
    if case == "one_entry":
        return torch.tensor([(n // 2) * k + k // 3])
    return torch.empty(0, dtype=torch.int64)  # "empty": nnz = 0


def dense(layer: SHiRALayer) -> torch.Tensor:
    """ΔW [N, K] in float64, from the support and values (the test's own formula)."""
    w = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    w.view(-1)[layer.rows * layer.in_features + layer.cols] = layer.shira_weight.detach().double()
    return w


def run_layer(layer: SHiRALayer, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    layer.shira_weight.grad = None
    y = layer.forward_delta(x)
    y.backward(dy)
    return y, x.grad, layer.shira_weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case,tokens,n,k", [("random", 37, 29, 23), ("random", 1, 29, 23), ("random", 0, 13, 11),
                                             ("empty_rows", 19, 31, 17), ("one_entry", 5, 7, 11),
                                             ("empty", 6, 5, 3), ("random", 70, 64, 96),
                                             ("random", 33, 300, 400)])  # dv: several entry chunks, column blocks
def test_native_and_fallback_match_dense_formulas(mode, case, tokens, n, k, dtype):
    """y = x ΔWᵀ, dx = dy ΔW and dv_k = Σ_t dy[t, row_k] x[t, col_k], both paths against float64 on the same
    (rounded) inputs, and against each other; odd shapes, T = 1, T = 0, empty rows, one entry, nnz = 0."""
    layer = sparse_layer(n, k, support(case, n, k), seed=tokens)
    gen = torch.Generator().manual_seed(n + k)
    x, dy = torch.randn(tokens, k, generator=gen).to(dtype), torch.randn(tokens, n, generator=gen).to(dtype)
    w = dense(layer)
    want = (x.double() @ w.t(), dy.double() @ w, (dy.double().t() @ x.double())[layer.rows, layer.cols])
    got = {}
    for value in ("on", "off"):
        mode(value)
        got[value] = run_layer(layer, x, dy)
        tolerances = (OUTPUT_TOLERANCES[dtype], OUTPUT_TOLERANCES[dtype], DV_TOLERANCE)
        for name, a, b, tol in zip(("y", "dx", "dv"), got[value], want, tolerances):
            assert a.dtype == (dtype if name != "dv" else torch.float32), f"{value} {name}: dtype {a.dtype}"
            close(f"native_ops={value}: {name}", a, b, tol)
    for name, a, b in zip(("y", "dx"), got["on"][:2], got["off"][:2]):
        close(f"native vs fallback: {name}", a, b, BETWEEN_PATHS_TOLERANCES[dtype])


@pytest.fixture
def threads():
    """Sets torch's thread count for the test (the native kernels read it per call); the old count afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_regrouped_product_over_bands_blocks_tiles_and_thread_counts(mode, threads):
    """y and dx at 130 tokens (5 token tiles, the last of 2 tokens: the kernel regroups S by row band and column
    block) on a 2100 × 4100 support with empty rows (forward: 9 bands, 3 column blocks; dx: 17 bands, 2 blocks),
    with 1 thread (parallel over tiles) and 8 (over bands within each tile): against float64, bit for bit across
    the thread counts, and bit for bit against the direct CSR products of 32-, 5- and 1-token segments. dv's bits
    do not depend on the thread count either (its entries are chunked per thread)."""
    n, k, tokens = 2100, 4100, 130
    gen = torch.Generator().manual_seed(3)
    flat = torch.randperm(n * k, generator=gen)[: n * k // 50].sort().values
    flat = flat[(flat // k) % 7 != 3]  # every 7th row empty
    layer = sparse_layer(n, k, flat, seed=4)
    x, dy = torch.randn(tokens, k, generator=gen), torch.randn(tokens, n, generator=gen)
    values = layer.shira_weight.detach()
    w = dense(layer)
    got = {}
    for count in (1, 8):
        threads(count)
        got[count] = (native.sparse_forward(x, layer.crow, layer.cols, values),
                      native.sparse_backward_input(dy, layer.t_crow, layer.t_cols, values[layer.t_perm]),
                      native.sparse_backward_values(dy, x, layer.rows, layer.cols))
    y, dx, dv = got[1]
    close("y", y, x.double() @ w.t(), OUTPUT_TOLERANCES[torch.float32])
    close("dx", dx, dy.double() @ w, OUTPUT_TOLERANCES[torch.float32])
    close("dv", dv, (dy.double().t() @ x.double())[layer.rows, layer.cols], DV_TOLERANCE)
    for name, a, b in zip(("y", "dx", "dv"), got[1], got[8]):
        assert torch.equal(a, b), f"{name} differs between 1 and 8 threads"
    for head in (32, 5, 1):  # one 32-token tile; segments of a few tokens (tiles one register wide)
        assert torch.equal(native.sparse_forward(x[:head].contiguous(), layer.crow, layer.cols, values), y[:head])
        assert torch.equal(native.sparse_backward_input(dy[:head].contiguous(), layer.t_crow, layer.t_cols,
                                                        values[layer.t_perm]), dx[:head])


def test_native_path_is_the_one_taken(mode, monkeypatch):
    """With native_ops 'on' the layer calls the native ops; with 'off' it never does."""
    calls = []
    for name in ("sparse_forward", "sparse_backward_input", "sparse_backward_values"):
        monkeypatch.setattr(native, name, lambda *a, _f=getattr(native, name), _n=name: calls.append(_n) or _f(*a))
    layer = sparse_layer(9, 8, support("random", 9, 8), seed=1)
    mode("off")
    run_layer(layer, torch.randn(4, 8), torch.randn(4, 9))
    assert calls == []
    mode("on")
    run_layer(layer, torch.randn(4, 8), torch.randn(4, 9))
    assert sorted(calls) == ["sparse_backward_input", "sparse_backward_values", "sparse_forward"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapters", [1, 16])
def test_switch_round_trip_is_bit_exact(mode, adapters, dtype):
    """W + Σ ΔW of one or 16 adapters (random supports that overlap between adapters): native and torch paths give
    the same bits, within one rounding per addition of the float64 sum, and W's exact bits come back."""
    gen = torch.Generator().manual_seed(adapters)
    original = torch.randn(37, 53, generator=gen).to(dtype)
    supports = [torch.randperm(original.numel(), generator=gen)[:300] for _ in range(adapters)]
    index, values = torch.cat(supports), torch.randn(300 * adapters, generator=gen)
    assert index.unique().numel() < index.numel() or adapters == 1  # overlapping supports when many
    want = original.double().view(-1).index_add(0, index, values.double()).view_as(original)
    # each addition rounds once (half an ulp of the running value, ≤ 2^-9 of the largest for bf16)
    ulp = 2 ** -9 if dtype == torch.bfloat16 else 2 ** -24
    switched_bits = {}
    for path in ("on", "off"):
        mode(path)
        weight = original.clone()
        saved = switch_entries(weight, index, values)
        assert torch.equal(bits(saved), bits(original.view(-1)[index]))
        close(f"{path}: switched weight", weight, want, (2 * adapters * ulp, 2 * ulp))
        switched_bits[path] = bits(weight).clone()
        restore_entries(weight, index, saved)
        assert torch.equal(bits(weight), bits(original)), f"{path}: not restored bit-exactly"
    assert torch.equal(switched_bits["on"], switched_bits["off"])


def fit_shira(checkpoint, data, out, native_ops: str) -> dict[str, torch.Tensor]:
    from lorafusion.adapter_io import read_peft_adapter

    job = lf.JobSpec(name="s", dataset=str(data), global_batch_size=4, learning_rate=1e-2, max_steps=2, seed=4,
                     adapter=lf.SHiRAConfig(rank=2, mask_seed=7, target_modules=["q_proj", "v_proj", "down_proj"]))
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(out), progress=False, engine="local",
                       dtype="float32", native_ops=native_ops)
    result = lf.fit([job], run)
    assert result["s"].status == "finished", result["s"].error
    return read_peft_adapter(out / "s" / "adapter")[1]


def test_shira_fit_gives_the_same_adapter_with_native_ops_on_and_off(mode, train_checkpoint, examples_data, tmp_path):
    """The run field reaches the stage worker; both fits give one adapter (fp32, ≤ 1e-5 relative), and
    lf.evaluate of it (the base model with the delta switched in) gives the unswitched path's loss."""
    from lorafusion.adapters.attach import ModelAdapters
    from lorafusion.adapter_io import read_peft_adapter
    from lorafusion.data import load_dataset, load_tokenizer
    from lorafusion.evaluate import evaluate_samples
    from lorafusion.models import build_model

    data = examples_data / "arith.jsonl"
    on, off = (fit_shira(train_checkpoint, data, tmp_path / value, value) for value in ("on", "off"))
    assert on.keys() == off.keys()
    for key in on:
        if key.endswith("shira_weight"):
            assert off[key].abs().max() > 1e-3, f"{key} stayed ~0; the comparison would be vacuous"
            close(key, on[key], off[key], (1e-5, 0.0))
        else:
            assert torch.equal(on[key], off[key]), key
    mode("auto")
    switched_loss = lf.evaluate(train_checkpoint, tmp_path / "on" / "s" / "adapter", data, dtype="float32").loss
    model, arch = build_model(train_checkpoint)
    adapters = ModelAdapters(model, arch)
    config, tensors = read_peft_adapter(tmp_path / "on" / "s" / "adapter")
    adapters.add_job("eval", config, seed=0)
    adapters.load_peft_state_dict("eval", tensors, where="test")
    samples = load_dataset(data, load_tokenizer(train_checkpoint), max_seq_len=4096, overflow="reject")
    unswitched = evaluate_samples(model, samples, job="eval", batch=adapters.batch).loss
    assert switched_loss == pytest.approx(unswitched, rel=1e-5)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with switched(adapters, ["eval"]):
        assert evaluate_samples(model, samples, job=None).loss == pytest.approx(unswitched, rel=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters()), "weights not restored exactly"


@pytest.mark.parametrize("compiler,reason", [("/nonexistent/c++", "no C++ compiler"),
                                             ("false", "building csrc/ failed")])
def test_without_a_build_one_notice_and_the_fallback(monkeypatch, tmp_path, compiler, reason):
    """No compiler, or a compiler that fails: one RuntimeWarning per process, the torch path computes, 'on' is a
    clear error; nothing raises at import or in 'auto'."""
    monkeypatch.setattr(native, "_state", {"devices": None, "error": None, "mode": "auto"})
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("LORAFUSION_CACHE", str(tmp_path))
    layer = sparse_layer(9, 8, support("random", 9, 8), seed=2)
    x = torch.randn(3, 8, dtype=torch.float64).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = layer.forward_delta(x)
        assert not native.available("cpu")
    notices = [w for w in caught if issubclass(w.category, RuntimeWarning) and "native" in str(w.message)]
    assert len(notices) == 1 and reason in str(notices[0].message), [str(w.message) for w in notices]
    close("fallback y", y, x.double() @ dense(layer).t(), OUTPUT_TOLERANCES[torch.float32])
    with pytest.raises(RuntimeError, match=f"native_ops=.on.*{re.escape(reason)}"):
        native.configure("on", "cpu")


def test_run_native_ops_is_validated():
    for value in ("auto", "on", "off"):
        assert lf.RunConfig(base_model="m", output_dir="o", native_ops=value).native_ops == value
    with pytest.raises(ValueError, match=r"run.native_ops='yes'.*'auto', 'on', 'off'"):
        lf.RunConfig(base_model="m", output_dir="o", native_ops="yes")
