"""Ray side of a fit: connect to (or start) Ray, one actor per (pipeline stage, data-parallel replica),
process groups created inside the actors, and a teardown that runs on success, error and Ctrl-C.

With RAY_ADDRESS set (as under `ray job submit`) or Ray already initialised, the fit uses that cluster;
otherwise it starts an embedded local instance and shuts it down at the end.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import ray
import torch

from lorafusion.config import JobSpec, RunConfig
from runtime.comm import StageComm, StagePlace
from runtime.engine import CPU_THREADS_ENV, StageLost
from runtime.pipeline import split_layers
from runtime.stage import StageRunner, Window, WindowResult
from runtime.worker import StageWorker

__all__ = ["StageActor", "StageGroup", "gpu_per_actor", "StageLost", "connect_ray", "ray_connection", "ACTOR_PREFIX", "CPU_THREADS_ENV"]

ACTOR_PREFIX = "lorafusion-"


def _code_root() -> str:
    """The folder holding the lorafusion/runtime/scheduler packages this driver imported."""
    import lorafusion

    return str(Path(lorafusion.__file__).resolve().parent.parent)


def connect_ray(num_actors: int) -> bool:
    """Make sure this process is connected to Ray; True when it started a local instance (to shut down)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        return False
    env = {"PYTHONPATH": os.pathsep.join(p for p in (_code_root(), os.environ.get("PYTHONPATH")) if p)}
    if CPU_THREADS_ENV in os.environ:
        env[CPU_THREADS_ENV] = os.environ[CPU_THREADS_ENV]
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_actors), include_dashboard=False,
             logging_level="WARNING", runtime_env={"env_vars": env})
    return True


@contextlib.contextmanager
def ray_connection(num_actors: int):
    """Connected to Ray for the block; a local instance started here is stopped at its end (error and Ctrl-C
    included), so stage groups restarted inside the block reuse it."""
    started = connect_ray(num_actors)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


def gpu_per_actor(cluster_gpus: float, actors: int) -> bool:
    """Whether each stage actor takes a GPU: yes when the cluster has one for every actor, no on a cluster
    without GPUs; a cluster with some GPUs but fewer than actors is an error (half the stages would run on
    CPU slots, silently hundreds of times slower)."""
    if cluster_gpus >= actors:
        return True
    if cluster_gpus > 0:
        raise RuntimeError(f"the Ray cluster has {cluster_gpus:g} GPUs for {actors} stage actors (pipeline_stages x "
                           f"data_parallel); lower run.pipeline_stages or run.data_parallel to at most {int(cluster_gpus)} "
                           "actors, or add GPUs")
    return False


