"""Federated groups in a fit (run.engine=local): a round's local steps are the clients' own training (isolation),
so the adapters the clients hold after the round are the method's formula, written here, of the adapters the same
jobs reach without federation; a job outside the group is unaffected; a resume across a round boundary is exact."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import lorafusion as lf
from lorafusion.federation import LORAFAIR_RIDGE

TARGETS = ["q_proj", "v_proj"]
WEIGHTS = (1.0, 3.0)  # p = 0.25, 0.75


def _jobs(data: Path, method: str | None, ranks: tuple[int, int], steps: int, every: int = 2) -> list[lf.JobSpec]:
    def fed(weight: float):
        return None if method is None else {"group": "g", "aggregate_every_steps": every, "method": method,
                                            "weight": weight}

    def job(name, dataset, rank, seed, federation, **extra):
        return lf.JobSpec(name=name, dataset=str(data / dataset), global_batch_size=4, learning_rate=1e-2,
                          max_steps=steps, seed=seed, federation=federation,
                          adapter=lf.LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS), **extra)

    # c1 evaluates after every step, so its windows drain at each step while c2's reach the round's end first:
    # c2 must wait there for c1 (the round barrier).
    return [job("c1", "greet.jsonl", ranks[0], 1, fed(WEIGHTS[0]), eval_dataset=str(data / "arith_eval.jsonl"),
                eval_every_steps=1),
            job("c2", "arith.jsonl", ranks[1], 2, fed(WEIGHTS[1])),
            job("solo", "reverse.jsonl", 2, 3, None)]


def _fit(checkpoint: Path, out: Path, jobs: list[lf.JobSpec], **fields) -> lf.FitResult:
    run = lf.RunConfig(base_model=str(checkpoint), output_dir=str(out), max_tokens_per_microbatch=256,
                       engine="local", dtype="float32", progress=False, **fields)
    return lf.fit(jobs, run)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _factors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT module -> (A, B)."""
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    return {m: (tensors[f"{m}.lora_A.weight"].double(), tensors[f"{m}.lora_B.weight"].double()) for m in modules}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys() and all((got[k] == v).all() for k, v in want.items()), f"{what} differs"


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    assert rel <= 1e-5, f"{what}: max rel. diff {rel:.2e}"


@pytest.fixture(scope="module")
def alone(train_checkpoint, examples_data, tmp_path_factory) -> dict[tuple[int, int], Path]:
    """The same three jobs without federation, two steps: ranks (2, 2) and (2, 4) -> output folder."""
    outs = {}
    for ranks in ((2, 2), (2, 4)):
        outs[ranks] = tmp_path_factory.mktemp(f"alone{ranks[1]}")
        _fit(train_checkpoint, outs[ranks], _jobs(examples_data, None, ranks, steps=2))
    return outs


@pytest.mark.parametrize("method", ["fedavg", "lorafair"])
def test_after_a_round_the_clients_hold_the_aggregate(method, alone, train_checkpoint, examples_data, tmp_path):
    _fit(train_checkpoint, tmp_path, _jobs(examples_data, method, (2, 2), steps=2))
    ref = alone[(2, 2)]
    mine = {name: _factors(_adapter(ref / name / "adapter")) for name in ("c1", "c2")}
    group = _factors(_adapter(tmp_path / "g" / "adapter"))
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    for module, (a_g, b_g) in group.items():
        (a1, b1), (a2, b2) = mine["c1"][module], mine["c2"][module]
        a_bar, b_bar = p[0] * a1 + p[1] * a2, p[0] * b1 + p[1] * b2
        if method == "lorafair":  # B̄' = argmin ‖B Ā − Σ p_k B_k A_k‖² + λ‖B − B̄‖², λ = LORAFAIR_RIDGE·tr(ĀĀᵀ)/r
            ideal = p[0] * b1 @ a1 + p[1] * b2 @ a2
            gram = a_bar @ a_bar.t()
            ridge = LORAFAIR_RIDGE * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
            b_bar = b_bar + (ideal - b_bar @ a_bar) @ a_bar.t() @ torch.linalg.inv(gram + ridge)
        _close(a_g, a_bar, f"{module} A")
        _close(b_g, b_bar, f"{module} B")
    for name in ("c1", "c2"):  # every client holds (and exports) the group's adapter
        _assert_equal(_adapter(tmp_path / name / "adapter"), _adapter(tmp_path / "g" / "adapter"), name)
    solo, solo_alone = _adapter(tmp_path / "solo" / "adapter"), _adapter(ref / "solo" / "adapter")
    for key in solo_alone:  # isolation: the job outside the group trains as it does without the group
        _close(solo[key].double(), solo_alone[key].double(), f"solo {key}")


