"""Where a serving run's CPU goes: `omnistream serve` (started as compare_servers.py starts it) under the
benchmarks/serve.py workload, with the CPU seconds of each process measured around every run: the front end
(HTTP, tokenizing, detokenizing, SSE), the engine core (scheduling and the model) and the load generator (this
process, while it sends: not its set-up). Per level (`--max-concurrency` list) it prints the medians over
`--repeats` runs of: the run's wall time, each process's CPU seconds, its CPU per output token, and the engine
core's busy share (core CPU / wall: near 1, the core computed all along; below 1, it waited on the rest or, on a
loaded machine, for a CPU).

    python benchmarks/serve_cpu.py --omnistream-threads 1 --max-concurrency 1,4,16 --num-prompts 16 \
        --input-len 128 --output-len 32 --repeats 3

CPU seconds come from /proc/PID/stat (Linux), so they count what each process ran, not what it waited for;
on a shared machine they still grow with the load (caches and memory bandwidth are shared), so compare runs
made side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve
from compare_servers import SERVED_NAME, engine_flags
from server_process import ServerProcess, free_port

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def child_pid(parent: int, marker: str) -> int:
    """The child of `parent` whose command line contains `marker` (the engine-core process)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and marker in command:
            return int(entry.name)
    raise RuntimeError(f"no child of {parent} runs {marker}")


def one_run(args: argparse.Namespace, url: str, concurrency: int, pids: dict[str, int]) -> dict[str, float]:
    """One serve.py run at `concurrency`; its duration, tokens and each process's CPU seconds."""
    argv = [
        "--base-url",
        url,
        "--backend",
        "openai-completions",
        "--model",
        SERVED_NAME,
        "--dataset-name",
        "random",
        "--num-prompts",
        str(args.num_prompts),
        "--num-warmups",
        "0",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--seed",
        str(args.seed),
        "--ignore-eos",
        "--temperature",
        "0",
        "--max-concurrency",
        str(concurrency),
        "--disable-tqdm",
        "--disable-summary",
    ]
    bench_args = serve.parse_args(argv)
    load_cpu: list[float] = []
    run_load = serve.run_load

    async def timed_load(*load_args: Any) -> Any:  # the load generator's CPU while it sends, not its set-up
        start = time.process_time()
        try:
            return await run_load(*load_args)
        finally:
            load_cpu.append(time.process_time() - start)

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    serve.run_load = timed_load
    try:
        result = asyncio.run(serve.benchmark(bench_args))
    finally:
        serve.run_load = run_load
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["load generator"] = load_cpu[0]
    return {
        "wall_s": result["duration"],
        "output_tokens": result["total_output_tokens"],
        "output_throughput": result["output_throughput"],
        **{f"cpu_{k}": v for k, v in cpu.items()},
    }


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    for name in ("front end", "engine core", "load generator"):
        summary[f"cpu_ms_per_token_{name}"] = 1e3 * summary[f"cpu_{name}"] / summary["output_tokens"]
    summary["core_busy_share"] = summary["cpu_engine core"] / summary["wall_s"]
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--max-concurrency", default="1,4,16")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omnistream-threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--out", default=None, help="a JSON of every run")
    args = p.parse_args(argv)
    from omnistream.engine.checkpoint.default_model import default_model_path

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "omnistream.engine.entrypoints.cli",
        "serve",
        str(args.model or default_model_path()),
        *engine_flags(args, port),
    ]
    env = {"OMNISTREAM_API_KEY": ""}
    if args.omnistream_threads:
        env["OMP_NUM_THREADS"] = str(args.omnistream_threads)
    log = Path(tempfile.mkdtemp(prefix="serve-cpu-")) / "omnistream.log"
    report: dict[str, Any] = {"loadavg_before": os.getloadavg(), "levels": {}}
    with ServerProcess("omnistream", command, port, log, env=env, ready_timeout_s=900) as server:
        pids = {"front end": server.process.pid}
        pids["engine core"] = child_pid(server.process.pid, "omnistream.engine.core.process")
        levels = [int(c) for c in args.max_concurrency.split(",")]
        one_run(args, server.url, levels[0], pids)  # warm-up, not counted
        for concurrency in levels:
            runs = [one_run(args, server.url, concurrency, pids) for _ in range(args.repeats)]
            report["levels"][concurrency] = {"runs": runs, "median": summarize(runs)}
    report["loadavg_after"] = os.getloadavg()
    print(f"load average before {report['loadavg_before'][0]:.2f}, after {report['loadavg_after'][0]:.2f}")
    print(
        "| concurrency | wall s | out tok/s | CPU s front end / core / load gen | CPU ms per token front end / core "
        "/ load gen | core busy share |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for concurrency, level in report["levels"].items():
        m = level["median"]
        print(
            f"| {concurrency} | {m['wall_s']:.2f} | {m['output_throughput']:.0f} | {m['cpu_front end']:.2f} / "
            f"{m['cpu_engine core']:.2f} / {m['cpu_load generator']:.2f} | {m['cpu_ms_per_token_front end']:.2f} / "
            f"{m['cpu_ms_per_token_engine core']:.2f} / {m['cpu_ms_per_token_load generator']:.2f} | "
            f"{m['core_busy_share']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