class StageActor:
    """One stage of one replica (a Ray actor): builds its model chunk and runs the windows it is sent."""

    def __init__(self, run: RunConfig, jobs: list[tuple[JobSpec, int]], place: StagePlace,
                 layers: tuple[int, int], actors_per_node: int, wants_gpu: bool = False) -> None:
        import warnings

        warnings.filterwarnings("ignore", module="megatron")
        if wants_gpu and not torch.cuda.is_available():
            raise RuntimeError(
                f"stage {place.stage} (replica {place.dp_rank}) was given a GPU by Ray but torch sees none on "
                f"{ray.util.get_node_ip_address()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                f"torch {torch.__version__}); install a CUDA build of torch on every node, or run on CPU nodes")
        if not torch.cuda.is_available():
            threads = int(os.environ.get(CPU_THREADS_ENV, 0)) or max(1, (os.cpu_count() or 1) // actors_per_node)
            torch.set_num_threads(threads)
        self.run, self.jobs, self.place, self.layers = run, jobs, place, layers
        self.runner: StageRunner | None = None

    def address(self) -> str:
        """A tcp:// rendezvous address on this actor's node (asked of replica 0, stage 0)."""
        from lorafusion.models.megatron_compat import free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def setup(self, init_method: str) -> None:
        from lorafusion.models.megatron_compat import ensure_model_parallel

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        comm = StageComm(self.place, device)
        comm.start(init_method)
        ensure_model_parallel()
        worker = StageWorker(self.run, self.jobs, self.place, self.layers)
        self.runner = StageRunner(worker, comm)

    def run_window(self, window: Window) -> WindowResult:
        return self.runner.run_window(window)

    def peft_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        return self.runner.worker.peft_state_dict(job)

    def federate(self, rnd) -> None:
        from runtime.federation import aggregate_on_stage

        aggregate_on_stage(self.runner.worker, rnd)

    def folded_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        from runtime.federation import folded_state_dict

        return folded_state_dict(self.runner.worker.adapters, job)

    def save_shard(self, staging: str, progress: dict) -> None:
        from lorafusion.checkpoint import stage_states, write_stage_shard

        write_stage_shard(staging, self.place.stage, stage_states(self.runner.worker, progress))

    def restore(self, resumed) -> None:
        from lorafusion.checkpoint import restore_worker

        restore_worker(self.runner.worker, resumed)


class StageGroup:
    """The actors of one fit, as one object the driver talks to; use as a context manager inside
    `ray_connection`."""

    def __init__(self, run: RunConfig, jobs: list[tuple[JobSpec, int]], num_layers: int) -> None:
        self.run = run
        self.places = [StagePlace(stage=s, stages=run.pipeline_stages, dp_rank=d, dp_size=run.data_parallel)
                       for d in range(run.data_parallel) for s in range(run.pipeline_stages)]
        self.layers = split_layers(num_layers, run.pipeline_stages, run.stage_layers)
        self.actors = []
        try:
            gpus = gpu_per_actor(ray.cluster_resources().get("GPU", 0), len(self.places))
            options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
            remote = ray.remote(StageActor)
            per_node = max(1, min(len(self.places), int(ray.cluster_resources().get("CPU", 1))))
            tag = uuid.uuid4().hex[:8]  # named so an operator (or a test) can find and inspect them
            self.actors = [remote.options(name=f"{ACTOR_PREFIX}{tag}-stage{place.stage}-replica{place.dp_rank}",
                                          **options).remote(run, jobs, place, self.layers[place.stage], per_node, gpus)
                           for place in self.places]
            init_method = self._all([self.actors[0].address.remote()])[0]
            self._all([actor.setup.remote(init_method) for actor in self.actors])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "StageGroup":
        return self

    def serve(self, driver):
        """driver() here: the actors compute in their own processes (LocalGroup's counterpart)."""
        return driver()

    def __exit__(self, *exc) -> None:
        self.close()

    def _all(self, calls: list) -> list:
        """ray.get of the actors' calls; a dead actor becomes StageLost."""
        try:
            return ray.get(calls)
        except ray.exceptions.RayActorError as err:
            first_line = (str(err).strip().splitlines() or [""])[0][:200]
            raise StageLost(f"a stage actor died ({type(err).__name__}: {first_line})") from err

    def submit_window(self, window: Window) -> list:
        """Send the window to every actor without waiting (each runs its calls in the order sent); `collect`
        the returned calls later."""
        window_ref = ray.put(window)  # serialised once for all actors
        return [actor.run_window.remote(window_ref) for actor in self.actors]

    def collect(self, calls: list) -> list[WindowResult]:
        """The results of submitted calls, in actor order (replica-major, then stage)."""
        return self._all(calls)

    def run_window(self, window: Window) -> list[WindowResult]:
        """Every actor runs the window; results in actor order."""
        return self.collect(self.submit_window(window))

    def save_shards(self, staging, progress: dict) -> None:
        """Replica 0 of every stage writes its share of every job's state into the checkpoint being made."""
        self._all([a.save_shard.remote(str(staging), progress) for a, p in zip(self.actors, self.places)
                   if p.dp_rank == 0])

    def restore(self, resumed) -> None:
        """Every actor loads its layers' share of every job from a checkpoint the driver has checked."""
        self._all([actor.restore.remote(resumed) for actor in self.actors])

    def last_stage_results(self, results: list[WindowResult]) -> list[WindowResult]:
        return [r for r, place in zip(results, self.places) if place.is_last]

    def peft_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        """The job's whole adapter: every stage's part, from replica 0 (replicas hold the same weights)."""
        parts = self._all([a.peft_state_dict.remote(job) for a, p in zip(self.actors, self.places) if p.dp_rank == 0])
        return {key: value for part in parts for key, value in part.items()}

    def federate(self, rnd) -> None:
        """Every actor aggregates a federated group on its layers (runtime/federation.py), after the windows
        sent before."""
        self._all([actor.federate.remote(rnd) for actor in self.actors])

    def folded_state_dict(self, job: str) -> dict[str, torch.Tensor]:
        """A FLoRA client's folded stack as PEFT tensors: every stage's part, from replica 0."""
        parts = self._all([a.folded_state_dict.remote(job) for a, p in zip(self.actors, self.places) if p.dp_rank == 0])
        return {key: value for part in parts for key, value in part.items()}

    def close(self) -> None:
        """Stop every actor, even a stuck one."""
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead: nothing left to stop
                pass
        self.actors = []
