"""DESIGN promises 1 (isolation between co-batched jobs) and 3 (loss normalisation per job)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lorafusion as lf
from lorafusion.adapter_io import read_peft_adapter
from lorafusion.adapters.attach import ModelAdapters
from lorafusion.adapters.multi import Segment
from lorafusion.data import IGNORE_INDEX, SampleStream, load_dataset, load_tokenizer
from lorafusion.models import build_model
from lorafusion.prepare import prepare_run
from runtime.windows import plan_window
from runtime.stage import local_runner

pytestmark = pytest.mark.usefixtures("ray_session")

RTOL = 1e-5  # DESIGN promise 1 (fp32), relative to each tensor's max |value|
CAPACITY = 1024  # every round of the three jobs below fits one microbatch: identical reduction order
SPLIT_CAPACITY = 256  # forces co-batching to split jobs' global batches differently from solo runs


def job(examples_data: Path, name: str, dataset: str, *, rank: int, batch: int, seed: int,
        dropout: float = 0.0, steps: int = 4) -> lf.JobSpec:
    return lf.JobSpec(
        name=name, dataset=str(examples_data / f"{dataset}.jsonl"),
        adapter=lf.LoRAConfig(rank=rank, alpha=2 * rank, dropout=dropout),
        global_batch_size=batch, learning_rate=1e-3, max_steps=steps, seed=seed,
    )


def three_jobs(examples_data: Path, dropout: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> list[lf.JobSpec]:
    """Different datasets, ranks, global batch sizes and seeds."""
    return [
        job(examples_data, "greet", "greet", rank=4, batch=4, seed=1, dropout=dropout[0]),
        job(examples_data, "arith", "arith", rank=8, batch=3, seed=2, dropout=dropout[1]),
        job(examples_data, "reverse", "reverse", rank=2, batch=5, seed=3, dropout=dropout[2]),
    ]


def fit_adapters(checkpoint: Path, output_dir: Path, jobs: list[lf.JobSpec], capacity: int,
                 **run_fields) -> dict[str, dict]:
    """job -> {tensors, metrics} after lf.fit."""
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(output_dir),
                       max_tokens_per_microbatch=capacity, progress=False, dtype="float32",
                       **run_fields)
    result = lf.fit(jobs, run)
    out = {}
    for spec in jobs:
        assert result[spec.name].status == "finished", result[spec.name].error
        lines = (output_dir / spec.name / "metrics.jsonl").read_text().splitlines()
        out[spec.name] = {
            # what was trained: the variant's own tensors where its PEFT export is a truncated-SVD LoRA (TeRA),
            # whose singular vectors are only defined up to sign and rotation
            "tensors": read_peft_adapter(output_dir / spec.name / "adapter")[1],
            "metrics": [json.loads(line) for line in lines],
        }
    return out


def max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert got.keys() == want.keys()
    worst = max(((got[k] - want[k]).abs().max().item() / max(want[k].abs().max().item(), 1e-30), k) for k in want)
    return worst


def assert_same_adapters(together: dict, alone: dict, name: str) -> None:
    worst, key = max_rel_diff(together[name]["tensors"], alone[name]["tensors"])
    assert worst <= RTOL, f"job {name}: together vs alone differ by {worst:.3e} (relative) in {key}"
    steps_t = [(m["step"], m["loss"]) for m in together[name]["metrics"] if "loss" in m]
    steps_a = [(m["step"], m["loss"]) for m in alone[name]["metrics"] if "loss" in m]
    assert [s for s, _ in steps_t] == [s for s, _ in steps_a]
    for (_, lt), (_, la) in zip(steps_t, steps_a):
        assert lt == pytest.approx(la, rel=1e-6), f"job {name}: per-step loss differs together vs alone"


# ----------------------------------------------------------------------------- promise 1, via lf.fit


@pytest.fixture(scope="module")
def alone(train_checkpoint, examples_data, tmp_path_factory) -> dict[str, dict]:
    """Each of three_jobs (no dropout) fitted alone, in process: job -> {tensors, metrics}. The fits together
    below run on Ray actors (the session's Ray instance), so each comparison also crosses the engines, which give
    the same adapters bit for bit (tests/runtime/test_resume.py)."""
    return {spec.name: fit_adapters(train_checkpoint, tmp_path_factory.mktemp(f"alone_{spec.name}"), [spec], CAPACITY,
                                    engine="local")[spec.name]
            for spec in three_jobs(examples_data)}


def test_jobs_trained_together_equal_each_trained_alone(alone, train_checkpoint, examples_data, tmp_path):
    jobs = three_jobs(examples_data)
    together = fit_adapters(train_checkpoint, tmp_path / "together", jobs, CAPACITY)
    for spec in jobs:
        b_max = max(v.abs().max().item() for k, v in together[spec.name]["tensors"].items() if "lora_B" in k)
        assert b_max > 1e-4, f"job {spec.name}: B stayed ~0, so the comparison would be vacuous"
        assert_same_adapters(together, alone, spec.name)


def test_dropout_job_trained_together_equals_itself_alone(alone, train_checkpoint, examples_data, tmp_path):
    jobs = three_jobs(examples_data, dropout=(0.1, 0.2, 0.0))
    together = fit_adapters(train_checkpoint, tmp_path / "together", jobs, CAPACITY)
    for spec in jobs[:2]:
        solo = fit_adapters(train_checkpoint, tmp_path / f"alone_{spec.name}", [spec], CAPACITY, engine="local")
        assert_same_adapters(together, solo, spec.name)
    # Dropout is really on: without it the same job ends somewhere else.
    worst, _ = max_rel_diff(together["greet"]["tensors"], alone["greet"]["tensors"])
    assert worst > 1e-2, "dropout=0.1 trained exactly like dropout=0; the masks are not applied"


# ----------------------------------------------------------------------------- promise 1, packing splits jobs


def randomize(adapters: ModelAdapters, name: str, seed: int, std: float = 0.05) -> None:
    """Non-zero B (and A), so every adapter parameter gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.parameters(name):
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def first_round(checkpoint: Path, output_dir: Path, jobs: list[lf.JobSpec], capacity: int):
    """Each job's gradient after the engine's first window (one global batch per job), and its microbatches."""
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(output_dir),
                       max_tokens_per_microbatch=capacity, progress=False, dtype="float32")
    prepared = prepare_run(jobs, run)
    runner = local_runner(run, [(j.spec, j.total_steps) for j in prepared.jobs])
    for spec in jobs:
        randomize(runner.worker.adapters, spec.name, seed=100 + spec.seed)
    planned = plan_window(prepared.jobs, {j.name: range(0, 1) for j in prepared.jobs}, run)
    planned.window.steps_after = {}  # keep the gradients instead of stepping
    runner.run_window(planned.window)
    for spec in jobs:
        runner.worker.collect_grads(spec.name)
    grads = {
        spec.name: {f"{i}": p.grad.detach().clone()
                    for i, p in enumerate(runner.worker.adapters.parameters(spec.name))}
        for spec in jobs
    }
    return grads, [slot.items for slot in planned.window.slots[0]]


