"""The multi-adapter linear: per-job token segments, fused-layer row placement, job bookkeeping."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorafusion as lf
from lorafusion.adapters.attach import ModelAdapters
from lorafusion.adapters.multi import Segment
from lorafusion.batching import build_microbatch
from lorafusion.data import IGNORE_INDEX, Sample
from lorafusion.models import build_model

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SITE_OF = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
           "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}
HF_PARENT = {"linear_qkv": "self_attn", "linear_proj": "self_attn", "linear_fc1": "mlp", "linear_fc2": "mlp"}
ATOL = 1e-5  # one linear layer in fp32


@pytest.fixture
def qwen(tiny_checkpoints):
    """A fresh qwen2 model (q/k/v bias, 4 heads in 2 query groups) with adapters attached, no jobs yet."""
    model, arch = build_model(tiny_checkpoints["qwen2"], dtype=torch.float32)
    model.eval()
    return model, arch, ModelAdapters(model, arch)


@pytest.fixture(scope="module")
def hf_weights(tiny_checkpoints) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoints["qwen2"] / "model.safetensors"))


def randomize(adapters: ModelAdapters, job: str, seed: int, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.parameters(job):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def _site_input(site: torch.nn.Module, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 1, site.weight.shape[1], generator=generator)  # [T, 1, K] (sequence-first)


@torch.no_grad()
def _run_site(adapters: ModelAdapters, site: torch.nn.Module, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
    adapters.batch.segments = segments
    try:
        out, _ = site(x)
    finally:
        adapters.batch.segments = []
    return out.reshape(x.shape[0], -1)  # [T, N]


def _split_hf(arch, site_name: str, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut a megatron site output [T, N] into HF module outputs, from megatron's documented layout.

    linear_qkv is grouped per query group g: [g's q heads, g's k head, g's v head]; HF's q head h belongs
    to group h // (heads / groups). linear_fc1 is [gate; up].
    """
    t = out.shape[0]
    if site_name == "linear_qkv":
        per_group, d = arch.num_heads // arch.num_kv_heads, arch.head_dim
        grouped = out.reshape(t, arch.num_kv_heads, per_group + 2, d)
        return {
            "q_proj": grouped[:, :, :per_group].reshape(t, arch.num_heads * d),
            "k_proj": grouped[:, :, per_group].reshape(t, arch.num_kv_heads * d),
            "v_proj": grouped[:, :, per_group + 1].reshape(t, arch.num_kv_heads * d),
        }
    if site_name == "linear_fc1":
        gate, up = out.chunk(2, dim=1)
        return {"gate_proj": gate, "up_proj": up}
    return {"o_proj" if site_name == "linear_proj" else "down_proj": out}


def _hf_reference(hf_weights, peft_tensors, layer: int, module: str, x: torch.Tensor, scale: float | None):
    """HF module output x Wᵀ (+ b) (+ scale · x Aᵀ Bᵀ when the job adapts this module), from HF names only."""
    name = f"model.layers.{layer}.{HF_PARENT[SITE_OF[module]]}.{module}"
    x2 = x.reshape(x.shape[0], -1)
    out = x2 @ hf_weights[f"{name}.weight"].T
    if f"{name}.bias" in hf_weights:
        out = out + hf_weights[f"{name}.bias"]
    if scale is not None:
        a = peft_tensors[f"base_model.model.{name}.lora_A.weight"]
        b = peft_tensors[f"base_model.model.{name}.lora_B.weight"]
        out = out + scale * (x2 @ a.T) @ b.T
    return out


# ----------------------------------------------------------------------------- segments


