"""Stage-to-stage sends and receives cannot deadlock under NCCL's rules.

NCCL runs a rank's point-to-point ops in the order they are issued, and a send of activation size completes only
once the peer has posted the matching receive; ops issued together (batch_isend_irecv) progress together. Each
stage of a 2-stage pipeline runs a real window here against a recording comm, and the recorded op sequences are
replayed under those rules: with the forward send and the next backward's receive paired they finish, and split
apart (what the runtime did before) they deadlock, which shows the replay can fail.
"""

from __future__ import annotations

import pytest
import torch

import lorafusion as lf
from lorafusion.prepare import prepare_run
from runtime.comm import StagePlace
from runtime.windows import plan_window
from runtime.pipeline import split_layers
from runtime.stage import StageRunner
from runtime.worker import StageWorker


class RecordingComm:
    """StageComm's interface; receives give zeros and every op is recorded as a group of (kind, peer)."""

    def __init__(self, place: StagePlace, split_pairs: bool = False) -> None:
        self.place, self.split_pairs = place, split_pairs
        self.groups: list[list[tuple[str, int]]] = []

    def _recv(self, shape, dtype, peer):
        self.groups.append([("recv", peer)])
        return torch.zeros(shape, dtype=dtype)

    def send_forward(self, hidden):
        self.groups.append([("send", self.place.rank + 1)])

    def send_backward(self, grad):
        self.groups.append([("send", self.place.rank - 1)])

    def recv_forward(self, shape, dtype):
        return self._recv(shape, dtype, self.place.rank - 1)

    def recv_backward(self, shape, dtype):
        return self._recv(shape, dtype, self.place.rank + 1)

    def send_forward_recv_backward(self, hidden, shape, dtype):
        pair = [("send", self.place.rank + 1), ("recv", self.place.rank + 1)]
        self.groups += [[op] for op in pair] if self.split_pairs else [pair]
        return torch.zeros(shape, dtype=dtype)

    def start_sum_over_stages(self, tensor):
        return None

    def sum_over_replicas(self, tensor):
        return tensor

    def wait_sends(self):
        pass


def replay(groups: dict[int, list[list[tuple[str, int]]]]) -> bool:
    """Whether every rank gets through its groups under NCCL's rules (FIFO matching per direction)."""
    at = {rank: 0 for rank in groups}
    matched = {rank: set() for rank in groups}  # indices of the current group's ops already matched
    while True:
        progress = False
        for rank, seq in groups.items():
            if at[rank] == len(seq):
                continue
            for index, (kind, peer) in enumerate(seq[at[rank]]):
                if kind != "send" or index in matched[rank] or at[peer] == len(groups[peer]):
                    continue
                theirs = groups[peer][at[peer]]
                for other, (other_kind, other_peer) in enumerate(theirs):
                    if other_kind == "recv" and other_peer == rank and other not in matched[peer]:
                        matched[rank].add(index)
                        matched[peer].add(other)
                        progress = True
                        break
        for rank, seq in groups.items():
            if at[rank] < len(seq) and len(matched[rank]) == len(seq[at[rank]]):
                at[rank] += 1
                matched[rank] = set()
                progress = True
        if all(at[rank] == len(seq) for rank, seq in groups.items()):
            return True
        if not progress:
            return False


@pytest.fixture(scope="module")
def window_and_workers(train_checkpoint, examples_data, tmp_path_factory):
    jobs = [lf.JobSpec(name=name, dataset=str(examples_data / f"{name}.jsonl"), adapter=lf.LoRAConfig(rank=2),
                       global_batch_size=4, learning_rate=1e-3, max_steps=2, seed=i)
            for i, name in enumerate(("greet", "arith"))]
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path_factory.mktemp("p2p") / "run"),
                       max_tokens_per_microbatch=64, pipeline_stages=2, progress=False, dtype="float32")
    prepared = prepare_run(jobs, run)
    planned = plan_window(prepared.jobs, {j.name: range(0, 2) for j in prepared.jobs}, run)
    layers = split_layers(2, 2)
    workers = [StageWorker(run, [(j.spec, j.total_steps) for j in prepared.jobs], StagePlace(stage=s, stages=2),
                           layers[s]) for s in range(2)]
    return planned.window, workers


@pytest.mark.parametrize("split_pairs, finishes", [(False, True), (True, False)], ids=["paired", "split"])
def test_one_f_one_b_exchanges_finish_under_nccl_rules(window_and_workers, split_pairs, finishes):
    window, workers = window_and_workers
    assert sum(1 for slot in window.slots[0] if slot.items) >= 4, "too few microbatches for a steady 1F1B phase"
    groups = {}
    for worker in workers:
        comm = RecordingComm(worker.place, split_pairs=split_pairs)
        StageRunner(worker, comm).run_window(window)
        groups[worker.place.rank] = comm.groups
    assert any(len(g) == 2 for g in groups[0]) != split_pairs  # stage 0 pairs a send with a receive
    assert replay(groups) is finishes
