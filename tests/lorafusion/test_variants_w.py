"""The identities of the variants whose update depends on the frozen W or is high-rank (PaCA, LoLDU, Hydra, TeRA):
each checked against maths written here, beside the shared matrix in test_variants.py (forward, every gradient,
export → PEFT)."""

from __future__ import annotations

import json

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters import get_variant
from lorafusion.adapters.base import BaseView
from lorafusion.adapters.loldu import ldu_factors
from lorafusion.adapter_io import read_peft_adapter, write_peft_adapter

from test_variants import _ids, _our_logits, _ours, perturb

peft = pytest.importorskip("peft")


class _Stub(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight, requires_grad=False), None


def _layer(config, weight: torch.Tensor, seed: int = 0, shared=None, layer_index: int = 0, target: str = "q_proj"):
    """A variant's layer on a module of weight W [N, K] (its rows all of the module)."""
    spec = get_variant(config.type)
    out, inp = weight.shape
    if shared is None and spec.shared_cls is not None:
        shared = spec.shared_cls(config, {target: (out, inp)}, 2, seed)
    return spec.layer_cls(config, inp, out, generator=torch.Generator().manual_seed(seed),
                          base=BaseView(_Stub(weight), torch.arange(out)), shared=shared,
                          layer_index=layer_index, target=target)


def _dense_delta(layer) -> torch.Tensor:
    """ΔW [N, K] read off the layer's own forward: forward_delta(I) = I ΔWᵀ."""
    with torch.no_grad():
        return layer.forward_delta(torch.eye(layer.in_features)).t()


# ---------------------------------------------------------------- PaCA


def test_paca_updates_r_columns_with_the_gradient_of_w_eff_and_exports_one_hot():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=gen)
    layer = _layer(lf.PaCAConfig(rank=4, alpha=8), w)
    perturb([layer.paca_P], seed=1, std=0.3)
    delta = _dense_delta(layer)
    columns = delta.abs().sum(0).nonzero().flatten()
    assert torch.equal(columns, layer.paca_idx) and len(columns) == 4  # non-zero in exactly r columns
    assert len(set(layer.paca_idx.tolist())) == 4

    # the gradient of P and x: autograd through W_eff, W with the columns idx replaced by s·P (s = 2)
    x = torch.randn(7, 20, generator=gen, requires_grad=True)
    dy = torch.randn(7, 12, generator=gen)
    (x @ w.t() + layer.forward_delta(x)).backward(dy)
    ours = (x.grad.clone(), layer.paca_P.grad.clone())
    x.grad = None
    p = layer.paca_P.detach().clone().requires_grad_()
    w_eff = w.clone()
    w_eff[:, layer.paca_idx] = 2.0 * p
    (x @ w_eff.t()).backward(dy)
    torch.testing.assert_close(ours[0], x.grad)
    torch.testing.assert_close(ours[1], p.grad)

    export = layer.peft_tensors()  # lora_alpha = r: scale 1
    a, b = export["lora_A.weight"], export["lora_B.weight"]
    assert torch.equal(a.sum(1), torch.ones(4)) and torch.equal(a.argmax(1), layer.paca_idx)
    torch.testing.assert_close(b @ a, w_eff.detach() - w)
    assert layer.config.export_config().scaling == 1.0