@pytest.mark.parametrize("site_name", ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
def test_zero_b_job_leaves_its_rows_at_the_base_output(qwen, site_name):
    _, _, adapters = qwen
    adapters.add_job("x", lf.LoRAConfig(rank=4, alpha=8), seed=1)
    randomize(adapters, "x", seed=2)
    adapters.add_job("zero_b", lf.LoRAConfig(rank=4, alpha=8), seed=3)  # PEFT init: A random, B = 0
    assert all(p.abs().sum() > 0 for p in adapters.parameters("zero_b")[0::2])  # the A's
    site = adapters.layers[1][site_name]
    x = _site_input(site, 15, seed=4)
    out = _run_site(adapters, site, x, [Segment("x", 0, 5), Segment("zero_b", 5, 12)])  # rows 12.. no job
    with torch.no_grad():
        base = site.base(x)[0].reshape(15, -1)
    assert torch.equal(out[5:12], base[5:12]), "a job with B = 0 must leave its rows at the base output"
    assert torch.equal(out[12:], base[12:]), "rows outside every segment must be the base output"
    assert (out[:5] - base[:5]).abs().max() > 1e-3, "job x's update is missing from its rows"


def test_rows_change_only_with_their_own_jobs_adapter(qwen):
    model, _, adapters = qwen
    for seed, job in enumerate(["a", "b", "c"]):
        adapters.add_job(job, lf.LoRAConfig(rank=2 + seed, alpha=4), seed=seed)
        randomize(adapters, job, seed=10 + seed)
    generator = torch.Generator().manual_seed(0)
    items = [(job, n) for job, n in (("a", 9), ("b", 6), ("c", 11), ("b", 8))]
    samples = [(job, Sample(input_ids=tuple(torch.randint(0, 259, (n,), generator=generator).tolist()),
                            labels=(IGNORE_INDEX,) * n, source="t")) for job, n in items]
    mb = build_microbatch(samples)
    rows = {seg.job: slice(seg.start, seg.end) for seg in mb.segments}

    @torch.no_grad()
    def logits() -> torch.Tensor:
        adapters.batch.segments = mb.segments
        try:
            return model(mb.input_ids, mb.position_ids, None, packed_seq_params=mb.packed_seq_params())[0]
        finally:
            adapters.batch.segments = []

    before = logits()
    with torch.no_grad():
        for param in adapters.parameters("b"):
            param.add_(0.05)
    after = logits()
    assert (before[rows["b"]] - after[rows["b"]]).abs().max() > 1e-3
    for job in ("a", "c"):
        diff = (before[rows[job]] - after[rows[job]]).abs().max().item()
        assert diff <= 1e-6, f"job {job}'s rows changed by {diff:.3e} when only job b's adapter changed"


# ----------------------------------------------------------------------------- fused-layer rows


@pytest.mark.parametrize("targets", [
    ALL_TARGETS,
    ["k_proj"],
    ["q_proj", "v_proj", "up_proj"],
    ["gate_proj", "o_proj", "down_proj"],
], ids=lambda t: "+".join(t))
def test_adapters_land_in_the_hf_modules_rows(qwen, hf_weights, targets):
    """Every fused site equals its HF modules computed from HF tensors and the exported (HF-named) adapter."""
    _, arch, adapters = qwen
    config = lf.LoRAConfig(rank=3, alpha=6, target_modules=targets)
    adapters.add_job("job", config, seed=0)
    randomize(adapters, "job", seed=1)
    peft_tensors = adapters.peft_state_dict("job")
    for layer, sites in adapters.layers.items():
        for site_name, site in sites.items():
            x = _site_input(site, 7, seed=layer)
            ours = _split_hf(arch, site_name, _run_site(adapters, site, x, [Segment("job", 0, 7)]))
            for module, got in ours.items():
                scale = config.scaling if module in targets else None
                want = _hf_reference(hf_weights, peft_tensors, layer, module, x, scale)
                diff = (got - want).abs().max().item()
                assert diff <= ATOL, f"layer {layer} {module} (adapted: {scale is not None}): differs by {diff:.3e}"


def test_jobs_with_different_targets_share_a_fused_layer(qwen, hf_weights):
    _, arch, adapters = qwen
    adapters.add_job("q_only", lf.LoRAConfig(rank=2, alpha=2, target_modules=["q_proj"]), seed=0)
    adapters.add_job("v_only", lf.LoRAConfig(rank=5, alpha=3, target_modules=["v_proj"]), seed=1)
    randomize(adapters, "q_only", seed=2)
    randomize(adapters, "v_only", seed=3)
    site = adapters.layers[0]["linear_qkv"]
    x = _site_input(site, 10, seed=5)
    out = _split_hf(arch, "linear_qkv", _run_site(adapters, site, x, [Segment("q_only", 0, 4), Segment("v_only", 4, 10)]))
    for job, rows in (("q_only", slice(0, 4)), ("v_only", slice(4, 10))):
        config, tensors = adapters.configs[job], adapters.peft_state_dict(job)
        for module in ("q_proj", "k_proj", "v_proj"):
            scale = config.scaling if module in config.target_modules else None
            want = _hf_reference(hf_weights, tensors, 0, module, x[rows], scale)
            assert (out[module][rows] - want).abs().max() <= ATOL, (job, module)


# ----------------------------------------------------------------------------- job bookkeeping


def test_duplicate_add_job_raises_and_keeps_the_first(qwen):
    _, _, adapters = qwen
    adapters.add_job("sql", lf.LoRAConfig(rank=4), seed=0)
    first = [p.detach().clone() for p in adapters.parameters("sql")]
    with pytest.raises(ValueError, match="sql"):
        adapters.add_job("sql", lf.LoRAConfig(rank=8), seed=1)
    assert adapters.configs["sql"].rank == 4
    now = adapters.parameters("sql")
    assert len(now) == len(first) and all(torch.equal(a, b) for a, b in zip(first, now))


def test_initial_adapter_depends_only_on_the_jobs_seed(tiny_checkpoints):
    def fresh(jobs: list[tuple[str, int]]) -> ModelAdapters:
        model, arch = build_model(tiny_checkpoints["qwen2"])
        adapters = ModelAdapters(model, arch)
        for name, seed in jobs:
            adapters.add_job(name, lf.LoRAConfig(rank=4), seed=seed)
        return adapters

    alone = fresh([("j", 5)]).peft_state_dict("j")
    shared = fresh([("other", 9), ("j", 5)]).peft_state_dict("j")
    assert alone.keys() == shared.keys()
    assert all(torch.equal(alone[k], shared[k]) for k in alone)
    assert all(v.abs().sum() == 0 for k, v in alone.items() if "lora_B" in k)
    assert all(v.abs().sum() > 0 for k, v in alone.items() if "lora_A" in k)


NAMES = ["eval", "train", "forward", "a.b", "a_b", "a-b", "0", "base"]


def test_job_names_that_look_like_attributes_or_contain_dots(qwen):
    model, _, adapters = qwen
    for seed, name in enumerate(NAMES):
        adapters.add_job(name, lf.LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "down_proj"]), seed=seed)
        randomize(adapters, name, seed=100 + seed)
    params = {name: adapters.parameters(name) for name in NAMES}
    ids = {id(p) for ps in params.values() for p in ps}
    assert len(ids) == sum(len(ps) for ps in params.values()), "two job names share parameters"
    assert all(len(ps) == 2 * 2 * 2 for ps in params.values())  # layers x targets x (A, B)

    site = adapters.layers[0]["linear_qkv"]
    x = _site_input(site, 3 * len(NAMES), seed=0)
    segments = [Segment(name, 3 * i, 3 * i + 3) for i, name in enumerate(NAMES)]
    out = _run_site(adapters, site, x, segments)
    for i, name in enumerate(NAMES):
        alone = _run_site(adapters, site, x[3 * i:3 * i + 3], [Segment(name, 0, 3)])
        assert torch.allclose(out[3 * i:3 * i + 3], alone, atol=1e-6), name

    # Round trip through the PEFT state dict, into a differently named job.
    adapters.add_job("copy", lf.LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "down_proj"]), seed=0)
    adapters.load_peft_state_dict("copy", adapters.peft_state_dict("a.b"))
    assert all(torch.equal(a, b) for a, b in zip(adapters.parameters("copy"), params["a.b"]))



