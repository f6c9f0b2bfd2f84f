"""Where a fit's stages run: Ray actors (runtime/backend.py), or the driver's own process for a one-stage,
one-replica fit with no Ray cluster to use (`LocalGroup`, no Ray at all).

Both run the same engine, StageRunner over a StageWorker; LocalGroup runs each window on a worker thread so the
driver plans the next window meanwhile, as it does while actors train. It keeps Ray's process start, object
transfers and background daemons off a fit that has nothing to distribute, and lets a machine without Ray train.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor

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


def _one_malloc_arena() -> None:
    """Let the stage thread allocate from glibc's main arena, as the main thread (and a Ray actor) does.

    A new thread otherwise gets an arena of its own, where every large tensor is a fresh mmap and its pages are
    faulted in again at each allocation: the same forward and backward ran about 20% slower on a worker thread
    than on the main thread, about 8% with one arena (2-core CPU; docs/hot_path.md). No-op without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        try:
            ctypes.CDLL(name).mallopt(-8, 1)  # M_ARENA_MAX = 1
        except (OSError, AttributeError):
            pass


class LocalGroup:
    """StageGroup's interface over one StageRunner in this process (one stage, one replica: RunConfig checks
    engine 'local', choose_engine picks it only then); use as a context manager."""

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
        _one_malloc_arena()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafusion-stage")

    def __enter__(self) -> "LocalGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit_window(self, window: Window) -> list[Future]:
        """Start the window on the stage thread (windows run in the order submitted); `collect` it later."""
        return [self._thread.submit(self.runner.run_window, window)]

    def collect(self, calls: list[Future]) -> list[WindowResult]:
        return [call.result() for call in calls]

    def run_window(self, window: Window) -> list[WindowResult]:
        return self.collect(self.submit_window(window))

    def _on_thread(self, fn, *args):
        """fn(*args) on the stage thread, after the windows submitted before it."""
        return self._thread.submit(fn, *args).result()

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

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
