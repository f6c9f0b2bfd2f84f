"""The hot path (DESIGN "The hot path"): a training step's forward and backward never wait for the device, their
per-layer op count does not grow with the number of samples packed, and the per-step caches stay correct."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

import lorafusion as lf
from lorafusion.batching import build_microbatch
from lorafusion.data import IGNORE_INDEX, Sample
from lorafusion.models.builder import resolve_dtype
from runtime.worker import StageWorker

JOBS = ("a", "b", "c")


def _jobs(examples_data, dropout: float = 0.1) -> list[lf.JobSpec]:
    return [lf.JobSpec(name=name, dataset=str(examples_data / "greet.jsonl"),
                       adapter=lf.LoRAConfig(rank=2 + i, alpha=8, dropout=dropout), global_batch_size=2,
                       learning_rate=1e-3, max_steps=2, seed=i) for i, name in enumerate(JOBS)]


@pytest.fixture(scope="module")
def worker(train_checkpoint, examples_data, tmp_path_factory) -> StageWorker:
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path_factory.mktemp("hot") / "run"),
                       progress=False, dtype="float32")
    return StageWorker(run, [(spec, 2) for spec in _jobs(examples_data)])


def _items(lengths: list[int], seed: int = 0) -> list[tuple[str, Sample, int]]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i, length in enumerate(lengths):
        ids = tuple(torch.randint(3, 250, (length,), generator=gen).tolist())
        labels = ids[1:] + (IGNORE_INDEX,)
        items.append((JOBS[i % len(JOBS)], Sample(input_ids=ids, labels=labels, source=f"t:{i}"), 100 + i))
    return items


_SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


@contextlib.contextmanager
def _no_host_sync():
    """Every tensor method that reads a value back to the host raises while the block runs."""
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def refuse(name):
        def call(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() called inside a training step's forward or backward")
        return call

    try:
        for name in _SYNCS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_forward_and_backward_never_read_a_tensor_back(worker):
    """Two microbatches (the second reuses the step's cached factors), dropout on, three jobs, mixed lengths."""
    weights = {job: 0.01 for job in JOBS}
    for seed in range(2):
        mb = build_microbatch(_items([5, 17, 40, 9, 3, 33], seed)).to(worker.device)
        with _no_host_sync():
            out, sums = worker.forward(mb, weights)
            worker.backward(out, None, None)
        assert set(sums) == set(JOBS) and all(isinstance(v, torch.Tensor) for v in sums.values())
    for job in JOBS:
        worker.collect_grads(job)
        assert all(p.grad is not None for p in worker.adapters.parameters(job))
        worker.step(job, float(worker.grad_norm_sq(job)) ** 0.5)


def _ops_per_microbatch(worker: StageWorker, lengths: list[int]) -> Counter:
    """aten ops of one microbatch's forward and backward, the step's factors already built."""
    mb = build_microbatch(_items(lengths))
    weights = {job: 0.01 for job in JOBS}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out, _ = worker.forward(mb, weights)
        worker.backward(out, None, None)
    # Not counted: fill_/zero_, which torch's own kernels (SDPA's CPU backward, index_add's output) issue or
    # skip depending on tensor sizes, whatever the caller does.
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in _FILLS)


_FILLS = ("aten::fill_", "aten::zero_")


def test_ops_per_microbatch_do_not_depend_on_the_number_of_samples(worker):
    """The same lengths and jobs, 8 or 65 samples: the same aten ops, the same number of times (one length spans
    three query chunks of the CPU's chunked attention, whose ops follow the bucket's length, never its samples)."""
    _ops_per_microbatch(worker, [12, 30, 50, 300])  # builds the step's factors
    few = _ops_per_microbatch(worker, [12, 30, 50, 300] * 2)
    many = _ops_per_microbatch(worker, [12, 30, 50] * 20 + [300] * 5)
    assert sum(few.values()) > 100
    assert few == many, {op: (few[op], many[op]) for op in few.keys() | many.keys() if few[op] != many[op]}


def test_cached_factors_follow_every_change_of_the_parameters(worker):
    """A parameter written in place (a step, a load) rebuilds the job's factors; gradients owed to the old
    ones are handed to the parameters first."""
    wrapper = next(iter(worker.adapters.layers[0].values()))
    first = wrapper.factors("a", torch.float32)
    assert wrapper.factors("a", torch.float32) is first
    with torch.no_grad():
        next(iter(wrapper.adapters["job_a"].parameters())).add_(1.0)
    rebuilt = wrapper.factors("a", torch.float32)
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt.a, wrapper.job_factors("a")[0])


