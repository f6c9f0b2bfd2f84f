"""Everything checked and tokenised before training starts: one bad input fails here, nothing written yet."""

from __future__ import annotations

from dataclasses import dataclass

from lorafusion.adapters.dropout import mix_seed
from lorafusion.checkpoint import check_output_dir
from lorafusion.config import JobSpec, RunConfig, check_jobs
from lorafusion.data import Sample, SampleStream, TextTokenizer, load_dataset, load_tokenizer
from lorafusion.models.hf import Architecture, HFWeights, read_architecture

__all__ = ["PreparedJob", "PreparedRun", "prepare_run"]


@dataclass
class PreparedJob:
    spec: JobSpec
    samples: list[Sample]
    stream: SampleStream
    total_steps: int
    eval_samples: list[Sample] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def global_batch(self, step: int) -> list[Sample]:
        return [self.samples[i] for i in self.stream.batch(step)]

    def dropout_seeds(self, step: int) -> list[int]:
        """Dropout seed of each sample of global batch `step`, from the job's seed and the sample's place."""
        return [mix_seed(self.spec.seed, step, i) for i in range(self.spec.global_batch_size)]


@dataclass
class PreparedRun:
    run: RunConfig
    arch: Architecture
    tokenizer: TextTokenizer
    jobs: list[PreparedJob]


def _max_seq_len(job: JobSpec, run: RunConfig) -> int:
    limit = job.max_seq_len or run.max_tokens_per_microbatch
    if limit > run.max_tokens_per_microbatch:
        raise ValueError(
            f"job '{job.name}': max_seq_len={limit} exceeds run.max_tokens_per_microbatch="
            f"{run.max_tokens_per_microbatch}; lower max_seq_len or raise max_tokens_per_microbatch"
        )
    return limit


def _prepare_job(job: JobSpec, run: RunConfig, tokenizer: TextTokenizer) -> PreparedJob:
    limit = _max_seq_len(job, run)
    # the setting that sets the limit: the job's own max_seq_len, or else the microbatch capacity
    limit_name = "max_seq_len" if job.max_seq_len is not None else "run.max_tokens_per_microbatch"
    samples = load_dataset(job.dataset, tokenizer, max_seq_len=limit, overflow=job.overflow, name=job.name,
                           limit_name=limit_name, fields=job.fields, default_split="train")
    stream = SampleStream(num_samples=len(samples), global_batch_size=job.global_batch_size, seed=job.seed)
    if job.max_steps is not None:
        total = job.max_steps
    else:
        total = stream.steps_for_epochs(job.num_epochs if job.num_epochs is not None else 1)
    eval_samples = None
    if job.eval_dataset is not None:
        eval_samples = load_dataset(job.eval_dataset, tokenizer, max_seq_len=limit, overflow=job.overflow,
                                    name=job.name, limit_name=limit_name, fields=job.fields)
    return PreparedJob(spec=job, samples=samples, stream=stream, total_steps=total, eval_samples=eval_samples)


def _check_adapter(job: JobSpec, arch: Architecture) -> None:
    """The job's adapter fits the model, and init_adapter's tensors are exactly an adapter of its config."""
    from lorafusion.adapters.attach import check_peft_adapter
    from lorafusion.adapter_io import read_peft_adapter

    try:
        job.adapter.check_model(job.adapter.target_shapes(arch))
    except ValueError as err:
        raise ValueError(f"job '{job.name}': {err}") from None
    if job.init_adapter is not None:
        _, tensors = read_peft_adapter(job.init_adapter)
        check_peft_adapter(job.adapter, tensors, arch, where=f"job '{job.name}': init_adapter '{job.init_adapter}'")


def prepare_run(jobs: list[JobSpec], run: RunConfig) -> PreparedRun:
    """Validate the whole run and tokenise every dataset; raises ValueError before anything is written."""
    check_jobs(jobs)
    arch = read_architecture(run.base_model)
    HFWeights(run.base_model).check(arch)  # missing or misshapen tensors fail now, not after writing
    tokenizer = load_tokenizer(run.base_model)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ValueError(
            f"tokenizer of '{run.base_model}' has {tokenizer.vocab_size} tokens but config.json vocab_size is "
            f"{arch.vocab_size}; the tokenizer does not belong to this checkpoint"
        )
    for job in jobs:
        _check_adapter(job, arch)
    prepared = [_prepare_job(job, run, tokenizer) for job in jobs]
    check_output_dir(run, jobs)
    return PreparedRun(run=run, arch=arch, tokenizer=tokenizer, jobs=prepared)
