"""LoRA-SB: the init from the sign of the job's gradient (the best rank-r approximation, deterministic), only R
trains with ∇R = s·Bᵀ G Aᵀ, the init pass in a fit, exact resume after it, and the plain-LoRA export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lorafusion as lf
from lorafusion.adapters import get_variant
from lorafusion.adapters.base import BaseView
from lorafusion.adapters.lorasb import LoRASBLayer
from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear, Segment
from lorafusion.data import IGNORE_INDEX, load_dataset, load_tokenizer
from tests.runtime.test_checkpointing import assert_resume_is_exact, make_worker, prepare
from tests.runtime.test_loraga import _hf_weight_grads

peft = pytest.importorskip("peft")


def _initialised(config: lf.LoRASBConfig, grad: torch.Tensor, *, seed: int = 0, layer_index: int = 0,
                 target: str = "q_proj") -> LoRASBLayer:
    out, inp = grad.shape
    layer = LoRASBLayer(config, inp, out, generator=torch.Generator().manual_seed(seed), layer_index=layer_index,
                        target=target)
    layer.finish_init_pass(grad)
    return layer


def _best_rank_r(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the best rank-r approximation of `matrix`, its singular values), from a float64 SVD made here."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r], s


def test_yaml_type_lorasb(tmp_path):
    """`type: lorasb` in a jobs YAML; alpha left out is rank (s = 1), and the config round-trips through its dict."""
    (tmp_path / "jobs.yaml").write_text(
        "run: {base_model: m, output_dir: out}\n"
        "jobs:\n  - {name: sb, dataset: d.jsonl,\n"
        "     adapter: {type: lorasb, rank: 4, init_batches: 2, init_scale: 1e-5}}\n")
    jobs, _ = lf.load_config(tmp_path / "jobs.yaml")
    config = jobs[0].adapter
    assert isinstance(config, lf.LoRASBConfig) and config.init_pass_batches == 2 and config.init_scale == 1e-5
    assert (config.alpha, config.scaling) == (4.0, 1.0)
    assert lf.JobSpec(name="sb", dataset="d.jsonl", adapter=config.to_dict()).adapter == config


@pytest.mark.parametrize("shape", [(40, 60), (33, 17)])
def test_init_is_the_best_rank_r_approximation_of_the_sign_step(shape):
    """s·B R₀ A = trunc_r(−init_scale·sign(G)) (Eckart–Young: the residual is the tail singular values), with
    orthonormal frozen A and B, whatever s is."""
    r, eta = 4, 1e-3
    config = lf.LoRASBConfig(rank=r, alpha=7, init_scale=eta)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    layer = _initialised(config, grad)
    a, b, r0 = (t.double() for t in (layer.lorasb_A, layer.lorasb_B, layer.lorasb_R))
    approx = -eta * torch.sign(grad).double()
    best, singular = _best_rank_r(approx, r)
    delta = config.scaling * b @ r0 @ a
    torch.testing.assert_close(delta, best, atol=1e-8, rtol=1e-5)
    residual = (approx - delta).pow(2).sum()
    torch.testing.assert_close(residual, singular[r:].pow(2).sum(), atol=1e-12, rtol=1e-5)
    torch.testing.assert_close(a @ a.t(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.t() @ b, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(torch.diag(torch.diag(r0)), r0)  # R₀ diagonal
    torch.testing.assert_close(layer.delta_weight().double(), best, atol=1e-8, rtol=1e-5)


def test_large_module_takes_the_seeded_randomised_svd():
    """Above the exact-SVD size: the randomised SVD, still the best rank-r approximation where the sign step has rank
    ≤ r (a rank-1 gradient's sign is rank 1), bit-identical for two jobs and untouched by the global RNG."""
    gen = torch.Generator().manual_seed(2)
    grad = torch.outer(torch.randn(2100, generator=gen), torch.randn(2060, generator=gen))
    config = lf.LoRASBConfig(rank=2, init_scale=1e-3)
    torch.manual_seed(0)
    first = _initialised(config, grad, seed=1, layer_index=5, target="up_proj")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    second = _initialised(config, grad, seed=2, layer_index=5, target="up_proj")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor advanced
    for name in ("lorasb_A", "lorasb_B", "lorasb_R"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    torch.testing.assert_close(first.delta_weight(), -1e-3 * torch.sign(grad), atol=1e-7, rtol=0)


def test_same_gradient_and_config_give_bit_identical_factors():
    """The Fed-SB contract: A, B, R₀ depend on the gradient and the config only, not on the job's seed."""
    grad = torch.randn(24, 36, generator=torch.Generator().manual_seed(3))
    config = lf.LoRASBConfig(rank=3, init_scale=1e-2)
    one = _initialised(config, grad, seed=10)
    two = _initialised(lf.LoRASBConfig(rank=3, init_scale=1e-2), grad, seed=11)
    for name in ("lorasb_A", "lorasb_B", "lorasb_R"):
        assert torch.equal(getattr(one, name), getattr(two, name)), name


def test_only_r_trains_and_its_gradient_is_s_bt_g_at():
    """Through the multi-job layer: A and B get no gradient, R gets s·Bᵀ G Aᵀ with G = dyᵀ x the gradient of the
    module's weight (here a plain nn.Linear-like stand-in)."""
    gen = torch.Generator().manual_seed(4)
    n, k = 20, 28
    weight = torch.randn(n, k, generator=gen)

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(weight, requires_grad=False), None

        def forward(self, x, weight=None):
            return x @ self.weight.t(), None

    base = Linear()
    site = MultiAdapterLinear(base, {"down_proj": torch.arange(n)}, AdapterBatch(), site_id=0, kernels="torch")
    config = lf.LoRASBConfig(rank=3, alpha=6, init_scale=1e-2, target_modules=["down_proj"])
    layer = get_variant("lorasb").layer_cls(config, k, n, generator=gen, base=BaseView(base, torch.arange(n)),
                                            target="down_proj")
    site.add_adapter("sb", "down_proj", layer)
    layer.finish_init_pass(torch.randn(n, k, generator=gen))
    with torch.no_grad():
        layer.lorasb_R.add_(torch.randn(3, 3, generator=gen))
    site.batch.segments = [Segment("sb", 0, 9)]
    x, dy = torch.randn(9, 1, k, generator=gen), torch.randn(9, 1, n, generator=gen)
    out, _ = site(x)
    out.backward(dy)
    site.collect_grads("sb")
    assert layer.lorasb_A.grad is None and layer.lorasb_B.grad is None
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["lorasb_R"]
    g = dy.reshape(9, n).t() @ x.reshape(9, k)  # dL/dW [N, K]
    want = config.scaling * layer.lorasb_B.t() @ g @ layer.lorasb_A.t()
    torch.testing.assert_close(layer.lorasb_R.grad, want, atol=1e-5, rtol=1e-5)


def test_init_pass_hands_each_layer_the_jobs_gradient(train_checkpoint, examples_data, tmp_path, load_hf_model,
                                                      monkeypatch):
    """One init batch = the whole dataset: each module gets transformers' gradient of its weight, and its A, B, R₀
    are the best rank-r approximation of −init_scale·sign(that gradient)."""
    from runtime.worker import StageWorker

    data = examples_data / "arith_eval.jsonl"
    config = lf.LoRASBConfig(rank=2, init_batches=1, init_scale=1e-3, target_modules=["k_proj", "up_proj"])
    spec = lf.JobSpec(name="sb", dataset=str(data), adapter=config, global_batch_size=50, max_steps=1)
    handed = {}
    real = StageWorker.finish_init_pass

    def record(worker, job, grads):
        layers = worker.adapters.init_pass_layers(job)
        handed.update({(layer.layer_index, layer.target): g.clone() for layer, g in zip(layers, grads)})
        real(worker, job, grads)

    monkeypatch.setattr(StageWorker, "finish_init_pass", record)
    worker = make_worker(prepare(train_checkpoint, tmp_path / "run", [spec]), init_pass=True)
    samples = load_dataset(data, load_tokenizer(train_checkpoint), max_seq_len=4096)
    modules = {(i, p.rsplit(".", 1)[1]): f"model.layers.{i}.{p}" for i in range(2)
               for p in ("self_attn.k_proj", "mlp.up_proj")}
    grads = _hf_weight_grads(train_checkpoint, samples, list(modules.values()), load_hf_model)
    layers = dict(worker.adapters._job_layers("sb"))
    assert len(handed) == len(modules) == 4
    for key, module in modules.items():
        torch.testing.assert_close(handed[key], grads[module], atol=1e-6, rtol=1e-4)
        layer = layers[f"base_model.model.{module}"]
        assert layer.compute == "factors"
        best, _ = _best_rank_r(-1e-3 * torch.sign(handed[key]), 2)
        torch.testing.assert_close(layer.delta_weight().double(), best, atol=1e-8, rtol=1e-5)


def test_resume_after_the_init_pass_is_exact(train_checkpoint, examples_data, tmp_path):
    """Checkpointed after 2 steps and resumed: bit-identical to the straight run (A and B, which only the init pass
    computes, come from the checkpoint), beside a LoRA job."""
    jobs = [lf.JobSpec(name="sb", dataset=str(examples_data / "arith.jsonl"), global_batch_size=3, max_steps=5,
                       adapter=lf.LoRASBConfig(rank=2, init_batches=2, init_scale=1e-2, dropout=0.1),
                       learning_rate=1e-2, seed=1, lr_schedule="cosine", warmup_steps=1),
            lf.JobSpec(name="lora", dataset=str(examples_data / "greet.jsonl"), global_batch_size=4, max_steps=5,
                       adapter=lf.LoRAConfig(rank=2, target_modules=["q_proj"]), learning_rate=1e-3, seed=2)]
    def holds_a_and_b(worker):  # frozen, but the job's state: only the init pass computes them
        assert "layers.1.down_proj.lorasb_A" in worker.job_state("sb")["params"]

    assert_resume_is_exact(train_checkpoint, tmp_path, jobs, steps=5, on_resume=holds_a_and_b)


def _loss(model, samples) -> float:
    """Mean token loss of an HF model over `samples`."""
    with torch.no_grad():
        total = sum(F.cross_entropy(model(torch.tensor([s.input_ids])).logits[0], torch.tensor(s.labels),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item() for s in samples)
    return total / sum(s.num_loss_tokens for s in samples)


def test_fit_starts_from_the_init_trains_r_and_exports_a_plain_lora(train_checkpoint, examples_data, tmp_path,
                                                                   load_hf_model):
    """The first step's loss is that of W + trunc_r(−init_scale·sign(G)) with G transformers' gradient (built here
    as a PEFT LoRA), not the base model's; training lowers it, and PEFT loads the export with our loss."""
    data = examples_data / "arith_eval.jsonl"
    r, eta, targets = 4, 2e-3, ["q_proj", "up_proj", "down_proj"]
    spec = lf.JobSpec(name="sb", dataset=str(data), global_batch_size=50, max_steps=3, learning_rate=2e-2,
                      adapter=lf.LoRASBConfig(rank=r, alpha=8, init_batches=1, init_scale=eta, target_modules=targets))
    out = tmp_path / "run"
    result = lf.fit([spec], lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False,
                                         dtype="float32", engine="local"))
    first = json.loads((out / "sb" / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    samples = load_dataset(data, load_tokenizer(train_checkpoint), max_seq_len=4096)
    modules = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
    grads = _hf_weight_grads(train_checkpoint, samples, modules, load_hf_model)
    start = peft.get_peft_model(load_hf_model(train_checkpoint),
                                peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets))
    named = dict(start.named_parameters())
    with torch.no_grad():
        for module in modules:
            u, s, vh = torch.linalg.svd(-eta * torch.sign(grads[module]).double(), full_matrices=False)
            named[f"base_model.model.{module}.lora_A.default.weight"].copy_(vh[:r])
            named[f"base_model.model.{module}.lora_B.default.weight"].copy_(u[:, :r] * s[:r])
    base = _loss(load_hf_model(train_checkpoint), samples)
    assert first == pytest.approx(_loss(start.eval(), samples), rel=1e-5)
    assert abs(first - base) > 1e-3  # the init moved the model: W + trunc_r(ΔW_approx), not W

    config = json.loads((out / "sb" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", r, 8.0, False)
    trained = lf.evaluate(train_checkpoint, result["sb"].adapter_path, data, dtype="float32", device="cpu")
    assert trained.loss < first
    model = peft.PeftModel.from_pretrained(load_hf_model(train_checkpoint), result["sb"].adapter_path).eval()
    assert _loss(model, samples) == pytest.approx(trained.loss, rel=1e-5)  # PEFT on the unmodified base agrees
