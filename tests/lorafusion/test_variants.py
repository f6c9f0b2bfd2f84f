"""The shared test matrix of adapter variants: each variant's forward and every gradient against a plain-torch
formula written here, PEFT round trips both ways, bit-identical regeneration of PEFT's frozen tensors, strict
import. Adding a variant = rows in VARIANTS (and PEFT_CONFIGS when PEFT has it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters import get_variant
from lorafusion.adapters.attach import ModelAdapters
from lorafusion.adapters.base import BaseView
from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear, Segment
from lorafusion.batching import build_microbatch
from lorafusion.adapter_io import read_peft_adapter, write_peft_adapter
from lorafusion.data import IGNORE_INDEX, Sample
from lorafusion.models import build_model

peft = pytest.importorskip("peft")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOGITS_ATOL = 1e-5  # fp32 logits of the tiny models (|logit| ≲ 10), ours vs PEFT
VOCAB = 259

# name -> our config; the same adapter's PEFT config (None when PEFT lacks the variant)
VARIANTS = {
    "lora": lambda: lf.LoRAConfig(rank=3, alpha=5, target_modules=ALL_TARGETS),
    "rslora": lambda: lf.RsLoRAConfig(rank=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": lambda: lf.DoRAConfig(rank=3, alpha=6, target_modules=ALL_TARGETS),
    "vera": lambda: lf.VeRAConfig(rank=8, d_initial=0.2, projection_seed=5, target_modules=ALL_TARGETS),
    "randlora": lambda: lf.RandLoRAConfig(rank=16, alpha=32, projection_seed=3, target_modules=ALL_TARGETS),
    "randlora_sparse": lambda: lf.RandLoRAConfig(rank=16, alpha=32, projection_seed=4, sparse=True,
                                                 target_modules=["k_proj", "up_proj"]),
    "shira": lambda: lf.SHiRAConfig(rank=2, mask_seed=11, target_modules=ALL_TARGETS),
    "shira_default_seed": lambda: lf.SHiRAConfig(rank=1, target_modules=["q_proj", "down_proj"]),
    "unilora": lambda: lf.UniLoRAConfig(rank=3, theta_dim=64, projection_seed=7, target_modules=ALL_TARGETS),
    "loraga": lambda: lf.LoRAGAConfig(rank=2, alpha=3, target_modules=ALL_TARGETS),
    "unilora_spare_theta": lambda: lf.UniLoRAConfig(rank=3, theta_dim=1000, target_modules=["q_proj"]),  # > 768 used
    "lorasb": lambda: lf.LoRASBConfig(rank=3, alpha=5, init_scale=1e-3, target_modules=ALL_TARGETS),
    "dylora": lambda: lf.DyLoRAConfig(rank=5, alpha=7, export_rank=3, target_modules=ALL_TARGETS),
    "dylora_unfrozen": lambda: lf.DyLoRAConfig(rank=4, alpha=3, frozen=False, target_modules=["k_proj", "down_proj"]),
    "matryoshka": lambda: lf.MatryoshkaLoRAConfig(train_ranks=[1, 2, 4], scale="sqrt", export_rank=2,
                                                  target_modules=ALL_TARGETS),
    "matryoshka_rank_scale": lambda: lf.MatryoshkaLoRAConfig(train_ranks=[2, 3, 6], scale="rank",
                                                             target_modules=["q_proj", "up_proj"]),
    "blocklora": lambda: lf.BlockLoRAConfig(rank=6, alpha=5, blocks=3, target_modules=ALL_TARGETS),
    "paca": lambda: lf.PaCAConfig(rank=3, alpha=6, target_modules=ALL_TARGETS),
    "loldu": lambda: lf.LoLDUConfig(rank=4, alpha=8, target_modules=ALL_TARGETS),
    "hydra": lambda: lf.HydraConfig(rank=3, alpha=6, target_modules=ALL_TARGETS),
    # Tucker rank 4 per mode: rank(ΔW) ≤ 16 on every module of the tiny models, so a rank-16 export is exact
    "tera": lambda: lf.TeRAConfig(rank=4, export_rank=16, projection_seed=2, target_modules=ALL_TARGETS),
}
PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=3, lora_alpha=5, target_modules=ALL_TARGETS),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": lambda: peft.LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=ALL_TARGETS),
    "vera": lambda: peft.VeraConfig(r=8, d_initial=0.2, projection_prng_key=5, target_modules=ALL_TARGETS),
    "randlora": lambda: peft.RandLoraConfig(r=16, randlora_alpha=32, projection_prng_key=3, target_modules=ALL_TARGETS),
    "randlora_sparse": lambda: peft.RandLoraConfig(r=16, randlora_alpha=32, projection_prng_key=4, sparse=True,
                                                   target_modules=["k_proj", "up_proj"]),
    "shira": lambda: peft.ShiraConfig(r=2, random_seed=11, target_modules=ALL_TARGETS),
    "shira_default_seed": lambda: peft.ShiraConfig(r=1, target_modules=["q_proj", "down_proj"]),
    "unilora": lambda: peft.UniLoraConfig(r=3, theta_d_length=64, proj_seed=7, target_modules=ALL_TARGETS,
                                          save_indices=True),
    "unilora_spare_theta": lambda: peft.UniLoraConfig(r=3, theta_d_length=1000, target_modules=["q_proj"],
                                                      save_indices=True),
}
FAMILY = {"unilora_spare_theta": "llama", "loraga": "llama", "lora": "qwen2", "rslora": "mistral", "dora": "qwen2", "vera": "llama", "randlora": "qwen2",
          "randlora_sparse": "llama", "shira": "mistral", "shira_default_seed": "llama", "unilora": "qwen2",
          "lorasb": "qwen2",
          "dylora": "qwen2", "dylora_unfrozen": "llama", "matryoshka": "llama", "matryoshka_rank_scale": "mistral",
          "blocklora": "mistral"}
FAMILY.update({"paca": "qwen2", "loldu": "llama", "hydra": "qwen2", "tera": "mistral"})


def finish_init_passes(layers, seed: int) -> None:
    """Initialise layers that wait for a gradient init pass (LoRA-GA) from a random 'gradient'."""
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        if layer.init_pass:
            layer.finish_init_pass(torch.randn(layer.out_features, layer.in_features, generator=generator))


def perturb(params, seed: int, std: float = 0.05) -> None:
    """Add seeded N(0, std) noise to every parameter, so each one matters (B, λ_b, SHiRA's values start at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * std)


# ---------------------------------------------------------------- forward and gradients against formulas


def _reference_module(layer, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The module's output [T, N] for input x [T, K], from the variant's paper/PEFT formula (differentiable)."""
    cfg, base = layer.config, x @ w.t() + bias
    if cfg.type in ("lora", "rslora"):
        return base + cfg.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    if cfg.type == "dora":
        s, a, b = cfg.scaling, layer.lora_A, layer.lora_B
        norm = torch.linalg.norm(w + s * b @ a, dim=1).detach()  # detached: DoRA §4.3, as PEFT
        return layer.lora_magnitude_vector / norm * (x @ w.t() + s * (x @ a.t()) @ b.t()) + bias
    if cfg.type == "vera":
        a_s = layer.shared.vera_A[:, :x.shape[1]]
        b_s = layer.shared.vera_B[:w.shape[0]]
        return base + layer.vera_lambda_b * (((x @ a_s.t()) * layer.vera_lambda_d) @ b_s.t())
    if cfg.type == "randlora":
        return base + x @ _randlora_delta(layer, w.shape).t()
    if cfg.type == "shira":
        delta = torch.zeros_like(w).index_put((layer.rows, layer.cols), layer.shira_weight)
        return base + x @ delta.t()
    if cfg.type == "loraga":
        a, b = layer.lora_A, layer.lora_B
        a0, b0 = layer.lora_A0, layer.lora_B0
        return base + cfg.scaling * ((x @ a.t()) @ b.t() - (x @ a0.t()) @ b0.t())
    if cfg.type == "unilora":
        theta = layer.shared.unilora_theta_d
        a, b = theta[layer.idx_A] * layer.scale_A, theta[layer.idx_B] * layer.scale_B
        return base + (x @ a.t()) @ b.t()
    if cfg.type == "lorasb":
        return base + cfg.scaling * ((x @ layer.lorasb_A.t()) @ layer.lorasb_R.t()) @ layer.lorasb_B.t()
    if cfg.type == "dylora":  # the step's rank b; frozen: the first b - 1 components detached
        r = int(layer.shared.dylora_rank) if layer.training else cfg.export_rank
        a, b = layer.lora_A[:r], layer.lora_B[:, :r]
        if cfg.frozen and layer.training:
            a = torch.cat([a[:r - 1].detach(), a[r - 1:]])
            b = torch.cat([b[:, :r - 1].detach(), b[:, r - 1:]], dim=1)
        return base + cfg.alpha / r * (x @ a.t()) @ b.t()
    if cfg.type == "matryoshka":  # training: the sum of the nested sub-adapters; evaluation: the export rank's
        scale = {"none": lambda t: 1.0, "rank": lambda t: 1.0 / t, "sqrt": lambda t: t ** -0.5}[cfg.scale]
        ranks = cfg.train_ranks if layer.training else [cfg.export_rank]
        a, b = layer.lora_A, layer.lora_B
        return base + sum(scale(t) * (x @ a[:t].t()) @ b[:, :t].t() for t in ranks)
    if cfg.type == "blocklora":  # every up-projection block B_i on the one shared down-projection A_s
        a = layer.lora_A
        return base + cfg.alpha / cfg.rank * sum((x @ a.t()) @ b_i.t() for b_i in layer.lora_B)
    if cfg.type in ("paca", "loldu", "hydra", "tera"):
        return _reference_module_ii(layer, x, w, bias)
    raise AssertionError(cfg.type)


def _reference_module_ii(layer, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The formulas of the variants of issue 19 whose update depends on W or is high-rank."""
    cfg = layer.config
    if cfg.type == "paca":  # W with its columns idx replaced by s·P
        w_eff = w.index_copy(1, layer.paca_idx, cfg.scaling * layer.paca_P)
        return x @ w_eff.t() + bias
    if cfg.type == "loldu":  # the LU computed here: W = P L U, D = diag(U)
        p, l, u = torch.linalg.lu(w)
        d, r = torch.diagonal(u), cfg.rank
        delta = p @ l[:, :r] @ torch.diag(layer.loldu_z - d[:r]) @ (u[:r] / d[:r, None])
        return x @ (w + cfg.scaling * delta).t() + bias
    if cfg.type == "hydra":  # the sequential branch on W x, without the bias
        s = cfg.scaling
        parallel = (x @ layer.hydra_A_p.t()) @ layer.hydra_B_p.t()
        sequential = ((x @ w.t()) @ layer.hydra_A_s.t()) @ layer.hydra_B_s.t()
        return x @ w.t() + bias + s * (parallel + sequential)
    if cfg.type == "tera":
        return x @ (w + _tera_delta(layer)).t() + bias
    raise AssertionError(cfg.type)


def _tera_delta(layer) -> torch.Tensor:
    """TeRA's ΔW through Kronecker products: c·(F₁ ⊗ F₂) G_(12) (F₃ ⊗ F₄)ᵀ, F_m = U_m diag(λ_m), c = 1/√K."""
    core, factors = layer.shared.factors(layer.out_features, layer.in_features)
    lambdas = [getattr(layer, f"tera_lambda_{m}") for m in range(4)]
    f1, f2, f3, f4 = (u * lam for u, lam in zip(factors, lambdas))
    r1, r2, r3, r4 = core.shape
    return torch.kron(f1, f2) @ core.reshape(r1 * r2, r3 * r4) @ torch.kron(f3, f4).t() / layer.in_features ** 0.5


def _randlora_delta(layer, shape: tuple[int, int]) -> torch.Tensor:
    """RandLoRA's ΔW written out per flattened index c: PEFT pairs A's row c = (k = c // bases, b = c % bases) with
    B's column c = (b' = c // r, k' = c % r)."""
    out_f, in_f = shape
    r, lo, hi = layer.config.rank, min(shape), max(shape)
    bases = -(-lo // r)
    a, b = layer.shared.randlora_A, layer.shared.randlora_B
    delta = torch.zeros(hi, lo)
    for c in range(r * bases):
        k, base_a = divmod(c, bases)
        base_b, k_b = divmod(c, r)
        row = layer.randlora_lambda[k, base_a] * a[k, 0, :lo] * layer.randlora_gamma[base_a]  # [lo]
        delta = delta + torch.outer(b[:hi, base_b, k_b], row)
    delta = delta * layer.config.scaling
    return delta if lo == in_f else delta.t()


class _Linear(torch.nn.Module):
    """A megatron-style linear stand-in: returns (x Wᵀ + bias, None)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x, weight=None):
        return x @ (self.weight if weight is None else weight).t() + self.bias, None


def _site(variant: str, seed: int = 0):
    """A fused site (gate rows 0..23, up rows 24..39; K = 36) with the variant's job 'v' on both targets and a
    LoRA job 'l' on up only; parameters perturbed."""
    gen = torch.Generator().manual_seed(seed)
    k, rows = 36, {"gate_proj": torch.arange(0, 24), "up_proj": torch.arange(24, 40)}
    base = _Linear(torch.randn(40, k, generator=gen) * 0.3, torch.randn(40, generator=gen) * 0.1)
    site = MultiAdapterLinear(base, rows, AdapterBatch(), site_id=2, kernels="torch")
    config = VARIANTS[variant]()
    config.target_modules = ["gate_proj", "up_proj"]
    spec = get_variant(config.type)
    shapes = {t: (len(r), k) for t, r in rows.items()}
    shared = spec.shared_cls(config, shapes, 1, 0) if spec.shared_cls else None
    for target, r in rows.items():
        layer = spec.layer_cls(config, k, len(r), generator=gen, base=BaseView(base, r), shared=shared,
                               layer_index=0, target=target)
        site.add_adapter("v", target, layer)
    site.add_adapter("l", "up_proj", get_variant("lora").layer_cls(lf.LoRAConfig(rank=2), k, 16, generator=gen,
                                                                    base=BaseView(base, rows["up_proj"])))
    finish_init_passes([layer for job in site.adapters.values() for layer in job.values()], seed)
    params = [p for job in site.adapters.values() for p in job.parameters() if p.requires_grad]
    if shared is not None:
        params += [p for p in shared.parameters() if p.requires_grad]
    perturb(params, seed + 1, std=0.2)
    return site, shared, params


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("lora", "rslora", "shira_default_seed")])
def test_forward_and_every_gradient_match_the_formula(variant):
    """Our multi-job layer (variant job 'v', a LoRA job, rows of no job) against the formula per HF module."""
    site, shared, params = _site(variant)
    site.batch.segments = [Segment("l", 0, 5), Segment("v", 5, 14), Segment("v", 16, 19)]
    site.train()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(19, 1, 36, generator=gen, requires_grad=True)
    dy = torch.randn(19, 1, 40, generator=gen)
    out, _ = site(x)
    out.backward(dy)
    for job in ("l", "v"):
        site.collect_grads(job)
    ours = [x.grad.clone(), *(p.grad.clone() for p in params)]
    for p in [x, *params]:
        p.grad = None

    w, b = site.base.weight, site.base.bias
    flat = x.reshape(19, 36)
    ref = flat @ w.t() + b
    pieces = []
    for job, start, end in (("l", 0, 5), ("v", 5, 14), ("v", 16, 19)):
        rows_out = flat[start:end] @ w.t() + b
        for target, layer in site.adapters["job_" + job].items():
            idx = site.out_rows[target]
            rows_out = rows_out.index_copy(1, idx, _reference_module(layer, flat[start:end], w[idx], b[idx]))
        pieces.append((start, end, rows_out))
    for start, end, value in pieces:
        ref = torch.cat([ref[:start], value, ref[end:]])
    torch.testing.assert_close(out.reshape(19, 40), ref, atol=1e-5, rtol=1e-5)
    ref.backward(dy.reshape(19, 40))
    theirs = [x.grad, *(p.grad for p in params)]
    for i, (got, want) in enumerate(zip(ours, theirs)):
        assert want is not None and got is not None, i
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"gradient {i}: {m}")


# ---------------------------------------------------------------- PEFT, both directions


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _our_logits(model, adapters: ModelAdapters, job: str | None, ids: torch.Tensor) -> torch.Tensor:
    rows = [Sample(input_ids=tuple(r.tolist()), labels=(IGNORE_INDEX,) * len(r), source="t") for r in ids]
    mb = build_microbatch([(job or "", s) for s in rows])
    adapters.batch.segments = mb.segments if job is not None else []
    try:
        logits = model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params())
    finally:
        adapters.batch.segments = []
    return logits.reshape(ids.shape[0], ids.shape[1], -1)


def _ours(checkpoint: Path):
    model, arch = build_model(checkpoint, dtype=torch.float32)
    model.eval()
    return model, ModelAdapters(model, arch)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_export_loads_in_peft_with_our_logits(variant, tiny_checkpoints, load_hf_model, tmp_path):
    checkpoint = tiny_checkpoints[FAMILY[variant]]
    model, adapters = _ours(checkpoint)
    config = VARIANTS[variant]()
    adapters.add_job("job", config, seed=3)
    finish_init_passes([layer for _, layer in adapters._job_layers("job")], seed=5)
    perturb(adapters.parameters("job"), seed=4)
    directory = write_peft_adapter(tmp_path / "adapter", adapters.peft_state_dict("job"), config,
                                   base_model=str(checkpoint))
    ids = _ids()
    ours = _our_logits(model, adapters, "job", ids)
    assert (ours - _our_logits(model, adapters, None, ids)).abs().max() > 1e-3, "the adapter should matter"
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(load_hf_model(checkpoint), str(directory)).eval()(ids).logits
    assert (ours - theirs).abs().max().item() <= LOGITS_ATOL

    again, tensors = read_peft_adapter(directory)
    # LoRA-GA: the equivalent plain LoRA; TeRA: its own config, from the native files beside the PEFT ones
    assert again.to_dict() == (config if config.svd_export_rank else config.export_config()).to_dict()
    fresh_model, fresh = _ours(checkpoint)
    fresh.add_job("job", again, seed=99)  # a different seed: everything that matters comes from the file
    fresh.load_peft_state_dict("job", tensors)
    assert torch.equal(_our_logits(fresh_model, fresh, "job", ids), ours)


def _peft_made(variant: str, checkpoint: Path, load_hf_model, directory: Path):
    """A PEFT model of the variant with perturbed trainable tensors, saved by PEFT to `directory`."""
    torch.manual_seed(0)
    model = peft.get_peft_model(load_hf_model(checkpoint), PEFT_CONFIGS[variant]())
    perturb([p for p in model.parameters() if p.requires_grad], seed=6)
    model.save_pretrained(str(directory))
    return model.eval()


@pytest.mark.parametrize("variant", list(PEFT_CONFIGS))
def test_peft_made_adapter_reads_exactly(variant, tiny_checkpoints, load_hf_model, tmp_path):
    checkpoint = tiny_checkpoints[FAMILY[variant]]
    peft_model = _peft_made(variant, checkpoint, load_hf_model, tmp_path / "adapter")
    config, tensors = read_peft_adapter(tmp_path / "adapter")
    assert type(config) is type(VARIANTS[variant]())
    model, adapters = _ours(checkpoint)
    adapters.add_job("job", config, seed=0)
    adapters.load_peft_state_dict("job", tensors)
    ids = _ids()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (_our_logits(model, adapters, "job", ids) - theirs).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("variant", ["vera", "randlora", "randlora_sparse", "shira", "shira_default_seed", "unilora"])
def test_frozen_tensors_regenerate_bit_identically(variant, tiny_checkpoints, load_hf_model, tmp_path):
    """What PEFT draws from its seeds (VeRA's projections, RandLoRA's bf16 or sparse bases, SHiRA's mask,
    Uni-LoRA's index map) we draw bit for bit from the same seeds, without reading PEFT's file."""
    checkpoint = tiny_checkpoints[FAMILY[variant]]
    _peft_made(variant, checkpoint, load_hf_model, tmp_path / "adapter")
    _, theirs = read_peft_adapter(tmp_path / "adapter")
    _, adapters = _ours(checkpoint)
    adapters.add_job("job", VARIANTS[variant](), seed=1)
    ours = adapters.peft_state_dict("job")
    frozen = {"vera": ("vera_A", "vera_B"), "randlora": ("randlora_A", "randlora_B"),
              "shira": ("shira_indices",), "unilora": ()}[variant.split("_")[0]]
    keys = [k for k in theirs if k.rsplit(".", 1)[-1] in frozen and k in ours]  # (not PEFT's per-module copies)
    assert keys or variant == "unilora"  # Uni-LoRA has no frozen tensor in its file; its index map is checked below
    for key in keys:
        assert torch.equal(ours[key], theirs[key].to(ours[key].dtype)), key
    if variant == "unilora":
        for module, layer in adapters._job_layers("job"):
            assert torch.equal(layer.idx_A, theirs[f"{module}.unilora_indices_A"])
            assert torch.equal(layer.idx_B, theirs[f"{module}.unilora_indices_B"])
            assert torch.equal(layer.scale_A, theirs[f"{module}.unilora_scales_A"])


# ---------------------------------------------------------------- strict import, validation


def _write_config(directory: Path, **fields) -> Path:
    """A real PEFT LoRA adapter folder with some config fields changed."""
    data = json.loads((directory / "adapter_config.json").read_text())
    data.pop("lorafusion_adapter", None)
    data.update(fields)
    (directory / "adapter_config.json").write_text(json.dumps(data))
    return directory


@pytest.fixture
def lora_dir(tiny_checkpoints, tmp_path) -> Path:
    model, adapters = _ours(tiny_checkpoints["llama"])
    config = lf.LoRAConfig(rank=2, target_modules=["q_proj"])
    adapters.add_job("job", config, seed=0)
    return write_peft_adapter(tmp_path / "adapter", adapters.peft_state_dict("job"), config,
                              base_model=str(tiny_checkpoints["llama"]))


@pytest.mark.parametrize("fields, message", [
    ({"peft_type": "LOHA"}, r"peft_type='LOHA' is not supported.*reads \["),
    ({"alpha_pattern": {"model.layers.0.self_attn.q_proj": 4}}, r"alpha_pattern=.*not supported"),
    ({"rank_pattern": {"q_proj": 4}}, r"rank_pattern=.*not supported"),
    ({"bias": "all"}, r"bias='all' is not supported"),
    ({"lora_bias": True}, r"lora_bias=True is not supported"),
    ({"target_modules": ".*q_proj"}, r"regular expressions are not supported"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"\['lm_head'\], which lorafusion cannot adapt"),
    ({"use_dora": True, "use_rslora": True}, r"use_rslora=True is not supported"),
    ({"init_lora_weights": "lora_ga"}, r"raw LoRA-GA adapter"),
])
def test_unsupported_peft_fields_are_errors(lora_dir, fields, message):
    with pytest.raises(ValueError, match=message):
        read_peft_adapter(_write_config(lora_dir, **fields))


def test_unexpected_or_missing_tensors_are_errors(lora_dir, tiny_checkpoints):
    from safetensors.torch import load_file, save_file

    weights = lora_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    extra = {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}
    save_file(extra, str(weights))
    config, loaded = read_peft_adapter(lora_dir)
    _, adapters = _ours(tiny_checkpoints["llama"])
    adapters.add_job("job", config, seed=0)
    with pytest.raises(ValueError, match=r"q_proj.lora_B.bias' \(1 unexpected in all\).*does not drop"):
        adapters.load_peft_state_dict("job", loaded, where="adapter")
    missing = {k: v for k, v in tensors.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj.lora_A.weight' is missing"):
        adapters.load_peft_state_dict("job", missing)


@pytest.mark.parametrize("adapter, message", [
    ({"type": "shira", "rank": 40}, r"rank=40: SHiRA would train .* entries of q_proj.*use rank ≤ 32"),
    ({"type": "unilora", "theta_dim": 0}, r"theta_dim=0 must be a positive integer"),
    ({"type": "vera", "rank": 0}, r"rank=0 must be a positive integer"),
    ({"type": "randlora", "sparse": "yes"}, r"sparse='yes' must be true or false"),
    ({"type": "dora", "alpha": -1}, r"alpha=-1 must be a positive number"),
    ({"type": "shira", "mask_seed": -2}, r"mask_seed=-2 must be an integer ≥ 0 or null"),
    ({"type": "unilora", "init_bound": 0}, r"init_bound=0 must be a positive number"),
    ({"type": "vera", "alpha": 3}, r"unknown field\(s\) \['alpha'\] for type 'vera'"),
    ({"type": "lorasb", "rank": 40}, r"rank=40: LoRA-SB takes rank singular vectors of k_proj's 32×64 .*rank ≤ 32"),
    ({"type": "lorasb", "alpha": -2}, r"alpha=-2 must be a positive number, e.g. alpha: null \(alpha = rank\)"),
    ({"type": "lorasb", "init_batches": 0}, r"init_batches=0 must be a positive integer"),
    ({"type": "lorasb", "init_scale": "big"}, r"init_scale='big' must be a positive number"),
    ({"type": "lorasb", "init_scale": -1e-6}, r"init_scale=-1e-06 must be a positive number"),
    ({"type": "dylora", "rank": 4, "export_rank": 5}, r"export_rank=5 is larger than adapter.rank=4"),
    ({"type": "dylora", "export_rank": 0}, r"export_rank=0 must be a positive integer"),
    ({"type": "dylora", "frozen": "yes"}, r"frozen='yes' must be true or false"),
    ({"type": "matryoshka", "train_ranks": [4, 2]}, r"train_ranks=\[4, 2\] must be strictly increasing"),
    ({"type": "matryoshka", "train_ranks": []}, r"train_ranks=\[\] must be a non-empty list"),
    ({"type": "matryoshka", "train_ranks": [0, 2]}, r"train_ranks=0 must be a positive integer"),
    ({"type": "matryoshka", "train_ranks": 4}, r"train_ranks=4 must be a non-empty list of ranks"),
    ({"type": "matryoshka", "train_ranks": [1], "export_rank": True}, r"export_rank=True must be a positive"),
    ({"type": "matryoshka", "scale": "log"}, r"scale='log' is not one of \['none', 'rank', 'sqrt'\]"),
    ({"type": "matryoshka", "train_ranks": [2, 4], "export_rank": 3}, r"export_rank=3 is not a train rank; .*\[2, 4\]"),
    ({"type": "matryoshka", "rank": 8}, r"unknown field\(s\) \['rank'\] for type 'matryoshka'"),
    ({"type": "blocklora", "blocks": 0}, r"blocks=0 must be a positive integer"),
    ({"type": "blocklora", "rank": 6, "blocks": 4}, r"blocks=4 does not divide adapter.rank=6; .* \[1, 2, 3, 6\]"),
    ({"type": "paca", "rank": 0}, r"rank=0 must be a positive integer"),
    ({"type": "paca", "rank": 65}, r"rank=65: PaCA trains rank input columns of q_proj.*use rank ≤ 64"),
    ({"type": "paca", "alpha": "big"}, r"alpha='big' must be a positive number"),
    ({"type": "paca", "dropout": 0.1}, r"unknown field\(s\) \['dropout'\] for type 'paca'"),
    ({"type": "loldu", "rank": 33}, r"rank=33: LoLDU .* k_proj's 32×64 weight.*use rank ≤ 32"),
    ({"type": "loldu", "alpha": 0}, r"alpha=0 must be a positive number"),
    ({"type": "loldu", "dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"type": "hydra", "rank": -1}, r"rank=-1 must be a positive integer"),
    ({"type": "hydra", "dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
    ({"type": "hydra", "alpha": None}, r"alpha=None must be a positive number"),
    ({"type": "tera", "rank": 1.5}, r"rank=1.5 must be a positive integer"),
    ({"type": "tera", "export_rank": 0}, r"export_rank=0 must be a positive integer"),
    ({"type": "tera", "export_rank": None}, r"export_rank=None must be a positive integer"),
    ({"type": "tera", "export_rank": 33}, r"export_rank=33: k_proj's 32×64 update .*use export_rank ≤ 32"),
    ({"type": "tera", "projection_seed": -1}, r"projection_seed=-1 must be an integer ≥ 0"),
])
def test_bad_variant_fields_are_named(adapter, message, tiny_checkpoints):
    with pytest.raises(ValueError, match=message):
        config = lf.JobSpec(name="j", dataset="d.jsonl", adapter=adapter).adapter
        model, adapters = _ours(tiny_checkpoints["llama"])
        adapters.add_job("j", config, seed=0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v]().export_config().type != VARIANTS[v]().type
                                     and VARIANTS[v]().svd_export_rank is None])
def test_a_variant_exported_as_another_reads_back_only_as_that_one(variant):
    """LoRA-GA, DyLoRA, ... write a plain LoRA: tensors handed to the variant itself are refused, naming the type to
    load them as (the PEFT config is the exported one's)."""
    config = VARIANTS[variant]()
    exported = config.export_config()
    assert config.peft_config() == exported.peft_config()
    spec = get_variant(config.type)
    shared = spec.shared_cls(config, {"q_proj": (8, 8)}, 1, 0) if spec.shared_cls else None
    base = BaseView(torch.nn.Linear(8, 8), torch.arange(8))
    layer = spec.layer_cls(config, 8, 8, generator=torch.Generator().manual_seed(0), base=base, shared=shared)
    with pytest.raises(ValueError, match=f"exported as a plain '{exported.type}' adapter.*load it as '{exported.type}'"):
        layer.load_peft_tensors(layer.peft_tensors())


@pytest.mark.parametrize("variant", ["dora", "vera", "randlora", "shira", "unilora"])
def test_evaluate_reads_peft_made_adapters_like_peft(variant, tiny_checkpoints, load_hf_model, tmp_path, examples_data):
    """lf.evaluate on a PEFT-saved adapter of each variant: the loss transformers + PEFT computes."""
    import torch.nn.functional as F

    from lorafusion.data import load_dataset, load_tokenizer

    checkpoint = tiny_checkpoints[FAMILY[variant]]
    peft_model = _peft_made(variant, checkpoint, load_hf_model, tmp_path / "adapter")
    data = examples_data / "arith_eval.jsonl"
    samples = load_dataset(data, load_tokenizer(checkpoint), max_seq_len=4096)[:12]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(line + "\n" for line in data.read_text().splitlines()[:12]))
    with torch.no_grad():
        total = sum(F.cross_entropy(peft_model(torch.tensor([s.input_ids])).logits[0].double(), torch.tensor(s.labels),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item() for s in samples)
    result = lf.evaluate(checkpoint, tmp_path / "adapter", rows, dtype="float32", device="cpu")
    assert result.loss == pytest.approx(total / result.tokens, rel=1e-5)
