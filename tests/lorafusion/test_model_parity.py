"""HF fidelity of the base model (DESIGN promise 5) and packed rows (no attention across samples)."""

from __future__ import annotations

import pytest
import torch

from lorafusion.batching import build_microbatch
from lorafusion.data import IGNORE_INDEX, Sample
from lorafusion.models import build_model

ATOL = 1e-4  # fp32, DESIGN promise 5
VOCAB = 259  # byte-level tokenizer of the tiny checkpoints


def _sample(ids: list[int]) -> Sample:
    return Sample(input_ids=tuple(ids), labels=(IGNORE_INDEX,) * len(ids), source="test")


def _random_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=generator).tolist()


@torch.no_grad()
def _packed_logits(model: torch.nn.Module, rows: list[list[int]]) -> list[torch.Tensor]:
    """Logits of each row when all rows are packed into one microbatch ([len, V] each)."""
    mb = build_microbatch([("job", _sample(ids)) for ids in rows])
    logits = model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params())[0]
    bounds = mb.cu_seqlens.tolist()
    return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@torch.no_grad()
def _single_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    tokens = torch.tensor([ids])
    return model(tokens, torch.arange(len(ids)).unsqueeze(0), None)[0]  # [len, V]


@pytest.fixture(scope="module")
def models(tiny_checkpoints) -> dict:
    built = {}
    for name, path in tiny_checkpoints.items():
        model, arch = build_model(path, dtype=torch.float32)
        built[name] = (model.eval(), arch)
    return built


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers(family, tiny_checkpoints, parity_specs, models, load_hf_model):
    spec = parity_specs[family]
    model, arch = models[family]
    # The checkpoint really exercises what the parity is meant to cover.
    assert arch.num_kv_heads < arch.num_heads
    assert arch.tie_word_embeddings == spec.tie_word_embeddings
    assert arch.rope_theta == spec.rope_theta
    assert arch.qkv_bias == (family == "qwen2")

    hf = load_hf_model(tiny_checkpoints[family])
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 37))  # [b, s]
    with torch.no_grad():
        ours = model(ids, torch.arange(37).expand(2, 37), None)  # [b, s, V]
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape == (2, 37, VOCAB)
    assert theirs.std() > 0.5, "logits are near-constant; the parity check would be vacuous"
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"{family}: max |ours - transformers| = {diff:.3e} > {ATOL}"


def test_tied_and_untied_output_layers_load_the_right_matrix(models):
    """With tied embeddings the output layer is the embedding; untied checkpoints have their own head."""
    tied, _ = models["qwen2"]
    untied, _ = models["llama"]
    assert torch.equal(tied.shared_embedding_or_output_weight(), tied.embedding.word_embeddings.weight)
    assert not torch.equal(untied.output_layer.weight, untied.embedding.word_embeddings.weight)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_packed_row_equals_separate_forwards(family, models, load_hf_model, tiny_checkpoints):
    model, _ = models[family]
    generator = torch.Generator().manual_seed(1)
    rows = [_random_ids(generator, n) for n in (7, 19, 12)]
    packed = _packed_logits(model, rows)
    hf = load_hf_model(tiny_checkpoints[family])
    for i, ids in enumerate(rows):
        alone = _single_logits(model, ids)
        diff = (packed[i] - alone).abs().max().item()
        assert diff <= ATOL, f"sample {i} (len {len(ids)}): packed vs alone differ by {diff:.3e}"
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0]
        diff = (packed[i] - theirs).abs().max().item()
        assert diff <= ATOL, f"sample {i} (len {len(ids)}): packed vs transformers differ by {diff:.3e}"


def test_no_attention_across_samples(models):
    """Changing one sample's tokens leaves its neighbours' logits (before and after it) unchanged."""
    model, _ = models["llama"]
    generator = torch.Generator().manual_seed(2)
    first, middle, last = (_random_ids(generator, n) for n in (9, 14, 11))
    changed = [(t + 1 + i) % VOCAB for i, t in enumerate(middle)]  # every token different
    before = _packed_logits(model, [first, middle, last])
    after = _packed_logits(model, [first, changed, last])
    assert (before[1] - after[1]).abs().max() > 1e-2, "the edited sample itself should change"
    # Exact equality is not required (a different batch may reorder reductions), a leak would be O(1).
    for i in (0, 2):
        diff = (before[i] - after[i]).abs().max().item()
        assert diff <= 1e-6, f"sample {i} changed by {diff:.3e} when its neighbour's tokens changed"


