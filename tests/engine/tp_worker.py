"""Worker for the tensor-parallel test: loads one checkpoint at TP=2 (gloo) and at TP=1, compares logits, and the
chunked greedy lm_head's ids at TP=2 with the first maximum of the TP=1 logits."""

from __future__ import annotations

import torch
import torch.distributed as dist

from omnistream.engine.model_executor.distributed import set_tp_group
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.worker.greedy_head import greedy_tokens
from tests.parity.paged_runner import Chunk, PagedRunner


def compare_tp2_with_tp1(rank: int, checkpoint: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(0)).tolist()
        set_tp_group(dist.group.WORLD)
        sharded, _ = load_model(checkpoint, "float32")
        got = PagedRunner(sharded, num_requests=2).step([Chunk(0, ids[:9]), Chunk(1, ids)])
        hidden = torch.randn(70, sharded.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(1))
        greedy = greedy_tokens(sharded.lm_head, hidden)
        set_tp_group(None)
        full, _ = load_model(checkpoint, "float32")
        want = PagedRunner(full, num_requests=2).step([Chunk(0, ids[:9]), Chunk(1, ids)])
        err = (got - want).abs().max().item()
        if err > 1e-4:
            raise RuntimeError(f"rank {rank}: TP=2 logits differ from TP=1 by {err:.2e}")
        if not torch.equal(greedy, full.compute_logits(hidden).max(dim=-1).indices):
            raise RuntimeError(f"rank {rank}: TP=2 chunked greedy ids differ from the TP=1 logits' maxima")
    finally:
        dist.destroy_process_group()
