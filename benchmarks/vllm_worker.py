"""Runs the throughput workload in vLLM; executed by benchmarks/throughput.py with a vLLM venv's python."""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(spec_path).read())
    workload = spec["workload"]
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        seed=0,
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        enable_prefix_caching=False,
        max_model_len=4096,
    )
    prompts = [TokensPrompt(prompt_token_ids=w["prompt_token_ids"]) for w in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=w["output_len"], ignore_eos=True) for w in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {"elapsed_s": elapsed, "outputs": [list(o.outputs[0].token_ids) for o in outputs]}
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
