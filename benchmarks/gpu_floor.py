"""The decode step's floor: the bytes one step must read from device memory ÷ the device's memory bandwidth.

Owns the byte count (from a checkpoint's text config) and the bandwidth measurement (a large device-to-device
copy, which reads and writes every byte once). At batch B a step reads every attention, norm and router weight,
the lm_head, the experts that some token routes to (with uniform routing, E·(1 − (1 − k/E)^B) per layer on
average) and each request's keys and values; activations and the embedding rows are negligible and left out.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second moved by a device copy of `nbytes` (read + write), the median of `repeats` copies."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a layer touches on average when `batch` tokens each pick `top_k` uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def decode_step_bytes(text: dict[str, Any], batch: int, context: int, element_size: int) -> dict[str, float]:
    """Bytes one decode step of `batch` requests, each with `context` cached tokens, must read, by part."""
    h, d, layers = text["hidden_size"], text["head_dim"], text["num_hidden_layers"]
    q, kv = text["num_attention_heads"] * d, text["num_key_value_heads"] * d
    experts, top_k, width = text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"]
    per_layer_dense = (q + 2 * kv) * h + h * q + 2 * d + 2 * h + experts * h  # q/k/v/o, q/k norms, 2 norms, router
    parts = {
        "dense": float(layers * per_layer_dense),
        "experts": layers * expected_experts(experts, top_k, batch) * 3 * h * width,
        "lm_head": float(text["vocab_size"] * h + h),
        "kv_cache": float(layers * batch * (context + 1) * 2 * kv),
    }
    return {name: count * element_size for name, count in parts.items()}


def floor_rows(
    text: dict[str, Any], batches: list[int], context: int, element_size: int, bandwidth: float
) -> list[dict[str, Any]]:
    """Per batch size: the bytes by part, their total and the floor time in ms at `bandwidth` bytes/s."""
    rows = []
    for batch in batches:
        parts = decode_step_bytes(text, batch, context, element_size)
        total = sum(parts.values())
        rows.append({"batch": batch, "bytes": parts, "total_bytes": total, "floor_ms": total / bandwidth * 1e3})
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
