"""One attention layer call: on CPU the `cpu` backend (C kernel reading pages in place) against `reference`, and the
kernel's three threading variants against each other; with --backend triton, on a CUDA device, the `triton` backend
(our Triton kernels) against `reference` (on a machine without CUDA it says so and measures nothing). Each on the
same cache and batches in the same run.

Shapes are the embedded tiny model's (4 query / 2 KV heads of 64, 16-token pages, fp32), the cache a pool of
--pages pages allocated like the runner's (huge pages) with every request's pages scattered over it:
- decode: --batch decodes over contexts of 100-1000 tokens
- mixed: two prefill chunks of 200 tokens over 300-token prefixes, a fresh 24-token prompt, --batch - 3 decodes
- long: a live session's commit step, 32 new tokens over 7,822, and one decode over that context
Threading variants (kernel only, no flash path; decode batch): OpenMP on torch's runtime (the engine's), pthreads
started per call, and the single-thread build called from a pool of Python threads (ctypes drops the GIL), each
request group a contiguous slice of the batch. Reported: median wall ms and median process CPU ms per call (on
CUDA each call is timed to the end of its kernels, and the cache holds --dtype).

    python benchmarks/attention.py
    python benchmarks/attention.py --threads 1 --batch 64 --repeats 50
    python benchmarks/attention.py --backend triton --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.attention.cpu_kernel import CpuBackend, load_kernel, run_kernel
from omnistream.engine.model_executor.attention.reference import ReferenceBackend
from omnistream.engine.model_executor.attention.triton_backend import TritonBackend
from omnistream.engine.worker.kv_memory import zeroed_kv_cache

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16
SCALE = HEAD_DIM**-0.5


def measure(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median wall ms, median process CPU ms), the fns called in turn each round after a warm-up."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - w) * 1e3)
            cpu[name].append((time.process_time() - c) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def batch(shapes: list[tuple[int, int]], cache: torch.Tensor, rng: random.Random):
    """(query, metadata) of requests (context before, new tokens) whose pages are sampled from the whole cache, on
    the cache's device, the query in the cache's dtype."""
    pages = [-(-(past + new) // BLOCK) for past, new in shapes]
    chosen = rng.sample(range(cache.shape[1]), sum(pages))
    width = max(pages)
    table = np.zeros((len(shapes), width), dtype=np.int32)
    for i, n in enumerate(pages):
        table[i, :n] = chosen[sum(pages[:i]) : sum(pages[: i + 1])]
    metadata = AttentionMetadata.build([n for _, n in shapes], [p + n for p, n in shapes], table, BLOCK, cache.device)
    return torch.randn(metadata.num_tokens, HEADS, HEAD_DIM, device=cache.device, dtype=cache.dtype), metadata


def pool_call(library, pool: ThreadPoolExecutor, threads: int, query, cache, metadata, out) -> None:
    """The single-thread kernel on `threads` contiguous groups of requests at once."""
    starts, lens, table = (t.numpy() for t in (metadata.query_start_loc, metadata.seq_lens, metadata.block_table))
    bounds = np.linspace(0, len(lens), threads + 1).astype(int)
    jobs = [pool.submit(run_kernel, library, query, cache, starts[a : b + 1], lens[a:b], table[a:b], SCALE, out, 1)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for job in jobs:
        job.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default all)")
    parser.add_argument("--batch", type=int, default=48, help="requests in the decode and mixed batches")
    parser.add_argument("--pages", type=int, default=1 << 15, help="pages in the cache pool")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--backend", choices=["cpu", "triton"], default="cpu",
                        help="the backend measured against reference: cpu (on CPU) or triton (on CUDA only)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="cache and query dtype of the triton runs (the cpu runs are float32)")
    args = parser.parse_args()
    if args.backend == "triton" and not torch.cuda.is_available():
        print("The triton attention backend runs on CUDA only and this machine has no CUDA device: nothing measured.")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    device = torch.device("cuda" if args.backend == "triton" else "cpu")
    dtype = getattr(torch, args.dtype) if args.backend == "triton" else torch.float32
    cache = zeroed_kv_cache((2, args.pages, BLOCK, KV_HEADS, HEAD_DIM), dtype, device)
    cache.normal_()
    cases = {
        "decode": [(rng.randint(100, 1000), 1) for _ in range(args.batch)],
        "mixed": [(300, 200), (300, 200), (0, 24)] + [(rng.randint(100, 1000), 1) for _ in range(args.batch - 3)],
        "long": [(7822 - 32, 32), (7821, 1)],
    }
    reference = ReferenceBackend()
    fast = CpuBackend() if args.backend == "cpu" else TritonBackend()
    rows = []
    with torch.inference_mode():
        for name, shapes in cases.items():
            query, metadata = batch(shapes, cache, rng)
            error = float((fast.attend(query, cache, metadata, SCALE).float()
                           - reference.attend(query, cache, metadata, SCALE).float()).abs().max())
            timed = measure({"reference": synced(lambda: reference.attend(query, cache, metadata, SCALE), device),
                             "fast": synced(lambda: fast.attend(query, cache, metadata, SCALE), device)}, args.repeats)
            rows.append({"case": name, "requests": len(shapes), "tokens": metadata.num_tokens, "max_abs_diff": error,
                         **{f"{k}_{unit}": v[i] for k, v in timed.items()
                            for i, unit in enumerate(("wall_ms", "cpu_ms"))}})
    if args.backend == "triton":
        report(args, rows, None, f"{args.dtype}, {device} ({torch.cuda.get_device_name(device)})")
        return
    with torch.inference_mode():
        query, metadata = batch(cases["decode"], cache, rng)
        out = torch.empty_like(query)
        arrays = [t.numpy() for t in (metadata.query_start_loc, metadata.seq_lens, metadata.block_table)]
        variants = {"openmp": load_kernel("openmp"), "pthreads": load_kernel("pthreads")}
        serial = load_kernel("serial")
        with ThreadPoolExecutor(args.threads) as pool:
            threading = measure({
                **{name: (lambda lib=lib: run_kernel(lib, query, cache, *arrays, SCALE, out, args.threads))
                   for name, lib in variants.items()},
                "serial_pool": lambda: pool_call(serial, pool, args.threads, query, cache, metadata, out),
                "serial_1_thread": lambda: run_kernel(serial, query, cache, *arrays, SCALE, out, 1),
            }, args.repeats)
    report(args, rows, threading, f"fp32, {args.threads} thread(s)")


def synced(fn, device: torch.device):
    """fn, timed to the end of its device work on CUDA."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def report(args: argparse.Namespace, rows: list[dict], threading: dict | None, setting: str) -> None:
    print(f"Attention, one layer call ({HEADS}/{KV_HEADS} heads x {HEAD_DIM}, {setting}, {BLOCK}-token pages "
          f"scattered over {args.pages}, medians of {args.repeats}): wall ms / process CPU ms")
    print(f"{'case':>7} {'requests':>8} {'tokens':>7} {'reference':>17} {args.backend:>17} {'speed-up':>9} "
          f"{'max |diff|':>11}")
    for r in rows:
        print(f"{r['case']:>7} {r['requests']:>8} {r['tokens']:>7} {r['reference_wall_ms']:>8.2f} / "
              f"{r['reference_cpu_ms']:>6.2f} {r['fast_wall_ms']:>8.2f} / {r['fast_cpu_ms']:>6.2f} "
              f"{r['reference_wall_ms'] / r['fast_wall_ms']:>8.2f}x {r['max_abs_diff']:>11.1e}")
    if threading is not None:
        print(f"Kernel threading, decode batch of {args.batch}: " + ", ".join(
            f"{name} {wall:.2f} / {cpu:.2f}" for name, (wall, cpu) in threading.items()))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), "rows": rows, "threading": threading}, f, indent=2)


if __name__ == "__main__":
    main()
