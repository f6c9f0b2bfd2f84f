"""Where a fit's stages run: Ray actors (runtime/backend.py), or the driver's own process for a one-stage,
one-replica fit with no Ray cluster to use (`LocalGroup`, no Ray at all).

Both run the same engine, StageRunner over a StageWorker. LocalGroup computes on the main thread while the driver
runs on a helper thread (`serve`), so the driver plans the next window meanwhile, as it does while actors train; the
same microbatches ran slower on a worker thread than on the main thread (docs/hot_path.md, "The local engine's
thread"). It keeps Ray's process start, object transfers and background daemons off a fit that has nothing to
distribute, and lets a machine without Ray train.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from concurrent.futures import Future

import torch

from lorafusion.config import JobSpec, RunConfig
from runtime.comm import StageComm, StagePlace
from runtime.stage import StageRunner, Window, WindowResult

__all__ = ["StageLost", "LocalGroup", "choose_engine", "CPU_THREADS_ENV"]

CPU_THREADS_ENV = "LORAFUSION_CPU_THREADS"
"""Intra-op threads of each CPU stage (default: the node's cores divided among its stages)."""


class StageLost(RuntimeError):
    """A stage actor died (its process or node went away); the driver restarts the group from a checkpoint."""


def _ray_connected() -> bool:
    """Whether this process is, or is told to be, on a Ray cluster (without importing Ray when it is not)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def choose_engine(run: RunConfig) -> str:
    """'ray' or 'local' for run.engine: 'auto' runs a one-stage, one-replica fit in this process unless a Ray
    cluster is at hand (RAY_ADDRESS set, as under `ray job submit`, or Ray already initialised)."""
    if run.engine != "auto":
        return run.engine
    single = run.pipeline_stages * run.data_parallel == 1
    return "local" if single and not _ray_connected() else "ray"


class _ServingThread:
    """Runs submitted calls, in order, on the thread inside `serve` while the driver runs on a helper thread.

    Before `serve` a call runs at once on the caller's thread; once `serve` has ended, or was interrupted (a second
    Ctrl-C raises KeyboardInterrupt in the main thread), calls are cancelled, so the driver unwinds instead of waiting
    on work nobody runs, and nothing queued after the interrupt runs."""

    _DRIVER_UNWIND_S = 10.0  # how long an interrupted `serve` waits for the driver to unwind its cancelled calls

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._state = "idle"  # "idle" -> "serving" -> "closed"
        self._server: threading.Thread | None = None

    def submit(self, fn, *args) -> Future:
        future = Future()
        with self._lock:
            state = self._state
            if state == "serving":
                if threading.current_thread() is self._server:
                    raise RuntimeError("a call submitted from the stage's own thread while it serves would wait on "
                                       "itself; submit from the driver")
                self._calls.put((future, fn, args))
        if state == "idle":
            self._run(future, fn, args)
        elif state == "closed":
            future.cancel()
            future.set_running_or_notify_cancel()
        return future

    @staticmethod
    def _run(future: Future, fn, args) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # the driver gets it from the future, as from a stage actor
            future.set_exception(err)
            if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: the serving thread stops too
                raise

    def _close(self) -> None:
        """Stop serving: cancel what is queued, and everything submitted from now on."""
        with self._lock:
            self._state = "closed"
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            if call is not None:
                call[0].cancel()

    def serve(self, driver):
        """driver() on a helper thread while this thread runs what it submits; its result, or its exception.

        The calls run with gradients on and no autocast, whatever the caller's thread has set (they used to run on
        a fresh thread, where that is the default)."""
        done = Future()

        def drive() -> None:
            try:
                done.set_result(driver())
            except BaseException as err:  # serve raises it on the calling thread
                done.set_exception(err)
            finally:
                self._calls.put(None)

        with self._lock:
            if self._state != "idle":
                raise RuntimeError("a stage group serves one driver")
            self._state, self._server = "serving", threading.current_thread()
        helper = threading.Thread(target=drive, name="lorafusion-driver", daemon=True)
        helper.start()
        interrupted = True
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                    stack.enter_context(torch.autocast(device, enabled=False))
                while (call := self._calls.get()) is not None:
                    self._run(*call)
            interrupted = False
        finally:
            self._close()
            helper.join(self._DRIVER_UNWIND_S if interrupted else None)
        return done.result()


class LocalGroup:
    """StageGroup's interface over one StageRunner in this process (one stage, one replica: RunConfig checks
    engine 'local', choose_engine picks it only then); use as a context manager, and run the driver through
    `serve` so that the stage computes on this (the main) thread."""

    def __init__(self, run: RunConfig, jobs: list[tuple[JobSpec, int]], num_layers: int) -> None:
        from lorafusion.models.megatron_compat import ensure_model_parallel
        from runtime.worker import StageWorker

        if not torch.cuda.is_available() and CPU_THREADS_ENV in os.environ:
            torch.set_num_threads(int(os.environ[CPU_THREADS_ENV]))
        self.run = run
        self.places = [StagePlace()]
        ensure_model_parallel()
        worker = StageWorker(run, jobs)
        self.runner = StageRunner(worker, StageComm(StagePlace(), worker.device))
        self._stage = _ServingThread()

    def __enter__(self) -> "LocalGroup":
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing to stop: the stage's thread is the caller's, and `serve` has returned

    def serve(self, driver):
        """driver() (the fit's driver loop) on a helper thread while this thread computes the windows it submits."""
        return self._stage.serve(driver)

    def submit_window(self, window: Window) -> list[Future]:
        """Queue the window for the stage's thread (windows run in the order submitted); `collect` it later."""
        return [self._stage.submit(self.runner.run_window, window)]

    def collect(self, calls: list[Future]) -> list[WindowResult]:
        return [call.result() for call in calls]

    def run_window(self, window: Window) -> list[WindowResult]:
        return self.collect(self.submit_window(window))

    def _on_thread(self, fn, *args):
        """fn(*args) on the stage's thread, after the windows submitted before it."""
        return self._stage.submit(fn, *args).result()

    def save_shards(self, staging, progress: dict) -> None:
        from lorafusion.checkpoint import stage_states, write_stage_shard

        self._on_thread(lambda: write_stage_shard(str(staging), 0, stage_states(self.runner.worker, progress)))

    def restore(self, resumed) -> None:
        from lorafusion.checkpoint import restore_worker

        self._on_thread(restore_worker, self.runner.worker, resumed)

    def last_stage_results(self, results: list[WindowResult]) -> list[WindowResult]:
        return results

    def federate(self, rnd) -> None:
        from runtime.federation import aggregate_on_stage

        self._on_thread(aggregate_on_stage, self.runner.worker, rnd)

    def folded_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        from runtime.federation import folded_state_dict

        return self._on_thread(folded_state_dict, self.runner.worker.adapters, job)

    def peft_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        return self._on_thread(self.runner.worker.peft_state_dict, job)

