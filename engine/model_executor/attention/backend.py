"""The one attention interface: metadata for a flat batch over a paged KV cache, and the backend API.

A layer's KV cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = keys, 1 = values). Tokens of all requests in a step are concatenated ("flat batch").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from omnistream.engine.model_executor.attention.kv_views import block_runs


@dataclass
class AttentionMetadata:
    """Where each request's new tokens sit in the flat batch and in the paged cache."""

    query_start_loc: list[int]  # [B+1] cumulative query lengths (flat-batch offsets)
    seq_lens: list[int]  # [B] context length after this step (computed before + new)
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset for every new token
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    block_size: int
    block_runs: list[list[tuple[int, int]]] | None = None  # per request: (first block, count) runs of its table

    def runs(self, i: int) -> list[tuple[int, int]]:
        """Request i's block runs (kv_views.block_runs of its table row when the runner gave none)."""
        if self.block_runs is not None:
            return self.block_runs[i]
        num_blocks = -(-self.seq_lens[i] // self.block_size)
        return block_runs(self.block_tables[i, :num_blocks].tolist())

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(ABC):
    """Causal attention of new queries against everything cached for their request."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write key/value into the cache at metadata.slot_mapping, then attend."""