def job_split(plan, name: str) -> list[list[int]]:
    """How a job's samples are cut into microbatches (their lengths per microbatch)."""
    return [[len(s) for j, s, _ in items if j == name] for items in plan if any(j == name for j, _, _ in items)]


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_gradients_do_not_depend_on_how_co_batching_splits_a_job(train_checkpoint, examples_data, tmp_path, dropout):
    """With a small capacity the packer cuts a job's global batch differently when other jobs share the
    round. Only the fp32 summation order may change: not the scaling, and not the dropout masks."""
    jobs = three_jobs(examples_data, dropout=(dropout, dropout, 0.0))
    together, plan_together = first_round(train_checkpoint, tmp_path / "together", jobs, SPLIT_CAPACITY)
    resplit = 0
    for spec in jobs:
        alone, plan_alone = first_round(train_checkpoint, tmp_path / f"alone_{spec.name}", [spec], SPLIT_CAPACITY)
        resplit += job_split(plan_together, spec.name) != job_split(plan_alone, spec.name)
        worst, key = max_rel_diff(together[spec.name], alone[spec.name])
        assert worst <= RTOL, (
            f"job {spec.name} (dropout {spec.adapter.dropout}): its gradient changes by {worst:.3e} (relative, "
            f"parameter #{key}) when co-batched; split together {job_split(plan_together, spec.name)} vs "
            f"alone {job_split(plan_alone, spec.name)}"
        )
    assert resplit >= 1, "the capacity no longer forces different splits; the test lost its point"


