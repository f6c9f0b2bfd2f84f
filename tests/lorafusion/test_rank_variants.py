"""The identities of the variants that train several ranks at once and export one (DyLoRA, MatryoshkaLoRA) and of
Block-LoRA's reduced export, beyond the shared matrix in test_variants.py: which components get a gradient, a PEFT
export at each rank equal to that rank's forward, the training form as the sum of the nested adapters, DyLoRA's
per-step rank as a function of (seed, step), and evaluation at the export rank beside training's cached factors."""

from __future__ import annotations

import json

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters import AdapterConfig, get_variant
from lorafusion.adapters.dylora import sampled_rank
from lorafusion.adapters.multi import Segment
from lorafusion.adapter_io import write_peft_adapter
from tests.lorafusion.test_variants import LOGITS_ATOL, _ids, _our_logits, _ours, _site, perturb

peft = pytest.importorskip("peft")

SEGMENTS = [Segment("l", 0, 5), Segment("v", 5, 14), Segment("v", 16, 19)]


def _grads(site, params, seed: int = 9) -> list[torch.Tensor]:
    """Every parameter's gradient after one forward and backward of the site in training mode (collected)."""
    site.batch.segments = SEGMENTS
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(19, 1, 36, generator=gen)
    out, _ = site(x)
    out.backward(torch.randn(19, 1, 40, generator=gen))
    for job in ("l", "v"):
        site.collect_grads(job)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("variant", ["dylora", "dylora_unfrozen"])
def test_dylora_trains_only_the_components_of_the_sampled_rank(variant):
    """Frozen mode: only row b of A and column b of B get a gradient; otherwise rows/columns 1..b; never past b."""
    site, shared, _ = _site(variant)
    site.train()
    layers = list(site.adapters["job_v"].values())
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    rank = layers[0].config.rank
    for b in sorted({1, 2, rank}):
        with torch.no_grad():
            shared.dylora_rank.fill_(b)
        grads = _grads(site, params)
        for grad_a, grad_b in zip(grads[::2], grads[1::2]):
            live = [b - 1] if layers[0].config.frozen else list(range(b))
            rows_a = grad_a.abs().sum(1) > 0  # [r]: components of A with a gradient
            cols_b = grad_b.abs().sum(0) > 0
            want = torch.zeros(rank, dtype=torch.bool)
            want[live] = True
            assert torch.equal(rows_a, want) and torch.equal(cols_b, want), (b, rows_a, cols_b)


def _export_logits(checkpoint, load_hf_model, tmp_path, configs: dict[str, AdapterConfig], rank_of):
    """For each job (same seed, same perturbation: the same tensors): (our logits at its rank, PEFT's logits of its
    export, its adapter_config.json). rank_of(job, layers) puts the job's layers at the rank to compare (our model is
    in evaluation mode unless it switches them)."""
    model, adapters = _ours(checkpoint)
    ids, out = _ids(), {}
    for name, config in configs.items():
        adapters.add_job(name, config, seed=3)
        perturb(adapters.parameters(name), seed=4)
        rank_of(name, adapters)
        ours = _our_logits(model, adapters, name, ids)
        directory = write_peft_adapter(tmp_path / name, adapters.peft_state_dict(name), config,
                                       base_model=str(checkpoint))
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(load_hf_model(checkpoint), str(directory)).eval()(ids).logits
        out[name] = (ours, theirs, json.loads((directory / "adapter_config.json").read_text()))
        model.eval()
    return out


def test_dylora_rank_b_exports_give_the_rank_b_training_forward(tiny_checkpoints, load_hf_model, tmp_path):
    """A rank-b export (a LoRA of r = b, lora_alpha = α) loaded by PEFT gives the logits of our training forward at
    sampled rank b, for several b."""
    configs = {f"b{b}": lf.DyLoRAConfig(rank=5, alpha=7, export_rank=b, target_modules=["q_proj", "v_proj", "up_proj"])
               for b in (1, 2, 5)}

    def at_sampled_rank(name, adapters):
        adapters.model.train()
        with torch.no_grad():
            adapters.shared[name].dylora_rank.fill_(configs[name].export_rank)

    results = _export_logits(tiny_checkpoints["llama"], load_hf_model, tmp_path, configs, at_sampled_rank)
    for name, (ours, theirs, saved) in results.items():
        assert saved["r"] == configs[name].export_rank and saved["lora_alpha"] == 7 and saved["peft_type"] == "LORA"
        assert (ours - theirs).abs().max().item() <= LOGITS_ATOL, name
    assert (results["b1"][0] - results["b5"][0]).abs().max() > 1e-3  # the rank matters


