"""Data parallelism without a wrapper: every rank computes gradients on its own samples, then the gradients
and the label counts are summed across ranks (the loss is normalised by the global count of label tokens, so a
sum, not a mean, is the right reduction). Works under `torchrun` with gloo (CPU) or NCCL (GPU)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def init(device_type: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device_type == "cuda":
        torch.cuda.set_device(local)  # collectives and Triton launches use the current device
    if world > 1 and not dist.is_initialized():
        # Rank 0 saves checkpoints while the others wait: allow more than the default 10 minutes.
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(hours=2))
    if world > 1:
        return dist.get_rank(), dist.get_world_size(), local
    return 0, 1, 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity on one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_(flag: bool, device: torch.device) -> bool:
    """Whether any rank says yes."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(sum_(t).item() > 0)


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every trainable parameter's gradient over ranks, in one flat buffer."""
    if not active() or not params:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
