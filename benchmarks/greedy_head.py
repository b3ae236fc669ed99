"""The greedy lm_head alone: each row's first-maximum id over the vocabulary, four ways, in the same run.

- full: the whole lm_head (`F.linear`, [B, V] logits), then `max(-1)`;
- chunks: greedy_head.chunked_max (torch, vocabulary chunks with a running maximum);
- kernel: greedy_kernel.greedy_max (compiled; the logits are never written);
- masked: the same kernel given a mask of allowed tokens per row (structured outputs) that allows a random half of
  the vocabulary, so that no tile is skipped: the cost of masking inside the kernel;
- top-k: the same kernel keeping each row's greedy_head.KEPT_IDS best ids (greedy structured output checks them).
Shapes are the embedded tiny model's lm_head (hidden 128, vocabulary 152064), random weights, float32 and bfloat16,
placed as the loader places it: on transparent huge pages where the kernel offers them (`--huge-pages off`: torch's
allocation). `--prefetch on|off` overrides the kernel's choice of prefetching weight rows (auto: off on huge pages).
Reported per dtype and batch size: medians of process CPU time (all threads; robust on a shared machine)
and the speedups of the kernel, with which path greedy_pays picks and whether the three unmasked ways give the same ids.

    python benchmarks/greedy_head.py
    python benchmarks/greedy_head.py --batches 1,2,4,8,16,48,64,128,256 --threads 1 --repeats 7
    python benchmarks/greedy_head.py --dtypes float32 --huge-pages off --prefetch off
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor import huge_pages
from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.engine.worker import greedy_kernel
from omnistream.engine.worker.greedy_head import KEPT_IDS, chunked_max, greedy_pays

VOCAB, HIDDEN = 152064, 128


def cpu_median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up (and the kernel's build on first use)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def case(lm_head: ParallelLMHead, batch: int, repeats: int, prefetch: bool | None) -> dict:
    weight = lm_head.weight
    hidden = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(batch)).to(weight.dtype)
    words = -(-weight.shape[0] // 32)
    gen = torch.Generator().manual_seed(1)
    half = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, generator=gen)
    paths = {
        "full": lambda: F.linear(hidden, weight).max(dim=-1).indices,
        "chunks": lambda: chunked_max(weight, hidden)[1],
        "kernel": lambda: greedy_kernel.greedy_max(weight, hidden, prefetch=prefetch)[1],
        "masked": lambda: greedy_kernel.greedy_max(weight, hidden, half, prefetch)[1],
        "top_k": lambda: greedy_kernel.greedy_top(weight, hidden, KEPT_IDS, prefetch)[1][:, 0],
    }
    ids = {name: fn() for name, fn in paths.items()}
    row = {"dtype": str(weight.dtype).removeprefix("torch."), "batch": batch}
    row.update({f"{name}_ms": cpu_median_ms(fn, repeats) for name, fn in paths.items()})
    row["kernel_vs_full"] = row["full_ms"] / row["kernel_ms"]
    row["kernel_vs_chunks"] = row["chunks_ms"] / row["kernel_ms"]
    row["greedy_pays"] = greedy_pays(lm_head, batch)
    row["masked_vs_kernel"] = row["masked_ms"] / row["kernel_ms"]
    row["top_k_vs_kernel"] = row["top_k_ms"] / row["kernel_ms"]
    row["same_ids"] = all(torch.equal(ids["full"], ids[name]) for name in ("chunks", "kernel", "top_k"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8,16,32,48,64,128,256")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernel uses as many)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--huge-pages", choices=("on", "off"), default="on", help="on: as the loader places it")
    parser.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if greedy_kernel.load_kernel() is None:
        raise SystemExit("the greedy kernel is not available (no C compiler, or OMNISTREAM_GREEDY_KERNEL=0)")
    rows = []
    prefetch = {"auto": None, "on": True, "off": False}[args.prefetch]
    print(
        f"greedy lm_head {VOCAB} x {HIDDEN}, process CPU ms (medians of {args.repeats}), {args.threads} thread(s), "
        f"THP {huge_pages.thp_mode()}, huge pages {args.huge_pages}, prefetch {args.prefetch}"
    )
    print(
        f"{'dtype':>9} {'batch':>6} {'full':>9} {'chunks':>9} {'kernel':>9} {'masked':>9} {'top-k':>9} {'vs full':>8} "
        f"{'vs chunks':>10} {'masked/k':>9} {'top-k/k':>8} {'pays':>5} {'same ids':>9}"
    )
    for dtype in args.dtypes.split(","):
        lm_head = ParallelLMHead(VOCAB, HIDDEN)
        with torch.no_grad():
            lm_head.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
        lm_head = lm_head.to(getattr(torch, dtype))
        if args.huge_pages == "on":
            huge_pages.place(lm_head.weight)
        for batch in (int(b) for b in args.batches.split(",")):
            with torch.inference_mode():
                r = case(lm_head, batch, args.repeats, prefetch)
            rows.append(r)
            print(
                f"{r['dtype']:>9} {batch:>6} {r['full_ms']:>9.2f} {r['chunks_ms']:>9.2f} {r['kernel_ms']:>9.2f} "
                f"{r['masked_ms']:>9.2f} {r['top_k_ms']:>9.2f} {r['kernel_vs_full']:>7.2f}x "
                f"{r['kernel_vs_chunks']:>9.2f}x {r['masked_vs_kernel']:>8.2f}x {r['top_k_vs_kernel']:>7.2f}x "
                f"{r['greedy_pays']!s:>5} {r['same_ids']!s:>9}",
                flush=True,
            )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
