"""The fused kernels inside the model: a training step with kernels on and off gives the same loss (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters.multi import AdapterBatch, MultiAdapterLinear, Segment
from lorafusion.batching import build_microbatch
from lorafusion.prepare import prepare_run
from runtime.worker import StageWorker


def _two_steps(checkpoint: Path, examples_data: Path, output_dir: Path, kernels: str):
    """Losses of two microbatches around one optimizer step, and every adapter gradient of the second."""
    jobs = [
        lf.JobSpec(name="greet", dataset=str(examples_data / "greet.jsonl"), seed=1, global_batch_size=2, max_steps=2,
                   adapter=lf.LoRAConfig(rank=4, alpha=8), learning_rate=1e-2),
        lf.JobSpec(name="arith", dataset=str(examples_data / "arith.jsonl"), seed=2, global_batch_size=2, max_steps=2,
                   adapter=lf.LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                   learning_rate=1e-2),
    ]
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(output_dir), kernels=kernels, progress=False,
                       dtype="float32")
    prepared = prepare_run(jobs, run)
    worker = StageWorker(run, [(job.spec, job.total_steps) for job in prepared.jobs])
    # one sample of each job, with its own dropout seed (unused at p = 0 but carried into the segment table)
    items = [(job.name, job.global_batch(0)[0], job.dropout_seeds(0)[0]) for job in prepared.jobs]
    mb = build_microbatch(items)
    weights = {"greet": 0.1, "arith": 0.1}
    first = worker.forward_backward(mb, weights)
    for job in ("greet", "arith"):
        worker.step(job, worker.grad_norm_sq(job) ** 0.5)
    second = worker.forward_backward(mb, weights)
    grads = {job: [p.grad.clone() for p in worker.adapters.parameters(job)] for job in ("greet", "arith")}
    return first, second, grads


def test_training_step_same_with_kernels_on_and_off(train_checkpoint, examples_data, tmp_path):
    ref = _two_steps(train_checkpoint, examples_data, tmp_path / "torch", "torch")
    fused = _two_steps(train_checkpoint, examples_data, tmp_path / "triton", "triton")
    for losses_ref, losses_fused in zip(ref[:2], fused[:2]):
        for job in losses_ref:
            assert abs(losses_fused[job] - losses_ref[job]) <= 1e-5 * abs(losses_ref[job]), job
    # Gradients: the fused base GEMM sums in another order than torch's, so activations differ by fp32
    # rounding (~1e-7) that grows through two layers, attention and the loss; after one step B is small and
    # dA = s·(dy B)ᵀ x̂ cancels, so some entries sit at ~1e-4 of the tensor's largest (measured 7e-5).
    for job, grads in ref[2].items():
        for g_ref, g_fused in zip(grads, fused[2][job]):
            scale = g_ref.abs().max().item()
            assert scale > 0
            torch.testing.assert_close(g_fused, g_ref, atol=2e-4 * scale, rtol=0.0)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = torch.nn.Linear(8, 8)
    layer = MultiAdapterLinear(base, {}, AdapterBatch([Segment("a", 0, 2)]), kernels="triton")
    layer.adapters["job_a"] = torch.nn.ModuleDict()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(torch.randn(2, 1, 8))


def test_run_config_rejects_unknown_kernels(tmp_path):
    with pytest.raises(ValueError, match="run.kernels='cuda'"):
        lf.RunConfig(base_model=str(tmp_path), output_dir=str(tmp_path / "out"), kernels="cuda")


@pytest.mark.parametrize("variant", ["dora", "vera", "unilora", "loraga", "shira", "randlora", "dylora", "lorasb",
                                     "matryoshka", "hydra", "paca"])
def test_variant_jobs_same_through_the_kernels(variant):
    """A site with a LoRA job and a job of each variant (DoRA's column scale inside the kernels; factors built from
    shared tensors, a gradient init, a rank mask, an r×r core, nested scales, W itself; SHiRA's, RandLoRA's and
    PaCA's own updates after them): output and every gradient equal the torch path's (fp32)."""
    from tests.lorafusion.test_variants import _site

    results = []
    for kernels in ("torch", "triton"):
        site, _, params = _site(variant)
        site.kernels = kernels
        site.batch.segments = [Segment("l", 0, 5), Segment("v", 5, 14), Segment("v", 16, 19)]
        site.train()
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(19, 1, 36, generator=gen, requires_grad=True)
        out, _ = site(x)
        out.backward(torch.randn(19, 1, 40, generator=gen))
        for job in ("l", "v"):
            site.collect_grads(job)
        results.append([out.detach(), x.grad, *(p.grad for p in params)])
    for i, (want, got) in enumerate(zip(*results)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"tensor {i}: {m}")
