"""Checkpoint names → our parameters: packed q/k/v and fused or per-expert MoE tensors, with shard
bookkeeping.

Shared by every model whose attention packs q/k/v (`QKVParallelLinear`) and whose MoE blocks hold
`w13`/`w2`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from omnistream.engine.model_executor.layers.linear import copy_weight
from omnistream.engine.model_executor.layers.moe import expert_checkpoint_shards

_QKV_SHARDS = {".q_proj.": "q", ".k_proj.": "k", ".v_proj.": "v"}


def load_named_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], what: str) -> set[str]:
    """Load (checkpoint name, tensor) pairs named relative to `module`; return the parameters whose every
    shard was loaded. Raises ValueError for a name that matches no parameter (`what` names the model in the
    message)."""
    params = dict(module.named_parameters())
    loaded_shards: dict[str, set[object]] = defaultdict(set)
    for name, tensor in weights:
        for target, shard, shard_id in route(name, tensor):
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the {what}")
            getattr(param, "weight_loader", copy_weight)(param, shard, shard_id)
            # shard id None means the whole parameter at once (e.g. an already-packed q|k|v tensor)
            loaded_shards[target].update(
                getattr(param, "shard_ids", (None,)) if shard_id is None else {shard_id}
            )
    return {
        name
        for name, param in params.items()
        if loaded_shards[name] >= set(getattr(param, "shard_ids", (None,)))
    }


def route(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, object]]:
    """Checkpoint name → (our parameter name, tensor, shard id) for packed q/k/v and fused experts."""
    prefix, _, suffix = name.partition(".mlp.experts.")
    expert_shards = expert_checkpoint_shards(suffix, tensor) if suffix else []
    if expert_shards:
        for param, shard, shard_id in expert_shards:
            yield f"{prefix}.mlp.{param}", shard, shard_id
        return
    for proj, shard_id in _QKV_SHARDS.items():
        if ".self_attn" + proj in name:
            yield name.replace(proj, ".qkv_proj."), tensor, shard_id
            return
    yield name, tensor, None
