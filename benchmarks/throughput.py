"""Offline throughput: one seeded workload through omnistream, HF transformers and (if present) vLLM.

Prints output and total tokens/s per backend, the ratios against omnistream (all measured in this
run), and whether the greedy outputs agree. Example:
    python benchmarks/throughput.py --backends omnistream,hf,vllm --vllm-python /path/to/vllm-venv/bin/python

On a machine shared with other work, `--clock cpu --threads 1` times the in-process backends (omnistream, hf) by
this process's CPU time instead of wall time: a core taken by someone else then costs nothing. Such figures are
labelled "cpu s" and are not wall-clock throughput; vLLM runs its engine in other processes and is refused there.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwen3_moe_export import export_qwen3_moe

_MAX_REGULAR_TOKEN = 151643  # ids below this are ordinary vocabulary entries


def make_workload(num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt_token_ids": [rng.randrange(_MAX_REGULAR_TOKEN) for _ in range(rng.randint(*input_range))],
            "output_len": rng.randint(*output_range),
        }
        for _ in range(num_prompts)
    ]


def clock(args: argparse.Namespace) -> float:
    """Seconds by the chosen clock: wall time, or the CPU time of this process (all its threads)."""
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


def run_omnistream(model_dir: str, workload: list[dict], args: argparse.Namespace) -> dict:
    from omnistream import LLM, SamplingParams

    llm = LLM(
        model_dir,
        dtype="float32",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_backend=args.attention_backend,
        enable_prefix_caching=False,
        cpu_threads=args.threads,
    )
    prompts = [{"prompt_token_ids": w["prompt_token_ids"]} for w in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=w["output_len"], ignore_eos=True) for w in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    # timed by the run's clock (--clock cpu: this process's CPU time, page faults included)
    profiler = cProfile.Profile(lambda: clock(args)) if args.profile else None
    start = clock(args)
    if profiler is not None:
        profiler.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if profiler is not None:
        profiler.disable()
    elapsed = clock(args) - start
    if profiler is not None:
        print_profile(profiler, args.profile)
    return {"elapsed_s": elapsed, "outputs": [o.outputs[0].token_ids for o in outputs]}


def print_profile(profiler: cProfile.Profile, top: int) -> None:
    """The `top` functions of omnistream's timed run by own time, then by cumulative time, in seconds of the run's
    clock (cProfile's overhead is in these figures and in the throughput, which --profile runs should not be
    quoted for)."""
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(order).print_stats(top)


def run_hf(export_dir: str, workload: list[dict], args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    order = sorted(range(len(workload)), key=lambda i: len(workload[i]["prompt_token_ids"]))
    outputs: list[list[int]] = [[] for _ in workload]
    pad = 151643
    start = clock(args)
    for b in range(0, len(order), args.hf_batch_size):
        batch = order[b : b + args.hf_batch_size]
        longest = max(len(workload[i]["prompt_token_ids"]) for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            p = workload[i]["prompt_token_ids"]
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        new = max(workload[i]["output_len"] for i in batch)
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad, eos_token_id=None,
            )
        for row, i in enumerate(batch):
            outputs[i] = gen[row, longest : longest + workload[i]["output_len"]].tolist()
    elapsed = clock(args) - start
    return {"elapsed_s": elapsed, "outputs": outputs}


def run_vllm(export_dir: str, workload: list[dict], args: argparse.Namespace, enforce_eager: bool) -> dict:
    """vLLM in its default (compiled) mode, or with enforce_eager=True (backend "vllm-eager")."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "workload.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"model": export_dir, "workload": workload, "max_num_seqs": args.max_num_seqs,
                                    "max_num_batched_tokens": args.max_num_batched_tokens,
                                    "enforce_eager": enforce_eager}))
        worker = Path(__file__).resolve().parent / "vllm_worker.py"
        subprocess.run([args.vllm_python, str(worker), str(spec), str(result)], check=True)
        return json.loads(result.read_text())


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(reference, other))
    prefix = []
    for a, b in zip(reference, other):
        n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"identical_requests": same, "of": len(reference), "mean_matching_prefix": sum(prefix) / len(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    parser.add_argument("--backends", default="omnistream,hf,vllm",
                        help="comma-separated: omnistream, hf, vllm (its default compiled mode), vllm-eager")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=(32, 512))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=(16, 256))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--attention-backend", default="auto",
                        help="omnistream's attention backend (auto, cpu, reference)")
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of omnistream and hf (default: torch's, one per core)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time instead of wall time (in-process backends only)")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), help="python of a venv with vllm")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="cProfile omnistream's timed run and print its TOP functions (throughput then biased)")
    args = parser.parse_args()

    from omnistream.engine.checkpoint.default_model import default_model_path

    model_dir = str(args.model or default_model_path())
    workload = make_workload(args.num_prompts, tuple(args.input_len_range), tuple(args.output_len_range), args.seed)
    num_in = sum(len(w["prompt_token_ids"]) for w in workload)
    num_out = sum(w["output_len"] for w in workload)
    backends = [b for b in args.backends.split(",") if b]
    if args.clock == "cpu":
        for name in [b for b in backends if b.startswith("vllm")]:
            print(f"{name}: skipped (--clock cpu times this process only; vLLM's engine runs in others)")
            backends.remove(name)
    if not args.vllm_python:
        for name in [b for b in backends if b.startswith("vllm")]:
            print(f"{name}: skipped (pass --vllm-python or set VLLM_PYTHON to a venv with vllm installed)")
            backends.remove(name)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = str(export_qwen3_moe(model_dir, Path(tmp) / "qwen3_moe"))
        runners = {"omnistream": lambda: run_omnistream(model_dir, workload, args),
                   "hf": lambda: run_hf(export_dir, workload, args),
                   "vllm": lambda: run_vllm(export_dir, workload, args, enforce_eager=False),
                   "vllm-eager": lambda: run_vllm(export_dir, workload, args, enforce_eager=True)}
        for name in backends:
            print(f"running {name} ...", flush=True)
            results[name] = runners[name]()
    base = results.get("omnistream")
    rows = []
    for name, r in results.items():
        row = {
            "backend": name,
            "elapsed_s": round(r["elapsed_s"], 2),
            "output_tok_s": round(num_out / r["elapsed_s"], 1),
            "total_tok_s": round((num_in + num_out) / r["elapsed_s"], 1),
        }
        if base is not None:
            row["omnistream_speedup"] = round(r["elapsed_s"] / base["elapsed_s"], 2)
            row["greedy_agreement"] = agreement(base["outputs"], r["outputs"])
        rows.append(row)
    print(f"\nworkload: {args.num_prompts} requests, {num_in} prompt + {num_out} output tokens, seed {args.seed}")
    if args.clock == "cpu":
        print(f"clock: process CPU time, {args.threads or 'default'} thread(s) (not wall-clock throughput)")
    print(f"{'backend':<12}{args.clock + ' s':>9}{'out tok/s':>11}{'total tok/s':>13}{'omni speedup':>14}  greedy == omnistream")
    for row in rows:
        agree = row.get("greedy_agreement", {})
        print(f"{row['backend']:<12}{row['elapsed_s']:>9}{row['output_tok_s']:>11}{row['total_tok_s']:>13}"
              f"{row.get('omnistream_speedup', '-'):>14}  {agree.get('identical_requests', '-')}/{agree.get('of', '-')}"
              f" (prefix {agree.get('mean_matching_prefix', 0):.2f})")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"config": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
