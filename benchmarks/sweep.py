"""A load sweep over benchmarks/serve.py: one run per concurrency (or request rate), then the knee, the
highest load that, like every lower load of the sweep, meets every `--slo` at `--slo-percentile` with no
failed request (a higher load passing by luck after a failing one is not "held"); writes the table
as JSON and, with `--plot`, throughput and latency against load as PNGs (needs matplotlib). Everything
after `--` goes to serve.py unchanged:

    python benchmarks/sweep.py --concurrency 1,2,4,8,16 --slo ttft:500 tpot:50 --out results/sweep.json \
        --plot -- --base-url http://127.0.0.1:8000 --dataset-name random --num-prompts 64 --ignore-eos

Live streams: with `-- --backend grpc-session ...` (or `realtime`) the load is the number of concurrent live audio
streams, and the SLO may also bound `eos_ttft` (end of speech -> first token) and `chunk_lag` (how late
audio chunks were sent); the rows then carry those percentiles and the ingested audio seconds per second:

    python benchmarks/sweep.py --concurrency 1,2,4,8 --slo eos_ttft:1000 chunk_lag:200 --out results/live.json \
        -- --backend grpc-session --grpc-target 127.0.0.1:50051 --audio-seconds 10 --num-prompts 8 \
        --random-output-len 16 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve  # noqa: E402

SLO_METRICS = ("ttft", "tpot", "itl", "e2el")
LIVE_METRICS = ("eos_ttft", "chunk_lag")  # the live backends (grpc-session, realtime) only


def parse_slo(pairs: list[str]) -> dict[str, float]:
    slo = {}
    for pair in pairs:
        name, _, value = pair.partition(":")
        if name not in SLO_METRICS + LIVE_METRICS or not value:
            raise argparse.ArgumentTypeError(f"--slo wants KEY:MS with KEY in {SLO_METRICS + LIVE_METRICS}, got {pair!r}")
        slo[name] = float(value)
    return slo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 1,2,4,8")
    load.add_argument("--request-rates", type=lambda s: [float(x) for x in s.split(",")], help="req/s, e.g. 1,2,4")
    p.add_argument("--slo", nargs="+", default=["ttft:1000"], metavar="KEY:MS")
    p.add_argument("--slo-percentile", type=float, default=99.0)
    p.add_argument("--out", default=None, help="the sweep's JSON (the PNGs go beside it)")
    p.add_argument("--plot", action="store_true")
    return p


def _point_row(load_name: str, value: float, result: dict[str, Any], slo: dict[str, float], pct: str) -> dict[str, Any]:
    row: dict[str, Any] = {load_name: value}
    keys = ("completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
            "audio_seconds_per_s", "max_chunk_lag_ms")
    row.update({key: result[key] for key in keys if key in result})
    for metric in SLO_METRICS + LIVE_METRICS:
        if f"p{pct}_{metric}_ms" in result:
            row[f"p{pct}_{metric}_ms"] = result[f"p{pct}_{metric}_ms"]
            row[f"median_{metric}_ms"] = result[f"median_{metric}_ms"]
    row["meets_slo"] = result["failed"] == 0 and all(row[f"p{pct}_{m}_ms"] <= ms for m, ms in slo.items())
    return row


def knee_point(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last row of the leading run of rows (in increasing load) that meet the SLO; None if the first fails."""
    held = list(itertools.takewhile(lambda row: row["meets_slo"], rows))
    return held[-1] if held else None


async def sweep(args: argparse.Namespace, serve_argv: list[str]) -> dict[str, Any]:
    slo = parse_slo(args.slo)
    pct = str(int(args.slo_percentile)) if args.slo_percentile == int(args.slo_percentile) else str(args.slo_percentile)
    load_name, points = ("max_concurrency", args.concurrency) if args.concurrency else ("request_rate", args.request_rates)
    flag = "--max-concurrency" if load_name == "max_concurrency" else "--request-rate"
    runs = [serve.parse_args([*serve_argv, flag, str(value), "--disable-summary",
                              "--metric-percentiles", f"50,{args.slo_percentile}"]) for value in sorted(points)]
    live = [m for m in slo if m in LIVE_METRICS]
    if live and runs[0].backend not in serve.LIVE_BACKENDS:
        raise SystemExit(f"--slo {', '.join(live)}: live-stream metrics need `-- --backend grpc-session` or realtime")
    rows, results = [], []
    for value, run_args in zip(sorted(points), runs):
        result = await serve.benchmark(run_args)
        results.append(result)
        rows.append(_point_row(load_name, value, result, slo, pct))
        print(json.dumps(rows[-1]))
    knee = knee_point(rows)
    sha, dirty = serve.git_state()
    summary = {"load": load_name, "slo": slo, "slo_percentile": args.slo_percentile, "points": rows,
               "knee": knee[load_name] if knee else None, "knee_point": knee, "git_sha": sha, "git_dirty": dirty,
               "serve_args": serve_argv, "config": results[0]["config"] if results else None, "plots": []}
    if args.out:
        out = Path(args.out)
        if args.plot:
            summary["plots"] = write_plots(summary, out.parent, out.stem, pct)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"knee under {slo} at p{pct}: {load_name} = {summary['knee']}")
    return summary


def write_plots(summary: dict[str, Any], out_dir: Path, stem: str, pct: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plots written", file=sys.stderr)
        return []
    load, rows = summary["load"], summary["points"]
    x = [row[load] for row in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(x, [row["output_throughput"] for row in rows], marker="o", label="output tok/s")
    ax.plot(x, [row["total_token_throughput"] for row in rows], marker="o", label="total tok/s")
    ax.set(xlabel=load, ylabel="tokens/s", title="throughput vs load")
    ax.legend(loc="upper left")
    if "audio_seconds_per_s" in rows[0]:  # live streams: the audio ingested, on its own axis
        audio = ax.twinx()
        audio.plot(x, [row["audio_seconds_per_s"] for row in rows], marker="s", color="tab:green",
                   label="audio s ingested / s")
        audio.set(ylabel="audio s / s")
        audio.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(str(out_dir / f"{stem}-throughput.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric in [m for m in SLO_METRICS + LIVE_METRICS if f"p{pct}_{m}_ms" in rows[0]]:
        line = ax.plot(x, [row[f"p{pct}_{metric}_ms"] for row in rows], marker="o", label=f"p{pct} {metric}")[0]
        if metric in summary["slo"]:
            ax.axhline(summary["slo"][metric], color=line.get_color(), linestyle="--", linewidth=1)
    if summary["knee"] is not None:
        ax.axvline(summary["knee"], color="gray", linestyle=":", label="knee")
    ax.set(xlabel=load, ylabel="ms", title="latency vs load (dashed: SLO)")
    ax.set_yscale("symlog", linthresh=1.0)  # log above 1 ms; a chunk lag of 0 stays on the plot
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(str(out_dir / f"{stem}-latency.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, serve_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        parse_slo(args.slo)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    asyncio.run(sweep(args, serve_argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
