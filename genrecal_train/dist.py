"""Data parallelism under `torchrun` (gloo on CPU, NCCL on GPU): the trained modules under one root wrapped with
DistributedDataParallel (default) or sharded with FSDP2 (`--fsdp`), gradients *summed* over ranks (the loss is
normalised by the global count of label tokens, so a mean would divide by the world size twice)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


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


def max_(n: int, device: torch.device) -> int:
    """The largest `n` of any rank."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


class Models(nn.Module):
    """The student and the Recalibrator under one root, so that DDP and FSDP see every pass that uses them:
    `models(fn, *args)` runs `fn(*args)` inside the root's forward (their hooks run around it)."""

    def __init__(self, **modules: nn.Module | None):
        super().__init__()
        for name, m in modules.items():
            if m is not None:
                self.add_module(name, m)

    def forward(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def _sum_hook(_, bucket):  # unannotated: DDP rejects the string annotations of `from __future__`
    """DDP communication hook: sum the gradient bucket over ranks (DDP's default divides by the world size)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def wrap(models: Models, fsdp: bool, units: list[nn.Module] = ()) -> nn.Module:
    """`models` ready for data parallelism (unchanged on one process). DDP keeps a full replica per rank and
    all-reduces gradients in the backward of each step's last micro-batch. FSDP2 shards each of `units` (inner
    ones first), then the rest under the root; a unit's parameters are gathered for each of its forwards and
    backwards and its gradients reduce-scattered, so every rank must call each unit equally often. Both handle
    frozen parameters (never reduced) and parameters some rank did not use in a step (a text-only batch skips
    the vision connector; such a gradient counts as 0)."""
    if not active():
        return models
    if not fsdp:
        ddp = nn.parallel.DistributedDataParallel(models, find_unused_parameters=True, broadcast_buffers=False)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    from torch.distributed.fsdp import FSDPModule, fully_shard

    chosen = {id(m) for m in units}
    for m in reversed([*models.modules()]):  # inner units before the modules that hold them
        if id(m) in chosen:
            fully_shard(m)
    fully_shard(models)
    for m in models.modules():
        if isinstance(m, FSDPModule):
            # Sum, not mean (see the module docstring); gloo has no pre-multiplied sum, so ask for a plain one.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
            m.set_reduce_scatter_unused_params(True, recurse=False)
    return models


def no_sync(wrapped: nn.Module, sync: bool) -> Any:
    """Context for one micro-batch: with `sync` False, gradients accumulate locally (reduced with the last
    micro-batch of the step)."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s complete state dict on CPU, keys as without any wrapper; under FSDP gathered on rank 0 (the
    other ranks get {}), so every rank must call it."""
    if not active():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=_FULL)


def optimizer_state(models: Models, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names (the same format with or without FSDP); every rank calls."""
    return get_optimizer_state_dict(models, opt, options=_FULL if active() else StateDictOptions(
        full_state_dict=True))


def load_optimizer_state(models: Models, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `optimizer_state` returned (each rank takes its shard under FSDP)."""
    set_optimizer_state_dict(models, opt, state, options=StateDictOptions(full_state_dict=True))
