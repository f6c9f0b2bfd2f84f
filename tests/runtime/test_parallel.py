"""DESIGN promise 2: pipeline stages and data-parallel replicas give the same adapters as one process.

Three jobs with different global batch sizes, ranks and sample lengths (fp32, dropout 0) on a 3-layer
model, trained by `lf.fit` on 1 stage x 1 replica, on 2 stages (layers 2 + 1), on 2 replicas, and on
2 stages x 2 replicas with the layers split the other way by `run.stage_layers` (1 + 2); the last two
layouts also with one global batch per job per window, so the 1F1B stream runs on across four windows
without draining (backwards and steps of one window completing in the next).

The layouts run with run.balance_pipeline off: it is a planning choice, not the layout, that may pack a
pipelined stream into smaller microbatches (tests/runtime/test_balance.py), and a different packing sums each
job's gradients in a different fp32 order (5.8e-5 relative after Adam in the continuous 2-stage case here).
"""

from __future__ import annotations

import importlib
import json

import pytest

import lorafusion as lf
from tests.runtime.test_isolation import RTOL, fit_adapters, max_rel_diff, three_jobs

pytestmark = pytest.mark.usefixtures("ray_session")
CAPACITY = 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from lorafusion.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("three_layers") / "llama", num_layers=3, init_std=0.1, seed=3)


@pytest.fixture(scope="module")
def single(checkpoint, examples_data, tmp_path_factory):
    """The reference: one stage, one replica, in this process (no Ray actor to start)."""
    return fit_adapters(checkpoint, tmp_path_factory.mktemp("single"), three_jobs(examples_data), CAPACITY,
                        engine="local")


@pytest.mark.parametrize("layout, steps_per_window", [
    (dict(pipeline_stages=2), None), (dict(data_parallel=2), None),
    (dict(pipeline_stages=2, data_parallel=2, stage_layers=[1, 2]), None),
    (dict(pipeline_stages=2), 1), (dict(pipeline_stages=2, data_parallel=2, stage_layers=[1, 2]), 1),
], ids=["2_stages", "2_replicas", "2x2_uneven", "2_stages_continuous", "2x2_uneven_continuous"])
def test_parallel_fit_equals_single_process(single, checkpoint, examples_data, tmp_path, monkeypatch, layout,
                                            steps_per_window):
    if steps_per_window is not None:
        monkeypatch.setattr(importlib.import_module("runtime.fit"), "_MAX_STEPS_PER_WINDOW", steps_per_window)
    jobs = three_jobs(examples_data)
    parallel = fit_adapters(checkpoint, tmp_path / "run", jobs, CAPACITY, balance_pipeline=False, **layout)
    for spec in jobs:
        worst, key = max_rel_diff(parallel[spec.name]["tensors"], single[spec.name]["tensors"])
        assert worst <= RTOL, f"job {spec.name}: {layout} vs 1 process differ by {worst:.3e} (relative) in {key}"
        losses = [m["loss"] for m in parallel[spec.name]["metrics"] if "loss" in m]
        expected = [m["loss"] for m in single[spec.name]["metrics"] if "loss" in m]
        assert losses == pytest.approx(expected, rel=1e-5)
        assert [m["step"] for m in parallel[spec.name]["metrics"]] == [1, 2, 3, 4]
    metrics = json.loads((tmp_path / "run" / "run_metrics.json").read_text())
    assert len(metrics["stages"]) == layout.get("pipeline_stages", 1) * layout.get("data_parallel", 1)
    assert metrics["microbatches"] > 0 and 0.0 <= metrics["bubble_fraction"] < 1.0
    if steps_per_window is not None:  # four windows, drained only at the end (no evaluation or checkpoint due)
        assert (metrics["windows"], metrics["pipeline_drains"]) == (4, 1)


def test_variants_on_stages_and_replicas_equal_single_process(checkpoint, examples_data, tmp_path, monkeypatch):
    """Every way a variant computes, across 2 stages x 2 replicas with one-step windows: Uni-LoRA's θ (one
    trainable tensor used by the layers of both stages) gets the sum of both stages' gradients; LoRA-GA's init
    pass sums its gradients over the replicas."""
    monkeypatch.setattr(importlib.import_module("runtime.fit"), "_MAX_STEPS_PER_WINDOW", 1)
    adapters = [lf.UniLoRAConfig(rank=2, theta_dim=256), lf.DoRAConfig(rank=2), lf.SHiRAConfig(rank=1),
                lf.VeRAConfig(rank=8, target_modules=["q_proj", "up_proj"]),
                lf.RandLoRAConfig(rank=32, target_modules=["o_proj"]), lf.LoRAGAConfig(rank=2, init_batches=2)]
    jobs = [lf.JobSpec(name=a.type, dataset=str(examples_data / ("greet.jsonl", "arith.jsonl")[i % 2]), adapter=a,
                       global_batch_size=3, learning_rate=1e-3, max_steps=3, seed=i) for i, a in enumerate(adapters)]
    single = fit_adapters(checkpoint, tmp_path / "single", jobs, CAPACITY, engine="local")
    parallel = fit_adapters(checkpoint, tmp_path / "run", jobs, CAPACITY, balance_pipeline=False, pipeline_stages=2,
                            data_parallel=2, stage_layers=[1, 2])
    for spec in jobs:
        worst, key = max_rel_diff(parallel[spec.name]["tensors"], single[spec.name]["tensors"])
        assert worst <= RTOL, f"job {spec.name}: 2x2 vs 1 process differ by {worst:.3e} (relative) in {key}"