def test_remove_job_keeps_the_others_and_restores_the_base_output(qwen):
    _, _, adapters = qwen
    for seed, name in enumerate(["a.b", "a_b"]):
        adapters.add_job(name, lf.LoRAConfig(rank=2, alpha=4), seed=seed)
        randomize(adapters, name, seed=100 + seed)
    kept = [p.detach().clone() for p in adapters.parameters("a_b")]
    adapters.remove_job("a.b")
    assert "a.b" not in adapters.configs
    assert all(torch.equal(a, b) for a, b in zip(adapters.parameters("a_b"), kept))
    site = adapters.layers[0]["linear_qkv"]
    x = _site_input(site, 3, seed=0)
    removed = _run_site(adapters, site, x, [Segment("a.b", 0, 3)])
    with torch.no_grad():
        base = site.base(x)[0].reshape(3, -1)
    assert torch.equal(removed, base), "a removed job's segment must get the base output"
    adapters.add_job("a.b", lf.LoRAConfig(rank=3), seed=0)  # the name is free again
    assert adapters.configs["a.b"].rank == 3


class _Base(torch.nn.Module):
    """A frozen linear layer with megatron's (output, bias) return convention."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x, weight=None):
        return x @ (self.weight if weight is None else weight).t(), None


def _dropout_layer(p: float, k: int = 64, n: int = 48, rank: int = 8, site_id: int = 3):
    from lorafusion.adapters.lora.layer import LoRALayer
    from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear

    gen = torch.Generator().manual_seed(0)
    layer = MultiAdapterLinear(_Base(torch.randn(n, k, generator=gen)), {"q_proj": torch.arange(n)}, AdapterBatch(),
                               site_id=site_id, kernels="torch")
    lora = LoRALayer(lf.LoRAConfig(rank=rank, alpha=rank, dropout=p), k, n, generator=gen)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(n, rank, generator=gen))
    layer.add_adapter("a", "q_proj", lora)
    return layer, lora


def test_torch_dropout_rate_scale_and_sample_streams():
    """The torch path's dropout: each entry drops with probability p (to 1/65536) and kept entries are scaled
    so the update is unbiased; a sample's mask depends only on its seed, the layer and its position in the
    sample, not on its row in the microbatch or on the samples around it."""
    from lorafusion.adapters.dropout import drop_threshold

    p, k = 0.25, 64
    layer, lora = _dropout_layer(p, k=k)
    assert drop_threshold(0.05) == 3277 and drop_threshold(0.0) == 0 and drop_threshold(0.99999999) == 65535
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(1))
    seg = Segment("a", 0, 300, ((0, 100, 11), (100, 300, 12)))

    def dropped_in(layer, x, seg):  # the mask of `seg`'s rows when it is the microbatch's only segment
        layer.batch.segments = [seg]
        return layer._dropped(x, seg, p).mask()

    dropped = dropped_in(layer, x, seg)
    assert abs(dropped.float().mean().item() - drop_threshold(p) / 65536) < 0.01  # 19200 draws: 4 std
    # The same sample behind other rows, with other neighbours: the same mask on its rows.
    moved = Segment("a", 40, 340, ((40, 240, 12), (240, 340, 77)))
    x_moved = torch.randn(340, k)
    assert torch.equal(dropped_in(layer, x_moved, moved)[:200], dropped[100:300])
    assert not torch.equal(dropped_in(layer, x_moved, moved)[200:300], dropped[:100])  # another seed
    other_site, _ = _dropout_layer(p, k=k, site_id=4)
    assert not torch.equal(dropped_in(other_site, x, seg), dropped)
    # The update equals (x ⊙ keep / (1 - p')) Aᵀ Bᵀ · scaling with the mask drawn, in training mode only.
    layer.batch.segments = [seg]
    layer.train()
    out, _ = layer(x)
    keep = (~dropped).float() / (1.0 - drop_threshold(p) / 65536)
    expected = x @ layer.base.weight.t() + ((x * keep) @ lora.lora_A.t()) @ lora.lora_B.t() * lora.config.scaling
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    out, _ = layer(x)
    expected = x @ layer.base.weight.t() + (x @ lora.lora_A.t()) @ lora.lora_B.t() * lora.config.scaling
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_torch_dropout_is_unbiased_over_many_seeds():
    """Averaged over sample seeds, dropout's update approaches the undropped one (the 1/keep scale is exact)."""
    p, k = 0.5, 16
    layer, lora = _dropout_layer(p, k=k, n=8, rank=4)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(2))
    layer.train()
    total = torch.zeros(4, 8)
    for seed in range(2000):
        layer.batch.segments = [Segment("a", 0, 4, ((0, 4, seed),))]
        total += layer(x)[0].detach()
    base = x @ layer.base.weight.t()
    update = (x @ lora.lora_A.t()) @ lora.lora_B.t() * lora.config.scaling
    mean_update = total / 2000 - base
    assert (mean_update - update).abs().max().item() < 0.1 * update.abs().max().item()


