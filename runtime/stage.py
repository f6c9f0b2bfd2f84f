"""One stage's loop over the microbatch stream, window by window: 1F1B forwards and backwards, activations
to and from the neighbouring stages, and each job's optimizer step as soon as the backward of the last
microbatch of its global batch is done on this stage.

The driver sends every actor the same `Window`s in the same order; each actor runs its replica's slots.
Windows continue one stream: the backwards still owed at a window's end run inside the next window (no
pipeline flush), unless the window is marked `flush` (an evaluation, a checkpoint or the end follows).
Every actor makes the same decisions (which jobs step after which slot, which jobs have failed) in the same
order, so the collective reductions at a step line up across stages and replicas without any handshake.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch

from lorafusion.batching import build_microbatch
from lorafusion.data import Sample
from runtime.comm import StageComm, StagePlace
from runtime.federation import init_pass_sets
from runtime.pipeline import OneFOneB
from runtime.telemetry import gpu_sample
from runtime.worker import StageWorker

__all__ = ["Slot", "Window", "StepEvent", "WindowResult", "StageRunner", "local_runner"]


@dataclass
class Slot:
    """One microbatch of one data-parallel replica; no items = a no-op (nothing runs, nothing is sent)."""

    items: list[tuple[str, Sample, int]] = field(default_factory=list)
    """(job, sample, dropout seed), in the order they are packed."""
    weights: dict[str, float] = field(default_factory=dict)
    """job -> 1 / loss tokens of the job's global batch this microbatch belongs to."""


@dataclass
class Window:
    """A stretch of the microbatch stream, identical for every actor."""

    slots: list[list[Slot]]
    """[replica][slot]: every replica has the same number of slots (padded with no-ops)."""
    steps_after: dict[int, list[str]] = field(default_factory=dict)
    """slot -> jobs whose global batch ends there: they step after that slot's backward, in this order."""
    train: bool = True
    """False: forward only, every job's token-loss sums are returned (evaluation)."""
    init_jobs: list[str] = field(default_factory=list)
    """Jobs whose gradient init pass this window is (no steps): after its drain their layers are initialised from
    the gradients summed over its slots (see AdapterLayer.init_pass)."""
    flush: bool = True
    """Drain the pipeline at the window's end: every backward and step of its slots is done when run_window
    returns. False: the stream goes on with the next window (which must come), and the backwards and steps
    of the window's last S - 1 - stage forwards run there. Evaluation windows always flush."""


@dataclass
class StepEvent:
    job: str
    loss: float
    """The job's mean token loss over its global batch (summed over stages and replicas)."""
    grad_norm: float
    lr: float
    error: str | None = None
    """Set when the step was refused (loss or gradient not finite); the job is then removed."""


