"""A job whose loss becomes NaN is stopped and reported; the other jobs finish normally."""

import math

import torch

import lorafusion as lf
from lorafusion.checkpoint import read_peft_adapter
from runtime.worker import StageWorker


def test_nan_job_is_stopped_and_the_others_finish(train_checkpoint, examples_data, tmp_path, monkeypatch):
    original_step = StageWorker.step

    def poisoning_step(self: StageWorker, name: str):
        result = original_step(self, name)
        if name == "bad":  # after its first step every forward of this job gives NaN
            with torch.no_grad():
                for param in self.adapters.parameters(name):
                    param.fill_(math.nan)
        return result

    monkeypatch.setattr(StageWorker, "step", poisoning_step)
    jobs = [
        lf.JobSpec(name=name, dataset=str(examples_data / f"{data}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                   global_batch_size=4, learning_rate=1e-3, max_steps=3, seed=i)
        for i, (name, data) in enumerate([("good", "greet"), ("bad", "arith"), ("other", "reverse")])
    ]
    out = tmp_path / "run"
    result = lf.fit(jobs, lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False))

    bad = result["bad"]
    assert bad.status == "failed" and bad.steps == 1 and bad.adapter_path is None
    assert "loss became nan at step 2" in bad.error
    assert not (out / "bad" / "adapter").exists()
    for name in ("good", "other"):
        job = result[name]
        assert job.status == "finished" and job.steps == 3 and math.isfinite(job.final_loss)
        tensors = read_peft_adapter(job.adapter_path)[1]
        assert all(torch.isfinite(t).all() for t in tensors.values())
