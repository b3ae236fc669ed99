"""Engine side of the parity tests: run flat-batch steps of our model over a paged KV cache (contiguous blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata

BLOCK_SIZE = 16


@dataclass
class Chunk:
    """New tokens of one request in a step, after `num_computed` tokens already in its cache."""

    request: int
    token_ids: list[int]
    num_computed: int = 0


class PagedRunner:
    """Owns the KV caches; request i holds blocks [i*blocks_per_request, (i+1)*blocks_per_request)."""

    def __init__(self, model: torch.nn.Module, num_requests: int = 2, max_len: int = 256) -> None:
        self.model = model
        self.blocks_per_request = -(-max_len // BLOCK_SIZE)
        num_blocks = num_requests * self.blocks_per_request
        dtype = model.lm_head.weight.dtype
        shape = model.kv_cache_shape_per_layer(num_blocks, BLOCK_SIZE)
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(model.num_layers)]

    @torch.no_grad()
    def step(self, chunks: list[Chunk], positions_3d: torch.Tensor | None = None) -> torch.Tensor:
        """Run one flat-batch step; return float32 logits [sum of chunk lengths, vocab].

        Positions default to each token's sequence index on all three M-RoPE rows.
        """
        tables = [torch.arange(self.blocks_per_request) + chunk.request * self.blocks_per_request for chunk in chunks]
        positions = [torch.arange(chunk.num_computed, chunk.num_computed + len(chunk.token_ids)) for chunk in chunks]
        metadata = AttentionMetadata.build(
            [len(chunk.token_ids) for chunk in chunks],
            [chunk.num_computed + len(chunk.token_ids) for chunk in chunks],
            torch.stack(tables).numpy(),
            BLOCK_SIZE,
        )
        input_ids = torch.tensor([t for chunk in chunks for t in chunk.token_ids])
        if positions_3d is None:
            positions_3d = torch.cat(positions).expand(3, -1)
        hidden = self.model(input_ids, positions_3d, self.kv_caches, metadata)
        return self.model.compute_logits(hidden)
