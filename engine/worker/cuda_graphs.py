"""Decode-only steps replayed from captured graphs (CUDA graphs on a GPU): buckets, static buffers, capture, replay.

A step whose requests each add one token (max_query_len == 1) and carry no media runs the graph of the smallest
bucket holding its requests; every other step runs eager. The step's rows are copied into static buffers sized for
the largest bucket; each padded row is one token that reads nothing (seq_len 0) and writes its keys/values into the
runner's sink page, so padding never touches a live page. Every padded row keeps one query, so max_query_len == 1
stays true for the kernels (a decode kernel may rely on it) and query_start_loc is arange(bucket + 1) whatever the
step: it is written once.

Recording is behind `GraphCapture`: on CUDA `CudaGraphCapture` (torch.cuda.CUDAGraph, one memory pool for all
buckets); tests plug a stand-in whose replay reruns the eager forward on the same padded buffers. Buckets are
captured largest first, each after one eager warm-up (Triton compiles on first launch, never during capture).
With tensor parallelism every rank captures the same buckets in the same order, its all-reduces inside the graph,
and picks the same bucket for a step: the buckets depend only on max_num_seqs and the choice only on the
SchedulerOutput, which every rank receives whole; `capture_all` checks the first at start-up.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.distributed import get_tp_world_size, tensor_model_parallel_all_gather

logger = logging.getLogger(__name__)

# attention backends whose forward never reads a device value on the host (capture would fail on a read-back)
GRAPH_SAFE_ATTENTION = ("triton",)


class StepGraph(Protocol):
    def replay(self) -> None:
        """Run the recorded step again on the same buffers."""


class GraphCapture(Protocol):
    def __call__(self, step: Callable[[], None]) -> StepGraph:
        """Record `step` (warmed up already) so that replay() reruns it."""


class CudaGraphCapture:
    """Records steps as torch.cuda.CUDAGraph objects that share one memory pool."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, step: Callable[[], None]) -> StepGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket sizes, ascending: 1, 2, 4, 8, then every 8 up to 256, then every 16; the last is max_num_seqs, so
    every decode batch the scheduler can form has a bucket."""
    sizes = [1, 2, 4, 8, *range(16, 257, 8), *range(272, max_num_seqs, 16)]
    return [size for size in sizes if size < max_num_seqs] + [max_num_seqs]


def bucket_for(num_reqs: int, sizes: list[int]) -> int:
    """The smallest bucket holding `num_reqs` requests (sizes ascending; num_reqs <= sizes[-1])."""
    return sizes[bisect.bisect_left(sizes, num_reqs)]


def graphs_off_reason(device: torch.device, enforce_eager: bool, attention_backend: str) -> str | None:
    """Why decode steps run eager on this runner, or None when they replay graphs."""
    if enforce_eager:
        return "enforce_eager is set"
    if device.type != "cuda":
        return f"graphs run on CUDA only, this runner is on {device.type}"
    if attention_backend not in GRAPH_SAFE_ATTENTION:
        return f"the {attention_backend} attention backend reads device values on the host"
    return None


class DecodeGraphs:
    """One recorded decode step per bucket, over static inputs sized for the largest bucket."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        *,
        sizes: list[int],
        max_pages: int,
        sink_page: int,
        capture: GraphCapture,
    ) -> None:
        self.model, self.kv_caches, self.sizes, self.capture = model, kv_caches, sizes, capture
        device, block_size = kv_caches[0].device, kv_caches[0].shape[2]
        self.max_seq_len = max_pages * block_size
        self.sink_slot = sink_page * block_size
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.float32, device=device)
        self.slot_mapping = torch.full((n,), self.sink_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.full((n, max_pages), sink_page, dtype=torch.int32, device=device)
        dtype = next(model.parameters()).dtype
        self.hidden = torch.zeros(n, model.config.text.hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, StepGraph] = {}

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Warm up then record every bucket, largest first (later graphs reuse the pool the largest sized)."""
        _check_ranks_agree(self.sizes, self.input_ids.device)
        start = time.perf_counter()
        self._pad(0, self.sizes[-1])  # every row padded: warm-up and capture write the sink page only
        for size in reversed(self.sizes):
            step = self._step(size)
            step()
            self.graphs[size] = self.capture(step)
        logger.info("CUDA graphs: captured %d decode buckets %s in %.1f s", len(self.sizes), self.sizes,
                    time.perf_counter() - start)

    def serves(self, metadata: AttentionMetadata, inputs_embeds: torch.Tensor | None) -> bool:
        """Whether this step replays a graph: one token per request, no media rows, a bucket large enough."""
        return (metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_reqs and inputs_embeds is None
                and metadata.num_reqs <= self.sizes[-1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [B, H] of a decode-only step (a view of the static output: read before the next)."""
        num_reqs = metadata.num_reqs
        size = bucket_for(num_reqs, self.sizes)
        self.input_ids[:num_reqs].copy_(input_ids)
        self.positions[:, :num_reqs].copy_(positions)
        self.slot_mapping[:num_reqs].copy_(metadata.slot_mapping)
        self.seq_lens[:num_reqs].copy_(metadata.seq_lens)
        self.block_table[:num_reqs, : metadata.block_table.shape[1]].copy_(metadata.block_table)
        self._pad(num_reqs, size)
        self.graphs[size].replay()
        return self.hidden[:num_reqs]

    def _pad(self, first: int, end: int) -> None:
        """Rows first .. end-1 become padding: token 0 at position 0, no context, keys/values into the sink."""
        self.input_ids[first:end].zero_()
        self.positions[:, first:end].zero_()
        self.slot_mapping[first:end].fill_(self.sink_slot)
        self.seq_lens[first:end].zero_()

    def _step(self, size: int) -> Callable[[], None]:
        metadata = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            block_table=self.block_table[:size], slot_mapping=self.slot_mapping[:size], num_tokens=size,
            num_reqs=size, max_query_len=1, max_seq_len=self.max_seq_len,
        )
        ids, positions, out = self.input_ids[:size], self.positions[:, :size], self.hidden[:size]

        def step() -> None:
            out.copy_(self.model(ids, positions, self.kv_caches, metadata))

        return step


def decode_graphs_for(
    model: torch.nn.Module,
    kv_caches: list[torch.Tensor],
    *,
    max_num_seqs: int,
    max_pages: int,
    sink_page: int,
    enforce_eager: bool,
) -> DecodeGraphs | None:
    """The runner's captured decode graphs, or None (logged with the reason) when its steps all run eager."""
    reason = graphs_off_reason(kv_caches[0].device, enforce_eager, model.attention_backend)
    if reason is not None:
        logger.info("CUDA graphs off: %s", reason)
        return None
    graphs = DecodeGraphs(model, kv_caches, sizes=capture_sizes(max_num_seqs), max_pages=max_pages,
                          sink_page=sink_page, capture=CudaGraphCapture())
    graphs.capture_all()
    return graphs


def _check_ranks_agree(sizes: list[int], device: torch.device) -> None:
    """Raise unless every tensor-parallel rank captures the same buckets (their graphs hold matching collectives)."""
    if get_tp_world_size() == 1:
        return
    mine = torch.tensor([len(sizes), sizes[-1], sum(sizes)], dtype=torch.int64, device=device)
    every = tensor_model_parallel_all_gather(mine, dim=0).view(-1, 3)
    if not bool((every == mine).all()):
        raise RuntimeError(f"tensor-parallel ranks disagree on the CUDA graph buckets: {every.tolist()}")
