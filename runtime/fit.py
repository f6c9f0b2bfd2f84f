"""`lorafusion.fit`: validate, then drive the stage actors window by window and export every adapter.

A window holds the next few global batches of every active job, packed and ordered by the scheduler
(distance ≥ stages × replicas between a job's consecutive global batches, across windows too), dealt
round-robin to the data-parallel replicas. Windows form one continuous 1F1B stream: the driver plans and
sends window k + 1 while the actors run window k, and only a window after which an evaluation, a
checkpoint or the end is due drains the pipeline. The driver records each job's steps as they come back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import signal
import time
from collections import deque
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import scheduler
from lorafusion.adapter_io import write_peft_adapter
from lorafusion.checkpoint import (
    JobProgress, Resumed, StreamState, atomic_write_text, begin_checkpoint, checkpoint_step, commit_checkpoint,
    open_checkpoint, trim_metrics, write_run_manifest,
)
from lorafusion.config import JobSpec, RunConfig
from lorafusion.loggers import RunLoggers
from lorafusion.prepare import PreparedJob, PreparedRun, prepare_run
from lorafusion.report import read_job_metrics
from lorafusion.result import FitInterrupted, FitResult, JobResult
from runtime.engine import LocalGroup, StageLost, choose_engine
from runtime.federation import Federation
from runtime.interrupt import StopSignals
from runtime.pipeline import bubble_fraction, split_layers
from runtime.planning import scheduler_jobs, stream_window, window_size
from runtime.progress import MetricsWriter, Progress
from runtime.stage import Window, WindowResult
from runtime.telemetry import summarise_gpu
from runtime.windows import WindowPlan, eval_window, init_pass_window, window_plan, window_planner
from scheduler.planner import MAX_WINDOW_GLOBAL_BATCHES

if TYPE_CHECKING:  # the Ray engine's module imports ray; a local fit never needs it
    from runtime.backend import StageGroup

__all__ = ["fit", "RUN_METRICS"]

RUN_METRICS = "run_metrics.json"
_MAX_STEPS_PER_WINDOW = MAX_WINDOW_GLOBAL_BATCHES  # tests set 1 for a stream of one-step windows


def _start_output(prepared: PreparedRun, resuming: bool) -> None:
    out = Path(prepared.run.output_dir)
    if out.exists() and prepared.run.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_manifest(prepared.run, [j.spec for j in prepared.jobs])
    if not resuming:
        for job in prepared.jobs:
            MetricsWriter(prepared.run.output_dir, job.name).clear()


class _JobState:
    def __init__(self, job: PreparedJob, output_dir: str, loggers: RunLoggers | None = None,
                 round_every: int | None = None) -> None:
        self.job = job
        self.metrics = MetricsWriter(output_dir, job.name, loggers)
        self.round_every = round_every  # a federated client's local steps per round (None: not a client)
        self.rounds_through = 0  # a client: the step count of its group's last aggregated round
        self.restore(JobProgress())

    def restore(self, progress: JobProgress) -> None:
        """Take step, tokens, losses and error from `progress` (a checkpoint's, or a fresh one)."""
        for field in fields(JobProgress):
            setattr(self, field.name, getattr(progress, field.name))
        self.eval_step: int | None = None
        self.planned = self.step  # global batches planned into windows sent to the actors (≥ step)

    def progress(self) -> JobProgress:
        return JobProgress(**{field.name: getattr(self, field.name) for field in fields(JobProgress)})

    @property
    def plannable(self) -> bool:
        return self.error is None and self.planned < self.job.total_steps and not self.awaits_round

    @property
    def awaits_round(self) -> bool:
        """A federated client planned to the end of a round its group has not aggregated yet: it waits there."""
        return bool(self.round_every) and self.planned % self.round_every == 0 and self.planned > self.rounds_through

    def steps_until_stop(self, checkpoint_every: int | None) -> int:
        """Global batches this job may be planned before the stream must drain: its last step, an evaluation,
        a checkpoint or the end of its federated round."""
        limit = self.job.total_steps - self.planned
        for period in (self.eval_every, checkpoint_every, self.round_every):
            if period:
                limit = min(limit, period - self.planned % period)
        return limit

    @property
    def eval_every(self) -> int | None:
        return self.job.spec.eval_every_steps if self.job.eval_samples is not None else None


class _Trainer:
    def __init__(self, prepared: PreparedRun, group: StageGroup | LocalGroup, loggers: RunLoggers | None = None,
                 stop: StopSignals | None = None) -> None:
        self.prepared, self.run, self.group = prepared, prepared.run, group
        self.stop = stop or StopSignals()  # not entered: never requested
        self.federation = Federation(prepared.jobs)
        self.states = {j.name: _JobState(j, prepared.run.output_dir, loggers, self.federation.every(j.name))
                       for j in prepared.jobs}
        self.windows = 0  # windows completed (run_metrics.json; a checkpoint keeps it for a resume)
        self.drains = 0  # training windows that drained the pipeline (evaluation, checkpoint or end followed)
        self.progress = Progress({j.name: j.total_steps for j in prepared.jobs},
                                 every=prepared.run.log_every_steps, enabled=prepared.run.progress,
                                 variants={j.name: _variant_label(j.spec) for j in prepared.jobs})
        self.start = time.perf_counter()
        self.last_checkpoint_s = self.start
        self.total_tokens = 0
        self.tokens: dict[tuple[str, int], int] = {}  # (job, step) -> tokens, for global batches sent, not stepped
        self.microbatches = 0
        self.planned_windows = 0
        self._stream: StreamState | None = None  # the capacity run.balance_pipeline chose, and for which jobs
        self.capacity_choices: list[dict] = []  # stream_window's choices, for run_metrics.json
        self.busy = [0.0] * len(group.places)
        self.span = [0.0] * len(group.places)
        self.peak_memory = 0
        self.optimizer_state_bytes: dict[str, int] = {}  # job -> its optimizer state summed over the stages
        self.gpu_samples: list[dict] = []

    def resume_from(self, resumed: Resumed | None) -> None:
        """Take every job's progress from `resumed` (None: from the start); their metrics files follow."""
        self.windows = resumed.windows if resumed is not None else 0
        for name, state in self.states.items():
            state.restore(resumed.progress[name] if resumed is not None else JobProgress())
            trim_metrics(self.run.output_dir, name, state.step)
        self.federation.restore(self.states, resumed.rounds if resumed is not None else None)
        self._note_rounds()
        if resumed is None:
            self._init_pass()
        if resumed is not None:
            stream = resumed.stream  # with the same layout, the stream goes on at the capacity chosen before
            if stream is not None and self.run.balance_pipeline and stream.layout == self._layout:
                self._stream = stream
            self.group.restore(resumed)
            done = sum(s.step for s in self.states.values())
            self.progress.note(f"resumed from {resumed.path} ({done} job steps already done)")

    def _init_pass(self) -> None:
        """Before any step: one window of the first `adapter.init_pass_batches` global batches of each job whose
        variant initialises from its data's gradient (LoRA-GA); it steps nothing."""
        window = init_pass_window(self.prepared.jobs, self.run)
        if window is not None:
            self.progress.note(f"gradient init pass of {window.init_jobs}")
            self._account(self.group.run_window(window))

    def run_all(self) -> None:
        """Plan and send windows until every job is planned to its end, one window ahead of the actors;
        evaluate and checkpoint where a drained window brings the jobs to those points."""
        sent: deque[tuple[WindowPlan, list]] = deque()
        planner = self._new_planner()
        while not self.stop.requested:
            if not any(s.plannable for s in self.states.values()):
                if not sent:
                    break
                # The last plannable job failed while a window streamed on (its federated partner may wait at
                # the round's end for it): drain, then take what falls due, which may let jobs go on.
                self._drain(sent)
                planner = self._new_planner()
                self._at_boundary([], False)
                continue
            planned, boundary, planner = self._plan_next(planner)
            sent.append((planned, self.group.submit_window(planned.window)))
            while len(sent) > (0 if planned.window.flush else 1):
                self._collect(*sent.popleft())
            if planned.window.flush:
                planner = self._new_planner()  # a drained stream starts again without carry-over
                self._at_boundary(*boundary)
        if self.stop.requested:
            self._stop(sent)
        self._evaluate([s for s in self.states.values()
                        if s.error is None and s.job.eval_samples is not None and s.eval_step != s.step])
        self.checkpoint()

    def _stop(self, sent: deque[tuple[WindowPlan, list]]) -> None:
        """After SIGINT/SIGTERM: finish the window in flight, drain the pipeline (an empty window), checkpoint
        every job where it stands, and raise FitInterrupted."""
        self._drain(sent)
        path = self.checkpoint()
        steps = _steps_line({name: (state.step, state.job.total_steps) for name, state in self.states.items()})
        raise FitInterrupted(f"stopped by {signal.Signals(self.stop.signum).name} at steps {steps}; checkpoint "
                             f"{path}; run the same command again to resume from it", self.stop.signum)

    def _drain(self, sent: deque[tuple[WindowPlan, list]]) -> None:
        """Collect the windows in flight; when the last of them streamed on, drain the pipeline (an empty window)."""
        while sent:
            planned, calls = sent.popleft()
            self._collect(planned, calls)
            if not sent and not planned.window.flush:
                drain = Window(slots=[[] for _ in range(self.run.data_parallel)], flush=True)
                self._collect(WindowPlan(window=drain, tokens={}, microbatches=0), self.group.submit_window(drain))

    @property
    def _layout(self) -> tuple[int, int]:
        return (self.run.pipeline_stages, self.run.data_parallel)

    def _new_planner(self) -> scheduler.WindowPlanner:
        """The planner of a fresh stream, at the capacity run.balance_pipeline chose (when it has)."""
        planner = window_planner(self.run)
        return planner.with_capacity(self._stream.capacity_tokens) if self._stream is not None else planner

    def _plan_next(self, planner: scheduler.WindowPlanner
                   ) -> tuple[WindowPlan, tuple[list[_JobState], bool], scheduler.WindowPlanner]:
        """The next window of the plannable jobs, what falls due after it (jobs to evaluate, checkpoint?), and
        the planner of the windows after it. The window drains the pipeline when anything falls due or no job
        has global batches left. With run.balance_pipeline, the capacity is chosen again (stream_window)
        whenever the set of jobs in the window changes."""
        every = self.run.checkpoint_every_steps
        active = [s for s in self.states.values() if s.plannable]
        steps = self._window_steps(active)
        window_steps = {s.job.name: range(s.planned, s.planned + min(steps, s.steps_until_stop(every)))
                        for s in active}
        for state in active:
            state.planned = window_steps[state.job.name].stop
        evaluate = [s for s in active if s.eval_every and s.planned % s.eval_every == 0]
        checkpoint = (bool(every) and any(s.planned % every == 0 for s in active)) or self._checkpoint_due()
        rounds = any(s.round_every and Federation.ends_round(s.planned, s.round_every, s.job.total_steps)
                     for s in active)  # an aggregation needs the clients' steps done: drain
        last = not any(s.plannable for s in self.states.values())
        flush = bool(evaluate) or checkpoint or rounds or last
        jobs = scheduler_jobs(self.prepared.jobs, window_steps)
        plan, planner, choice = stream_window(jobs, planner, stages=self.run.pipeline_stages,
                                              replicas=self.run.data_parallel, balance=self.run.balance_pipeline,
                                              chosen_for=self._stream.jobs if self._stream else None, last=last)
        if choice is not None:
            self._stream = StreamState(capacity_tokens=choice.capacity_tokens, jobs=choice.jobs, layout=self._layout)
            self.capacity_choices.append({"window": self.planned_windows, "jobs": list(choice.jobs),
                                          "capacity_tokens": choice.capacity_tokens,
                                          "simulated_makespan": {str(c): m for c, m in choice.simulated.items()}})
            if choice.capacity_tokens != self.run.max_tokens_per_microbatch:
                self.progress.note(f"pipeline balance: microbatches of ≤ {choice.capacity_tokens} tokens for "
                                   f"{', '.join(choice.jobs)} (simulated {choice.gain:.0%} sooner than at "
                                   f"{self.run.max_tokens_per_microbatch})")
        planned = window_plan(self.prepared.jobs, window_steps, self.run, plan, flush)
        self.planned_windows += 1
        return planned, (evaluate, checkpoint), planner

    def _at_boundary(self, evaluate: list[_JobState], checkpoint: bool) -> None:
        for rnd in self.federation.due(self.states):  # before evaluating: a client at a round's end is the aggregate
            self.group.federate(rnd)
            self.progress.note(f"federated group {rnd.group}: {rnd.method} of {', '.join(rnd.clients)} "
                               f"at step {rnd.step}")
        self._note_rounds()
        self._evaluate([s for s in evaluate if s.error is None])
        if checkpoint:
            self.checkpoint()

    def _note_rounds(self) -> None:
        """Tell each client the last round its group aggregated (it may be planned past that round's end)."""
        for name, state in self.states.items():
            group = self.federation.group_of(name)
            if group is not None:
                state.rounds_through = self.federation.done[group]

    def checkpoint(self) -> Path:
        """Save every job (adapter shards from each stage, optimizer, progress) as one complete checkpoint, named by
        the jobs' optimizer steps summed (lorafusion/checkpoint/__init__.py)."""
        progress = {name: state.progress() for name, state in self.states.items()}
        staging = begin_checkpoint(self.run.output_dir, checkpoint_step(progress))
        self.group.save_shards(staging, progress)
        self.last_checkpoint_s = time.perf_counter()
        return commit_checkpoint(self.prepared, staging, self.windows, progress, self.run.pipeline_stages,
                                 self._stream, self.federation.done)

    def _checkpoint_due(self) -> bool:
        """run.checkpoint_every_s has passed since the last checkpoint (or the start)."""
        every = self.run.checkpoint_every_s
        return every is not None and time.perf_counter() - self.last_checkpoint_s >= every

    def _window_steps(self, active: list[_JobState]) -> int:
        """Global batches per job in the next window (`planning.window_size`)."""
        return window_size(self.prepared.jobs, {st.job.name: st.planned for st in active},
                           self.run.max_tokens_per_microbatch, self.run.pipeline_stages * self.run.data_parallel,
                           most=_MAX_STEPS_PER_WINDOW)

    def _collect(self, planned: WindowPlan, calls: list) -> None:
        """Wait for a window sent earlier and record the steps its calls completed (steps of earlier windows'
        global batches may complete in a later call: the stream is not drained between windows)."""
        results = self.group.collect(calls)
        self.windows += 1
        self.drains += planned.window.flush
        self._account(results)
        self.microbatches += planned.microbatches
        self.tokens.update(planned.tokens)
        for event in results[0].steps:
            state = self.states[event.job]
            self._record_step(state, event, self.tokens.pop((event.job, state.step)))

    def _account(self, results: list[WindowResult]) -> None:
        for i, result in enumerate(results):
            self.busy[i] += result.busy_s
            self.span[i] += result.span_s
            self.peak_memory = max(self.peak_memory, result.peak_memory_bytes)
            if result.gpu is not None:
                self.gpu_samples.append(result.gpu)
        replica0 = [r for r, place in zip(results, self.group.places) if place.dp_rank == 0]
        for job in {job for r in replica0 for job in r.optimizer_state_bytes}:
            self.optimizer_state_bytes[job] = sum(r.optimizer_state_bytes.get(job, 0) for r in replica0)

    def _record_step(self, state: _JobState, event, tokens: int) -> None:
        name = state.job.name
        if event.error is not None:
            state.error = f"{event.error} at step {state.step + 1}; the job was stopped"
            self.progress.note(f"  {name}: FAILED — {state.error}")
            return
        state.step += 1
        state.tokens += tokens
        state.last_loss = event.loss
        self.total_tokens += tokens
        elapsed = time.perf_counter() - self.start
        state.metrics.write({"step": state.step, "variant": state.job.spec.adapter.type, "loss": event.loss,
                             "lr": event.lr, "tokens": tokens, "grad_norm": event.grad_norm,
                             "time_s": round(elapsed, 3)})
        self.progress.step(name, state.step, event.loss, event.lr, self.total_tokens / max(elapsed, 1e-9))

    def _evaluate(self, states: list[_JobState]) -> None:
        if not states:
            return
        results = self.group.run_window(eval_window({s.job.name: s.job.eval_samples for s in states}, self.run))
        self._account(results)
        totals: dict[str, list[float]] = {}
        for result in self.group.last_stage_results(results):
            for job, (loss, count) in result.eval_sums.items():
                acc = totals.setdefault(job, [0.0, 0])
                acc[0] += loss
                acc[1] += count
        for state in states:
            loss, count = totals.get(state.job.name, [0.0, 0])
            state.eval_loss, state.eval_step = loss / max(count, 1), state.step
            state.metrics.write({"step": state.step, "eval_loss": state.eval_loss, "eval_tokens": int(count)})
            self.progress.eval(state.job.name, state.step, state.eval_loss)

    def run_metrics(self, wall: float) -> dict:
        stages = [{"stage": p.stage, "replica": p.dp_rank, "busy_s": round(b, 4), "span_s": round(s, 4),
                   "bubble_fraction": round(bubble_fraction(b, s), 4)}
                  for p, b, s in zip(self.group.places, self.busy, self.span)]
        return {
            "wall_time_s": round(wall, 3),
            "tokens_per_s": self.total_tokens / max(wall, 1e-9),
            "microbatches": self.microbatches,
            "microbatches_per_s": self.microbatches / max(wall, 1e-9),
            "windows": self.windows,
            "pipeline_drains": self.drains,
            "capacity_choices": self.capacity_choices,
            "bubble_fraction": (sum(st["bubble_fraction"] for st in stages) / len(stages)) if stages else None,
            "peak_memory_bytes": self.peak_memory,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "stages": stages,
            "gpu": summarise_gpu(self.gpu_samples),
        }

    def result(self) -> FitResult:
        out = Path(self.run.output_dir)
        jobs = {}
        for name, state in self.states.items():
            path = None
            if state.error is None:
                config, tensors = self.federation.job_adapter(state.job.spec, self.group)
                path = str(write_peft_adapter(out / name / "adapter", tensors, config, base_model=self.run.base_model))
            jobs[name] = _job_result(name, state.progress(), path, out)
        for group, path in self.federation.write_exports(self.run.output_dir, self.states, self.group,
                                                         self.run.base_model).items():
            self.progress.note(f"  federated group {group}: adapter → {path}")
        wall = time.perf_counter() - self.start
        metrics = self.run_metrics(wall)
        atomic_write_text(out / RUN_METRICS, json.dumps(metrics, indent=2))
        return FitResult(jobs=jobs, output_dir=str(out), wall_time_s=wall, tokens_per_s=metrics["tokens_per_s"])


def _variant_label(spec: JobSpec) -> str:
    """The adapter type shown beside the job's name, and its optimizer when that is not the default AdamW."""
    kind = spec.optimizer.type
    return spec.adapter.type if kind == "adamw" else f"{spec.adapter.type}, {kind}"


def _job_result(name: str, progress: JobProgress, adapter: str | None, out: Path) -> JobResult:
    metrics = out / name / "metrics.jsonl"
    return JobResult(name=name, steps=progress.step, tokens=progress.tokens, final_loss=progress.last_loss,
                     adapter_path=adapter, status="finished" if progress.error is None else "failed",
                     error=progress.error, eval_loss=progress.eval_loss,
                     first_loss=read_job_metrics(metrics, name).first_loss if metrics.is_file() else None)


def _finished_result(prepared: PreparedRun, resumed: Resumed | None) -> FitResult | None:
    """The result of a run the output directory already holds complete (every job finished or failed, every
    finished job's adapter written), without starting anything; None when there is training left to do."""
    if resumed is None:
        return None
    out = Path(prepared.run.output_dir)
    jobs = {}
    for job in prepared.jobs:
        progress = resumed.progress[job.name]
        adapter = out / job.name / "adapter"
        if progress.error is None and (progress.step < job.total_steps or not (adapter / "adapter_config.json").is_file()):
            return None
        jobs[job.name] = _job_result(job.name, progress, str(adapter) if progress.error is None else None, out)
    return FitResult(jobs=jobs, output_dir=str(out), already_complete=True)


def _steps_line(steps: dict[str, tuple[int, int]]) -> str:
    """'greet 4/24, arith 3/22': each job's optimizer steps done, of its total."""
    return ", ".join(f"{name} {done}/{total}" for name, (done, total) in steps.items())


def _lost_after_stop(prepared: PreparedRun, signum: int, lost: StageLost) -> FitInterrupted:
    """SIGINT/SIGTERM reached a stage process before the window in flight came back (a local Ray instance shares
    the driver's process group): the fit stands where its last checkpoint does, and says so as a clean stop does."""
    last = open_checkpoint(prepared)
    done = {job.name: (last.progress[job.name].step if last is not None else 0, job.total_steps)
            for job in prepared.jobs}
    name = signal.Signals(signum).name
    if last is None:
        return FitInterrupted(f"stopped by {name} at steps {_steps_line(done)}: no checkpoint was written yet, so the "
                              f"work done was lost ({lost}); set run.overwrite=true and run it again to start over",
                              signum)
    return FitInterrupted(f"stopped by {name} at steps {_steps_line(done)}, as checkpoint {last.path} holds them (the "
                          f"work after it was lost: {lost}); run the same command again to resume from it", signum)


def _train(prepared: PreparedRun, group, loggers: RunLoggers, stop: StopSignals, resumed: Resumed | None) -> FitResult:
    """The driver's loop over one stage group (`group.serve` runs it where the group wants its driver)."""
    trainer = _Trainer(prepared, group, loggers, stop)
    trainer.resume_from(resumed)
    trainer.run_all()
    return trainer.result()


def fit(jobs: list[JobSpec], run: RunConfig) -> FitResult:
    """Train `jobs` together on one copy of the base model (see lorafusion.fit).

    Resumes from the newest complete checkpoint in run.output_dir when it holds this run (run.resume). When a
    stage actor dies, the stage group is started again from the last checkpoint, up to run.max_restarts times.
    """
    progress = Progress({}, every=1, enabled=run.progress)
    progress.note(f"checking the run and tokenising the datasets of {len(jobs)} job(s)")
    prepared = prepare_run(jobs, run)
    split_layers(prepared.arch.num_layers, run.pipeline_stages, run.stage_layers)  # a bad split fails before output
    Federation(prepared.jobs)  # and so do federated clients of unequal lengths
    resumed = open_checkpoint(prepared)  # a damaged or mismatched checkpoint fails before anything is written
    finished = _finished_result(prepared, resumed)
    if finished is not None:
        progress.note(f"{run.output_dir} already holds this run, complete (checkpoint {resumed.path}); nothing to "
                      "train. Set run.overwrite=true, or choose another output_dir, to train it again.")
        return finished
    _start_output(prepared, resuming=resumed is not None)
    progress.note(f"training {len(prepared.jobs)} job(s) on {run.base_model} "
                  f"({run.pipeline_stages} stage(s) × {run.data_parallel} replica(s))")
    job_steps = [(j.spec, j.total_steps) for j in prepared.jobs]
    if choose_engine(run) == "local":
        group_cls, connection = LocalGroup, contextlib.nullcontext()
        progress.note("building the model and the adapters in this process")
    else:
        from runtime.backend import StageGroup, ray_connection

        group_cls, connection = StageGroup, ray_connection(run.pipeline_stages * run.data_parallel)
        progress.note(f"connecting to Ray and starting {run.pipeline_stages * run.data_parallel} stage actor(s); each "
                      "builds its part of the model and the adapters")
    loggers = RunLoggers(run.loggers, run.output_dir, {j.name: j.spec.to_dict() for j in prepared.jobs})
    with connection, contextlib.closing(loggers), StopSignals(progress.note) as stop:
        for attempt in range(run.max_restarts + 1):
            try:
                with group_cls(run, job_steps, prepared.arch.num_layers) as group:
                    result = group.serve(functools.partial(_train, prepared, group, loggers, stop, resumed))
                break
            except StageLost as lost:
                if stop.requested:  # the signal reached the stage processes too: what the last checkpoint holds stays
                    raise _lost_after_stop(prepared, stop.signum, lost) from None
                if attempt == run.max_restarts:
                    raise RuntimeError(f"{lost}; gave up after {run.max_restarts} restart(s) (run.max_restarts)") from lost
                resumed = open_checkpoint(prepared)
                where = f"checkpoint {resumed.path}" if resumed is not None else "the start (no checkpoint yet)"
                progress.note(f"{lost}; restarting the stage group from {where} "
                              f"(restart {attempt + 1} of {run.max_restarts})")
    for job in result.jobs.values():
        if job.adapter_path:
            progress.note(f"  {job.name}: adapter → {job.adapter_path}")
        elif job.error:
            progress.note(f"  {job.name}: failed — {job.error}")
    return result
