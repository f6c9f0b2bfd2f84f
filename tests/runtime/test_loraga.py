"""LoRA-GA: the gradient init pass, the authors' init, the intact base, and the rank-2r export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lorafusion as lf
from lorafusion.adapters.loraga import gradient_init
from lorafusion.data import IGNORE_INDEX, load_dataset, load_tokenizer
from lorafusion.prepare import prepare_run
from runtime.comm import StageComm, StagePlace
from runtime.windows import init_pass_window
from runtime.stage import StageRunner
from runtime.worker import StageWorker

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("shape, rank_of_g", [((40, 60), 12), ((9, 7), 7), ((2100, 2060), 6)])
def test_first_sgd_step_follows_the_best_rank_2r_gradient(shape, rank_of_g):
    """With A₀ = Vᵀ[:r]ζ and B₀ = U[:, r:2r]ζ, the first-order change of B A under one SGD step on (A, B) is
    −η·ζ²·G₂ᵣ (the best rank-2r approximation of G), per the LoRA-GA paper. The largest shape takes the randomised
    SVD (4r = 8 directions ≥ G's rank there: its range is found exactly), the others the exact one."""
    r, gamma = 2, 16.0
    gen = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(shape[0], rank_of_g, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(shape[1], rank_of_g, generator=gen, dtype=torch.float64))[0]
    g = left @ torch.diag(torch.linspace(3.0, 0.5, rank_of_g, dtype=torch.float64)) @ right.t()  # G = U S Vᵀ
    a, b = (t.double() for t in gradient_init(g, r, gamma, seed=0))
    zeta = shape[0] ** 0.25 / gamma ** 0.5
    singular = torch.linspace(3.0, 0.5, rank_of_g, dtype=torch.float64)
    best = left[:, :2 * r] @ torch.diag(singular[:2 * r]) @ right[:, :2 * r].t()  # G's own SVD, built above
    change = g @ a.t() @ a + b @ b.t() @ g  # dB·A + B·dA for dA = Bᵀ G, dB = G Aᵀ (η = s = 1)
    torch.testing.assert_close(change, zeta ** 2 * best, atol=1e-5, rtol=1e-5)  # the SVDs run in fp32


def _hf_weight_grads(checkpoint, samples, modules: list[str], load_hf_model) -> dict[str, torch.Tensor]:
    """d(mean token loss over `samples`)/dW of each HF module name, from transformers' autograd."""
    model = load_hf_model(checkpoint)
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules:
        named[f"{m}.weight"].requires_grad_(True)
    total = sum(s.num_loss_tokens for s in samples)
    for sample in samples:
        logits = model(torch.tensor([sample.input_ids])).logits[0]
        loss = F.cross_entropy(logits, torch.tensor(sample.labels), ignore_index=IGNORE_INDEX, reduction="sum")
        (loss / total).backward()
    return {m: named[f"{m}.weight"].grad for m in modules}


def test_init_pass_initialises_from_the_base_weights_gradient(train_checkpoint, examples_data, tmp_path,
                                                               load_hf_model):
    """One init batch = the whole dataset: A₀, B₀ of each module are the authors' init of transformers' own
    gradient of that module's weight, and A = A₀, B = B₀ (so ΔW = 0)."""
    data = examples_data / "arith_eval.jsonl"
    spec = lf.JobSpec(name="ga", dataset=str(data), adapter=lf.LoRAGAConfig(rank=2, alpha=4, init_batches=1,
                                                                             target_modules=["q_proj", "down_proj"]),
                      global_batch_size=50, max_steps=1)
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"), progress=False,
                       dtype="float32")
    prepared = prepare_run([spec], run)
    worker = StageWorker(run, [(spec, 1)])
    StageRunner(worker, StageComm(StagePlace(), worker.device)).run_window(init_pass_window(prepared.jobs, run))
    samples = load_dataset(data, load_tokenizer(train_checkpoint), max_seq_len=4096)
    modules = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    grads = _hf_weight_grads(train_checkpoint, samples, modules, load_hf_model)
    layers = dict(worker.adapters._job_layers("ga"))
    for module in modules:
        layer = layers[f"base_model.model.{module}"]
        assert layer.compute == "factors"
        want_a, want_b = gradient_init(grads[module], 2, 16.0, seed=0)
        torch.testing.assert_close(layer.lora_A0, want_a, atol=1e-5, rtol=1e-4)  # G agrees to fp32 rounding, and
        torch.testing.assert_close(layer.lora_B0, want_b, atol=1e-5, rtol=1e-4)  # the same SVD picks the same signs
        assert torch.equal(layer.lora_A, layer.lora_A0) and torch.equal(layer.lora_B, layer.lora_B0)
        assert layer.delta_weight().abs().max() < 1e-8  # s·(B A − B₀ A₀) in one rank-2r product: rounding only


def test_fit_starts_at_the_base_model_and_exports_a_rank_2r_lora(train_checkpoint, examples_data, tmp_path,
                                                                  load_hf_model):
    data = examples_data / "arith_eval.jsonl"
    spec = lf.JobSpec(name="ga", dataset=str(data), adapter=lf.LoRAGAConfig(rank=2, alpha=4, init_batches=2),
                      global_batch_size=50, max_steps=2, learning_rate=5e-3)
    out = tmp_path / "run"
    result = lf.fit([spec], lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False,
                                         dtype="float32", engine="local"))
    first = json.loads((out / "ga" / "metrics.jsonl").read_text().splitlines()[0])
    base = lf.evaluate(train_checkpoint, None, data, dtype="float32", device="cpu")
    assert first["loss"] == pytest.approx(base.loss, rel=1e-5)  # ΔW = 0 after the init: the base model's loss
    config = json.loads((out / "ga" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    trained = lf.evaluate(train_checkpoint, result["ga"].adapter_path, data, dtype="float32", device="cpu")
    assert trained.loss < base.loss
    samples = load_dataset(data, load_tokenizer(train_checkpoint), max_seq_len=4096)
    model = peft.PeftModel.from_pretrained(load_hf_model(train_checkpoint), result["ga"].adapter_path).eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(torch.tensor([s.input_ids])).logits[0], torch.tensor(s.labels),
                                    ignore_index=IGNORE_INDEX, reduction="sum").item() for s in samples)
    assert total / trained.tokens == pytest.approx(trained.loss, rel=1e-5)  # PEFT on the unmodified base agrees
