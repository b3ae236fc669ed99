"""A torch.profiler profile of one decode step through the engine (gpu_decode.DecodeBench): the top ops table.

Owns only the profiling: the step is the same synchronised schedule → execute → update as the timed ones, taken
after the warm-up decode steps of a fresh batch. Ops are ranked by their own device time on CUDA (kernels a
replayed graph launches show up as kernels), by their own CPU time on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_decode import WARMUP_STEPS, DecodeBench
from torch.profiler import ProfilerActivity, profile


def profile_decode_step(bench: DecodeBench, batch: int, table_path: Path, rows: int = 25) -> dict[str, Any]:
    """Profile one decode step of `batch` requests; write the full table to `table_path`, return the top ops."""
    bench.start(batch, WARMUP_STEPS + 2)
    decodes = 0
    while decodes < WARMUP_STEPS and bench.scheduler.has_unfinished_requests():
        if bench.step()[1]:
            decodes += 1
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        elapsed, is_decode = bench.step()
    bench.drain()
    events = prof.key_averages()
    sort_key = _self_time_key(events, cuda)
    table = events.table(sort_by=sort_key, row_limit=rows)
    table_path.write_text(table + "\n")
    ranked = sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)[:rows]
    return {
        "batch": batch,
        "step_ms": elapsed * 1e3,
        "was_decode_step": is_decode,
        "sorted_by": sort_key,
        "table_file": str(table_path),
        "top_ops": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, sort_key) / 1e3} for e in ranked],
    }


def _self_time_key(events: Any, cuda: bool) -> str:
    """The attribute holding an op's own time (µs): device time on CUDA (its name changed across torch releases)."""
    if not cuda:
        return "self_cpu_time_total"
    sample = events[0] if len(events) else None
    return "self_device_time_total" if hasattr(sample, "self_device_time_total") else "self_cuda_time_total"