# ----------------------------------------------------------------------------- promise 3


def test_gradient_is_job_token_sum_over_its_loss_tokens(train_checkpoint, examples_data, tmp_path):
    """The engine's gradient for a job at an optimizer step equals d/dθ (Σ token losses of the job's global
    batch / loss tokens of that batch), computed here one sample at a time from logits."""
    capacity = 64
    target = job(examples_data, "arith", "arith", rank=4, batch=6, seed=5, steps=2)  # prompts: few loss tokens
    other = job(examples_data, "greet", "greet", rank=2, batch=3, seed=6, steps=2)
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"),
                       max_tokens_per_microbatch=capacity, progress=False, dtype="float32")
    prepared = prepare_run([target, other], run)
    runner = local_runner(run, [(j.spec, j.total_steps) for j in prepared.jobs])
    seen: dict[str, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}
    original_step = runner.worker.step

    def recording_step(name: str, norm: float) -> float:
        params = runner.worker.adapters.parameters(name)
        seen.setdefault(name, []).append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return original_step(name, norm)

    runner.worker.step = recording_step
    losses = []
    for step in range(2):  # the engine's windows, one global batch per job each, as a 1-stage fit runs them
        planned = plan_window(prepared.jobs, {j.name: range(step, step + 1) for j in prepared.jobs}, run)
        events = runner.run_window(planned.window).steps
        losses.append({e.job: e.loss for e in events})
    params, engine_grads = seen["arith"][1]  # step 2: B is non-zero, so A has a gradient too

    batch = prepared.jobs[0].global_batch(1)  # the job's second global batch
    spread = sum(any(item[0] == "arith" for item in slot.items) for slot in planned.window.slots[0])
    assert spread >= 2, "the job's global batch should span several microbatches"
    loss_tokens = sum(s.num_loss_tokens for s in batch)
    assert loss_tokens < sum(len(s) for s in batch), "prompt tokens must carry no loss"

    model, arch = build_model(train_checkpoint)
    adapters = ModelAdapters(model, arch)
    adapters.add_job("arith", target.adapter, seed=target.seed)
    with torch.no_grad():
        for mine, value in zip(adapters.parameters("arith"), params):
            mine.copy_(value)
    total = torch.zeros((), dtype=torch.float64)
    for sample in batch:
        adapters.batch.segments = [Segment("arith", 0, len(sample))]
        logits = model(torch.tensor([sample.input_ids]), torch.arange(len(sample)).unsqueeze(0), None)[0]
        total = total + F.cross_entropy(logits.float(), torch.tensor(sample.labels),
                                        ignore_index=IGNORE_INDEX, reduction="sum").double()
    adapters.batch.segments = []
    (total / loss_tokens).backward()
    adapters.collect_grads("arith")

    engine_loss = losses[1]["arith"]
    assert engine_loss == pytest.approx(float(total / loss_tokens), rel=1e-5)
    for i, (mine, theirs) in enumerate(zip(adapters.parameters("arith"), engine_grads)):
        assert mine.grad.abs().max() > 0, f"parameter #{i} has no gradient; the check would be vacuous"
        rel = ((mine.grad - theirs).abs().max() / mine.grad.abs().max()).item()
        assert rel <= RTOL, f"parameter #{i}: engine gradient differs from Σ losses / loss tokens by {rel:.3e}"