def test_torch_fast_path_matches_the_generic_path():
    """The one-node torch path (update added in place into each job's rows) gives the output and gradients of
    the generic path (base layer, then a cat of per-job updates), which megatron's extra arguments select:
    several jobs, rows of no job, a fused layer with two targets, dropout on one job."""
    from lorafusion.adapters.lora.layer import LoRALayer
    from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear

    k, n = 24, 20
    gen = torch.Generator().manual_seed(5)
    layer = MultiAdapterLinear(_Base(torch.randn(n, k, generator=gen)),
                               {"gate_proj": torch.arange(0, 12), "up_proj": torch.arange(12, 20)}, AdapterBatch(),
                               site_id=1, kernels="torch")
    for job, targets, rank, p in (("a", ("gate_proj", "up_proj"), 4, 0.3), ("b", ("up_proj",), 2, 0.0)):
        for target in targets:
            lora = LoRALayer(lf.LoRAConfig(rank=rank, alpha=2 * rank, dropout=p), k, len(layer.out_rows[target]),
                             generator=gen)
            with torch.no_grad():
                lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen))
            layer.add_adapter(job, target, lora)
    layer.batch.segments = [Segment("a", 2, 9, ((2, 5, 7), (5, 9, 8))), Segment("b", 9, 15), Segment("a", 17, 20)]
    layer.train()
    x = torch.randn(22, 1, k, generator=gen)
    dy = torch.randn(22, 1, n, generator=gen)
    params = list(layer.adapters.parameters())

    def run(**kwargs):
        xi = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        out, _ = layer(xi, **kwargs)
        out.backward(dy)
        for job in ("a", "b"):
            layer.collect_grads(job)
        return out.detach(), [xi.grad, *(p.grad for p in params)]

    fast, fast_grads = run()
    generic, generic_grads = run(weight=layer.base.weight)
    torch.testing.assert_close(fast, generic, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fast, x @ layer.base.weight.t())  # the updates are there
    for got, want in zip(fast_grads, generic_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
