"""`ray job submit --working-dir . -- lorafusion train jobs.yaml` against a head started with `ray start --head`,
token authentication on, as the README shows it (CPU, a tiny model, a few steps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafusion.models.megatron_compat import free_port
from lorafusion.models.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray(args: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head of its own (ports and temp dir apart from the tests' local instance).

    `ray start --block` runs in its own process group and is stopped by signalling that group: `ray stop`
    would stop every Ray instance on the machine, the tests' own one (and so the test process) included. SIGTERM
    gets 5 s, then whatever is left of the group gets SIGKILL: the graceful path is slow (the raylet waits
    on the GCS the same signal stopped), which a throwaway head need not wait for.
    """
    if shutil.which("ray", path=str(BIN)) is None or shutil.which("lorafusion", path=str(BIN)) is None:
        pytest.fail("the `ray` and `lorafusion` commands must be installed in this environment (pip install -e .)")
    dashboard = free_port()
    temp_dir = Path("/tmp") / f"ray_submit_{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    env.pop("RAY_ADDRESS", None)
    # Every port of its own: the defaults (e.g. the dashboard agent's 52365) are taken by the tests' instance.
    ports = [arg for flag in ("--port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
                              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                              "--runtime-env-agent-port") for arg in (flag, str(free_port()))]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
         "--dashboard-port", str(dashboard), "--temp-dir", str(temp_dir), "--disable-usage-stats",
         *ports],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while _ray(["job", "list"], env, timeout_s=60).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
            time.sleep(2)
        yield env
    finally:
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait_s)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_on_the_cluster(ray_head, tmp_path, examples_data):
    model = make_tiny_checkpoint(tmp_path / "model", init_std=0.1, seed=3)
    out = tmp_path / "out"
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"base_model": str(model), "output_dir": str(out), "max_tokens_per_microbatch": 512,
                "pipeline_stages": 2, "progress": True},
        "jobs": [{"name": "greet", "dataset": str(examples_data / "greet.jsonl"), "max_steps": 2,
                  "global_batch_size": 2, "learning_rate": 1e-3, "adapter": {"type": "lora", "rank": 2}},
                 {"name": "arith", "dataset": str(examples_data / "arith.jsonl"), "max_steps": 3,
                  "global_batch_size": 3, "learning_rate": 1e-3, "adapter": {"type": "lora", "rank": 4}}],
    }))
    for _ in range(20):  # the head's job agent comes up a few seconds after `ray start` returns
        submitted = _ray(["job", "submit", "--working-dir", ".", "--", "lorafusion", "train", str(config)],
                         ray_head, timeout_s=900)
        log = submitted.stdout + submitted.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(3)
    assert submitted.returncode == 0, log[-4000:]
    assert "succeeded" in log and "2 stage(s)" in log
    for name, steps in (("greet", 2), ("arith", 3)):
        assert (out / name / "adapter" / "adapter_model.safetensors").is_file()
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    assert len(json.loads((out / "run_metrics.json").read_text())["stages"]) == 2


def test_working_dir_upload_leaves_out_history_environment_and_outputs():
    """What `ray job submit --working-dir .` packs from this repository (Ray's own walk, with .gitignore and our
    .rayignore): the code and examples, never .git, .venv or runs/."""
    from ray._private.runtime_env.packaging import _dir_travel

    packed: list[str] = []
    _dir_travel(ROOT, [], lambda p: p.is_file() and packed.append(p.relative_to(ROOT).as_posix()),
                include_gitignore=True)
    tops = {p.split("/")[0] for p in packed}  # files only: Ray packs a bare entry for an ignored folder itself
    assert {"lorafusion", "runtime", "scheduler", "examples", "pyproject.toml"} <= tops
    assert not tops & {".git", ".venv", "runs"}, sorted(tops)
