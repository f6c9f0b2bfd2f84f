"""runtime/heap.py: with the freed memory held, a tensor allocated again after it was freed reuses faulted-in pages
(counted in a fresh process each, so this test process's heap plays no part); a fit's CPU stage holds it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime import heap

HEAP = Path(heap.__file__)
# float32 elements of a step's activations: two above glibc's largest adaptive mmap threshold (32 MiB), which it
# maps afresh each time by default, and two below it
SIZES = [10_000_000, 2_500_000, 10_000_000, 4_000_000] * 2
SCRIPT = """
import importlib.util, resource
import torch
SIZES = {sizes}
spec = importlib.util.spec_from_file_location("heap", {path!r})  # the module alone, not the runtime package
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
if {hold}:
    assert heap.hold_freed_memory()
def step():  # a step's activations: kept until its backward, then all freed at once (float32: 40, 10, 40, 16 MB)
    kept = [torch.ones(n) for n in SIZES]
    del kept
step()  # the first steps grow the heap (and settle its layout): counted by neither
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
heap.trim_freed_memory()
"""


def faults(hold: bool) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(HEAP), hold=hold, sizes=SIZES)], capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap._libc() is None, reason="glibc's malloc only")
def test_held_memory_is_reused_without_page_faults():
    default, held = faults(False), faults(True)
    large = 3 * sum(n for n in SIZES if n * 4 > 32 << 20) * 4 // 4096  # pages of the large tensors, 3 steps
    assert default > large // 2, (default, large)  # glibc's default: fresh pages for those at least
    assert held < large // 4, (held, large)  # held: the heap grows a little more at most


def test_a_local_fit_holds_freed_memory_and_trims_it_at_the_end(monkeypatch, train_checkpoint, examples_data,
                                                                 tmp_path):
    import lorafusion as lf
    from runtime import engine, worker

    calls = []
    monkeypatch.setattr(worker, "hold_freed_memory", lambda: calls.append("hold") or True)
    monkeypatch.setattr(engine, "trim_freed_memory", lambda: calls.append("trim"))
    job = lf.JobSpec(name="h", dataset=str(examples_data / "arith.jsonl"), global_batch_size=2, max_steps=1,
                     adapter=lf.LoRAConfig(rank=2))
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path), progress=False, engine="local")
    assert lf.fit([job], run)["h"].status == "finished"
    assert calls == ["hold", "trim"]
