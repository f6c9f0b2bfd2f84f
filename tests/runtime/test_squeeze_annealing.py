"""In-training LoRA-Squeeze (adapter type 'lorasqueeze'): the rank is annealed by truncated-SVD re-factorisation at
the scheduled steps, ends at target_rank, resumes exactly and exports a plain LoRA of target_rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorafusion as lf
from lorafusion.adapters.base import layer_generator
from lorafusion.adapters.lorasqueeze import LoRASqueezeLayer
from lorafusion.adapter_io import read_peft_adapter, write_peft_adapter
from tests.lorafusion.test_variants import _our_logits
from tests.runtime.test_checkpointing import (
    assert_bit_identical, interrupted_run, load_checkpoint, make_worker, prepare, straight_run, train_round,
)

peft = pytest.importorskip("peft")


def squeeze_config(**fields) -> lf.LoRASqueezeConfig:
    return lf.LoRASqueezeConfig(**{"rank": 4, "alpha": 6, "dropout": 0.1, "target_rank": 1, "squeeze_start_step": 1,
                                   "squeeze_end_step": 3, "target_modules": ["q_proj", "down_proj"], **fields})


def test_schedule_and_validation():
    config = squeeze_config(rank=8, target_rank=2, squeeze_start_step=2, squeeze_end_step=8)
    assert [config.rank_at(step) for step in range(11)] == [8, 8, 8, 7, 6, 5, 4, 3, 2, 2, 2]
    assert [squeeze_config(squeeze_start_step=3).rank_at(step) for step in (2, 3, 4)] == [4, 1, 1]  # one squeeze
    from_yaml = lf.JobSpec(name="j", dataset="d.jsonl", adapter={"type": "lorasqueeze", "rank": 8, "target_rank": 2,
                                                                "squeeze_start_step": 2, "squeeze_end_step": 8}).adapter
    assert from_yaml == lf.LoRASqueezeConfig(rank=8, target_rank=2, squeeze_start_step=2, squeeze_end_step=8)
    exported = config.export_config()
    assert (exported.type, exported.rank, exported.scaling) == ("lora", 2, config.scaling)
    for fields, message in [({"target_rank": None}, r"target_rank=None must be an integer in \[1, rank=4\]"),
                            ({"target_rank": 5}, r"target_rank=5 is above adapter.rank=4.*choose target_rank ≤ 4"),
                            ({"squeeze_end_step": 0}, r"squeeze_end_step=0 must be an integer ≥ squeeze_start_step=1"),
                            ({"squeeze_start_step": -1}, r"squeeze_start_step=-1 must be an integer ≥ 0")]:
        with pytest.raises(ValueError, match=message):
            squeeze_config(**fields)


def test_refactorisation_is_the_truncated_svd_and_keeps_shapes():
    config = squeeze_config(rank=5, target_rank=2, squeeze_start_step=0, squeeze_end_step=3)
    layer = LoRASqueezeLayer(config, 12, 9, generator=layer_generator(0, 0, "q_proj"))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(9, 5, generator=torch.Generator().manual_seed(1)))
    s = config.scaling
    for step, rank in ((1, 4), (2, 3), (3, 2)):
        before = (s * layer.lora_B @ layer.lora_A).detach().double()
        u, sigma, vh = torch.linalg.svd(before)
        reset = layer.after_step(step)
        assert reset == [layer.lora_A, layer.lora_B]
        after = (s * layer.lora_B @ layer.lora_A).detach().double()
        torch.testing.assert_close(after, (u[:, :rank] * sigma[:rank]) @ vh[:rank], atol=1e-6, rtol=0)
        assert layer.lora_A.shape == (5, 12) and not layer.lora_A[rank:].any() and not layer.lora_B[:, rank:].any()
        # split evenly: A's rows and B's columns have equal norms √(σ/s)
        torch.testing.assert_close(layer.lora_A[:rank].norm(dim=1), layer.lora_B[:, :rank].norm(dim=0))
    assert layer.after_step(4) == []  # past squeeze_end_step: nothing to do
    exported = layer.peft_tensors()
    assert exported["lora_A.weight"].shape == (2, 12) and exported["lora_B.weight"].shape == (9, 2)
    assert torch.equal(exported["lora_A.weight"], layer.lora_A[:2].detach())


def specs(examples_data: Path) -> list[lf.JobSpec]:
    """A squeezed job (re-factorised after steps 2 and 3) beside a plain LoRA job."""
    return [
        lf.JobSpec(name="sq", dataset=str(examples_data / "greet.jsonl"), adapter=squeeze_config(),
                   global_batch_size=3, learning_rate=1e-2, max_steps=5, seed=1, weight_decay=0.01),
        lf.JobSpec(name="plain", dataset=str(examples_data / "arith.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=3, learning_rate=2e-3, max_steps=5, seed=2),
    ]


def test_anneals_to_target_rank_resumes_exactly_and_exports(train_checkpoint, examples_data, tmp_path, load_hf_model):
    jobs = specs(examples_data)
    want, want_progress = straight_run(train_checkpoint, tmp_path / "straight", jobs)
    for module, layer in want.adapters.job_layers("sq").items():
        delta = layer.config.scaling * layer.lora_B @ layer.lora_A
        assert torch.linalg.matrix_rank(delta.detach()).item() == 1, module
        assert not layer.lora_A[1:].any() and not layer.lora_B[:, 1:].any()
    exported = want.peft_state_dict("sq")
    scale = squeeze_config().export_config().scaling
    for module, layer in want.adapters.job_layers("sq").items():  # the export is the trained ΔW, exactly
        a, b = exported[f"{module}.lora_A.weight"], exported[f"{module}.lora_B.weight"]
        trained = (layer.config.scaling * layer.lora_B @ layer.lora_A).detach()
        assert a.shape[0] == 1 and torch.equal(scale * b @ a, trained)
    folder = write_peft_adapter(tmp_path / "export", exported, squeeze_config(), base_model=str(train_checkpoint))
    ids = torch.randint(0, 259, (2, 11), generator=torch.Generator().manual_seed(0))
    want.model.eval()
    ours = _our_logits(want.model, want.adapters, "sq", ids)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(load_hf_model(train_checkpoint), str(folder)).eval()(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5

    out = tmp_path / "run"
    interrupted_run(train_checkpoint, out, jobs, rounds=2)  # step 2 re-factorised: its reset state is saved
    prepared = prepare(train_checkpoint, out, jobs)
    worker = make_worker(prepared)
    counter, progress = load_checkpoint(prepared, {0: worker})
    assert counter == 2 and progress["sq"].step == 2
    squeezed = {id(p) for layer in worker.adapters.job_layers("sq").values() for p in (layer.lora_A, layer.lora_B)}
    assert squeezed and not squeezed & {id(p) for p in worker.optimizers["sq"].optimizer.state}
    for _ in range(counter, 5):
        train_round(worker, prepared, progress)
    for job in prepared.jobs:
        assert_bit_identical(worker, want, job.name)
        assert progress[job.name] == want_progress[job.name]


def test_fit_exports_a_plain_lora_of_target_rank(train_checkpoint, examples_data, tmp_path):
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"), progress=False,
                       dtype="float32", engine="local", max_tokens_per_microbatch=256)
    result = lf.fit(specs(examples_data), run)
    assert all(job.status == "finished" for job in result.jobs.values())
    folder = tmp_path / "run" / "sq" / "adapter"
    written = json.loads((folder / "adapter_config.json").read_text())
    assert (written["peft_type"], written["r"], written["lora_alpha"]) == ("LORA", 1, pytest.approx(1.5))
    config, tensors = read_peft_adapter(folder)
    assert (config.type, config.rank, config.scaling) == ("lora", 1, 1.5)  # init_adapter of a follow-up job
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {1}
    again = lf.squeeze(folder, rank=1, output_dir=tmp_path / "squeezed")  # post-hoc, from lorafusion's own export
    assert again.source_type == "lora" and again.max_error <= 1e-6 and set(again.methods.values()) == {"factors"}
