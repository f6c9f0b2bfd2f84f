"""JobSpec.optimizer in whole fits: LoRA-Pro and AltLoRA jobs beside an AdamW job train as they do alone, resume
exactly, export plain PEFT LoRA adapters, and their optimizer state is in the run's memory report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import lorafusion as lf
from runtime.fit import RUN_METRICS
from tests.runtime.test_checkpointing import assert_resume_is_exact
from tests.runtime.test_isolation import CAPACITY, RTOL, assert_same_adapters, fit_adapters, max_rel_diff


def optimizer_jobs(examples_data: Path) -> list[lf.JobSpec]:
    common = {"learning_rate": 1e-3, "max_steps": 3, "lr_schedule": "cosine", "warmup_steps": 1}
    return [
        lf.JobSpec(name="adamw", dataset=str(examples_data / "greet.jsonl"), adapter=lf.LoRAConfig(rank=4, alpha=8),
                   global_batch_size=4, seed=1, **common),
        lf.JobSpec(name="pro", dataset=str(examples_data / "arith.jsonl"), optimizer=lf.LoRAProConfig(),
                   adapter=lf.LoRAConfig(rank=2, alpha=4, target_modules=["q_proj", "down_proj"]),
                   global_batch_size=3, seed=2, weight_decay=0.01, **common),
        lf.JobSpec(name="alt", dataset=str(examples_data / "reverse.jsonl"), optimizer=lf.AltLoRAConfig(),
                   adapter=lf.RsLoRAConfig(rank=4, alpha=4, target_modules=["v_proj", "up_proj"]),
                   global_batch_size=5, seed=3, **common),
    ]


def expected_state_bytes(optimizer: str, tensors: dict) -> int:
    """fp32 state from the exported factors: AdamW 2 moments per tensor; LoRA-Pro 2·N·K per module; AltLoRA m_A,
    m_B and B_old."""
    a = {k: t for k, t in tensors.items() if k.endswith("lora_A.weight")}
    b = {k: t for k, t in tensors.items() if k.endswith("lora_B.weight")}
    if optimizer == "adamw":
        return 4 * 2 * sum(t.numel() for t in tensors.values())
    if optimizer == "lorapro":
        return 4 * 2 * sum(b[k.replace("lora_A", "lora_B")].shape[0] * t.shape[1] for k, t in a.items())
    return 4 * (sum(t.numel() for t in a.values()) + 2 * sum(t.numel() for t in b.values()))


def test_mixed_optimizers_train_together_as_alone(train_checkpoint, examples_data, tmp_path):
    jobs = optimizer_jobs(examples_data)
    together = fit_adapters(train_checkpoint, tmp_path / "together", jobs, CAPACITY, engine="local")
    for spec in jobs[1:]:
        alone = fit_adapters(train_checkpoint, tmp_path / spec.name, [spec], CAPACITY, engine="local")
        assert_same_adapters(together, alone, spec.name)
        adamw = dataclasses.replace(spec, optimizer=lf.AdamWConfig())  # the method really is what steps the job
        with_adamw = fit_adapters(train_checkpoint, tmp_path / f"{spec.name}-adamw", [adamw], CAPACITY, engine="local")
        assert max_rel_diff(alone[spec.name]["tensors"], with_adamw[spec.name]["tensors"])[0] > 1e-2
    metrics = json.loads((tmp_path / "together" / RUN_METRICS).read_text())
    for spec in jobs:
        config = json.loads((tmp_path / "together" / spec.name / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and not config["use_dora"]
        tensors = together[spec.name]["tensors"]
        assert set(k.rsplit(".", 2)[-2] for k in tensors) == {"lora_A", "lora_B"}
        assert metrics["optimizer_state_bytes"][spec.name] == expected_state_bytes(spec.optimizer.type, tensors)
        steps = [m for m in together[spec.name]["metrics"] if "loss" in m]
        assert len(steps) == 3 and all(m["grad_norm"] > 0 for m in steps)


def test_factor_optimizers_resume_to_the_same_adapter(train_checkpoint, examples_data, tmp_path):
    """Checkpointed after 2 rounds and resumed, each job ends bit-identical to the straight run: LoRA-Pro's full-size
    moments and AltLoRA's momenta and B_old are saved and restored exactly (LoRA-GA's init pass included)."""
    setups = [(lf.LoRAConfig(rank=2, dropout=0.1), lf.LoRAProConfig()),
              (lf.RsLoRAConfig(rank=4, target_modules=["q_proj", "down_proj"]), lf.AltLoRAConfig(beta1=0.9)),
              (lf.LoRAGAConfig(rank=2, init_batches=2, target_modules=["o_proj"]), lf.LoRAProConfig())]
    jobs = [lf.JobSpec(name=f"{optimizer.type}-{adapter.type}", adapter=adapter, optimizer=optimizer,
                       dataset=str(examples_data / ("greet.jsonl" if i % 2 else "arith.jsonl")), global_batch_size=3,
                       learning_rate=1e-3, max_steps=5, seed=i, lr_schedule="cosine", weight_decay=0.01)
            for i, (adapter, optimizer) in enumerate(setups)]
    assert_resume_is_exact(train_checkpoint, tmp_path, jobs, steps=5)


@pytest.mark.usefixtures("ray_session")
def test_factor_optimizers_on_two_stages_equal_single_process(train_checkpoint, examples_data, tmp_path):
    """2 pipeline stages (Ray): each stage steps its own layers' pairs, clipped by the job's norm summed over the
    stages; the adapters and the reported state (summed over the stages) equal one process's."""
    jobs = [dataclasses.replace(spec, max_grad_norm=0.5) for spec in optimizer_jobs(examples_data)]
    single = fit_adapters(train_checkpoint, tmp_path / "single", jobs, CAPACITY, engine="local")
    parallel = fit_adapters(train_checkpoint, tmp_path / "run", jobs, CAPACITY, balance_pipeline=False,
                            pipeline_stages=2)
    for spec in jobs:
        worst, key = max_rel_diff(parallel[spec.name]["tensors"], single[spec.name]["tensors"])
        assert worst <= RTOL, f"job {spec.name}: 2 stages vs 1 process differ by {worst:.3e} (relative) in {key}"
    reported = [json.loads((tmp_path / run / RUN_METRICS).read_text())["optimizer_state_bytes"]
                for run in ("single", "run")]
    assert reported[0] == reported[1]


def test_progress_names_the_optimizer_beside_the_variant(examples_data):
    from runtime.fit import _variant_label

    assert [_variant_label(spec) for spec in optimizer_jobs(examples_data)] == ["lora", "lora, lorapro",
                                                                                 "rslora, altlora"]