def test_dropout_masks_are_uncorrelated_across_rows_columns_and_layers():
    from lorafusion.adapters.dropout import dropped_entries, row_keys

    keys = row_keys(512, [(0, 200, 7), (200, 512, 8)])
    masks = [dropped_entries(keys, site, 256, 0.5).float() for site in (0, 1)]
    for mask in masks:
        assert abs(mask.mean().item() - 0.5) < 0.01
        centred = mask - mask.mean()
        for a, b in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):
            assert abs((a * b).mean().item()) < 0.01  # neighbouring columns / rows: 1/sqrt(130k) ≈ 0.003
    cross = ((masks[0] - masks[0].mean()) * (masks[1] - masks[1].mean())).mean().item()
    assert abs(cross) < 0.01
    assert dropped_entries(keys, 0, 255, 0.5).shape == (512, 255)


def test_dropout_mask_is_the_documented_hash_entry_by_entry():
    """Each entry against the hash written out in Python integers: column c's uniform is 16-bit half c % 2 of the
    high 32 bits of ((row key ^ layer key ^ key of column pair c // 2) · C1 mod 2^64), dropped below the threshold."""
    from lorafusion.adapters import dropout

    mask64 = (1 << 64) - 1
    keys = dropout.row_keys(6, [(0, 4, 11), (4, 6, 12)])
    site_id, columns, p = 5, 7, 0.3
    got = dropout.dropped_entries(keys, site_id, columns, p)
    layer_key = dropout.mix_seed(site_id, 0x5EED)
    pair_keys = dropout._column_keys(-(-columns // 2), keys.device).tolist()
    for row, key in enumerate(keys.tolist()):
        for column in range(columns):
            word = ((key ^ layer_key ^ pair_keys[column // 2]) & mask64) * (0xFF51AFD7ED558CCD) & mask64
            uniform = (word >> (32 + 16 * (column % 2))) & 0xFFFF  # as unsigned; the code compares it as int16
            dropped = (uniform ^ 0x8000) < dropout.drop_threshold(p)
            assert bool(got[row, column]) == dropped, (row, column)
    assert 0 < int(got.sum()) < got.numel()


@pytest.mark.parametrize("flags, expected", [("fpu sse avx2", torch.float32),
                                             ("fpu avx512f avx512_bf16", torch.bfloat16),
                                             ("fpu amx_tile amx_bf16", torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_it(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"model name\t: Test CPU\nflags\t\t: {flags}\n")
    assert resolve_dtype("auto", torch.device("cpu"), cpuinfo) == expected
    assert resolve_dtype("float32", torch.device("cpu"), cpuinfo) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), tmp_path / "missing") == torch.float32


def test_actors_take_a_gpu_each_or_none():
    """A cluster with fewer GPUs than stage actors is refused instead of running some stages on CPU slots."""
    from runtime.backend import gpu_per_actor

    assert gpu_per_actor(4, 4) is True and gpu_per_actor(8, 2) is True and gpu_per_actor(0, 2) is False
    with pytest.raises(RuntimeError, match="1 GPUs for 2 stage actors.*at most 1"):
        gpu_per_actor(1, 2)


def test_evaluate_refuses_a_gpu_torch_cannot_see(train_checkpoint, examples_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        lf.evaluate(train_checkpoint, None, examples_data / "arith_eval.jsonl", device="cuda")


@pytest.mark.gpu
def test_evaluate_runs_on_the_gpu(train_checkpoint, examples_data):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    on_gpu = lf.evaluate(train_checkpoint, None, examples_data / "arith_eval.jsonl", dtype="float32")
    on_cpu = lf.evaluate(train_checkpoint, None, examples_data / "arith_eval.jsonl", dtype="float32", device="cpu")
    assert on_gpu.tokens == on_cpu.tokens and on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-4)


def _saved_bytes_and_grads(train_checkpoint, examples_data, out, recompute: str):
    """Bytes the forward keeps for the backward (the storages of the tensors saved for autograd, each counted
    once), and the adapter gradients."""
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(out), progress=False, dtype="float32",
                       recompute=recompute)
    worker = StageWorker(run, [(spec, 2) for spec in _jobs(examples_data, dropout=0.2)])
    from benchmarks.bench_recompute import saved_bytes

    saved = saved_bytes(worker, build_microbatch(_items([40, 25, 60, 33, 12, 70])), {job: 0.01 for job in JOBS})
    for job in JOBS:
        worker.collect_grads(job)
    return saved, [p.grad.clone() for job in JOBS for p in worker.adapters.parameters(job)]


def test_recompute_keeps_less_and_gives_the_same_gradients(train_checkpoint, examples_data, tmp_path):
    """run.recompute: 'selective' keeps less than 'none' and 'full' less again, with the same gradients (dropout
    on: the rerun draws the same masks), though 1F1B may run other microbatches in between."""
    results = {mode: _saved_bytes_and_grads(train_checkpoint, examples_data, tmp_path / mode, mode)
               for mode in ("none", "selective", "full")}
    assert results["none"][0] > results["selective"][0] > results["full"][0]
    for mode in ("selective", "full"):
        for got, want in zip(results[mode][1], results["none"][1]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="run.recompute='all'; choose one of"):
        lf.RunConfig(base_model="m", output_dir="o", recompute="all")


def test_engine_choice(monkeypatch):
    from runtime.engine import choose_engine

    def run(**fields):
        return lf.RunConfig(base_model="m", output_dir="o", **fields)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import sys

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # no Ray imported: nothing is connected
    assert choose_engine(run()) == "local"
    assert choose_engine(run(pipeline_stages=2)) == "ray"
    assert choose_engine(run(engine="ray")) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # under `ray job submit`
    assert choose_engine(run()) == "ray"
    with pytest.raises(ValueError, match="engine='local' runs one stage and one replica.*data_parallel=2"):
        run(engine="local", data_parallel=2)


def test_variant_jobs_never_read_a_tensor_back(train_checkpoint, examples_data, tmp_path):
    """The same for jobs of every way a variant computes: DoRA's column scale, VeRA's shared projections,
    Uni-LoRA's gathered factors, SHiRA's sparse and RandLoRA's full-rank updates, DyLoRA's per-step rank mask,
    Matryoshka's nested scale, Block-LoRA's summed blocks, PaCA's column node, LoLDU's and Hydra's factors from W,
    TeRA's tensor network (dropout on where they have it)."""
    two = ["q_proj", "down_proj"]
    adapters = [lf.DoRAConfig(rank=2, dropout=0.1), lf.VeRAConfig(rank=8, dropout=0.1),
                lf.UniLoRAConfig(rank=2, theta_dim=128), lf.SHiRAConfig(rank=1),
                lf.RandLoRAConfig(rank=32, dropout=0.1, target_modules=two),
                lf.DyLoRAConfig(rank=4, dropout=0.1, target_modules=two),
                lf.MatryoshkaLoRAConfig(train_ranks=[1, 2, 4], target_modules=two),
                lf.BlockLoRAConfig(rank=4, blocks=2, target_modules=two), lf.PaCAConfig(rank=2, target_modules=two),
                lf.LoLDUConfig(rank=2, target_modules=two), lf.HydraConfig(rank=2, dropout=0.1, target_modules=two),
                lf.TeRAConfig(rank=2, target_modules=two)]
    names = [a.type for a in adapters]
    specs = [lf.JobSpec(name=a.type, dataset=str(examples_data / "greet.jsonl"), adapter=a, global_batch_size=2,
                        max_steps=2, seed=i) for i, a in enumerate(adapters)]
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"), progress=False,
                       dtype="float32")
    worker = StageWorker(run, [(spec, 2) for spec in specs])
    lengths = [5, 17, 40, 9, 3, 33, 11, 8, 20, 6, 14, 7, 25, 4]  # at least one sample of every job
    items = [(names[i % len(names)], sample, seed) for i, (_, sample, seed) in enumerate(_items(lengths, 3))]
    for _ in range(2):  # the second reuses the step's cached factors
        mb = build_microbatch(items).to(worker.device)
        with _no_host_sync():
            out, _ = worker.forward(mb, {name: 0.01 for name in names})
            worker.backward(out, None, None)
    for name in names:
        worker.collect_grads(name)
        assert all(p.grad is not None for p in worker.adapters.parameters(name)), name
