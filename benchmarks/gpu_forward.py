"""The model's decode forward alone, per batch size: what the decode step costs without the scheduler and sampler.

Owns a measurement that needs none of the engine's process dependencies (no msgspec, zmq or llguidance, which
device images may lack): B requests with `context` cached tokens (KV pages in random order) decode one token,
through the decode graphs when the attention backend allows them (as the runner replays them; then also eager, for
what the graphs save and whether they give the same tokens), else eager; then the lm_head and the greedy pick.
Timed between device synchronisations, median after two warm-up steps. Next to gpu_decode.py's engine step it
splits the step into the forward and the host/sampling cost around it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.worker.cuda_graphs import (
    DecodeGraphs,
    capture_sizes,
    decode_graphs_for,
)
from omnistream.engine.worker.kv_memory import zeroed_kv_cache

BLOCK_SIZE = 16
WARMUP_STEPS = 2


def forward_rows(
    model: torch.nn.Module,
    device: torch.device,
    batches: list[int],
    context: int,
    steps: int,
    emit: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Median forward + greedy-pick time per batch size, and whether decode graphs ran."""
    max_pages = -(-(context + 1) // BLOCK_SIZE)
    num_pages = max(batches) * max_pages
    dtype = next(model.parameters()).dtype
    caches = [
        zeroed_kv_cache(model.kv_cache_shape_per_layer(num_pages + 1, BLOCK_SIZE), dtype, device)
        for _ in range(model.num_layers)
    ]
    start = time.perf_counter()
    graphs, mode = _decode_graphs(model, caches, max(batches), max_pages, num_pages)
    header = {
        "graphs": mode,
        "graphs_on": mode == "cuda",
        "capture_s": time.perf_counter() - start,
        "attention_backend": model.attention_backend,
        "context": context,
    }
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        tables = torch.randperm(num_pages, generator=generator)[: batch * max_pages].view(batch, max_pages)
        metadata = AttentionMetadata.build([1] * batch, [context + 1] * batch, tables.numpy(), BLOCK_SIZE, device)
        ids = torch.randint(0, model.config.text.vocab_size, (batch,), generator=generator).to(device)
        positions = torch.full((3, batch), float(context), device=device)
        replay = graphs is not None and graphs.serves(metadata, None)

        def step(
            replay: bool,
            ids: torch.Tensor = ids,
            positions: torch.Tensor = positions,
            metadata: AttentionMetadata = metadata,
        ) -> torch.Tensor:
            hidden = graphs.run(ids, positions, metadata) if replay else model(ids, positions, caches, metadata)
            return model.compute_logits(hidden).max(dim=-1).indices

        times, tokens = _timed(partial(step, replay), steps, device)
        median = statistics.median(times)
        row = {
            "batch": batch,
            "step_ms": median * 1e3,
            "steps": len(times),
            "graph": replay,
            "output_tok_s": batch / median,
        }
        if replay:  # the same step eager: what the graph saves, and whether it gives the same tokens
            eager_times, eager_tokens = _timed(partial(step, False), max(3, steps // 3), device)
            row |= {
                "eager_ms": statistics.median(eager_times) * 1e3,
                "graph_tokens_equal_eager": torch.equal(tokens, eager_tokens),
            }
        rows.append(row)
        emit({**header, "rows": rows})
    return {**header, "rows": rows}


def _decode_graphs(
    model: torch.nn.Module, caches: list[torch.Tensor], max_batch: int, max_pages: int, sink_page: int
) -> tuple[DecodeGraphs | None, str]:
    """The runner's decode graphs on CUDA ("cuda", or None and "off" where the backend rules them out). On CPU, where
    graphs never run, stand-ins whose replay reruns the eager forward on the padded static buffers ("stand-in"), so
    that the smoke run goes through the same copy-in, padding and replay path."""
    if caches[0].device.type == "cuda":
        graphs = decode_graphs_for(
            model, caches, max_num_seqs=max_batch, max_pages=max_pages, sink_page=sink_page, enforce_eager=False
        )
        return graphs, "off" if graphs is None else "cuda"
    graphs = DecodeGraphs(
        model,
        caches,
        sizes=capture_sizes(max_batch),
        max_pages=max_pages,
        sink_page=sink_page,
        capture=lambda step: SimpleNamespace(replay=step),
    )
    graphs.capture_all()
    return graphs, "stand-in"


@torch.inference_mode()
def _timed(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Seconds of each step after the warm-up, and the last step's output."""
    times = []
    for i in range(steps + WARMUP_STEPS):
        _synchronize(device)
        start = time.perf_counter()
        out = step()
        _synchronize(device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return times, out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
