"""The one attention interface: per-step metadata of a flat batch over a paged KV cache, and the backend API.

A layer's KV cache is one tensor [2, num_pages, block_size, num_kv_heads, head_dim] (index 0 = keys, 1 = values).
The tokens of all requests in a step are concatenated (the flat batch). The metadata are device tensors built once
per step before the forward, plus host ints the runner knows from the SchedulerOutput; a backend never reads a
device value back on the host inside the forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def check_kernel_shapes(
    backend: str, dtypes: tuple[torch.dtype, ...], max_head_dim: int,
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
) -> None:
    """Raise ValueError naming what a kernel backend cannot do: a cache dtype outside `dtypes`, a head wider than
    `max_head_dim`, or query heads that are not a multiple of the KV heads (then select the `reference` backend)."""
    if dtype not in dtypes:
        *others, last = [str(d).removeprefix("torch.") for d in dtypes]
        supported = f"{', '.join(others)} and {last}" if others else last
        raise ValueError(f"the {backend} attention backend supports {supported} caches, not {dtype}; "
                         "use attention_backend='reference'")
    if head_dim > max_head_dim or num_heads % num_kv_heads:
        raise ValueError(f"the {backend} attention backend needs head_dim <= {max_head_dim} and query heads a multiple "
                         f"of KV heads, got head_dim {head_dim}, {num_heads}/{num_kv_heads} heads")


@dataclass
class AttentionMetadata:
    """Where each request's new tokens sit in the flat batch and in the paged cache.

    Query i of request b is at position seq_lens[b] - q_len_b + i and sees keys 0 .. that position. A padded
    row has seq_len 0 (it reads nothing and its outputs are zeros); padded tokens get slots in a page no request
    owns (the runner's sink page)."""

    query_start_loc: torch.Tensor  # [B+1] int32: flat-batch offsets, non-decreasing, last = num_tokens
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_table: torch.Tensor  # [B, M] int32: page ids per request (M covers max_seq_len)
    slot_mapping: torch.Tensor  # [T] int64: page * block_size + offset of every new token
    num_tokens: int  # T
    num_reqs: int  # B
    max_query_len: int
    max_seq_len: int

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int] | np.ndarray,
        seq_lens: Sequence[int] | np.ndarray,
        block_table: np.ndarray | Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from host numbers (one row per request; the table's rows padded to equal width), with every
        token's slot computed from its request's table row; the host arrays are copied to `device` once each."""
        query_lens = np.asarray(query_lens, dtype=np.int64)
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        table = np.asarray(block_table, dtype=np.int32).reshape(len(seq_lens), -1)
        query_start_loc, row, positions = token_positions(query_lens, seq_lens)
        num_tokens = len(positions)
        slots = table[row, positions // block_size].astype(np.int64) * block_size + positions % block_size
        return cls(
            query_start_loc=_upload(query_start_loc, device),
            seq_lens=_upload(seq_lens.astype(np.int32), device),
            block_table=_upload(table, device),
            slot_mapping=_upload(slots, device),
            num_tokens=num_tokens,
            num_reqs=len(seq_lens),
            max_query_len=int(query_lens.max(initial=0)),
            max_seq_len=int(seq_lens.max(initial=0)),
        )


def token_positions(query_lens: np.ndarray, seq_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """query_start_loc [B+1] int32, then each new token's request row [T] and absolute position [T] (int64):
    request b's q_len new tokens are its positions seq_len - q_len .. seq_len - 1."""
    query_start_loc = np.zeros(len(query_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    row = np.repeat(np.arange(len(query_lens)), query_lens)
    positions = (seq_lens - query_lens)[row] + np.arange(len(row)) - query_start_loc[row]
    return query_start_loc, row, positions


def _upload(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter this step's keys/values [T, num_kv_heads, head_dim] into their slots of the paged cache."""
    num_pages, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_pages * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


class AttentionBackend(ABC):
    """Causal attention of a step's new queries against everything cached for their request."""

    name: str

    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write key/value into the cache at metadata.slot_mapping, then attend (one call per layer)."""
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return self.attend(query, kv_cache, metadata, scale)

    @abstractmethod
    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Attention of `query` over the cache (this step's keys already written), in query's dtype."""