def test_flora_folds_the_stack_and_restarts_the_clients(alone, train_checkpoint, examples_data, tmp_path):
    """Rounds end at steps 2 and 3; the export stacks both rounds (rank 2 × (2 + 4)), the first being the stack of
    the clients' adapters after two steps of their own (c2 had to wait at step 2 for c1: the round barrier)."""
    _fit(train_checkpoint, tmp_path, _jobs(examples_data, "flora", (2, 4), steps=3))
    ref = alone[(2, 4)]
    mine = {name: _factors(_adapter(ref / name / "adapter")) for name in ("c1", "c2")}
    config = json.loads((tmp_path / "g" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 12.0)  # two rounds' stacks of ranks 2 + 4, at scale 1
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    for module, (a_g, b_g) in _factors(_adapter(tmp_path / "g" / "adapter")).items():
        (a1, b1), (a2, b2) = mine["c1"][module], mine["c2"][module]
        first = b_g[:, :6] @ a_g[:6]
        _close(first, p[0] * 2.0 * b1 @ a1 + p[1] * 2.0 * b2 @ a2, module)  # Σ p_k s_k B_k A_k, s_k = 2
        assert (b_g[:, 6:] @ a_g[6:]).abs().max() > 1e-3 * first.abs().max()  # the second round learnt too
    for name in ("c1", "c2"):  # a client's export is the group's: its own B restarted at zero after the last round
        _assert_equal(_adapter(tmp_path / name / "adapter"), _adapter(tmp_path / "g" / "adapter"), name)


def _driver_step(ckpt: Path, job: str) -> int:
    return json.loads((ckpt / "jobs" / job / "driver.json").read_text())["step"]


def test_resume_across_a_round_boundary_is_exact(train_checkpoint, examples_data, tmp_path):
    """FLoRA (its folded offset grows each round) over rounds at steps 2, 4, 5: resumed from the checkpoint at the
    round's end (step 2) and from the one inside the next round (step 3), the fit ends bit for bit as it did."""
    jobs = _jobs(examples_data, "flora", (2, 4), steps=5)
    straight = tmp_path / "straight"
    _fit(train_checkpoint, straight, jobs, checkpoint_every_steps=1, keep_checkpoints=10)
    want = {name: _adapter(straight / name / "adapter") for name in ("g", "c1", "c2", "solo")}
    for ckpt in (straight / "checkpoints").iterdir():  # each records the last round both clients had finished
        both = min(_driver_step(ckpt, "c1"), _driver_step(ckpt, "c2"))
        rounds = json.loads((ckpt / "manifest.json").read_text())["federation_rounds"]
        assert rounds == {"g": max(end for end in (0, 2, 4, 5) if end <= both)}, ckpt.name
    assert json.loads((straight / "g" / "adapter" / "adapter_config.json").read_text())["r"] == 18  # 3 rounds of 6
    for step in (2, 3):
        out = tmp_path / f"from{step}"
        shutil.copytree(straight, out)
        for ckpt in (out / "checkpoints").iterdir():
            if ckpt.name.startswith("step-") and _driver_step(ckpt, "c1") > step:
                shutil.rmtree(ckpt)
        result = _fit(train_checkpoint, out, jobs, checkpoint_every_steps=1, keep_checkpoints=10)
        assert not result.already_complete and result["c1"].steps == 5
        for name, tensors in want.items():
            _assert_equal(_adapter(out / name / "adapter"), tensors, f"{name} resumed at step {step}")
    damaged = Path(shutil.copytree(straight, tmp_path / "damaged"))
    for ckpt in (damaged / "checkpoints").iterdir():
        manifest = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps({**manifest, "federation_rounds": {"g": 9}}))
    with pytest.raises(ValueError, match=r"damaged \"federation_rounds\" record \{'g': 9\}.* delete '"):
        _fit(train_checkpoint, damaged, jobs, checkpoint_every_steps=1, keep_checkpoints=10)


