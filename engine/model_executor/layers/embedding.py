"""Vocab-parallel token embedding and lm_head: vocab rows split evenly across the TP ranks.

The lm_head gathers every rank's logits so callers always see the full vocabulary.
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
from omnistream.engine.model_executor.layers.linear import copy_weight, divide


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the table live on this rank; other ids contribute zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.rows_per_rank = divide(num_embeddings, self.tp_size, "vocab size")
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        copy_weight(param, loaded_weight.narrow(0, self.vocab_start, self.rows_per_rank), shard_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Untied output projection hidden → logits over the full vocabulary (model dtype)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_gather(F.linear(hidden, self.weight), -1)
