"""Process groups of one stage actor: activations to the next stage, gradients to the previous one, and the
per-job reductions at an optimizer step (gradients across data-parallel replicas, norms across stages).

Ranks are laid out rank = dp_rank * stages + stage. Every actor creates every group in the same order
(torch.distributed requires it). Tensors travel as raw bytes so any dtype (bf16 on gloo included) goes
through unchanged; shapes are never sent, because every stage builds the same microbatch and knows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["StagePlace", "StageComm"]


@dataclass(frozen=True)
class StagePlace:
    """Where one actor sits: pipeline stage `stage` of `stages`, data-parallel replica `dp_rank` of `dp_size`."""

    stage: int = 0
    stages: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def rank(self) -> int:
        return self.dp_rank * self.stages + self.stage

    @property
    def world_size(self) -> int:
        return self.stages * self.dp_size

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


class StageComm:
    """Point-to-point and group reductions for one actor; a single actor (world 1) needs none of them."""

    def __init__(self, place: StagePlace, device: torch.device) -> None:
        self.place, self.device = place, device
        self.pp_group = self.dp_group = None
        self._pending: list = []  # in-flight sends and the buffers they read from

    def start(self, init_method: str, timeout_s: float = 1800.0) -> None:
        """Join the world and create the pipeline and data-parallel groups (no-op for a world of one)."""
        import datetime

        place = self.place
        if place.world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=place.rank, world_size=place.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        for d in range(place.dp_size):  # one pipeline group per replica
            group = dist.new_group([d * place.stages + s for s in range(place.stages)])
            if d == place.dp_rank:
                self.pp_group = group
        for s in range(place.stages):  # one data-parallel group per stage
            group = dist.new_group([d * place.stages + s for d in range(place.dp_size)])
            if s == place.stage:
                self.dp_group = group

    def shutdown(self) -> None:
        self.wait_sends()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _send(self, tensor: torch.Tensor, peer: int) -> None:
        # Sends finished by now release their buffers (activations) here, not only at the window's end.
        self._pending = [(work, buf) for work, buf in self._pending if not work.is_completed()]
        payload = _as_bytes(tensor)
        self._pending.append((dist.isend(payload, peer), payload))

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, peer: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(_as_bytes(out), peer)
        return out

    def send_forward(self, hidden: torch.Tensor) -> None:
        self._send(hidden, self.place.rank + 1)

    def send_forward_recv_backward(self, hidden: torch.Tensor, shape: tuple[int, ...],
                                   dtype: torch.dtype) -> torch.Tensor:
        """Send `hidden` on and receive a gradient from the next stage as one batch of point-to-point ops.

        In 1F1B a stage sends microbatch i forward and then waits for microbatch j's gradient from the same
        peer, which sends that gradient before it receives i. Issued one by one, NCCL's blocking sends would
        cross (each side's send waits for a receive queued behind the other's send); issued together
        (batch_isend_irecv) both progress. The upstream side of every stage pair pairs them, which suffices.
        """
        peer = self.place.rank + 1
        out = torch.empty(shape, dtype=dtype, device=self.device)
        payload = _as_bytes(hidden)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, payload, peer),
                                        dist.P2POp(dist.irecv, _as_bytes(out), peer)])
        for work in works:
            work.wait()
        return out

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._recv(shape, dtype, self.place.rank - 1)

    def send_backward(self, grad: torch.Tensor) -> None:
        self._send(grad, self.place.rank - 1)

    def recv_backward(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._recv(shape, dtype, self.place.rank + 1)

    def wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum across the data-parallel replicas of this stage."""
        if self.place.dp_size > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def sum_each_over_replicas(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed across the data-parallel replicas in one collective (in fp32; the same shapes and
        dtypes come back)."""
        if self.place.dp_size == 1 or not tensors:
            return tensors
        flat = self.sum_over_replicas(torch.cat([t.reshape(-1).float() for t in tensors]))
        return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def start_sum_over_stages(self, tensor: torch.Tensor):
        """Start an in-place sum across the pipeline stages of this replica; returns the work to wait on
        (None when there is one stage and nothing to do)."""
        if self.place.stages > 1:
            return dist.all_reduce(tensor, group=self.pp_group, async_op=True)
        return None