def variant_jobs(examples_data: Path) -> list[lf.JobSpec]:
    """One job per variant computing its own way: factors with a column scale (DoRA), factors from shared
    tensors (VeRA, Uni-LoRA), sparse (SHiRA) and full-rank (RandLoRA) deltas, a gradient init pass (LoRA-GA);
    dropout on two of them."""
    adapters = {
        "dora": lf.DoRAConfig(rank=4, alpha=8, dropout=0.1),
        "vera": lf.VeRAConfig(rank=16, projection_seed=2, target_modules=["q_proj", "v_proj", "up_proj"]),
        "randlora": lf.RandLoRAConfig(rank=16, alpha=8, dropout=0.1, target_modules=["k_proj", "down_proj"]),
        "shira": lf.SHiRAConfig(rank=2, mask_seed=3),
        "unilora": lf.UniLoRAConfig(rank=4, theta_dim=512, projection_seed=5),
        "loraga": lf.LoRAGAConfig(rank=2, init_batches=2, target_modules=["o_proj", "gate_proj"]),
        # adapter variants II: an r×r core from an init pass, per-step ranks, nested ranks, shared blocks, W's own
        # columns, W's LU factors, a branch on W x, a shared tensor network, re-factorisations mid-run
        "lorasb": lf.LoRASBConfig(rank=2, init_batches=1, target_modules=["q_proj", "down_proj"]),
        "dylora": lf.DyLoRAConfig(rank=4, dropout=0.1, target_modules=["v_proj", "up_proj"]),
        "matryoshka": lf.MatryoshkaLoRAConfig(train_ranks=[1, 2, 4], target_modules=["k_proj", "o_proj"]),
        # not gate_proj: in this job's slot its gradients are near AdamW's eps (a plain LoRA there differs by 1.2e-5)
        "blocklora": lf.BlockLoRAConfig(rank=4, blocks=2, target_modules=["up_proj"]),
        "paca": lf.PaCAConfig(rank=2, target_modules=["q_proj", "up_proj"]),
        "loldu": lf.LoLDUConfig(rank=2, target_modules=["v_proj", "down_proj"]),
        "hydra": lf.HydraConfig(rank=2, dropout=0.1, target_modules=["o_proj"]),
        "tera": lf.TeRAConfig(rank=2, target_modules=["q_proj", "gate_proj"]),
        "lorasqueeze": lf.LoRASqueezeConfig(rank=4, target_rank=2, squeeze_start_step=1, squeeze_end_step=2,
                                            target_modules=["k_proj"]),
    }
    data = ["greet", "arith", "reverse", "arith", "greet", "reverse"] * 3
    return [lf.JobSpec(name=name, dataset=str(examples_data / f"{data[i]}.jsonl"), adapter=adapter,
                       global_batch_size=3 + i % 2, learning_rate=1e-3, max_steps=3, seed=10 + i)
            for i, (name, adapter) in enumerate(adapters.items())]


def test_jobs_of_different_variants_stay_isolated(train_checkpoint, examples_data, tmp_path):
    """Jobs of every variant share microbatches (and the init passes of LoRA-GA and LoRA-SB); each ends with the
    adapter it gets alone, and its metrics name its variant."""
    jobs = variant_jobs(examples_data)
    together = fit_adapters(train_checkpoint, tmp_path / "together", jobs, SPLIT_CAPACITY, engine="local")
    for spec in jobs:
        alone = fit_adapters(train_checkpoint, tmp_path / f"alone_{spec.name}", [spec], SPLIT_CAPACITY, engine="local")
        assert_same_adapters(together, alone, spec.name)
        assert {m["variant"] for m in together[spec.name]["metrics"] if "loss" in m} == {spec.adapter.type}