@dataclass
class WindowResult:
    steps: list[StepEvent] = field(default_factory=list)
    eval_sums: dict[str, list[float]] = field(default_factory=dict)
    """job -> [token-loss sum, loss tokens] of this actor's slots (last stage only, evaluation windows)."""
    busy_s: float = 0.0
    """Time spent computing (forward, backward, optimizer steps), excluding waits for other stages."""
    span_s: float = 0.0
    """Stream time this call covers: from the end of the stream's previous op (or the start of the first
    forward's compute, on a fresh stream) to the end of its last op; summed over the calls of one stream it
    is the time from the stage's first microbatch to its last, waits included."""
    microbatches: int = 0
    peak_memory_bytes: int = 0
    gpu: dict | None = None
    """nvidia-ml-py sample of this actor's GPU at the window's end (None on CPU or without nvidia-ml-py)."""
    optimizer_state_bytes: dict[str, int] = field(default_factory=dict)
    """job -> bytes of its optimizer's state on this actor (LoRA-Pro's full-size moments make it large)."""


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class StageRunner:
    """Runs windows on one StageWorker, talking to the other stages and replicas through `comm`."""

    def __init__(self, worker: StageWorker, comm: StageComm) -> None:
        self.worker, self.comm = worker, comm
        self.place = comm.place
        self._loss = {}  # job -> weighted loss of its current global batch on this actor (last stage)
        self._pending = {}  # job -> (its in-flight sum over stages, [shared grads..., norm², loss], shared) until it steps
        self._new_stream()

    def _new_stream(self) -> None:
        self._schedule = OneFOneB(self.place.stage, self.place.stages)
        self._received = 0  # slots of the stream received so far: window slot i is stream microbatch base + i
        self._in_flight = {}  # stream microbatch -> (output, input) until its backward
        self._steps_at = {}  # stream microbatch -> jobs stepping after its backward
        self._grad_ahead: torch.Tensor | None = None  # the next backward's gradient, received with a forward send
        self._span_from: float | None = None  # where the next call's span starts (None: at its first compute)
        self._span_to: float | None = None  # end of the stream's last op so far

    def run_window(self, window: Window) -> WindowResult:
        result = WindowResult()
        slots = window.slots[self.place.dp_rank]
        if window.train:
            self._train(window, slots, result)
        else:
            if self._schedule.in_flight or self._received:
                raise RuntimeError("an evaluation window came while a training window's pipeline was not flushed; "
                                   "the training window before it must have flush=True")
            self._evaluate(slots, result)
        flush = not window.train or window.flush
        if flush:
            self._finish_steps(None, result)
            self.comm.wait_sends()
        for job in window.init_jobs:  # an init pass's loss sums are not a step's
            self._loss.pop(job, None)
        for jobs in init_pass_sets(self.worker, window.init_jobs):
            self._finish_init_pass(jobs, result)
        if self._span_to is not None and self._span_from is not None:
            result.span_s = self._span_to - self._span_from
            self._span_from = self._span_to
        if flush:
            self._new_stream()
        result.peak_memory_bytes = _peak_memory_bytes(self.worker.device)
        result.optimizer_state_bytes = {job: opt.state_bytes() for job, opt in self.worker.optimizers.items()}
        if self.worker.device.type == "cuda":
            result.gpu = gpu_sample(torch.cuda.current_device())
        return result

    def _microbatch(self, slot: Slot):
        # A failed job was removed on every actor at the same step, before any later slot holding it runs.
        items = [item for item in slot.items if item[0] in self.worker.optimizers]
        return build_microbatch(items).to(self.worker.device) if items else None

    def _train(self, window: Window, slots: list[Slot], result: WindowResult) -> None:
        base = self._received
        self._received += len(slots)
        for i, jobs in window.steps_after.items():
            self._steps_at[base + i] = jobs
        ops = self._schedule.ops(self._received, drain=window.flush)
        for n, (kind, i) in enumerate(ops):
            if kind == "F":
                slot = slots[i - base]
                self._finish_steps({item[0] for item in slot.items}, result)
                mb = self._microbatch(slot)
                if mb is not None:
                    upcoming = ops[n + 1] if n + 1 < len(ops) else None
                    grad_for = upcoming[1] if upcoming and upcoming[0] == "B" and upcoming[1] in self._in_flight else None
                    out, sums, hidden_in = self._forward(mb, slot.weights, result, grad_for)
                    for job, value in sums.items():  # device scalars: read once, at the job's step
                        self._loss[job] = self._loss[job] + value if job in self._loss else value
                    self._in_flight[i] = (out, hidden_in)
                continue
            if i in self._in_flight:
                self._backward(*self._in_flight.pop(i), result)
            for job in self._steps_at.pop(i, []):
                if job in self.worker.optimizers:
                    self._start_step(job, result)

    def _compute(self, fn, *args, result: WindowResult):
        """fn(*args), timed as busy; marks the stream's span."""
        tic = time.perf_counter()
        if self._span_from is None:
            self._span_from = tic
        out = fn(*args)
        self._span_to = time.perf_counter()
        result.busy_s += self._span_to - tic
        return out

    def _forward(self, mb, weights: dict[str, float] | None, result: WindowResult, grad_for: int | None = None):
        """Receive this stage's input, run the chunk, send its output on; returns (out, sums, input).

        grad_for: the in-flight microbatch whose backward comes next; its gradient is received together with
        this send (StageComm.send_forward_recv_backward) and kept for that backward."""
        hidden_in = None
        if not self.place.is_first:
            hidden_in = self.comm.recv_forward(self.worker.hidden_shape(mb), self.worker.hidden_dtype)
            hidden_in.requires_grad_(weights is not None)
        out, sums = self._compute(self.worker.forward, mb, weights, hidden_in, result=result)
        result.microbatches += 1
        if not self.place.is_last:
            if grad_for is None:
                self.comm.send_forward(out)
            else:
                waiting = self._in_flight[grad_for][0]
                self._grad_ahead = self.comm.send_forward_recv_backward(out, tuple(waiting.shape), waiting.dtype)
        return out, sums, hidden_in

    def _backward(self, out, hidden_in, result: WindowResult) -> None:
        grad_out = None
        if not self.place.is_last:
            grad_out, self._grad_ahead = self._grad_ahead, None
            if grad_out is None:
                grad_out = self.comm.recv_backward(tuple(out.shape), out.dtype)
        grad_in = self._compute(self.worker.backward, out, grad_out, hidden_in, result=result)
        if grad_in is not None:
            self.comm.send_backward(grad_in)

    def _start_step(self, job: str, result: WindowResult) -> None:
        """At the backward of the job's last microbatch: sum its gradients over the replicas (they run in
        step with each other), then start summing its norm and loss over the stages without waiting.

        The stages reach this point at different times (the last stage first); waiting here would idle the
        later stages for a backward of every earlier one. The sum is awaited in `_finish_steps`, before the
        job's next microbatch runs on this stage, by which time every stage has started it (distance rule).
        """
        self._finish_steps({job}, result)  # a replica that held none of the job's last batch has not stepped yet
        if job not in self.worker.optimizers:
            return
        tic = time.perf_counter()
        self.worker.collect_grads(job)
        params = self.worker.optimizers[job].params
        device = self.worker.device
        loss = self._loss.pop(job, None)
        loss = torch.zeros((), dtype=torch.float64, device=device) if loss is None else loss
        if self.place.dp_size > 1:
            *grads, loss = self.comm.sum_each_over_replicas(
                [p.grad if p.grad is not None else torch.zeros_like(p) for p in params] + [loss])
            for p, grad in zip(params, grads):
                p.grad = grad
        self.worker.transform_grads(job)  # the variant's gradient hooks see the job's whole gradient of this stage
        # Parameters every stage holds a copy of (a variant's job-wide tensors, e.g. Uni-LoRA's θ) get gradients from
        # each stage's layers: their sum travels in the same collective, and their norm is taken after it.
        shared = self.worker.shared_parameters(job) if self.place.stages > 1 else []
        norm_sq = self.worker.grad_norm_sq(job, exclude=shared).to(device, torch.float64)
        totals = torch.cat([*(p.grad.reshape(-1).double() if p.grad is not None else
                              torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in shared),
                            torch.stack([norm_sq, loss])])  # stays on the device
        self._pending[job] = (self.comm.start_sum_over_stages(totals), totals, shared)
        self._span_to = time.perf_counter()
        result.busy_s += self._span_to - tic

    def _finish_init_pass(self, jobs: list[str], result: WindowResult) -> None:
        """Initialise the init-pass layers of `jobs` (one job, or the live clients of a Fed-SB group, which share
        one init: runtime/federation.py) from the gradients of the window just drained, summed over the jobs and
        the replicas (each stage holds its own layers')."""
        local, *others = (self.worker.init_pass_gradients(job) for job in jobs)
        for other in others:  # summed into the first job's gradients in place: no second [N, K] copy per layer
            torch._foreach_add_(local, other)
        grads = self.comm.sum_each_over_replicas(local)
        for job in jobs:
            self._compute(self.worker.finish_init_pass, job, grads, result=result)

    def _finish_steps(self, jobs: set[str] | None, result: WindowResult) -> None:
        """Complete the pending steps of `jobs` (None: all), in the order they were started."""
        for job in [j for j in self._pending if jobs is None or j in jobs]:
            work, totals, shared = self._pending.pop(job)
            if work is not None:
                work.wait()
            offset = 0
            for p in shared:
                p.grad = totals[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            norm_sq, loss = totals[-2:].tolist()
            norm_sq += sum(float(p.grad.double().pow(2).sum()) for p in shared)
            result.steps.append(self._step(job, norm_sq, loss, result))

    def _step(self, job: str, norm_sq: float, loss: float, result: WindowResult) -> StepEvent:
        """Step the job clipped by its global gradient norm, or stop it when its loss or norm is not finite."""
        norm = math.sqrt(norm_sq) if norm_sq >= 0 else float("nan")
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._compute(self.worker.remove_job, job, result=result)  # its adapter and optimizer go; the rest go on
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            return StepEvent(job, loss, norm, 0.0, error=f"{what} became {loss if what == 'loss' else norm}")
        lr = self._compute(self.worker.step, job, norm, result=result)
        return StepEvent(job, loss, norm, lr)

    @torch.no_grad()
    def _evaluate(self, slots: list[Slot], result: WindowResult) -> None:
        self.worker.model.eval()
        try:
            for slot in slots:
                mb = self._microbatch(slot)
                if mb is None:
                    continue
                _, sums, _ = self._forward(mb, None, result)
                for job, total in sums.items():  # last stage only: the others have no sums
                    acc = result.eval_sums.setdefault(job, [0.0, 0])
                    acc[0] = acc[0] + total
                    acc[1] += sum(s.num_loss_tokens for name, s, _ in slot.items if name == job)
            for acc in result.eval_sums.values():  # one read of each device sum, after every forward
                acc[0] = float(acc[0])
        finally:
            self.worker.model.train()


def local_runner(run, jobs) -> StageRunner:
    """The engine in this process, one stage holding the whole model (no Ray, no process groups): what an
    actor of a 1-stage, 1-replica fit runs; for tests and debugging."""
    from lorafusion.models.megatron_compat import ensure_model_parallel

    ensure_model_parallel()
    worker = StageWorker(run, jobs)
    return StageRunner(worker, StageComm(StagePlace(), worker.device))
