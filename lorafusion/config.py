"""Job specs and run configuration: kw-only dataclasses validated on construction; YAML is a view of them.

```yaml
run: {base_model: path/to/hf_dir, output_dir: runs/demo, max_tokens_per_microbatch: 4096}
jobs:
  - {name: sql, dataset: data/sql.jsonl, adapter: {type: lora, rank: 16, alpha: 32}, global_batch_size: 8}
```
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

import torch

from lorafusion.adapters import AdapterConfig, LoRAConfig, adapter_config_from_dict, get_variant
from lorafusion.data.dataset import check_fields
from lorafusion.federation import FederationConfig, check_groups
from lorafusion.hub import is_hub_id
from lorafusion.loggers import check_loggers
from lorafusion.ops.native import MODES as NATIVE_MODES
from lorafusion.ops.utils import ATTENTION_BACKENDS, BACKENDS as KERNEL_BACKENDS
from lorafusion.optimizers import AdamWConfig, OptimizerConfig, optimizer_config_from_dict
from lorafusion.validation import is_number

__all__ = ["JobSpec", "RunConfig", "load_config", "apply_overrides", "check_jobs"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
LR_SCHEDULES = ("constant", "linear", "cosine")
OVERFLOW_POLICIES = ("reject", "truncate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECOMPUTE_MODES = ("none", "selective", "full")  # run.recompute, see lorafusion.models.recompute
ENGINES = ("auto", "ray", "local")  # run.engine, see runtime.engine


def _positive_int(owner: str, name: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name}={value!r} must be a positive integer, e.g. {name}: {example}")


def _non_negative(owner: str, name: str, value: Any) -> None:
    if not is_number(value) or value < 0:
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number ≥ 0")


@dataclass(kw_only=True)
class JobSpec:
    """One fine-tuning job: a dataset, an adapter and its optimisation settings."""

    name: str
    """Unique job name, [A-Za-z0-9_.-]; the output folder is <output_dir>/<name>."""
    dataset: str
    """Rows {prompt, completion}, {messages}, or {text}: a JSONL, Parquet (.parquet) or Arrow (.arrow, .feather)
    file, or a folder written by HF `save_to_disk` (a DatasetDict's split as `folder:split`, default `train`)."""
    adapter: AdapterConfig | None = None
    """Adapter variant config, e.g. LoRAConfig(rank=16); in YAML {type: lora, rank: 16}. Default: LoRAConfig(),
    or the config of init_adapter."""
    init_adapter: str | None = None
    """Continue training from this adapter folder (ours or PEFT's, any variant lorafusion reads): the job starts
    from its tensors, and its adapter_config.json defines the adapter (`adapter`, if given, must agree with it
    except for dropout)."""
    global_batch_size: int = 8
    """Samples per optimizer step."""
    learning_rate: float = 2e-4
    """Peak learning rate of the job's optimizer."""
    max_steps: int | None = None
    """Optimizer steps to run; exactly one of max_steps and num_epochs (default: 1 epoch)."""
    num_epochs: float | None = None
    """Passes over the dataset (may be fractional); the step count is ceil(epochs·samples/batch)."""
    seed: int = 0
    """Seeds the adapter init, the data order and the dropout stream of this job alone."""
    lr_schedule: str = "constant"
    """'constant', 'linear' (to min_lr_ratio·lr) or 'cosine' (to min_lr_ratio·lr), after warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to learning_rate."""
    min_lr_ratio: float = 0.0
    """Final LR of the linear/cosine decay as a fraction of learning_rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay: each step multiplies the trainable tensors by 1 − lr·weight_decay (every optimizer)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2), of AdamW and of LoRA-Pro's full-size moments (AltLoRA has optimizer.beta1)."""
    adam_eps: float = 1e-8
    """Adam's epsilon, of AdamW and of LoRA-Pro."""
    max_grad_norm: float | None = 1.0
    """Clip this job's gradient to this global L2 norm (of the raw gradients, before any optimizer transforms them);
    None disables clipping."""
    optimizer: OptimizerConfig = field(default_factory=AdamWConfig)
    """The job's optimizer, e.g. lf.LoRAProConfig(); in YAML {type: adamw | lorapro | altlora, ...}. Default: AdamW."""
    max_seq_len: int | None = None
    """Longest sample in tokens; defaults to run.max_tokens_per_microbatch."""
    overflow: str = "reject"
    """What to do with a sample longer than max_seq_len: 'reject' (error) or 'truncate'."""
    eval_dataset: str | None = None
    """Optional dataset (as `dataset`; a DatasetDict's split named as `folder:split` unless it has only one)
    evaluated every eval_every_steps and at the end (into metrics.jsonl)."""
    eval_every_steps: int | None = None
    """Evaluation period in optimizer steps (only with eval_dataset); None = only at the end."""
    fields: dict[str, str] | None = None
    """The dataset's names for the row keys, e.g. {prompt: question, completion: answer} (keys: prompt,
    completion, messages, text; those left out keep their own names); for dataset and eval_dataset alike."""
    federation: FederationConfig | None = None
    """Make this job a client of a federated group: {group, aggregate_every_steps, method, weight}, e.g.
    FederationConfig(group="clinics", aggregate_every_steps=10, method="flora"); see lorafusion.federation and
    docs/variants.md "Federated LoRA". None: the job trains alone."""

    def __post_init__(self) -> None:
        owner = f"job '{self.name}'"
        if not isinstance(self.name, str) or not _NAME.match(self.name) or set(self.name) == {"."}:
            raise ValueError(f"job name {self.name!r} is invalid; use letters, digits, '_', '.', '-' (e.g. name: sql)")
        if not isinstance(self.dataset, (str, Path)) or not str(self.dataset):
            raise ValueError(f"{owner}: dataset={self.dataset!r} must be the path of a JSONL, Parquet or Arrow file or "
                             "of a saved HF dataset folder")
        self.dataset = str(self.dataset)
        if isinstance(self.adapter, dict):
            self.adapter = adapter_config_from_dict(self.adapter, where=f"{owner}: adapter")
        if self.init_adapter is not None:
            self._adopt_init_adapter(owner)
        elif self.adapter is None:
            self.adapter = LoRAConfig()
        if not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"{owner}: adapter={self.adapter!r} must be an adapter config such as lf.LoRAConfig(...)")
        self._check_optimizer(owner)
        _positive_int(owner, "global_batch_size", self.global_batch_size, "8")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{owner}: seed={self.seed!r} must be an integer ≥ 0, e.g. seed: 0")
        if not is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"{owner}: learning_rate={self.learning_rate!r} must be > 0, e.g. 2e-4")
        self._check_length()
        self._check_schedule()
        self._check_data_options()
        self._check_federation(owner)

    def _check_federation(self, owner: str) -> None:
        if isinstance(self.federation, dict):
            known = {f.name for f in fields(FederationConfig)}
            unknown = sorted(set(self.federation) - known)
            if unknown:
                raise ValueError(f"{owner}: federation has unknown field(s) {unknown}; known fields: {sorted(known)}")
            try:
                self.federation = FederationConfig(**self.federation)
            except TypeError as err:  # a required field left out
                raise ValueError(f"{owner}: federation needs group and aggregate_every_steps, e.g. "
                                 "{group: clinics, aggregate_every_steps: 10} ({err})") from None
            except ValueError as err:
                raise ValueError(f"{owner}: {err}") from None
        elif isinstance(self.federation, FederationConfig):
            try:
                replace(self.federation)  # validated again: a field may have changed after construction
            except ValueError as err:
                raise ValueError(f"{owner}: {err}") from None
        elif self.federation is not None:
            raise ValueError(f"{owner}: federation={self.federation!r} must be a mapping like "
                             "{group: clinics, aggregate_every_steps: 10, method: fedavg}, or null")

    def _adopt_init_adapter(self, owner: str) -> None:
        """The job's adapter config from init_adapter's adapter_config.json (its tensors are checked in prepare)."""
        from lorafusion.adapter_io import read_peft_config

        if not isinstance(self.init_adapter, (str, Path)) or not str(self.init_adapter):
            raise ValueError(f"{owner}: init_adapter={self.init_adapter!r} must be the path of an adapter folder")
        self.init_adapter = str(self.init_adapter)
        saved = read_peft_config(self.init_adapter)
        if self.adapter is None:
            self.adapter = saved
            return
        mine, theirs = self.adapter.to_dict(), saved.to_dict()
        differ = sorted(k for k in set(mine) | set(theirs) if k != "dropout" and mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError(f"{owner}: adapter differs from init_adapter '{self.init_adapter}' in {differ} "
                             f"(yours: {[mine.get(k) for k in differ]}, the adapter's: {[theirs.get(k) for k in differ]}); "
                             "leave `adapter` out to use the adapter's own config")

    def _check_optimizer(self, owner: str) -> None:
        if isinstance(self.optimizer, dict):
            self.optimizer = optimizer_config_from_dict(self.optimizer, where=owner)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f"{owner}: optimizer={self.optimizer!r} must be a mapping like {{type: lorapro}} or an "
                             "optimizer config such as lf.LoRAProConfig()")
        self.optimizer.check_adapter(self.adapter.type, self.name)

    def _check_length(self) -> None:
        owner = f"job '{self.name}'"
        if self.max_steps is not None and self.num_epochs is not None:
            raise ValueError(f"{owner}: give max_steps or num_epochs, not both")
        if self.max_steps is not None:
            _positive_int(owner, "max_steps", self.max_steps, "100")
        if self.num_epochs is not None and (not is_number(self.num_epochs) or self.num_epochs <= 0):
            raise ValueError(f"{owner}: num_epochs={self.num_epochs!r} must be > 0, e.g. num_epochs: 1")

    def _check_schedule(self) -> None:
        owner = f"job '{self.name}'"
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{owner}: lr_schedule={self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"{owner}: warmup_steps={self.warmup_steps!r} must be an integer ≥ 0")
        if not is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{owner}: min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        _non_negative(owner, "weight_decay", self.weight_decay)
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"{owner}: adam_betas={self.adam_betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        if not is_number(self.adam_eps) or self.adam_eps <= 0:
            raise ValueError(f"{owner}: adam_eps={self.adam_eps!r} must be > 0")
        if self.max_grad_norm is not None and (not is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ValueError(f"{owner}: max_grad_norm={self.max_grad_norm!r} must be > 0, or null to disable clipping")

    def _check_data_options(self) -> None:
        owner = f"job '{self.name}'"
        if self.max_seq_len is not None:
            _positive_int(owner, "max_seq_len", self.max_seq_len, "2048")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"{owner}: overflow={self.overflow!r}; choose one of {list(OVERFLOW_POLICIES)}")
        if self.eval_dataset is not None:
            self.eval_dataset = str(self.eval_dataset)
        if self.eval_every_steps is not None:
            _positive_int(owner, "eval_every_steps", self.eval_every_steps, "50")
            if self.eval_dataset is None:
                raise ValueError(f"{owner}: eval_every_steps is set but eval_dataset is not; add eval_dataset")
        if self.fields is not None:
            self.fields = check_fields(self.fields, f"{owner}: ")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter"] = self.adapter.to_dict()
        data["optimizer"] = self.optimizer.to_dict()
        data["adam_betas"] = list(self.adam_betas)
        return data


