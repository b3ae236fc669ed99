"""The model's decode forward alone, per batch size: what the decode step costs without the scheduler and sampler.

Owns a measurement that needs none of the engine's process dependencies (no msgspec, zmq or llguidance, which
device images may lack): B requests with `context` cached tokens (KV pages in random order) decode one token,
through the decode graphs when the attention backend allows them (as the runner replays them), else eager; then
the lm_head and the greedy pick. Timed between device synchronisations, median after two warm-up steps. Next to
gpu_decode.py's engine step it splits the step into the forward and the host/sampling cost around it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.worker.cuda_graphs import decode_graphs_for
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
    graphs = decode_graphs_for(
        model, caches, max_num_seqs=max(batches), max_pages=max_pages, sink_page=num_pages, enforce_eager=False
    )
    header = {
        "graphs_on": graphs is not None,
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
            ids: torch.Tensor = ids,
            positions: torch.Tensor = positions,
            metadata: AttentionMetadata = metadata,
            replay: bool = replay,
        ) -> torch.Tensor:
            hidden = graphs.run(ids, positions, metadata) if replay else model(ids, positions, caches, metadata)
            return model.compute_logits(hidden).max(dim=-1).indices

        times = _timed(step, steps, device)
        median = statistics.median(times)
        rows.append(
            {
                "batch": batch,
                "step_ms": median * 1e3,
                "steps": len(times),
                "graph": replay,
                "output_tok_s": batch / median,
            }
        )
        emit({**header, "rows": rows})
    return {**header, "rows": rows}


@torch.inference_mode()
def _timed(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> list[float]:
    times = []
    for i in range(steps + WARMUP_STEPS):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
