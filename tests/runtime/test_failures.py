"""A job whose loss becomes NaN/inf is stopped and reported; the other jobs finish normally."""

import math

import pytest
import torch

import lorafusion as lf
from lorafusion.adapter_io import read_peft_adapter

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.mark.parametrize("stages, engine", [(1, "local"), (2, "ray")])
def test_diverging_job_is_stopped_and_the_others_finish(train_checkpoint, examples_data, tmp_path, stages, engine):
    """A learning rate of 1e30 blows the job's adapter up after its first step: its next loss is not finite.
    One stage in process, two on Ray actors: each engine stops the job and finishes the others."""
    jobs = [
        lf.JobSpec(name=name, dataset=str(examples_data / f"{data}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=4, learning_rate=lr, max_steps=3, seed=i, max_grad_norm=None)
        for i, (name, data, lr) in enumerate([("good", "greet", 1e-3), ("bad", "arith", 1e30),
                                              ("other", "reverse", 1e-3)])
    ]
    out = tmp_path / "run"
    result = lf.fit(jobs, lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False,
                                       pipeline_stages=stages, engine=engine))

    bad = result["bad"]
    assert bad.status == "failed" and bad.steps == 1 and bad.adapter_path is None
    assert "became" in bad.error and "at step 2" in bad.error and "stopped" in bad.error
    assert not (out / "bad" / "adapter").exists()
    for name in ("good", "other"):
        job = result[name]
        assert job.status == "finished" and job.steps == 3 and math.isfinite(job.final_loss)
        tensors = read_peft_adapter(job.adapter_path)[1]
        assert all(torch.isfinite(t).all() for t in tensors.values())
