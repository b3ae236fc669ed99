"""Tensor-parallel linear layers; each parameter carries a `weight_loader` that copies only this rank's shard.

At TP size 1 every layer is a plain F.linear. Loaders take the full checkpoint tensor and an optional shard id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.distributed import (
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)


def copy_weight(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
    """Default loader: copy a whole (already sliced) tensor into `param`, casting its dtype."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} takes no shard id, got {shard_id!r}")
    check_shape(param.data, loaded_weight)
    param.data.copy_(loaded_weight)


def check_shape(target: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Raise ValueError unless the checkpoint slice has exactly the target's shape."""
    if target.shape != loaded_weight.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit parameter (shard) "
            f"of shape {tuple(target.shape)}"
        )


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator (the TP size), or ValueError naming `what` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


class _LinearBase(nn.Module):
    """Holds weight [out, in] (+ bias [out]) for this rank and wires the loaders."""

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        copy_weight(param, loaded_weight, shard_id)


class ReplicatedLinear(_LinearBase):
    """Every rank holds the full weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(_LinearBase):
    """Output features split across ranks; `gather_output` concatenates them back."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False) -> None:
        super().__init__(input_size, divide(output_size, get_tp_world_size(), "output size"), bias)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        copy_weight(param, loaded_weight.narrow(0, self.tp_rank * rows, rows), shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return tensor_model_parallel_all_gather(y, -1) if self.gather_output else y


class QKVParallelLinear(_LinearBase):
    """Packed q, k, v projections split by heads; KV heads are replicated when tp > num_kv_heads."""

    def __init__(
        self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int, bias: bool = False
    ) -> None:
        tp_size = get_tp_world_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            if tp_size % total_num_kv_heads:
                raise ValueError(
                    f"tensor-parallel size {tp_size} must be a multiple of the {total_num_kv_heads} KV heads "
                    "to replicate them"
                )
            self.num_kv_heads, self.kv_replicas = 1, tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.kv_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size, bias)
        for param in (self.weight, self.bias):
            if param is not None:
                param.shard_ids = ("q", "k", "v")  # the model checks that every shard was loaded

    @property
    def split_sizes(self) -> list[int]:
        """Per-rank sizes of q, k, v along the output dim."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [q, kv, kv]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        """shard_id "q"/"k"/"v" for separate checkpoint tensors; None for one already-packed q|k|v tensor."""
        if shard_id is None:
            q_total, kv_total = self.total_num_heads * self.head_dim, self.total_num_kv_heads * self.head_dim
            if loaded_weight.shape[0] != q_total + 2 * kv_total:
                raise ValueError(
                    f"packed qkv tensor has {loaded_weight.shape[0]} rows, expected {q_total + 2 * kv_total}"
                )
            for sid, part in zip(("q", "k", "v"), loaded_weight.split([q_total, kv_total, kv_total], dim=0)):
                self.weight_loader(param, part, sid)
            return
        q_size, kv_size, _ = self.split_sizes
        if shard_id == "q":
            offset, size, rank_index = 0, q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank_index = kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"QKVParallelLinear shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        target = param.data.narrow(0, offset, size)
        shard = loaded_weight.narrow(0, rank_index * size, size)
        check_shape(target, shard)
        target.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_LinearBase):
    """Input features split across ranks; partial outputs are summed with one all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(divide(input_size, get_tp_world_size(), "input size"), output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if param is self.bias:  # the bias is added once, after the reduction
            copy_weight(param, loaded_weight, shard_id)
            return
        cols = param.shape[1]
        copy_weight(param, loaded_weight.narrow(1, self.tp_rank * cols, cols), shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return tensor_model_parallel_all_reduce(y)
