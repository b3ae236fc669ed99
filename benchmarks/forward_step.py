"""Time the thinker's eager CPU forward for one step (embedding to final norm, no lm_head), on the embedded tiny
model, where per-op host costs (dispatch, temporaries) are a large part of a step.

Steps (each request's context before the step, new tokens):
- `decode16`: 16 decodes over 128-160 tokens (the `compare_servers.py` concurrency-16 workload's decode);
- `decode32`: 32 decodes over 32-512 tokens (the `throughput.py` workload's decode mix);
- `prefill16`: 16 prompts of 128 tokens in one step (that workload's first step, which its TTFT waits for).
The KV pages of each request are scrambled; the cache holds random values. Each sample repeats the step for at
least ~50 ms; the table gives the median thread CPU time per step over `--repeats` samples (1 torch thread), the
steps interleaved. To compare two versions, run this file with each on PYTHONPATH, alternately:
    python benchmarks/forward_step.py --repeats 15
`--profile NAME` prints torch.profiler's table (self CPU time per op) for that step instead.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.loader import load_model

BLOCK = 16


def step_shapes(name: str) -> list[tuple[int, int]]:
    """(context before the step, new tokens) per request of the named step (seeded)."""
    rng = random.Random(0)
    if name == "decode16":
        return [(rng.randint(128, 160), 1) for _ in range(16)]
    if name == "decode32":
        return [(rng.randint(32, 512), 1) for _ in range(32)]
    if name == "prefill16":
        return [(0, 128)] * 16
    raise ValueError(f"unknown step {name!r}: decode16, decode32 or prefill16")


def make_step(model: torch.nn.Module, shapes: list[tuple[int, int]]) -> tuple:
    """The forward's arguments for one step: ids, M-RoPE positions [3, T], KV caches, metadata."""
    pages_per_request = [-(-(past + new) // BLOCK) for past, new in shapes]
    order = list(range(1, sum(pages_per_request) + 1))
    random.Random(1).shuffle(order)
    width = max(pages_per_request)
    tables, used = [], 0
    for pages in pages_per_request:
        tables.append(order[used : used + pages] + [0] * (width - pages))
        used += pages
    metadata = AttentionMetadata.build([n for _, n in shapes], [p + n for p, n in shapes], tables, BLOCK)
    caches = [torch.randn(model.kv_cache_shape_per_layer(used + 1, BLOCK)) for _ in range(model.num_layers)]
    positions = torch.cat([torch.arange(p, p + n) for p, n in shapes]).expand(3, -1)
    ids = torch.randint(0, model.config.text.vocab_size, (metadata.num_tokens,))
    return ids, positions, caches, metadata


def sample(model: torch.nn.Module, args: tuple) -> float:
    """Thread CPU seconds per forward, over at least ~50 ms of repeats."""
    calls, start = 0, time.thread_time()
    while True:
        model(*args)
        calls += 1
        elapsed = time.thread_time() - start
        if elapsed >= 0.05:
            return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="decode16,decode32,prefill16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--profile", default=None, help="a step name: print its per-op profile instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(default_model_path(), "float32", attention_backend=args.attention_backend)[0]
    names = [args.profile] if args.profile else args.steps.split(",")
    steps = {name: make_step(model, step_shapes(name)) for name in names}
    with torch.inference_mode():
        for step in steps.values():
            sample(model, step)  # warm-up
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    model(*steps[args.profile])
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            return
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name, step in steps.items():
                times[name].append(sample(model, step))
    print(f"thinker forward per step, attention {model.attention_backend}, thread CPU ms, medians of {args.repeats}")
    for name in names:
        print(f"{name:>10} {statistics.median(times[name]) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