@dataclass(kw_only=True)
class RunConfig:
    """Settings shared by every job of one fit."""

    base_model: str
    """HF checkpoint directory (config.json, *.safetensors, tokenizer.json), or an HF Hub id (org/name) resolved
    through huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only); a folder that exists wins."""
    output_dir: str
    """Where adapters, metrics and checkpoints go: <output_dir>/<job>/adapter, ..."""
    max_tokens_per_microbatch: int = 4096
    """Capacity of one packed microbatch, in tokens."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages (model chunks)."""
    data_parallel: int = 1
    """Data-parallel replicas."""
    stage_layers: list[int] | None = None
    """Decoder layers of each pipeline stage, e.g. [3, 5]; default: balanced by count."""
    balance_pipeline: bool = True
    """With pipeline_stages > 1, plan at max_tokens_per_microbatch or at 3/4, 5/8 or 1/2 of it, whichever a 1F1B
    simulation of the window finishes soonest (chosen again when the set of jobs changes): stages wait on size
    differences between consecutive microbatches, and smaller ones can even out a stream that one job
    dominates. False: always fill microbatches to max_tokens_per_microbatch. Either way a multi-stage fit packs
    the jobs' samples differently from a 1-stage one (the distance rule alone does), so its adapters match to
    the fp32 rounding of the gradient sums; re-packing at a smaller capacity can make that larger (measured up
    to 9e-5 relative after Adam, against 5e-6 without, on the 4-job workload of tests/runtime/test_balance.py)."""
    plan_time_limit_s: float = 0.5
    """CP-SAT time limit per planning window, shared by its packings that greedy cannot prove optimal (greedy
    packing is the floor); the next window is planned while the current one trains."""
    dtype: str = "auto"
    """Base-model compute dtype: 'auto' = bfloat16 where the hardware multiplies it natively (CUDA compute
    capability 8.0+, CPUs with AMX or AVX512-BF16), float32 elsewhere; or 'float32', 'bfloat16', 'float16'.
    Adapters keep fp32 master weights and optimizer state either way."""
    log_every_steps: int = 1
    """Print each job's progress every this many of its optimizer steps."""
    progress: bool = True
    """Print progress lines on the driver."""
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a run (its files are replaced); wins over resume."""
    checkpoint_every_steps: int | None = None
    """Checkpoint every this many optimizer steps of a job (all jobs are saved together, at the end of the
    window in which one reaches a multiple of it); a checkpoint is also written at the end. None = only at the end."""
    checkpoint_every_s: float | None = 600.0
    """Also checkpoint whenever this many seconds have passed since the last checkpoint (at the end of the window
    running then), so a crash or Ctrl-C loses at most about this much training; None = by steps only."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep in <output_dir>/checkpoints (older ones are deleted)."""
    resume: bool = True
    """Resume from the latest complete checkpoint when output_dir holds this same run; False refuses such a dir."""
    max_restarts: int = 2
    """How often a fit whose stage actor died is started again from its last checkpoint before it gives up."""
    engine: str = "auto"
    """Where the stages run: 'ray' = one Ray actor per (stage, replica), on the cluster in RAY_ADDRESS or an
    embedded local Ray instance; 'local' = in this process, without Ray (one stage, one replica only); 'auto' =
    local for a one-stage, one-replica fit unless a Ray cluster is at hand (RAY_ADDRESS, or Ray initialised)."""
    recompute: str = "none"
    """Activation recompute: 'none'; 'selective' = each layer's core attention is computed again in the backward
    instead of kept; 'full' = each decoder layer keeps only its input and runs again in the backward (least
    memory, one more forward of compute)."""
    attention: str = "auto"
    """Packed attention: 'auto' = torch's varlen flash attention on CUDA (one call per layer over the whole
    row), length-bucketed SDPA elsewhere; 'buckets' or 'varlen' to force one."""
    kernels: str = "auto"
    """LoRA layer implementation: 'auto' = fused Triton kernels on CUDA, torch elsewhere; 'triton' = force
    Triton (on CPU only under TRITON_INTERPRET=1, else a clear error); 'torch' = force the torch reference."""
    native_ops: str = "auto"
    """The native ops of csrc/, built on first use (lorafusion/ops/native.py): SHiRA's sparse ops (C++/OpenMP on CPU,
    CUDA on GPU) and LoRA dropout drawn where it is applied (CPU; the same masks as the torch path, bit for bit).
    'auto' = native where the build succeeded, else the torch fallback with one warning; 'on' = native or an
    error before training; 'off' = always the torch fallback."""
    loggers: list[str] = field(default_factory=list)
    """Experiment loggers that also get every job's metrics: any of 'tensorboard', 'wandb', 'mlflow' (each needs
    its extra, e.g. pip install 'lorafusion[tensorboard]'); where they write: lorafusion/loggers.py."""

    def __post_init__(self) -> None:
        for name in ("base_model", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                raise ValueError(f"run.{name}={value!r} must be a path")
            setattr(self, name, str(value))
        _positive_int("run", "max_tokens_per_microbatch", self.max_tokens_per_microbatch, "4096")
        _positive_int("run", "pipeline_stages", self.pipeline_stages, "1")
        _positive_int("run", "data_parallel", self.data_parallel, "1")
        if not is_number(self.plan_time_limit_s) or self.plan_time_limit_s <= 0:
            raise ValueError(f"run.plan_time_limit_s={self.plan_time_limit_s!r} must be a number of seconds > 0, e.g. 0.5")
        if self.stage_layers is not None:
            if not isinstance(self.stage_layers, list) or len(self.stage_layers) != self.pipeline_stages:
                raise ValueError(
                    f"run.stage_layers={self.stage_layers!r} must be a list of {self.pipeline_stages} layer counts "
                    "(one per pipeline stage), or null for a balanced split"
                )
            for count in self.stage_layers:
                _positive_int("run", "stage_layers", count, "[4, 4]")
        _positive_int("run", "log_every_steps", self.log_every_steps, "10")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"run.dtype={self.dtype!r}; choose one of {['auto', *DTYPES]}")
        if self.engine not in ENGINES:
            raise ValueError(f"run.engine={self.engine!r}; choose one of {list(ENGINES)}")
        if self.engine == "local" and self.pipeline_stages * self.data_parallel != 1:
            raise ValueError(f"run.engine='local' runs one stage and one replica, but pipeline_stages="
                             f"{self.pipeline_stages} and data_parallel={self.data_parallel}; use engine 'ray' or 'auto'")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"run.recompute={self.recompute!r}; choose one of {list(RECOMPUTE_MODES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"run.attention={self.attention!r}; choose one of {list(ATTENTION_BACKENDS)} ('auto' "
                             "takes varlen flash attention on CUDA and length buckets elsewhere)")
        if self.kernels not in KERNEL_BACKENDS:
            raise ValueError(f"run.kernels={self.kernels!r}; choose one of {list(KERNEL_BACKENDS)} "
                             "('auto' picks Triton on CUDA and torch elsewhere)")
        if self.native_ops not in NATIVE_MODES:
            raise ValueError(f"run.native_ops={self.native_ops!r}; choose one of {list(NATIVE_MODES)} ('auto' uses "
                             "the native ops where they build, else the torch fallback)")
        self.loggers = check_loggers(self.loggers)
        self._check_checkpointing()

    def _check_checkpointing(self) -> None:
        if self.checkpoint_every_steps is not None:
            _positive_int("run", "checkpoint_every_steps", self.checkpoint_every_steps, "100 (or null: only at the end)")
        every_s = self.checkpoint_every_s
        if every_s is not None and (not is_number(every_s) or every_s <= 0):
            raise ValueError(f"run.checkpoint_every_s={every_s!r} must be a number of seconds > 0, e.g. 600 (or null: "
                             "checkpoint by steps only)")
        _positive_int("run", "keep_checkpoints", self.keep_checkpoints, "2")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"run.max_restarts={self.max_restarts!r} must be an integer ≥ 0, e.g. max_restarts: 2")
        for name in ("resume", "balance_pipeline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"run.{name}={getattr(self, name)!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_jobs(jobs: list[JobSpec]) -> None:
    """Checks across jobs: at least one, all JobSpec, unique names, consistent federated groups."""
    if not jobs:
        raise ValueError("no jobs given; pass at least one lf.JobSpec (or a `jobs:` list in the YAML)")
    seen: set[str] = set()
    for job in jobs:
        if not isinstance(job, JobSpec):
            raise ValueError(f"jobs must be lf.JobSpec objects, got {type(job).__name__}")
        # Configs are mutable: build validated copies so a field changed after construction is caught.
        replace(job, adapter=replace(job.adapter), optimizer=replace(job.optimizer))
        get_variant(job.adapter.type)
        if job.name in seen:
            raise ValueError(f"duplicate job name '{job.name}'; every job needs its own name")
        seen.add(job.name)
    check_groups(jobs)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; numbers users write as learning rates must be floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _parse_value(text: str) -> Any:
    return _yaml(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set run.pipeline_stages=2` / `--set jobs.sql.learning_rate=1e-4` style overrides."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like section.field=value, e.g. run.pipeline_stages=2")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if keys[0] == "run" and len(keys) == 2:
            if not isinstance(data.get("run"), dict):
                data["run"] = {}
            data["run"][keys[1]] = _parse_value(raw)
        elif keys[0] == "jobs" and len(keys) >= 3:
            job_name, field_path = ".".join(keys[1:-1]), keys[-1]
            _set_job_field(data, job_name, field_path, _parse_value(raw), item)
        else:
            raise ValueError(f"--set {item!r}: use run.<field>=value or jobs.<job name>.<field>=value")
    return data


# JobSpec fields that are configs of their own, set field by field with jobs.<job>.<section>.<field>=value
_NESTED_JOB_FIELDS = ("adapter", "optimizer", "federation")


def _set_job_field(data: dict, job_name: str, field_name: str, value: Any, item: str) -> None:
    for job in data.get("jobs") or []:
        if isinstance(job, dict) and job.get("name") == job_name:
            job[field_name] = value
            return
    if "." in job_name:  # jobs.<job>.<section>.<field> of a nested config
        head, sub = job_name.rsplit(".", 1)
        for job in data.get("jobs") or []:
            if isinstance(job, dict) and job.get("name") == head and sub in _NESTED_JOB_FIELDS:
                section = job.get(sub)
                job[sub] = {**(section if isinstance(section, dict) else {}), field_name: value}
                return
    raise ValueError(f"--set {item!r}: no job named '{job_name}' in the config")


def _known(cls: type, data: dict, where: str) -> None:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(names)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}; add them")


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[list[JobSpec], RunConfig]:
    """Read `{run: {...}, jobs: [...]}` from YAML; relative paths are taken from the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file '{path}' does not exist; pass the path of a jobs YAML file")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping with keys 'run' and 'jobs'")
    extra = sorted(set(data) - {"run", "jobs"})
    if extra:
        raise ValueError(f"{path}: unknown top-level key(s) {extra}; the top level has only 'run' and 'jobs'")
    data = apply_overrides(data, overrides or [])
    run_data, job_list = data.get("run") or {}, data.get("jobs") or []
    if not isinstance(run_data, dict):
        raise ValueError(f"{path}: 'run' must be a mapping of RunConfig fields")
    if not isinstance(job_list, list):
        raise ValueError(f"{path}: 'jobs' must be a list of job mappings")
    _known(RunConfig, run_data, f"{path}: run")
    base = path.parent
    for key in ("base_model", "output_dir"):
        if key in run_data and isinstance(run_data[key], str) and not Path(run_data[key]).is_absolute():
            local = os.path.normpath(base / run_data[key])
            # a base_model that is no folder next to the YAML, shaped like org/name, is an HF Hub id: kept as written
            if key == "output_dir" or Path(local).exists() or not is_hub_id(run_data[key]):
                run_data[key] = local
    run = RunConfig(**run_data)
    jobs = []
    for i, job in enumerate(job_list):
        if not isinstance(job, dict):
            raise ValueError(f"{path}: jobs[{i}] must be a mapping of JobSpec fields")
        _known(JobSpec, job, f"{path}: jobs[{i}]")
        job = dict(job)
        for key in ("dataset", "eval_dataset", "init_adapter"):
            if isinstance(job.get(key), str) and not Path(job[key]).is_absolute():
                job[key] = os.path.normpath(base / job[key])
        jobs.append(JobSpec(**job))
    check_jobs(jobs)
    return jobs, run