def test_a_round_a_checkpoint_left_unaggregated_is_aggregated_after_the_resume(train_checkpoint, examples_data,
                                                                               tmp_path):
    """Ctrl-C right after c1 failed, while c2 waited at the round's end (step 2), saves that round unaggregated (no
    drain came between). The resumed driver aggregates c2 alone there, as the uninterrupted fit does at its next
    drain, instead of taking the round as done because every live client has reached its end; a checkpoint without
    the record (an older lorafusion's) is still read that way."""
    from lorafusion.prepare import prepare_run
    from runtime.federation import Federation

    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"), max_tokens_per_microbatch=256)
    prepared = prepare_run(_jobs(examples_data, "flora", (2, 2), steps=4), run)
    states = {job.name: SimpleNamespace(job=job, step=2, error=None) for job in prepared.jobs}
    states["c1"].step, states["c1"].error = 1, "loss became nan at step 2; the job was stopped"
    saved = Federation(prepared.jobs)
    saved.restore(states, {"g": 0})
    [aggregation] = saved.due(states)
    assert (aggregation.clients, aggregation.step, saved.done) == (["c2"], 2, {"g": 2})
    derived = Federation(prepared.jobs)
    derived.restore(states)
    assert derived.done == {"g": 2} and derived.due(states) == []


def test_clients_of_unequal_length_are_refused_before_training(train_checkpoint, examples_data, tmp_path):
    jobs = _jobs(examples_data, "fedavg", (2, 2), steps=2)
    jobs[1].max_steps = 3
    with pytest.raises(ValueError, match=r"job 'c2': trains 3 steps but job 'c1' of federated group 'g' trains 2; "
                                         r".*give them the same max_steps"):
        _fit(train_checkpoint, tmp_path / "out", jobs)
    assert not (tmp_path / "out").exists()


def test_fedsb_clients_share_their_init_and_average_r_exactly(train_checkpoint, examples_data, tmp_path, monkeypatch):
    """Fed-SB: the clients' init pass shares one gradient (A and B identical), and the round's end replaces each
    client's R by the unweighted mean, so s·B R̄ A = mean_k s·B R_k A; the group exports LoRA-SB's A' = R̄ A, B."""
    import runtime.federation as federation

    seen = []
    real = federation.aggregate_on_stage

    def spy(worker, rnd):
        layers = {c: federation._client_layers(worker.adapters, c) for c in rnd.clients}
        before = {c: {w: (l.lorasb_A.clone(), l.lorasb_B.clone(), l.lorasb_R.clone()) for w, l in ls.items()}
                  for c, ls in layers.items()}
        real(worker, rnd)
        seen.append((before, {c: {w: l.lorasb_R.clone() for w, l in ls.items()} for c, ls in layers.items()}))

    monkeypatch.setattr(federation, "aggregate_on_stage", spy)
    fed = {"group": "g", "aggregate_every_steps": 2, "method": "fedsb"}
    adapter = {"type": "lorasb", "rank": 2, "init_batches": 1, "target_modules": TARGETS}
    jobs = [lf.JobSpec(name=name, dataset=str(examples_data / data), global_batch_size=4, learning_rate=1e-2,
                       max_steps=2, seed=seed, adapter=adapter, federation=fed)
            for name, data, seed in (("c1", "greet.jsonl", 1), ("c2", "arith.jsonl", 2))]
    _fit(train_checkpoint, tmp_path, jobs)
    assert len(seen) == 1  # one round, at the last step
    before, after = seen[0]
    exported = _factors(_adapter(tmp_path / "g" / "adapter"))
    for where, (a, b, r1) in before["c1"].items():
        a2, b2, r2 = before["c2"][where]
        assert (a == a2).all() and (b == b2).all(), f"{where}: the clients' A, B differ"
        assert not torch.equal(r1, r2)
        r_bar = (r1 + r2) / 2
        for client in ("c1", "c2"):
            torch.testing.assert_close(after[client][where], r_bar, rtol=0, atol=0)
        index, target = where
        a_exp, b_exp = exported[f"base_model.model.model.layers.{index}.self_attn.{target}"]
        torch.testing.assert_close(a_exp.float(), r_bar @ a, rtol=0, atol=1e-7)
        torch.testing.assert_close(b_exp.float(), b, rtol=0, atol=0)


