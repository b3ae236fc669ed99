"""The `reference` attention backend: the slow, exact oracle every other backend is tested against; runs anywhere.

Its body (torch_sdpa) goes request by request from host copies of the step's offsets and lengths, so it sits
behind a custom op whose fake (shape-only) implementation lets meta-device runs and torch.compile see one opaque
call per layer (eager calls skip the dispatcher: eager_ops.py). On a GPU the read-back is a device sync per layer:
faster backends avoid it.
"""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.attention.backend import AttentionBackend, AttentionMetadata
from omnistream.engine.model_executor.attention.torch_sdpa import sdpa_attention
from omnistream.engine.model_executor.eager_ops import eager_op


@eager_op("omnistream::attention_reference")
def attention_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return sdpa_attention(query, kv_cache, query_start_loc.tolist(), seq_lens.tolist(), block_table, scale)


@attention_reference.register_fake
def _(query, kv_cache, query_start_loc, seq_lens, block_table, scale):
    return torch.empty_like(query)


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return attention_reference(
            query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table, scale
        )
