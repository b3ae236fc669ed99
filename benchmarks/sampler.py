"""lm_head + sampling for one decode step: the device sampler (engine/worker/sampler.py, one vectorized pass)
against the per-row host sampler it replaced (kept below as the baseline), in the same run.

Shapes are the embedded tiny model's lm_head (hidden 128, vocabulary 152064, fp32). Workloads:
- greedy: every row temperature 0. The new path is the runner's: where greedy_pays says so, greedy_tokens (the
  compiled kernel, else vocabulary chunks with a running maximum: greedy_head.py); the last column times the other
  way so the threshold can be checked (benchmarks/greedy_head.py compares the three greedy paths alone).
- mixed: rows in turn greedy; seeded T 0.7 top-k 20 top-p 0.8; unseeded T 1.0 top-p 0.95 (no top-k: a full
  sort); seeded T 0.9 with repetition 1.05 / presence 0.5 penalties and 5 logprobs. Prompts of 100 tokens, 20 outputs.
Each timing covers the whole step's sampling: the parameters' upload, the lm_head, the pass and the copy back.
Reported: medians of thread CPU time (robust on a shared machine; exact with --threads 1) and of wall time.

    python benchmarks/sampler.py
    python benchmarks/sampler.py --batches 1,8,48,256 --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

import torch

from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.engine.worker.greedy_head import greedy_pays, greedy_tokens
from omnistream.engine.worker.sampler import sample, to_host
from omnistream.engine.worker.sampling_state import SamplingState
from omnistream.scheduler.outputs import TokenLogprobs
from omnistream.scheduler.sampling_params import SamplingParams

VOCAB, HIDDEN = 152064, 128
EOS = [151645, 151643]
PROMPT_LEN, OUTPUT_LEN = 100, 20


# ---- the baseline: the per-row host sampler this repository used before the device sampler ---------------

@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    blocked_token_ids: list[int]


def _edits_logits(row: SamplingRow) -> bool:
    p = row.params
    penalizes_outputs = (p.frequency_penalty or p.presence_penalty) and row.output_token_ids
    return bool(p.repetition_penalty != 1.0 or penalizes_outputs or row.blocked_token_ids)


def _penalized(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    p = row.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
        out_ids = torch.tensor(row.output_token_ids, dtype=torch.long)
        ones = torch.ones_like(out_ids, dtype=logits.dtype)
        counts = torch.zeros(logits.shape[0]).scatter_add_(0, out_ids, ones)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if row.blocked_token_ids:
        logits[row.blocked_token_ids] = float("-inf")
    return logits


def _filter_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        logits = logits.masked_fill(logits < logits.topk(p.top_k).values[-1], float("-inf"))
    probs = logits.softmax(dim=0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop_sorted = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def old_top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen_lp.unsqueeze(1)).sum(dim=1) + 1
    top_vals, top_ids = logprobs.topk(num_top, dim=1)
    return [TokenLogprobs(token_ids=[int(chosen[i])] + top_ids[i].tolist(),
                          logprobs=[float(chosen_lp[i])] + top_vals[i].tolist(),
                          ranks=[int(ranks[i])] + list(range(1, num_top + 1))) for i in range(logprobs.shape[0])]


def old_sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw_logprobs = logits[want].log_softmax(dim=-1) if want else None
    chosen = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.params.greedy and not _edits_logits(row):
            continue
        row_logits = _penalized(logits[i], row) if _edits_logits(row) else logits[i]
        if row.params.greedy:
            chosen[i] = row_logits.argmax()
            continue
        noise = torch.empty(row_logits.shape[0]).exponential_(generator=row.generator)
        chosen[i] = (_filter_distribution(row_logits, row.params) / noise).argmax()
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for j, i in enumerate(want):
            entry = old_top_logprobs(raw_logprobs[j : j + 1], chosen[i : i + 1], rows[i].params.logprobs)
            logprobs[i] = entry[0]
    return chosen.tolist(), logprobs


# ---- the workload -----------------------------------------------------------------------------------------

def _params(i: int, mixed: bool) -> SamplingParams:
    if not mixed or i % 4 == 0:
        return SamplingParams(temperature=0.0)
    if i % 4 == 1:
        return SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=i)
    if i % 4 == 2:
        return SamplingParams(temperature=1.0, top_p=0.95)
    return SamplingParams(temperature=0.9, seed=i, repetition_penalty=1.05, presence_penalty=0.5, logprobs=5)


def measure(fns: list, repeats: int) -> list[tuple[float, float]]:
    """(median thread CPU seconds, median wall seconds) of each fn, called in turn each round."""
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


def case(lm_head: ParallelLMHead, batch: int, mixed: bool, repeats: int) -> dict:
    rng = random.Random(batch)
    params = [_params(i, mixed) for i in range(batch)]
    tokens = [[rng.randrange(VOCAB) for _ in range(PROMPT_LEN + OUTPUT_LEN)] for _ in range(batch)]
    names = [f"r{i}" for i in range(batch)]
    state = SamplingState(VOCAB, EOS, 0, torch.device("cpu"))
    for name, p, ids in zip(names, params, tokens):
        state.set_request(name, p, ids, PROMPT_LEN)
    hidden = torch.randn(batch, HIDDEN)

    def new() -> list[int]:
        meta = state.prepare(names, [OUTPUT_LEN] * batch)
        if meta.plain_greedy and greedy_pays(lm_head, batch):
            return greedy_tokens(lm_head, hidden).tolist()
        out = sample(lm_head(hidden).float(), meta)
        state.record(meta, out.token_ids)
        return to_host(out, meta)[0]

    def new_other_way() -> list[int]:
        meta = state.prepare(names, [OUTPUT_LEN] * batch)
        if not greedy_pays(lm_head, batch):
            return greedy_tokens(lm_head, hidden).tolist()
        return to_host(sample(lm_head(hidden).float(), meta), meta)[0]

    def old() -> list[int]:
        rows = [SamplingRow(p, ids[:PROMPT_LEN], ids[PROMPT_LEN:],
                            None if p.seed is None else torch.Generator().manual_seed(p.seed), [])
                for p, ids in zip(params, tokens)]
        return old_sample(lm_head(hidden).float().cpu(), rows)[0]

    fns = [old, new] + ([new_other_way] if not mixed else [])
    same = None if mixed else old() == new() == new_other_way()
    timings = measure(fns, repeats)
    row = {"batch": batch, "workload": "mixed" if mixed else "greedy", "greedy_ids_equal": same,
           "old_cpu_ms": timings[0][0] * 1e3, "new_cpu_ms": timings[1][0] * 1e3,
           "old_wall_ms": timings[0][1] * 1e3, "new_wall_ms": timings[1][1] * 1e3}
    row["speedup_cpu"] = row["old_cpu_ms"] / row["new_cpu_ms"]
    if not mixed:
        row["other_way_cpu_ms"] = timings[2][0] * 1e3
        row["other_way_wall_ms"] = timings[2][1] * 1e3
    return row


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=_ints, default=[1, 8, 48, 256], help="rows that sample per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per case (default 7)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lm_head = ParallelLMHead(VOCAB, HIDDEN)
    lm_head.weight.normal_(0.0, 0.02)
    rows = [case(lm_head, b, mixed, args.repeats) for mixed in (False, True) for b in args.batches]
    print(f"lm_head ({HIDDEN} x {VOCAB}, fp32) + sampling per step, {args.threads} thread(s), "
          f"medians of {args.repeats}; old = per-row host sampler, new = device sampler")
    print(f"{'workload':>8} {'batch':>5} {'old cpu ms':>11} {'new cpu ms':>11} {'speed-up':>9} "
          f"{'old wall ms':>12} {'new wall ms':>12} {'greedy other way cpu ms':>24}")
    for r in rows:
        other = f"{r['other_way_cpu_ms']:.1f}" if "other_way_cpu_ms" in r else "-"
        print(f"{r['workload']:>8} {r['batch']:>5} {r['old_cpu_ms']:>11.1f} {r['new_cpu_ms']:>11.1f} "
              f"{r['speedup_cpu']:>8.2f}x {r['old_wall_ms']:>12.1f} {r['new_wall_ms']:>12.1f} {other:>24}")
    if any(r["greedy_ids_equal"] is False for r in rows):
        print("WARNING: greedy ids differ between the old and the new sampler")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