def test_positions_restart_per_sample(models):
    """A sample's logits do not depend on where in the packed row it sits (RoPE restarts per sample)."""
    model, _ = models["mistral"]
    generator = torch.Generator().manual_seed(3)
    a, b = _random_ids(generator, 10), _random_ids(generator, 16)
    ab = _packed_logits(model, [a, b])
    ba = _packed_logits(model, [b, a])
    assert (ab[1] - ba[0]).abs().max() <= ATOL
    assert (ab[0] - ba[1]).abs().max() <= ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_node_is_megatrons_glu_bit_for_bit(dtype, models):
    """Our one-node SwiGLU against megatron's unfused silu(gate) * (up + 0) chain: output and gradient, bit for bit
    (odd widths, a batch dimension); and the built model's MLP runs it."""
    import torch.nn.functional as F

    from lorafusion.models.swiglu import SwiGLU, swiglu

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 3, 2 * 13, generator=gen) * 4).to(dtype).requires_grad_()
    dy = torch.randn(5, 3, 13, generator=gen).to(dtype)
    got = swiglu(x)
    (got_dx,) = torch.autograd.grad(got, x, dy)
    gate, up = torch.chunk(x, 2, dim=-1)
    want = F.silu(gate) * (up + 0.0)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    assert torch.equal(got, want) and torch.equal(got_dx, want_dx)
    model, _ = models["llama"]
    assert isinstance(model.decoder.layers[0].mlp.activation_func, SwiGLU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_node_is_torchs_rmsnorm(dtype, models):
    """Our one-node RMSNorm against torch.nn.RMSNorm (what megatron's local spec builds): the output bit for bit,
    the input's and the weight's gradients to the dtype's rounding of the exact (float64) ones, as torch's own are;
    and the built model uses it in all three norm slots."""
    from lorafusion.models.rmsnorm import RMSNorm, rms_norm

    gen = torch.Generator().manual_seed(5)
    hidden = 37
    reference = torch.nn.RMSNorm(hidden, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = (torch.randn(6, 2, hidden, generator=gen) * 3).to(dtype).requires_grad_()
    dy = torch.randn(6, 2, hidden, generator=gen).to(dtype)
    got = rms_norm(x, reference.weight, 1e-5)
    got_dx, got_dw = torch.autograd.grad(got, (x, reference.weight), dy)
    want = reference(x)
    want_dx, want_dw = torch.autograd.grad(want, (x, reference.weight), dy)
    assert torch.equal(got, want)
    x64, w64 = x.detach().double().requires_grad_(), reference.weight.detach().double().requires_grad_()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    exact_dx, exact_dw = torch.autograd.grad(exact, (x64, w64), dy.double())
    for name, ours, torchs, truth in (("dx", got_dx, want_dx, exact_dx), ("dw", got_dw, want_dw, exact_dw)):
        scale = truth.abs().max().item()
        # within twice torch's own error (and a few ulps of the dtype) of the exact gradient
        bound = 2 * (torchs.double() - truth).abs().max().item() + 4 * torch.finfo(dtype).eps * scale
        assert (ours.double() - truth).abs().max().item() <= bound, name
    # a frozen weight: no weight gradient is computed
    frozen = reference.weight.detach()
    (dx_only,) = torch.autograd.grad(rms_norm(x, frozen, 1e-5), x, dy)
    assert torch.equal(dx_only, got_dx)
    model, _ = models["llama"]
    layer = model.decoder.layers[0]
    assert all(isinstance(norm, RMSNorm) for norm in (layer.input_layernorm, layer.pre_mlp_layernorm,
                                                      model.decoder.final_layernorm))
    # what it does not compute is refused, as megatron's torch norm refuses it
    from types import SimpleNamespace

    plain = dict(layernorm_zero_centered_gamma=False, sequence_parallel=False, normalization="RMSNorm",
                 params_dtype=dtype)
    assert RMSNorm(SimpleNamespace(**plain), hidden).weight.dtype == dtype
    for field, value in (("layernorm_zero_centered_gamma", True), ("sequence_parallel", True),
                         ("normalization", "LayerNorm")):
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            RMSNorm(SimpleNamespace(**{**plain, field: value}), hidden)
