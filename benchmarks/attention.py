"""Paged attention on CPU over long contexts: the in-place path (engine/model_executor/attention/cpu_flash.py: the paged
blocks read where they lie, log-sum-exp merge) against the gather path (the request's whole KV copied out of
the cache, then SDPA with a causal mask), on the same cache and queries in the same run.

The shapes are a live session's commit step with the embedded tiny model (4 query / 2 KV heads of 64, 16-token
blocks): 32 new tokens (the last 2 s audio window, <|audio_end|> and the assistant prompt) over the context of
10, 120 and 600 s of speech (13 tokens a second), and one decode over the longest. Reported per layer call:
median thread CPU time (robust on a shared machine) and median wall time, the two paths called in turn.

    python benchmarks/attention.py
    python benchmarks/attention.py --contexts 152,1582,7822 --queries 32,1 --threads 1 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.attention.cpu_flash import attend_request
from omnistream.engine.model_executor.attention.kv_views import block_runs
from omnistream.engine.model_executor.attention.torch_sdpa import (
    TorchSDPABackend,
    write_kv_cache,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure(fns: list, repeats: int) -> list[tuple[float, float]]:
    """(median thread CPU seconds, median wall seconds) of each fn, called in turn each round (so machine
    noise hits them alike) after one warm-up call each."""
    for fn in fns:
        fn()
    cpu: list[list[float]] = [[] for _ in fns]
    wall: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            c, w = time.thread_time(), time.perf_counter()
            fn()
            cpu[i].append(time.thread_time() - c)
            wall[i].append(time.perf_counter() - w)
    return [(statistics.median(c), statistics.median(w)) for c, w in zip(cpu, wall)]


def case(seq_len: int, num_query: int, repeats: int) -> dict:
    num_blocks = -(-seq_len // BLOCK)
    cache = torch.randn(2, num_blocks + 8, BLOCK, KV_HEADS, HEAD_DIM)
    table = list(range(4, 4 + num_blocks))  # one contiguous run, as a lone session's blocks usually are
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len - num_query, seq_len)])
    query = torch.randn(num_query, HEADS, HEAD_DIM)
    key, value = torch.randn(num_query, KV_HEADS, HEAD_DIM), torch.randn(num_query, KV_HEADS, HEAD_DIM)
    write_kv_cache(key, value, cache, slots)
    metadata = AttentionMetadata(query_start_loc=[0, num_query], seq_lens=[seq_len], slot_mapping=slots,
                                 block_tables=torch.tensor([table]), block_size=BLOCK)
    out = torch.empty_like(query)
    runs = block_runs(table)
    scale = HEAD_DIM**-0.5

    def gather() -> None:
        if num_query == 1:
            TorchSDPABackend._decode(query, cache, metadata, [0], scale, out)
        else:
            TorchSDPABackend._prefill(query, cache, metadata, 0, scale, out)

    def in_place() -> None:
        attend_request(query, key, value, cache, runs, seq_len, scale)

    gather()
    reference = out.clone()
    error = float((attend_request(query, key, value, cache, runs, seq_len, scale) - reference).abs().max())
    (g_cpu, g_wall), (p_cpu, p_wall) = measure([gather, in_place], repeats)
    return {"context": seq_len, "queries": num_query, "gather_cpu_ms": g_cpu * 1e3, "in_place_cpu_ms": p_cpu * 1e3,
            "gather_wall_ms": g_wall * 1e3, "in_place_wall_ms": p_wall * 1e3, "cpu_speedup": g_cpu / p_cpu,
            "max_abs_diff": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=_ints, default=[152, 1582, 7822], help="context lengths in tokens")
    parser.add_argument("--queries", type=_ints, default=[32, 1], help="new tokens per step (1 = a decode)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case (default 30)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = [case(s, q, args.repeats) for q in args.queries for s in args.contexts]
    print(f"Paged attention, one layer call ({HEADS} heads / {KV_HEADS} KV heads x {HEAD_DIM}, fp32, "
          f"{args.threads} thread(s), medians of {args.repeats})")
    print(f"{'context':>8} {'queries':>7} {'gather cpu ms':>14} {'in-place cpu ms':>16} {'speed-up':>9} "
          f"{'gather wall ms':>15} {'in-place wall ms':>17} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['context']:>8} {r['queries']:>7} {r['gather_cpu_ms']:>14.2f} {r['in_place_cpu_ms']:>16.2f} "
              f"{r['cpu_speedup']:>8.2f}x {r['gather_wall_ms']:>15.2f} {r['in_place_wall_ms']:>17.2f} "
              f"{r['max_abs_diff']:>11.1e}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