def test_paca_backward_keeps_only_the_chosen_columns_of_x():
    layer = _layer(lf.PaCAConfig(rank=3), torch.randn(64, 256))
    x = torch.randn(50, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer.forward_delta(x)
    assert all(t.shape[0] != 50 or t.shape[1] == 3 for t in saved if t.dim() == 2)  # x_idx [T, r], never x [T, K]
    assert sum(t.numel() for t in saved) <= 50 * 3 + 64 * 3 + 3


def test_paca_columns_come_from_the_layer_generator_not_the_global_rng():
    w = torch.randn(8, 30)
    torch.manual_seed(1)
    first = _layer(lf.PaCAConfig(rank=5), w, seed=4).paca_idx
    torch.manual_seed(2)
    assert torch.equal(_layer(lf.PaCAConfig(rank=5), w, seed=4).paca_idx, first)
    assert not torch.equal(_layer(lf.PaCAConfig(rank=5), w, seed=5).paca_idx, first)


# ---------------------------------------------------------------- LoLDU


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24)])
def test_loldu_factors_rebuild_w_and_start_from_the_base(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    full = min(shape)
    pl, u, z0 = ldu_factors(w, full)  # all of the LDU: P L diag(D) U == W
    torch.testing.assert_close(pl @ torch.diag(z0) @ u, w, atol=1e-6, rtol=1e-6)
    assert torch.equal(u.diagonal(), torch.ones(full))  # unit upper triangular
    assert torch.equal(u.tril(-1), torch.zeros_like(u.tril(-1)))

    layer = _layer(lf.LoLDUConfig(rank=3, alpha=6), w)
    assert torch.equal(layer.delta_weight(), torch.zeros(shape))  # the initial function is the base's
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["loldu_z"]
    perturb([layer.loldu_z], seed=1)
    s, r = 6 / 3, 3  # alpha / rank
    want = s * pl[:, :r] @ torch.diag(layer.loldu_z.detach() - z0[:r]) @ u[:r]  # s·P L_r diag(z − z₀) U_r, from W's LDU
    torch.testing.assert_close(layer.delta_weight(), want, atol=1e-6, rtol=1e-5)
    export = layer.peft_tensors()
    assert layer.config.export_config().scaling == s
    torch.testing.assert_close(s * export["lora_B.weight"] @ export["lora_A.weight"], want, atol=1e-6, rtol=1e-5)


def test_loldu_only_z_trains_and_its_frozen_factors_are_job_state(tiny_checkpoints):
    _, adapters = _ours(tiny_checkpoints["llama"])
    adapters.add_job("job", lf.LoLDUConfig(rank=2, target_modules=["q_proj", "down_proj"]), seed=0)
    assert {n.rsplit(".", 1)[-1] for n in adapters.named_parameters("job")} == {"loldu_z"}
    assert {n.rsplit(".", 1)[-1] for n in adapters.named_parameters("job", frozen=True)} == {
        "loldu_z", "loldu_z0", "loldu_PL", "loldu_U"}


def test_loldu_rejects_a_zero_pivot():
    w = torch.randn(6, 6)
    w[:, :2] = 0.0  # the first two columns are zero: no pivot there
    with pytest.raises(ValueError, match=r"adapter.rank=2: the LU of this 6×6 weight has a zero pivot"):
        _layer(lf.LoLDUConfig(rank=2), w)


# ---------------------------------------------------------------- Hydra


def test_hydra_exports_rank_2r_with_the_sequential_branch_through_w():
    w = torch.randn(10, 14, generator=torch.Generator().manual_seed(2))
    layer = _layer(lf.HydraConfig(rank=3, alpha=6), w)
    assert torch.equal(layer.delta_weight(), torch.zeros(10, 14))  # zero up-projections
    perturb(list(layer.parameters()), seed=3)
    export = layer.peft_tensors()
    a, b = export["lora_A.weight"], export["lora_B.weight"]
    assert a.shape == (6, 14) and b.shape == (10, 6)
    torch.testing.assert_close(a, torch.cat([layer.hydra_A_p, layer.hydra_A_s @ w]).detach())
    delta = 2.0 * (layer.hydra_B_p @ layer.hydra_A_p + layer.hydra_B_s @ layer.hydra_A_s @ w)
    export_config = layer.config.export_config()
    assert (export_config.rank, export_config.scaling) == (6, 2.0)
    torch.testing.assert_close(export_config.scaling * b @ a, delta.detach())


# ---------------------------------------------------------------- TeRA


def test_tera_update_is_high_rank_from_few_trainable_values():
    layer = _layer(lf.TeRAConfig(rank=16), torch.zeros(256, 256))
    perturb(list(layer.parameters()), seed=0, std=1.0)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == 4 * 16
    # modes 16·16: rank up to 16² = 256; counted in float64 on the (fp32) factors, through Kronecker products
    core, factors = layer.shared.factors(256, 256)
    f1, f2, f3, f4 = (u.double() * getattr(layer, f"tera_lambda_{m}").detach().double()
                      for m, u in enumerate(factors))
    dense = torch.kron(f1, f2) @ core.double().reshape(256, 256) @ torch.kron(f3, f4).t()
    assert torch.linalg.matrix_rank(dense).item() == 256
    torch.testing.assert_close(layer.delta_weight().double(), dense / 16, atol=1e-6, rtol=1e-5)
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer.forward_delta(x), x @ layer.delta_weight().t(), atol=1e-5, rtol=1e-5)


