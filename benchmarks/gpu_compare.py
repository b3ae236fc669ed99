"""Our engine against HF transformers on one device: offline throughput on the same weights, and greedy agreement.

Owns two measurements. `engine_vs_hf`: one seeded workload (benchmarks/throughput.py's) through `LLM.generate`
and through HF `generate` (eager: no compile; batches of prompts sorted by length, left-padded; each batch runs to
its longest output, so equal output lengths keep the count fair), output tokens per second of each and their
ratio. `tiny_parity`: the embedded tiny model in fp32 through both, greedy, and how
many requests produce identical tokens. On CUDA, TF32 is turned off so that fp32 means fp32 on both sides.
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from qwen3_moe_export import export_qwen3_moe
from throughput import agreement, make_workload

_PAD = 151643
_WARM_UP_TOKENS = 4  # a short warm-up request: kernels and caches ready, little device time spent


def run_engine(
    model_dir: Path, workload: list[dict], device: str, dtype: str, attention_backend: str, kv_cache_memory: int | None
) -> dict[str, Any]:
    """Our LLM on the workload (after a short two-request warm-up): elapsed seconds and each request's tokens."""
    from omnistream import LLM, SamplingParams

    llm = LLM(
        str(model_dir),
        dtype=dtype,
        device=device,
        max_num_seqs=max(64, len(workload)),
        max_num_batched_tokens=4096,
        enable_prefix_caching=False,
        attention_backend=attention_backend,
        kv_cache_memory=kv_cache_memory,
    )
    prompts = [{"prompt_token_ids": w["prompt_token_ids"]} for w in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=w["output_len"], ignore_eos=True) for w in workload]
    warm_up = SamplingParams(temperature=0.0, max_tokens=_WARM_UP_TOKENS, ignore_eos=True)
    llm.generate(prompts[:2], warm_up, use_tqdm=False)
    _synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    llm.engine.shutdown()
    return {"elapsed_s": elapsed, "outputs": [list(o.outputs[0].token_ids) for o in outputs]}


def load_hf(hf_dir: Path, device: str, dtype: torch.dtype, experts: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """HF's Qwen3MoeForCausalLM on `device`, SDPA attention and the `experts` implementation where this
    transformers release lets one choose (it defaults to grouped_mm since 5.x); returns it and what it runs."""
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    new_api = hasattr(transformers.PreTrainedModel, "get_correct_experts_implementation")
    kwargs["dtype" if new_api else "torch_dtype"] = dtype
    if new_api:
        kwargs["experts_implementation"] = experts
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), **kwargs).to(device).eval()
    chosen = getattr(model.config, "_experts_implementation", None) or "eager (fixed in this release)"
    return model, {"transformers": transformers.__version__, "attention": "sdpa", "experts": str(chosen)}


def run_hf(model: torch.nn.Module, workload: list[dict], device: str, batch_size: int) -> dict[str, Any]:
    """HF generate over the workload in length-sorted, left-padded batches (after a short one-request warm-up)."""
    order = sorted(range(len(workload)), key=lambda i: len(workload[i]["prompt_token_ids"]))
    outputs: list[list[int]] = [[] for _ in workload]
    _hf_generate(model, [{**workload[order[0]], "output_len": _WARM_UP_TOKENS}], device)
    _synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        for i, tokens in zip(batch, _hf_generate(model, [workload[i] for i in batch], device)):
            outputs[i] = tokens
    _synchronize(device)
    return {"elapsed_s": time.perf_counter() - start, "outputs": outputs}


def _hf_generate(model: torch.nn.Module, requests: list[dict], device: str) -> list[list[int]]:
    longest = max(len(r["prompt_token_ids"]) for r in requests)
    ids = torch.full((len(requests), longest), _PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(requests):
        prompt = request["prompt_token_ids"]
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    new = max(r["output_len"] for r in requests)
    with torch.inference_mode():
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=_PAD,
            eos_token_id=None,
        )
    return [generated[row, longest : longest + r["output_len"]].tolist() for row, r in enumerate(requests)]


def engine_vs_hf(
    model_dir: Path,
    hf_dir: Path,
    device: str,
    dtype: str,
    attention_backend: str,
    workload_spec: dict[str, Any],
    hf_batch_size: int,
    hf_experts: str,
    emit: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Output tok/s of our engine and of HF generate on the same workload and weights, and their ratio (our
    figures are emitted before HF starts)."""
    _strict_fp32(device)
    workload = make_workload(
        workload_spec["num_prompts"], tuple(workload_spec["input_range"]), tuple(workload_spec["output_range"]), seed=0
    )
    num_out = sum(w["output_len"] for w in workload)
    kv_memory = 8 << 30 if device.startswith("cuda") else None  # leaves room for HF's copy of the weights
    ours = run_engine(model_dir, workload, device, dtype, attention_backend, kv_memory)
    engine = {
        "workload": {**workload_spec, "output_tokens": num_out},
        "engine_elapsed_s": ours["elapsed_s"],
        "engine_output_tok_s": num_out / ours["elapsed_s"],
    }
    emit(engine)
    _release(device)  # our engine's weights and KV cache, before HF loads its copy
    start = time.perf_counter()
    model, hf_setup = load_hf(hf_dir, device, getattr(torch, dtype), hf_experts)
    hf_load_s = time.perf_counter() - start
    hf = run_hf(model, workload, device, hf_batch_size)
    return {
        **engine,
        "hf": hf_setup,
        "hf_load_s": hf_load_s,
        "hf_batch_size": hf_batch_size,
        "hf_elapsed_s": hf["elapsed_s"],
        "hf_output_tok_s": num_out / hf["elapsed_s"],
        "speedup_vs_hf": hf["elapsed_s"] / ours["elapsed_s"],
        "greedy_agreement": agreement(ours["outputs"], hf["outputs"]),
    }


def tiny_parity(
    device: str, num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int]
) -> dict[str, Any]:
    """The embedded tiny model in fp32, greedy, through our engine and HF: requests with identical tokens."""
    from omnistream.engine.checkpoint.default_model import default_model_path

    _strict_fp32(device)
    _release(device)  # what an earlier stage of this process left
    workload = make_workload(num_prompts, input_range, output_range, seed=1)
    model_dir = default_model_path()
    ours = run_engine(model_dir, workload, device, "float32", "auto", 1 << 30 if device.startswith("cuda") else None)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_qwen3_moe(model_dir, Path(tmp) / "hf")
        model, hf_setup = load_hf(hf_dir, device, torch.float32, "eager")
    hf = run_hf(model, workload, device, batch_size=1)  # batch 1: no padding in HF's computation
    result = agreement(ours["outputs"], hf["outputs"])
    return {
        **result,
        "hf": hf_setup,
        "identical": result["identical_requests"] == result["of"],
        "first_mismatch": next((i for i, (a, b) in enumerate(zip(ours["outputs"], hf["outputs"])) if a != b), None),
    }


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _strict_fp32(device: str) -> None:
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
