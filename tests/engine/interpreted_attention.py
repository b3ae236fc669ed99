"""Worker for the Triton attention tests: runs our KV write and attention kernels under Triton's interpreter on CPU.

Triton reads TRITON_INTERPRET whenever `@triton.jit` decorates a function, so the variable must be set before triton
is first imported; a pytest process may already have imported it (torch._dynamo does). This script sets it first
thing in a fresh process.
Usage: python interpreted_attention.py CASES.pt OUTPUTS.pt. CASES.pt maps names to dicts with query, key, value,
cache, metadata (an AttentionMetadata), scale, plan and compiled: plan None runs the whole backend as the engine
selects it (custom ops, launch plan from the metadata; through torch.compile(fullgraph=True, dynamic=True) when
compiled is set), an AttentionPlan runs the two kernels with that plan. OUTPUTS.pt maps names to (attention output,
cache after the step). A case whose plan is "kv-write" runs only the KV write (its output is empty).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch

from omnistream.engine.model_executor.attention.selector import get_attention_backend
from omnistream.engine.model_executor.attention.triton_attention import paged_attention
from omnistream.engine.model_executor.attention.triton_kv_write import write_kv_triton


def run(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    query, key, value, cache, metadata = (case[name] for name in ("query", "key", "value", "cache", "metadata"))
    if case["plan"] == "kv-write":
        write_kv_triton(key, value, cache, metadata.slot_mapping)
        return torch.empty(0), cache
    if case["plan"] is None:
        backend = get_attention_backend("triton", torch.device("cpu"), cache.dtype, query.shape[1], cache.shape[3],
                                        query.shape[2])
        forward = backend.forward
        if case["compiled"]:
            forward = torch.compile(forward, fullgraph=True, backend="eager", dynamic=True)
        return forward(query, key, value, cache, metadata, case["scale"]), cache
    write_kv_triton(key, value, cache, metadata.slot_mapping)
    out = paged_attention(query, cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                          case["scale"], case["plan"])
    return out, cache


def main(cases_path: str, outputs_path: str) -> None:
    cases = torch.load(cases_path, weights_only=False)
    torch.save({name: run(case) for name, case in cases.items()}, outputs_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