def test_matryoshka_exports_each_train_rank(tiny_checkpoints, load_hf_model, tmp_path):
    """For each train rank t, the export (a LoRA of r = t, lora_alpha = t·scale(t)) loaded by PEFT gives our logits
    at evaluation with export_rank t."""
    configs = {f"t{t}": lf.MatryoshkaLoRAConfig(train_ranks=[1, 3, 4], scale="sqrt", export_rank=t,
                                                target_modules=["k_proj", "o_proj", "down_proj"]) for t in (1, 3, 4)}
    results = _export_logits(tiny_checkpoints["qwen2"], load_hf_model, tmp_path, configs, lambda name, adapters: None)
    for name, (ours, theirs, saved) in results.items():
        t = configs[name].export_rank
        assert saved["r"] == t and saved["lora_alpha"] == pytest.approx(t ** 0.5)
        assert (ours - theirs).abs().max().item() <= LOGITS_ATOL, name
    assert (results["t1"][0] - results["t4"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("scale", ["none", "rank", "sqrt"])
def test_matryoshka_training_update_is_the_sum_of_its_nested_adapters(scale):
    """ΔW of the training form (one product with the fixed diagonal P) = Σ_t of the nested adapters' ΔW at
    evaluation with export_rank t (each scale(t)·B[:, :t]A[:t], what the rank-t export computes)."""
    ranks = [2, 3, 7]
    factor = {"none": lambda t: 1.0, "rank": lambda t: 1.0 / t, "sqrt": lambda t: t ** -0.5}[scale]
    nested = []
    for t in ranks:
        config = lf.MatryoshkaLoRAConfig(train_ranks=ranks, scale=scale, export_rank=t)
        layer = get_variant("matryoshka").layer_cls(config, 11, 13, generator=torch.Generator())
        perturb(layer.parameters(), seed=1)  # the same tensors in every layer
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        nested.append(factor(t) * b[:, :t] @ a[:t])  # the nested rank-t adapter, written here
        torch.testing.assert_close(layer.eval().delta_weight(), nested[-1], atol=1e-7, rtol=1e-6)
    assert not torch.equal(nested[0], nested[1])
    torch.testing.assert_close(layer.train().delta_weight(), sum(nested), atol=1e-6, rtol=1e-6)


def test_blocklora_exports_rank_r_over_n(tiny_checkpoints, tmp_path):
    """The export is a LoRA of rank r/n: A_s and Σ B_i, lora_alpha α/n (so its scale is α/r, the training one)."""
    config = lf.BlockLoRAConfig(rank=8, alpha=6, blocks=4, target_modules=["q_proj"])
    _, adapters = _ours(tiny_checkpoints["llama"])
    adapters.add_job("job", config, seed=0)
    perturb(adapters.parameters("job"), seed=1)
    directory = write_peft_adapter(tmp_path / "a", adapters.peft_state_dict("job"), config, base_model="base")
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["lora_alpha"] == 1.5
    layer = next(layer for _, layer in adapters._job_layers("job"))
    tensors = layer.peft_tensors()
    assert tensors["lora_A.weight"].shape == (2, layer.in_features)
    torch.testing.assert_close(tensors["lora_B.weight"], sum(layer.lora_B[i] for i in range(4)).detach())
    block_sum = sum(layer.lora_B[i] for i in range(4)).detach() @ layer.lora_A.detach()  # Σ B_i A_s, written here
    torch.testing.assert_close(config.export_config().scaling * tensors["lora_B.weight"] @ tensors["lora_A.weight"],
                               config.alpha / config.rank * block_sum, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(layer.delta_weight().detach(), config.alpha / config.rank * block_sum, atol=1e-7,
                               rtol=1e-6)


def test_dylora_rank_is_a_function_of_seed_and_step(tiny_checkpoints):
    """The rank of step s depends on (job seed, s) alone, covers 1..r, and is part of the job's checkpointed state
    (a frozen parameter: saved, not trained), so a job restored after step k samples on as an uninterrupted one."""
    ranks = [sampled_rank(7, step, 6) for step in range(1, 200)]
    assert set(ranks) == set(range(1, 7))
    assert ranks != [sampled_rank(8, step, 6) for step in range(1, 200)]
    _, adapters = _ours(tiny_checkpoints["llama"])
    config = lf.DyLoRAConfig(rank=6, target_modules=["q_proj"])
    for name in ("straight", "resumed"):
        adapters.add_job(name, config, seed=7)
    straight = adapters.shared["straight"]
    seen = [int(straight.dylora_rank)]
    for step in range(1, 9):
        adapters.after_step("straight", step)
        seen.append(int(straight.dylora_rank))
        if step == 4:  # a checkpoint after step 4, restored into another job
            state = adapters.named_parameters("straight", frozen=True)["shared.dylora_rank"].clone()
    assert seen == ranks[:9]
    assert "shared.dylora_rank" not in adapters.named_parameters("straight")  # not trained
    with torch.no_grad():
        adapters.named_parameters("resumed", frozen=True)["shared.dylora_rank"].copy_(state)
    resumed = adapters.shared["resumed"]
    assert int(resumed.dylora_rank) == ranks[4]
    for step in range(5, 9):
        adapters.after_step("resumed", step)
        assert int(resumed.dylora_rank) == seen[step]


@pytest.mark.parametrize("variant", ["dylora", "matryoshka"])
def test_evaluation_between_microbatches_leaves_training_factors_alone(variant):
    """An evaluation forward (the export rank's factors) between two training microbatches of a step neither
    changes what they compute nor the gradients they owe: both equal those of the same step without it."""
    results = []
    for evaluate in (False, True):
        site, _, params = _site(variant)
        site.train()
        site.batch.segments = SEGMENTS
        gen = torch.Generator().manual_seed(9)
        xs = [torch.randn(19, 1, 36, generator=gen) for _ in range(3)]
        outs = [site(xs[0])[0]]
        outs[0].backward(torch.ones_like(outs[0]))
        if evaluate:
            site.eval()
            with torch.no_grad():
                evaluated = site(xs[2])[0]
            site.train()
            with torch.no_grad():
                assert not torch.allclose(evaluated, site(xs[2])[0])  # evaluation computes at the export rank
        outs.append(site(xs[1])[0])
        outs[1].backward(torch.ones_like(outs[1]))
        for job in ("l", "v"):
            site.collect_grads(job)
        results.append([o.detach() for o in outs] + [p.grad for p in params])
    for want, got in zip(*results):
        assert torch.equal(got, want)
