"""Tensor-parallel state and collectives: real torch.distributed calls once a TP group is set, no-ops at size 1.

Owns only the group handle; process launch and `init_process_group` belong to the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_tp_group: dist.ProcessGroup | None = None


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    """Install (or clear, with None) the process group that tensor-parallel layers shard over."""
    global _tp_group
    _tp_group = group


@contextmanager
def tp_group_hidden() -> Iterator[None]:
    """Run as if at TP size 1: layers built or called inside hold whole weights and issue no collectives
    (a replicated encoder on a TP rank, or a TP=1 engine beside a TP engine in one process)."""
    global _tp_group
    group, _tp_group = _tp_group, None
    try:
        yield
    finally:
        _tp_group = group


def get_tp_world_size() -> int:
    return 1 if _tp_group is None else dist.get_world_size(_tp_group)


def get_tp_rank() -> int:
    return 0 if _tp_group is None else dist.get_rank(_tp_group)


def tensor_model_parallel_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the TP ranks (in place); identity at world size 1."""
    if get_tp_world_size() == 1:
        return tensor
    dist.all_reduce(tensor, group=_tp_group)
    return tensor


def tensor_model_parallel_all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim` in rank order; identity at world size 1."""
    world_size = get_tp_world_size()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=_tp_group)
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_gather(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
    """Every rank's `tensor` concatenated along `dim` in rank order, on the first TP rank; None on the others
    (every rank must call it); identity at world size 1."""
    world_size = get_tp_world_size()
    if world_size == 1:
        return tensor
    first = get_tp_rank() == 0
    parts = [torch.empty_like(tensor) for _ in range(world_size)] if first else None
    dist.gather(tensor.contiguous(), parts, dst=dist.get_global_rank(_tp_group, 0), group=_tp_group)
    return torch.cat(parts, dim=dim) if first else None