def test_a_failed_client_leaves_its_group_and_the_rest_go_on(train_checkpoint, examples_data, tmp_path):
    """c1's learning rate blows its adapter up at step 1, so its step 2 fails; c2 waits at the round's end (step 2)
    for nothing: the group aggregates its one live client there and at step 4, and exports c2's adapter."""
    jobs = _jobs(examples_data, "fedavg", (2, 2), steps=4)
    jobs[0].learning_rate, jobs[0].max_grad_norm = 1e30, None
    for job in jobs[:2]:  # every module: a blown-up down_proj makes the loss infinite (RMSNorm hides q and v)
        job.adapter = lf.LoRAConfig(rank=2, alpha=4.0)
    result = _fit(train_checkpoint, tmp_path, jobs)
    assert result["c1"].status == "failed" and result["c1"].steps == 1
    assert result["c2"].status == "finished" and result["c2"].steps == 4
    assert result["solo"].status == "finished" and result["solo"].steps == 4
    _assert_equal(_adapter(tmp_path / "g" / "adapter"), _adapter(tmp_path / "c2" / "adapter"), "the group's adapter")


@pytest.mark.parametrize("optimizer", [lf.LoRAProConfig(), lf.AltLoRAConfig()])
def test_clients_of_factor_optimizers_restart_their_state_at_each_round(optimizer, train_checkpoint, examples_data,
                                                                       tmp_path):
    """A round resets every client's optimizer state, whichever optimizer it has (LoRA-Pro's full-size moments,
    AltLoRA's momenta): the checkpoint taken at the round's end holds fresh (zero) state, and training goes on."""
    import dataclasses

    from lorafusion.checkpoint import read_manifest, read_stage_state

    jobs = [dataclasses.replace(j, optimizer=optimizer) if j.federation else j
            for j in _jobs(examples_data, "fedavg", (2, 2), steps=3)]
    result = _fit(train_checkpoint, tmp_path, jobs, checkpoint_every_steps=1, keep_checkpoints=10)
    assert all(result[name].status == "finished" and result[name].steps == 3 for name in ("c1", "c2", "solo"))
    at_round = [c for c in (tmp_path / "checkpoints").iterdir() if c.name.startswith("step-")
                and _driver_step(c, "c1") == 2 and _driver_step(c, "c2") == 2]
    assert at_round, "no checkpoint at the round's end"
    for name in ("c1", "c2"):
        state = read_stage_state(at_round[0], name, read_manifest(at_round[0]))["optimizer"]
        moments = [t for per_param in state.values() for t in per_param.values()]
        assert moments and all(not t.any() for t in moments), f"{name}: state survived the round"


def test_when_the_last_job_fails_mid_stream_the_window_in_flight_is_collected_and_drained(
        train_checkpoint, examples_data, tmp_path, monkeypatch):
    """One job, streamed one window ahead: its step 2 fails while the next window is in flight. Every window sent
    is still collected and the pipeline ends drained (before, the fit ended with that window never collected, and
    a federated partner waiting at its round's end for the failed client was never aggregated)."""
    from runtime.engine import LocalGroup

    sent, collected = [], []
    submit, collect = LocalGroup.submit_window, LocalGroup.collect

    def spy_submit(self, window):
        calls = submit(self, window)
        sent.append((window.flush, calls))
        return calls

    def spy_collect(self, calls):
        collected.append(calls)
        return collect(self, calls)

    monkeypatch.setattr(LocalGroup, "submit_window", spy_submit)
    monkeypatch.setattr(LocalGroup, "collect", spy_collect)
    monkeypatch.setattr(importlib.import_module("runtime.fit"), "_MAX_STEPS_PER_WINDOW", 1)  # one-step windows
    job = lf.JobSpec(name="bad", dataset=str(examples_data / "arith.jsonl"), global_batch_size=4, learning_rate=1e30,
                     max_grad_norm=None, max_steps=8, adapter=lf.LoRAConfig(rank=2, alpha=4.0))
    result = _fit(train_checkpoint, tmp_path, [job])
    assert result["bad"].status == "failed" and result["bad"].steps == 1
    training = [(flush, calls) for flush, calls in sent if calls in collected]
    assert len(training) == len(sent), "a window sent to the stage was never collected"
    assert not sent[0][0] and sent[-1][0], "expected streamed windows and a drain at the end"