def test_tera_factors_are_shared_across_layers_and_regenerate_from_the_seed(tiny_checkpoints):
    config = lf.TeRAConfig(rank=4, projection_seed=6, target_modules=["q_proj", "o_proj", "gate_proj"])
    _, adapters = _ours(tiny_checkpoints["llama"])
    adapters.add_job("job", config, seed=0)
    layers = dict(adapters._job_layers("job"))
    q0, q1 = (layers[f"base_model.model.model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
    o0 = layers["base_model.model.model.layers.0.self_attn.o_proj"]
    for a, b in zip(q0.shared.factors(64, 64)[1], o0.shared.factors(64, 64)[1]):  # one set for one shape
        assert a is b
    assert q0.shared is q1.shared
    assert len(list(q0.shared.buffers())) == 2 * 5  # (64×64, 128×64) × (core + 4 factors)

    _, other = _ours(tiny_checkpoints["llama"])
    other.add_job("job", lf.TeRAConfig(rank=4, projection_seed=6, target_modules=["gate_proj"]), seed=9)
    again = other.shared["job"].factors(128, 64)
    mine = adapters.shared["job"].factors(128, 64)
    assert all(torch.equal(x, y) for x, y in zip([again[0], *again[1]], [mine[0], *mine[1]]))
    other.remove_job("job")
    other.add_job("job", lf.TeRAConfig(rank=4, projection_seed=7, target_modules=["gate_proj"]), seed=0)
    assert not torch.equal(other.shared["job"].factors(128, 64)[0], mine[0])


def test_tera_truncated_export_reports_its_error_and_the_native_files_read_back_exactly(tiny_checkpoints, tmp_path,
                                                                                        load_hf_model):
    checkpoint = tiny_checkpoints["llama"]
    config = lf.TeRAConfig(rank=4, export_rank=3, projection_seed=1, target_modules=["q_proj", "down_proj"])
    model, adapters = _ours(checkpoint)
    adapters.add_job("job", config, seed=0)
    perturb(adapters.parameters("job"), seed=2, std=0.5)
    directory = write_peft_adapter(tmp_path / "adapter", adapters.peft_state_dict("job"), config,
                                   base_model=str(checkpoint))
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "export_report.json", "lorafusion_native.json",
        "lorafusion_native.safetensors"]

    report = json.loads((directory / "export_report.json").read_text())
    assert report["export_rank"] == 3 and len(report["relative_error"]) == 4
    for module, layer in adapters._job_layers("job"):
        sigma = torch.linalg.svdvals(layer.delta_weight().detach().double())
        expected = (sigma[3:].square().sum().sqrt() / sigma.square().sum().sqrt()).item()  # Eckart–Young
        assert report["relative_error"][module] == pytest.approx(expected, rel=1e-4)
        assert 0.05 < expected < 1.0
    assert report["max_relative_error"] == max(report["relative_error"].values())

    again, tensors = read_peft_adapter(directory)
    assert again == config
    fresh_model, fresh = _ours(checkpoint)
    fresh.add_job("job", again, seed=5)
    fresh.load_peft_state_dict("job", tensors)
    ids = _ids()
    ours = _our_logits(model, adapters, "job", ids)
    assert torch.equal(_our_logits(fresh_model, fresh, "job", ids), ours)

    peft_config = json.loads((directory / "adapter_config.json").read_text())
    assert (peft_config["peft_type"], peft_config["r"], peft_config["lora_alpha"]) == ("LORA", 3, 3.0)
    with torch.no_grad():  # PEFT loads the rank-3 LoRA: close to ours, not equal
        theirs = peft.PeftModel.from_pretrained(load_hf_model(checkpoint), str(directory)).eval()(ids).logits
    base = _our_logits(model, adapters, None, ids)
    assert (theirs - ours).abs().max() < (base - ours).abs().max()


def test_a_foreign_native_file_is_an_error(tmp_path, tiny_checkpoints):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "lorafusion_native.json").write_text(json.dumps({"format": "other/9", "adapter": {}}))
    with pytest.raises(ValueError, match=r"lorafusion_native.json: not a lorafusion-native/1 file"):
        read_peft_adapter(directory)
