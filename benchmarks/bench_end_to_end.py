"""End to end: real (unpadded) training tokens/s of four LoRA jobs with different length distributions.

Providers, all in --dtype (default fp32) on the same device (the GPU when torch sees one: ours' stage actors
take one each, (c) runs on cuda:0) with the same torch thread count, same steps, same samples:
  (a) `lf.fit` with the four jobs together (packed microbatches shared by all jobs);
  (b) `lf.fit` with each job alone, one after another;
  (c) HF transformers `LlamaForCausalLM` + PEFT LoRA, each job alone, one padded batch of
      global_batch_size samples per step (right-padded to the batch's longest sample), loss on the
      completion tokens only, AdamW with the same hyper-parameters and gradient clipping — what a user
      would otherwise run;
  (cp) the same without padding: each global batch packed into one row with position_ids restarting per
      sample, which transformers turns into a per-sample causal mask (its sdpa path).
Beside them the row records the run's GEMM-bound ceiling (benchmarks/ceiling.py: FLOPs per real token over the
matmul rate measured in this process at the run's shapes and dtype with one stage's threads, times the pipeline
stages, which compute at once) and the fraction of it (a) reaches.
The samples of each step come from lorafusion's own tokenisation and data order, so every provider
trains on exactly the same tokens; tokens/s counts real tokens only. Timed: the training loop (for
`lf.fit` its own wall time, which also covers writing the adapters), not model loading.

    python benchmarks/bench_end_to_end.py                       # CPU, hidden 512 × 8 layers
    python benchmarks/bench_end_to_end.py --pipeline-stages 2   # (a) and (b) with run.pipeline_stages=2
    python benchmarks/bench_end_to_end.py --pipeline-stages 2 --no-balance-pipeline   # full microbatches only
    python benchmarks/bench_end_to_end.py --dtype bfloat16 --hidden-size 2048 --num-layers 16 ...  # on a GPU
    python benchmarks/bench_end_to_end.py --variants            # every adapter variant against LoRA, see below

One row per run is appended to benchmarks/results/end_to_end.csv, with the ratios a/b, a/c and a/cp.

--variants [lora,dora,...]: provider (a) only, once per variant with the four jobs all of that variant at
cfg.rank (VARIANT_CONFIGS), then once with the jobs of every variant together in one fit (two jobs per dataset
when there are eight variants) against the same jobs all LoRA; after one untimed fit of every variant, repeats
alternate the order. One row per
variant (and one for the mixed fit) goes to benchmarks/results/variants.csv, with its tokens/s over LoRA's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages win
    sys.path.insert(0, str(REPO))

import lorafusion as lf  # noqa: E402
from benchmarks.ceiling import Ceiling, ModelDims, ceiling  # noqa: E402
from benchmarks.results_csv import append_rows  # noqa: E402
from lorafusion.config import DTYPES, ENGINES  # noqa: E402
from lorafusion.models.builder import resolve_dtype  # noqa: E402
from lorafusion.data import IGNORE_INDEX, Sample  # noqa: E402
from lorafusion.prepare import PreparedJob, prepare_run  # noqa: E402
from lorafusion.report import RunReport, load_run  # noqa: E402

__all__ = ["BenchConfig", "ProviderResult", "ParallelismRefused", "bench_checkpoint", "bench_jobs",
           "run_ours", "run_hf_peft", "run_benchmark", "measure_ceiling", "result_row", "main"]

DATA = REPO / "examples" / "data"
# Four clearly different length distributions (mean tokens per sample): arith ~11, greet ~28,
# reverse ~100, chat ~350 (chat format, loss on the assistant turn only).
JOB_NAMES = ("arith", "greet", "reverse", "chat")
PROVIDERS = ("a", "b", "c", "cp")


@dataclass(kw_only=True)
class BenchConfig:
    """One benchmark run; defaults are the CPU scenario of issue 5 (a few minutes on 2 cores)."""

    hidden_size: int = 512
    """Model width; the model is a random-weight Llama-architecture checkpoint."""
    intermediate_size: int = 1376
    """SwiGLU MLP width."""
    num_layers: int = 8
    """Decoder layers."""
    num_heads: int = 8
    """Attention heads."""
    num_kv_heads: int = 4
    """Key/value heads (GQA)."""
    steps: int = 4
    """Optimizer steps per job, the same for every provider."""
    repeats: int = 3
    """Measurements of each provider, in alternating order (a b c, c b a, ...); the row keeps medians."""
    global_batch_size: int = 8
    """Samples per optimizer step, every job."""
    rank: int = 16
    """LoRA rank of every job (alpha = 2·rank, dropout 0.05, all seven projections)."""
    learning_rate: float = 1e-4
    """AdamW learning rate, constant."""
    max_tokens_per_microbatch: int = 2048
    """Capacity of our packed microbatches."""
    pipeline_stages: int = 1
    """run.pipeline_stages for (a) and (b)."""
    threads: int = 2
    """torch intra-op threads for every provider."""
    providers: tuple[str, ...] = PROVIDERS
    """Which providers to run; the ratios need 'a' and the provider divided by."""
    cache_dir: str = str(REPO / "runs" / "bench_cache")
    """Where the checkpoint is built once (keyed by its shape)."""
    dtype: str = "auto"
    """Base-model compute dtype of every provider (run.dtype, 'auto' as the run resolves it on this machine; (c)
    loads the model in it and PEFT keeps its adapter weights in fp32, as ours does)."""
    balance_pipeline: bool = True
    """run.balance_pipeline for (a) and (b) (with pipeline_stages > 1: plan at the capacity the simulated 1F1B
    finishes soonest, the run's default; False: always fill microbatches to max_tokens_per_microbatch)."""
    engine: str = "auto"
    """run.engine for (a) and (b): 'auto' (the run's default: in this process at one stage, Ray actors at more),
    'ray' or 'local'."""
    variants: tuple[str, ...] = ()
    """Non-empty: compare these adapter variants against LoRA (run_variants) instead of the providers."""

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise ValueError(f"providers={list(self.providers)}; choose from {', '.join(PROVIDERS)} "
                             "(e.g. --providers a,c)")
        for name in ("steps", "repeats", "global_batch_size", "rank", "pipeline_stages", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype={self.dtype!r}; choose one of {['auto', *DTYPES]}")

    @property
    def model_name(self) -> str:
        return (f"llama-h{self.hidden_size}-i{self.intermediate_size}-l{self.num_layers}"
                f"-a{self.num_heads}-kv{self.num_kv_heads}")


@dataclass
class ProviderResult:
    """One provider's measurement."""

    tokens: int
    """Real (unpadded) tokens trained on."""
    wall_s: float
    """Seconds of training."""
    first_loss: dict[str, float] = field(default_factory=dict)
    """Each job's loss at step 1 (LoRA B starts at 0, so every provider must agree: a fidelity check)."""
    padded_tokens: int | None = None
    """Tokens including padding (provider c only)."""
    bubble_fraction: float | None = None
    """The fit's measured bubble fraction, mean over its stages (run_metrics.json; providers a and b)."""
    capacities: list[int] = field(default_factory=list)
    """Capacities run.balance_pipeline chose (run_metrics.json capacity_choices; empty at 1 stage or when off)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


class ParallelismRefused(RuntimeError):
    """The runtime does not (yet) accept the requested run.pipeline_stages."""


def bench_checkpoint(cfg: BenchConfig) -> Path:
    """The benchmark's random Llama checkpoint, built once under cfg.cache_dir."""
    from lorafusion.models.tiny import make_tiny_checkpoint

    directory = Path(cfg.cache_dir) / cfg.model_name
    if not (directory / "config.json").is_file():
        make_tiny_checkpoint(directory, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             init_std=0.02, seed=0)
    return directory


def bench_jobs(cfg: BenchConfig) -> list[lf.JobSpec]:
    return [
        lf.JobSpec(name=name, dataset=str(DATA / f"{name}.jsonl"),
                   adapter=lf.LoRAConfig(rank=cfg.rank, alpha=2 * cfg.rank, dropout=0.05),
                   global_batch_size=cfg.global_batch_size, learning_rate=cfg.learning_rate,
                   max_steps=cfg.steps, seed=seed)
        for seed, name in enumerate(JOB_NAMES)
    ]


# Each variant at the bench's rank r, as a user would configure it (alpha = 2r where the variant has one).
VARIANT_CONFIGS = {
    "lora": lambda r: lf.LoRAConfig(rank=r, alpha=2 * r, dropout=0.05),
    "rslora": lambda r: lf.RsLoRAConfig(rank=r, alpha=2 * r, dropout=0.05),
    "dora": lambda r: lf.DoRAConfig(rank=r, alpha=2 * r, dropout=0.05),
    "vera": lambda r: lf.VeRAConfig(rank=r, dropout=0.05),
    "randlora": lambda r: lf.RandLoRAConfig(rank=r, alpha=2 * r, dropout=0.05),
    "shira": lambda r: lf.SHiRAConfig(rank=r),
    "unilora": lambda r: lf.UniLoRAConfig(rank=r, theta_dim=1 << 15, dropout=0.05),
    "loraga": lambda r: lf.LoRAGAConfig(rank=r, alpha=2 * r, dropout=0.05, init_batches=2),
    "lorasb": lambda r: lf.LoRASBConfig(rank=r, dropout=0.05, init_batches=2),
    "dylora": lambda r: lf.DyLoRAConfig(rank=r, alpha=2 * r, dropout=0.05),
    "matryoshka": lambda r: lf.MatryoshkaLoRAConfig(train_ranks=sorted({1 << i for i in range(r.bit_length())} | {r}),
                                                    dropout=0.05),
    "blocklora": lambda r: lf.BlockLoRAConfig(rank=r, alpha=2 * r, blocks=math.gcd(r, 8), dropout=0.05),
    "paca": lambda r: lf.PaCAConfig(rank=r, alpha=2 * r),
    "loldu": lambda r: lf.LoLDUConfig(rank=r, alpha=2 * r, dropout=0.05),
    "hydra": lambda r: lf.HydraConfig(rank=r, alpha=2 * r, dropout=0.05),
    "tera": lambda r: lf.TeRAConfig(rank=r, export_rank=r),
    # annealed to a quarter of the rank over the bench's first steps (the re-factorisations are what it costs)
    "lorasqueeze": lambda r: lf.LoRASqueezeConfig(rank=r, alpha=2 * r, target_rank=max(r // 4, 1), squeeze_start_step=1,
                                                  squeeze_end_step=3, dropout=0.05),
}


def variant_jobs(cfg: BenchConfig, variants: list[str]) -> list[lf.JobSpec]:
    """The bench's jobs with their adapters replaced: variant i on job i, the datasets taken in turn (job names
    `<dataset>_<variant>`); one variant = the four bench jobs all of it."""
    base = bench_jobs(cfg)
    count = max(len(base), len(variants))
    return [replace(base[i % len(base)], name=f"{base[i % len(base)].name}_{variants[i % len(variants)]}",
                    adapter=VARIANT_CONFIGS[variants[i % len(variants)]](cfg.rank), seed=i)
            for i in range(count)]


def run_variants(cfg: BenchConfig, variants: list[str]) -> list[dict]:
    """Rows of variants.csv: each variant's tokens/s and the mixed fit's, over LoRA's, medians of cfg.repeats."""
    checkpoint = bench_checkpoint(cfg)
    torch.set_num_threads(cfg.threads)
    cases = {v: variant_jobs(cfg, [v]) for v in dict.fromkeys(["lora", *variants])}
    cases["mixed"] = variant_jobs(cfg, variants)
    cases["mixed_as_lora"] = [replace(j, adapter=VARIANT_CONFIGS["lora"](cfg.rank)) for j in cases["mixed"]]
    rates: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as scratch:
        # untimed: the process's first fit pays one-time costs (allocator growth, lazy imports) the others do not
        run_ours(variant_jobs(replace(cfg, steps=1), list(dict.fromkeys(["lora", *variants]))), cfg, checkpoint,
                 Path(scratch) / "warmup")
        for repeat in range(cfg.repeats):
            order = list(cases) if repeat % 2 == 0 else list(reversed(cases))
            for name in order:
                result = run_ours(cases[name], cfg, checkpoint, Path(scratch) / f"{name}_{repeat}")
                rates[name].append(result.tokens_per_s)
                print(f"{name}: {result.tokens} tokens in {result.wall_s:.1f} s = {result.tokens_per_s:.0f} tokens/s")
    dtype = str(_compute_dtype(cfg.dtype)).removeprefix("torch.")
    rows = []
    for name in [*variants, "mixed"]:
        against = "mixed_as_lora" if name == "mixed" else "lora"
        ours, lora = statistics.median(rates[name]), statistics.median(rates[against])
        rows.append({"model": cfg.model_name, "variant": name if name != "mixed" else "mixed:" + "+".join(variants),
                     "jobs": len(cases[name]), "rank": cfg.rank, "steps": cfg.steps, "repeats": cfg.repeats,
                     "global_batch_size": cfg.global_batch_size, "dtype": dtype, "threads": cfg.threads,
                     "engine": cfg.engine, "tokens_per_s": round(ours, 1), "lora_tokens_per_s": round(lora, 1),
                     "over_lora": round(ours / lora, 3),
                     "over_lora_per_repeat": ";".join(f"{a / b:.3f}" for a, b in zip(rates[name], rates[against]))})
    return rows


def _run_config(cfg: BenchConfig, checkpoint: Path, output_dir: Path) -> lf.RunConfig:
    return lf.RunConfig(base_model=str(checkpoint), output_dir=str(output_dir), progress=False, overwrite=True,
                        max_tokens_per_microbatch=cfg.max_tokens_per_microbatch,
                        pipeline_stages=cfg.pipeline_stages, balance_pipeline=cfg.balance_pipeline, dtype=cfg.dtype,
                        engine=cfg.engine)


def _first_losses(report: RunReport, names: list[str]) -> dict[str, float]:
    return {job.name: job.first_loss for job in report.jobs if job.name in names and job.train}


def run_ours(jobs: list[lf.JobSpec], cfg: BenchConfig, checkpoint: Path, output_dir: Path) -> ProviderResult:
    """One `lf.fit` of `jobs` together; ParallelismRefused when the runtime rejects cfg.pipeline_stages."""
    try:
        result = lf.fit(jobs, _run_config(cfg, checkpoint, output_dir))
    except ValueError as err:
        if f"pipeline_stages={cfg.pipeline_stages}" in str(err):
            raise ParallelismRefused(str(err)) from None
        raise
    failed = [j.name for j in result.jobs.values() if j.status != "finished"]
    if failed:
        raise RuntimeError(f"jobs {failed} failed in the benchmark fit: {[result[n].error for n in failed]}")
    tokens = sum(j.tokens for j in result.jobs.values())
    report = load_run(output_dir)
    metrics = report.run_metrics or {}
    return ProviderResult(tokens=tokens, wall_s=result.wall_time_s,
                          first_loss=_first_losses(report, [j.name for j in jobs]),
                          bubble_fraction=metrics.get("bubble_fraction"),
                          capacities=[c["capacity_tokens"] for c in metrics.get("capacity_choices", [])])


def _padded_batch(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, labels (IGNORE_INDEX on padding) and attention mask, each [B, longest]."""
    longest = max(len(s) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample.input_ids)
        labels[row, :len(sample)] = torch.tensor(sample.labels)
        mask[row, :len(sample)] = 1
    return ids, labels, mask


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _peft_model(job: lf.JobSpec, checkpoint: Path, dtype: torch.dtype) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=dtype).to(_device())
    adapter = job.adapter
    torch.manual_seed(job.seed)
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                        target_modules=list(adapter.target_modules), bias="none")
    return get_peft_model(model, config).train()


def _packed_row(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels and position_ids [1, Σ len] of the samples packed back to back (positions restart)."""
    ids = torch.tensor([[t for s in samples for t in s.input_ids]])
    labels = torch.tensor([[t for s in samples for t in s.labels]])
    positions = torch.tensor([[p for s in samples for p in range(len(s))]])
    return ids, labels, positions


def _compute_dtype(name: str) -> torch.dtype:
    """The dtype a run with run.dtype `name` computes in on this machine's device."""
    return resolve_dtype(name, _device())


def run_hf_peft(prepared: PreparedJob, checkpoint: Path, pad_id: int, dtype: str = "float32",
                packed: bool = False) -> ProviderResult:
    """Provider (c) for one job: transformers + PEFT, one padded global batch per optimizer step; with `packed`,
    provider (cp): the global batch as one row without padding, samples separated by their position_ids."""
    job = prepared.spec
    device = _device()
    model = _peft_model(job, checkpoint, _compute_dtype(dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job.learning_rate, betas=job.adam_betas, eps=job.adam_eps,
                                  weight_decay=job.weight_decay)
    tokens = padded = 0
    first_loss = None
    start = time.perf_counter()
    for step in range(prepared.total_steps):
        samples = prepared.global_batch(step)
        if packed:
            ids, labels, positions = (t.to(device) for t in _packed_row(samples))
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # [1, T, vocab]
        else:
            ids, labels, mask = (t.to(device) for t in _padded_batch(samples, pad_id))
            logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, vocab]
        # Our labels are already shifted (labels[t] is the token after t), so no shift here.
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX)
        loss.backward()
        if job.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, job.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss.item() if first_loss is None else first_loss
        tokens += sum(len(s) for s in samples)
        padded += ids.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    return ProviderResult(tokens=tokens, wall_s=wall, first_loss={job.name: first_loss}, padded_tokens=padded)


def _sum_results(parts: list[ProviderResult]) -> ProviderResult:
    padded = [p.padded_tokens for p in parts]
    return ProviderResult(tokens=sum(p.tokens for p in parts), wall_s=sum(p.wall_s for p in parts),
                          first_loss={k: v for p in parts for k, v in p.first_loss.items()},
                          padded_tokens=None if None in padded else sum(padded))


def _prepared(jobs: list[lf.JobSpec], cfg: BenchConfig, checkpoint: Path, scratch: Path):
    """lorafusion's own validation, tokenisation and data order: the samples of every step."""
    return prepare_run(jobs, replace(_run_config(cfg, checkpoint, scratch / "hf_unused"), pipeline_stages=1))


def _run_hf_all(jobs: list[lf.JobSpec], cfg: BenchConfig, checkpoint: Path, scratch: Path,
                packed: bool) -> ProviderResult:
    prepared = _prepared(jobs, cfg, checkpoint, scratch)
    pad_id = prepared.tokenizer.pad_id
    pad_id = 0 if pad_id is None else pad_id
    return _sum_results([run_hf_peft(job, checkpoint, pad_id, cfg.dtype, packed) for job in prepared.jobs])


def _measure(provider: str, jobs: list[lf.JobSpec], cfg: BenchConfig, checkpoint: Path,
             scratch: Path) -> ProviderResult:
    if provider == "a":
        return run_ours(jobs, cfg, checkpoint, scratch / "together")
    if provider == "b":
        return _sum_results([run_ours([job], cfg, checkpoint, scratch / f"alone_{job.name}") for job in jobs])
    return _run_hf_all(jobs, cfg, checkpoint, scratch, packed=provider == "cp")


def checkpoint_dims(checkpoint: Path) -> ModelDims:
    """The widths of the checkpoint's model that fix its FLOPs (benchmarks/ceiling.py)."""
    from lorafusion.models import read_architecture

    arch = read_architecture(checkpoint)
    return ModelDims(hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                     num_layers=arch.num_layers, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                     vocab_size=arch.vocab_size)


def measure_ceiling(cfg: BenchConfig) -> Ceiling:
    """The run's GEMM-bound ceiling (benchmarks/ceiling.py), its matmul rate measured now, in this process, with
    cfg.threads threads (one stage's), at the run's capacity and compute dtype, times cfg.pipeline_stages: the
    stages compute at once, each with its own cfg.threads threads (or GPU)."""
    torch.set_num_threads(cfg.threads)
    checkpoint = bench_checkpoint(cfg)
    dims = checkpoint_dims(checkpoint)
    with tempfile.TemporaryDirectory(prefix="bench_ceiling_") as tmp:
        prepared = _prepared(bench_jobs(cfg), cfg, checkpoint, Path(tmp))
    lengths = [len(s) for job in prepared.jobs for step in range(job.total_steps) for s in job.global_batch(step)]
    adapter = bench_jobs(cfg)[0].adapter
    return ceiling(dims, cfg.rank, list(adapter.target_modules), lengths, cfg.max_tokens_per_microbatch,
                   _compute_dtype(cfg.dtype), _device(), stages=cfg.pipeline_stages)


def run_benchmark(cfg: BenchConfig) -> dict[str, list[ProviderResult]]:
    """Each chosen provider's measurements (cfg.repeats of them); ParallelismRefused when (a)/(b) cannot
    run cfg.pipeline_stages.

    The order alternates between repeats (a b c, c b a, ...) so a slow phase of a shared machine does
    not fall on one provider only.
    """
    from runtime.engine import CPU_THREADS_ENV, choose_engine

    torch.set_num_threads(cfg.threads)
    os.environ[CPU_THREADS_ENV] = str(cfg.threads)  # each stage (actor or thread) gets the same thread count as (c)
    checkpoint = bench_checkpoint(cfg)
    jobs = bench_jobs(cfg)
    results: dict[str, list[ProviderResult]] = {p: [] for p in cfg.providers}
    started = False
    if choose_engine(_run_config(cfg, checkpoint, Path("unused"))) == "ray":
        from runtime.backend import connect_ray

        started = connect_ray(num_actors=cfg.pipeline_stages)  # once, not per fit (b runs four fits)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
            for repeat in range(cfg.repeats):
                order = cfg.providers if repeat % 2 == 0 else cfg.providers[::-1]
                for provider in order:
                    results[provider].append(_measure(provider, jobs, cfg, checkpoint, Path(tmp)))
    finally:
        if started:
            import ray

            ray.shutdown()
    return results


def _median_rate(results: list[ProviderResult]) -> float:
    return statistics.median(r.tokens_per_s for r in results)


def result_row(cfg: BenchConfig, results: dict[str, list[ProviderResult]], bound: Ceiling | None = None) -> dict:
    """One CSV row: the scenario, each provider's median tokens/s, the ratios of a to the others' medians (with
    the per-repeat ratios, so the spread is on record), and with `bound` the GEMM-bound ceiling and the fraction
    of it (a) reaches."""
    dtype = str(_compute_dtype(cfg.dtype)).removeprefix("torch.")
    row = {"model": cfg.model_name, "jobs": "+".join(JOB_NAMES), "steps": cfg.steps, "repeats": cfg.repeats,
           "global_batch_size": cfg.global_batch_size, "rank": cfg.rank, "pipeline_stages": cfg.pipeline_stages,
           "threads": cfg.threads, "max_tokens_per_microbatch": cfg.max_tokens_per_microbatch,
           "balance_pipeline": cfg.balance_pipeline, "engine": cfg.engine, "dtype": dtype, "tokens": next(iter(results.values()))[0].tokens}
    for name in PROVIDERS:
        runs = results.get(name)
        row[f"{name}_tokens_per_s"] = round(_median_rate(runs), 1) if runs else ""
        row[f"{name}_wall_s"] = round(statistics.median(r.wall_s for r in runs), 2) if runs else ""
    a = results.get("a")
    row["a_bubble_fraction"] = round(statistics.median(r.bubble_fraction for r in a), 4) if a else ""
    row["a_capacities"] = ";".join(str(c) for c in a[0].capacities) if a else ""
    c = results.get("c")
    row["c_padding_fraction"] = round(1 - c[0].tokens / c[0].padded_tokens, 3) if c else ""
    for other in PROVIDERS[1:]:
        both = "a" in results and other in results
        row[f"a_over_{other}"] = round(_median_rate(results["a"]) / _median_rate(results[other]), 3) if both else ""
        row[f"a_over_{other}_per_repeat"] = ";".join(
            f"{a.tokens_per_s / o.tokens_per_s:.3f}" for a, o in zip(results["a"], results[other])) if both else ""
    row["gemm_gflops"] = round(bound.matmul_flops_per_s / 1e9, 1) if bound else ""
    row["flops_per_token_m"] = round(bound.flops_per_token / 1e6, 2) if bound else ""
    row["ceiling_tokens_per_s"] = round(bound.tokens_per_s, 1) if bound else ""
    row["a_ceiling_fraction"] = round(_median_rate(results["a"]) / bound.tokens_per_s, 4) if bound and a else ""
    return row


def _parse(argv: list[str] | None) -> tuple[BenchConfig, bool]:
    """(config, whether to append the row to the CSV)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "steps", "repeats",
                 "global_batch_size", "rank", "max_tokens_per_microbatch", "pipeline_stages", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--engine", default=defaults.engine, choices=list(ENGINES),
                        help="run.engine of (a) and (b) (auto: in this process at one stage)")
    parser.add_argument("--providers", default=",".join(defaults.providers),
                        help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", *DTYPES],
                        help="base-model compute dtype (auto: bf16 where the hardware multiplies it natively)")
    parser.add_argument("--balance-pipeline", action=argparse.BooleanOptionalAction, default=defaults.balance_pipeline,
                        help="run.balance_pipeline (default on, as in the run: plan at the capacity the simulated "
                             "1F1B finishes soonest); --no-balance-pipeline fills every microbatch to capacity")
    parser.add_argument("--no-record", action="store_true", help="print the row without appending it to the CSV")
    parser.add_argument("--variants", nargs="?", const=",".join(VARIANT_CONFIGS), default=None,
                        help="compare adapter variants against LoRA instead (default: all of "
                             f"{','.join(VARIANT_CONFIGS)})")
    args = vars(parser.parse_args(argv))
    record = not args.pop("no_record")
    variants = args.pop("variants")
    if variants is not None:
        chosen = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in VARIANT_CONFIGS]
        if unknown or not chosen:
            parser.error(f"--variants {variants}: choose from {','.join(VARIANT_CONFIGS)}")
        args["variants"] = tuple(chosen)
    args["providers"] = tuple(p.strip() for p in args["providers"].split(",") if p.strip())
    return BenchConfig(**args), record


def main(argv: list[str] | None = None, results_dir: Path | None = None) -> int:
    cfg, record = _parse(argv)
    where = {} if results_dir is None else {"results_dir": results_dir}
    if cfg.variants:
        rows = run_variants(cfg, list(cfg.variants))
        for row in rows:
            print(f"{row['variant']}: {row['tokens_per_s']} tokens/s = {row['over_lora']}× LoRA")
        if record:
            append_rows("variants", rows, **where)
        return 0
    try:
        results = run_benchmark(cfg)
    except ParallelismRefused as err:
        print(f"bench_end_to_end: pipeline_stages={cfg.pipeline_stages} was not measured: the runtime refuses it "
              f"({err}). Nothing was recorded; rerun once the runtime accepts it.", file=sys.stderr)
        return 3
    for name, runs in results.items():
        for result in runs:
            bubble = "" if result.bubble_fraction is None else f"bubble {result.bubble_fraction:.1%}; "
            if result.capacities:
                bubble += f"capacities {result.capacities}; "
            print(f"({name}) {result.tokens} tokens in {result.wall_s:.1f} s = {result.tokens_per_s:.0f} tokens/s; "
                  f"{bubble}step-1 losses {({k: round(v, 4) for k, v in result.first_loss.items()})}")
    bound = measure_ceiling(cfg)
    stages = f" × {bound.stages} stages" if bound.stages > 1 else ""
    print(f"GEMM-bound ceiling: {bound.flops_per_token / 1e6:.1f} MFLOP per real token at "
          f"{bound.matmul_flops_per_s / 1e9:.0f} GFLOP/s{stages} = {bound.tokens_per_s:.0f} tokens/s")
    row = result_row(cfg, results, bound)
    if record:
        append_rows("end_to_end", [row], **({} if results_dir is None else {"results_dir": results_dir}))
    else:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
