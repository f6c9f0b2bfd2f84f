"""DyLoRA, MatryoshkaLoRA and Block-LoRA in the engine: a resume continues DyLoRA's per-step ranks exactly, and a
fit's evaluations use each job's export rank (the loss lf.evaluate gives its exported adapter)."""

from __future__ import annotations

import dataclasses

import pytest

import lorafusion as lf
from lorafusion.adapters.dylora import sampled_rank
from lorafusion.adapter_io import read_peft_adapter
from tests.runtime.test_checkpointing import assert_resume_is_exact


def _jobs(examples_data) -> list[lf.JobSpec]:
    adapters = [lf.DyLoRAConfig(rank=6, alpha=6, export_rank=2, target_modules=["q_proj", "up_proj"]),
                lf.MatryoshkaLoRAConfig(train_ranks=[1, 2, 4], scale="rank", export_rank=2,
                                        target_modules=["v_proj", "down_proj"]),
                lf.BlockLoRAConfig(rank=4, alpha=8, blocks=2, target_modules=["o_proj"])]
    return [lf.JobSpec(name=a.type, dataset=str(examples_data / ("greet.jsonl" if i % 2 else "arith.jsonl")),
                       adapter=a, global_batch_size=3, learning_rate=1e-2, max_steps=5, seed=i + 1)
            for i, a in enumerate(adapters)]


def test_resume_continues_with_the_ranks_of_an_uninterrupted_run(train_checkpoint, examples_data, tmp_path):
    """Checkpointed after 2 steps and resumed, every job ends with the straight run's tensors, all of them (not only
    the exported ranks), and DyLoRA samples the straight run's rank at each step after the resume."""
    def rank_of_step_3(worker):  # the step after the checkpoint's, not step 1's
        assert int(worker.adapters.shared["dylora"].dylora_rank) == sampled_rank(1, 3, 6)

    worker = assert_resume_is_exact(train_checkpoint, tmp_path, _jobs(examples_data), steps=5, on_resume=rank_of_step_3)
    assert int(worker.adapters.shared["dylora"].dylora_rank) == sampled_rank(1, 6, 6)


def test_fit_evaluates_each_job_at_its_export_rank(train_checkpoint, examples_data, tmp_path):
    """The fit's final evaluation of each job equals lf.evaluate of the adapter it exported (DyLoRA and
    MatryoshkaLoRA at export_rank, not at the training form), and the exports are plain LoRAs of that rank."""
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text("".join(line + "\n" for line in
                                 (examples_data / "arith_eval.jsonl").read_text().splitlines()[:6]))
    jobs = [dataclasses.replace(job, max_steps=2, eval_dataset=str(eval_rows)) for job in _jobs(examples_data)]
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "out"), progress=False,
                       dtype="float32", engine="local", max_tokens_per_microbatch=256)
    result = lf.fit(jobs, run)
    for job in jobs:
        done = result[job.name]
        assert done.status == "finished" and done.steps == 2
        config, _ = read_peft_adapter(done.adapter_path)
        assert config == job.adapter.export_config()
        evaluated = lf.evaluate(train_checkpoint, done.adapter_path, eval_rows, dtype="float32", device="cpu")
        assert done.eval_loss == pytest.approx(evaluated.loss, rel=1e-5), job.name
