"""Decode step time with and without the decode graphs (engine/worker/cuda_graphs.py), and their agreement.

For each --batch B, B requests with --context tokens each already cached take one decode step; the model's
forward is timed eager on the unpadded batch and through DecodeGraphs (copy the rows in, pad to the bucket,
replay), median of --steps, each step synchronised. On CUDA the graphs are real CUDA graphs; on CPU they are
stand-ins whose replay runs the eager forward on the padded buffers, so the ratio there is the cost of padding
and copying (graphs never run on CPU). Also reported: the largest difference between the two outputs.

    python benchmarks/decode_graphs.py                       # CUDA when available (triton attention), else CPU
    python benchmarks/decode_graphs.py --device cpu --batch 1,5,8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.worker.cuda_graphs import CudaGraphCapture, DecodeGraphs, bucket_for, capture_sizes
from omnistream.engine.worker.kv_memory import zeroed_kv_cache

BLOCK = 16


def timed(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median milliseconds of `step` (after two warm-up calls) and its last output."""
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    backend = args.attention_backend or ("triton" if device.type == "cuda" else "auto")
    model = load_model(args.model or default_model_path(), args.dtype, device, backend)[0]
    batches = [int(b) for b in args.batch.split(",")]
    max_pages = -(-(args.context + 1) // BLOCK)
    num_pages = max(batches) * max_pages
    dtype = next(model.parameters()).dtype
    caches = [zeroed_kv_cache(model.kv_cache_shape_per_layer(num_pages + 1, BLOCK), dtype, device)
              for _ in range(model.num_layers)]
    sizes = capture_sizes(max(batches))
    capture = CudaGraphCapture() if device.type == "cuda" else (lambda step: SimpleNamespace(replay=step))
    graphs = DecodeGraphs(model, caches, sizes=sizes, max_pages=max_pages, sink_page=num_pages, capture=capture)
    start = time.perf_counter()
    graphs.capture_all()
    capture_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        tables = torch.randperm(num_pages, generator=generator)[: batch * max_pages].view(batch, max_pages)
        metadata = AttentionMetadata.build([1] * batch, [args.context + 1] * batch, tables.numpy(), BLOCK, device)
        ids = torch.randint(0, model.config.text.vocab_size, (batch,), generator=generator).to(device)
        positions = torch.full((3, batch), float(args.context), device=device)
        with torch.inference_mode():
            eager_ms, eager = timed(partial(model, ids, positions, caches, metadata), args.steps, device)
            graph_ms, graphed = timed(partial(graphs.run, ids, positions, metadata), args.steps, device)
        rows.append({"batch": batch, "bucket": bucket_for(batch, sizes), "eager_ms": eager_ms,
                     "graph_ms": graph_ms, "speedup": eager_ms / graph_ms,
                     "max_abs_diff": float((eager.float() - graphed.float()).abs().max())})
    return {"device": str(device), "attention_backend": model.attention_backend, "dtype": str(dtype),
            "capture_s": capture_s, "buckets": sizes, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-backend", default=None, help="default: triton on CUDA, auto on CPU")
    parser.add_argument("--batch", default="1,5,8,32", help="comma-separated decode batch sizes")
    parser.add_argument("--context", type=int, default=200, help="cached tokens per request")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    result = run(args)
    print(f"Decode step, {result['device']} {result['dtype']}, attention {result['attention_backend']}; "
          f"{len(result['buckets'])} buckets captured in {result['capture_s']:.1f} s (medians of {args.steps})")
    print(f"{'batch':>6} {'bucket':>7} {'eager ms':>9} {'graph ms':>9} {'speedup':>8} {'max |diff|':>11}")
    for r in result["rows"]:
        print(f"{r['batch']:>6} {r['bucket']:>7} {r['eager_ms']:>9.3f} {r['graph_ms']:>9.3f} {r['speedup']:>8.2f} "
              f"{r['max_abs_diff']:>11.2e}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), **result}, f, indent=2)


if __name__ == "__main__":
    main()
