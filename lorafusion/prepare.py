"""Everything checked and tokenised before training starts: one bad input fails here, nothing written yet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafusion.adapters.multi import mix_seed
from lorafusion.config import JobSpec, RunConfig, check_jobs
from lorafusion.data import Sample, SampleStream, TextTokenizer, load_jsonl_dataset, load_tokenizer
from lorafusion.models.hf import Architecture, HFWeights, read_architecture

__all__ = ["PreparedJob", "PreparedRun", "prepare_run", "check_output_dir", "RUN_MANIFEST"]

RUN_MANIFEST = "run.json"


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
    samples = load_jsonl_dataset(job.dataset, tokenizer, max_seq_len=limit, overflow=job.overflow, name=job.name)
    stream = SampleStream(num_samples=len(samples), global_batch_size=job.global_batch_size, seed=job.seed)
    if job.max_steps is not None:
        total = job.max_steps
    else:
        total = stream.steps_for_epochs(job.num_epochs if job.num_epochs is not None else 1)
    eval_samples = None
    if job.eval_dataset is not None:
        eval_samples = load_jsonl_dataset(job.eval_dataset, tokenizer, max_seq_len=limit, overflow=job.overflow,
                                          name=job.name)
    return PreparedJob(spec=job, samples=samples, stream=stream, total_steps=total, eval_samples=eval_samples)


def _inside(path: str | Path, directory: Path) -> bool:
    resolved = Path(path).resolve()
    return resolved == directory or directory in resolved.parents


def check_output_dir(run: RunConfig, jobs: list[JobSpec]) -> None:
    """Refuse an output_dir that holds anything (another run, or unrelated files) unless run.overwrite,
    and always refuse one that holds this run's own inputs (overwrite would delete them)."""
    out = Path(run.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir '{out}' is a file; choose a directory path")
    inputs = [("base_model", run.base_model)] + [
        (f"job '{j.name}' dataset", p) for j in jobs for p in (j.dataset, j.eval_dataset) if p is not None
    ]
    for what, path in inputs:
        if _inside(path, out.resolve()):
            raise ValueError(
                f"run.output_dir '{out}' contains this run's {what} '{path}'; choose an output_dir outside the inputs"
            )
    if run.overwrite or not out.exists() or not any(out.iterdir()):
        return
    what = "another run (run.json)" if (out / RUN_MANIFEST).exists() else "files"
    raise ValueError(
        f"run.output_dir '{out}' already holds {what}; choose a new output_dir or set run.overwrite=true "
        "to replace it"
    )


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
    prepared = [_prepare_job(job, run, tokenizer) for job in jobs]
    check_output_dir(run, jobs)
    return PreparedRun(run=run, arch=arch, tokenizer=tokenizer, jobs=prepared)
