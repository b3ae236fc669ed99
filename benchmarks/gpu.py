"""The one-command GPU report (issue #14 item 5): real thinker shapes on random weights, every figure in one run.

    python benchmarks/gpu.py                                   # CUDA, bf16, 48 layers, 16 experts, ≤ 8 min
    python benchmarks/gpu.py --stages build,decode,profile     # a subset (build is added when a stage needs it)
    python benchmarks/gpu.py --device cpu --smoke              # tiny shapes, every stage end to end on CPU

Stages (gpu_stages.py) run in worker processes (build+floor, forward+decode+profile, compare+parity, live, speech,
gputests), each killed at the sum of its stages' time caps, clipped to what is left of --budget-s; a stage that
fails, lacks a dependency or runs out of time is recorded with what it had measured, and the next one runs:
  build    random weights drawn on the device, written as an omnistream checkpoint plus an HF view of the same
           files (gpu_model.py); reused when --model-dir already holds one of the same spec
  floor    bytes a decode step must read ÷ the device's copy bandwidth, per batch size (gpu_floor.py)
  forward  the model's decode forward + greedy pick alone at each --batches size, through the decode graphs when
           the attention backend allows (gpu_forward.py; needs none of msgspec, zmq, llguidance)
  decode   decode step time at each --batches size through the engine's scheduler and runner, CUDA graphs on
           (gpu_decode.py)
  profile  torch.profiler top ops of one decode step (gpu_profile.py; runs in the decode process)
  compare  offline output tok/s of LLM.generate vs HF generate (eager) on the same weights (gpu_compare.py)
  parity   the embedded tiny model in fp32: greedy tokens of our engine vs HF, 64 prompts (gpu_compare.py)
  live     end of speech → first token at 10 s and 600 s of live audio, benchmarks/streaming.py (gpu_live.py)
  speech   benchmarks/speech.py (issue #17: spoken answers on the embedded tiny speech stack, on the device) with
           --speech-args, when that file exists; its table rows and output are recorded
  gputests the repository's @pytest.mark.gpu tests, counts and failures (gpu_tests.py)
Output in --out: gpu_report.json and gpu_report.txt (issue #14's targets marked met / missed / not measured,
gpu_report.py), stages/<stage>.json, logs/<stage>.log, profile.txt; the model (about 12 GB at the real shapes) goes
to --model-dir (default OUT/model; keep it outside a folder that is copied back). A device image without some of
our dependencies: pass --wheels DIR to pip-install the wheels in DIR first; otherwise the stages that need a
missing module report it by name.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from gpu_stages import NEEDS_MODEL, run_worker

STAGES = ("build", "floor", "forward", "decode", "profile", "compare", "parity", "live", "speech", "gputests")
# stages that share a process (forward, decode and profile: the model is loaded once; parity needs little memory)
GROUPS = (
    ("build", "floor"),
    ("forward", "decode", "profile"),
    ("compare", "parity"),
    ("live",),
    ("speech",),
    ("gputests",),
)
CAPS_S = {
    "build": 120,
    "floor": 30,
    "forward": 60,
    "decode": 150,
    "profile": 30,
    "compare": 150,
    "parity": 90,
    "live": 150,
    "speech": 60,
    "gputests": 120,
}


def ensure_importable() -> dict[str, str]:
    """Make `import omnistream` resolve (to this tree, when it is not installed): environment for the workers."""
    env = dict(os.environ)
    try:
        import omnistream  # noqa: F401
    except ImportError:
        link_dir = Path(tempfile.mkdtemp(prefix="omnistream-path-"))
        (link_dir / "omnistream").symlink_to(REPO_ROOT)
        sys.path.insert(0, str(link_dir))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), env.get("PYTHONPATH")]))
    return env


# ---- the plan ------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting the stage processes read, in one JSON-able dict."""
    out = Path(args.out).resolve()
    model_root = Path(args.model_dir).resolve() if args.model_dir else out / "model"
    smoke = args.smoke
    selected = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(selected) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if any(s in NEEDS_MODEL for s in selected) and "build" not in selected:
        selected.insert(0, "build")
    return {
        "out": str(out),
        "device": args.device,
        "smoke": smoke,
        "stages": selected,
        "dtype": args.dtype or ("float32" if smoke else "bfloat16"),
        "experts": args.experts or (4 if smoke else 16),
        "model_dir": str(model_root / "omnistream"),
        "hf_dir": str(model_root / "hf"),
        "attention_backend": args.attention_backend,
        "batches": [int(b) for b in (args.batches or ("1,4" if smoke else "1,8,32,64")).split(",")],
        "context": 32 if smoke else 512,
        "steps": 5 if smoke else 30,
        "profile_batch": 2 if smoke else 8,
        "bandwidth_bytes": (64 << 20) if smoke else (2 << 30),
        "bandwidth_gbps": args.bandwidth_gbps,
        "compare": (
            {"num_prompts": 4, "input_range": [8, 32], "output_range": [6, 6]}
            if smoke
            else {"num_prompts": 64, "input_range": [32, 256], "output_range": [96, 96]}
        ),
        "hf_batch_size": 2 if smoke else 32,
        "hf_experts": args.hf_experts,
        "parity": (
            {"num_prompts": 4, "input_range": [8, 24], "output_range": [4, 8]}
            if smoke
            else {"num_prompts": 64, "input_range": [16, 128], "output_range": [16, 48]}
        ),
        "live_durations": [1.0, 2.0] if smoke else [10.0, 600.0],
        "speech_script": str(BENCH_DIR / "speech.py"),
        "speech_args": shlex.split(args.speech_args)
        if args.speech_args is not None
        else (
            ["--threads", "1", "--voices", "1", "--frames", "4", "--max-tokens", "4"]
            if smoke
            else ["--voices", "1", "8", "32", "--frames", "50", "--max-tokens", "16"]
        ),
        "cpu_threads": 1 if args.device == "cpu" else None,
        "fail_stage": args.fail_stage,
    }


# ---- the orchestrator ----------------------------------------------------------------------------------


def run_all(plan: dict[str, Any], env: dict[str, str], budget_s: float) -> dict[str, dict[str, Any]]:
    out = Path(plan["out"])
    for sub in ("stages", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for old in (out / "stages").glob("*.json"):
        old.unlink()
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    deadline = time.monotonic() + budget_s
    stages: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        selected = []
        for stage in (s for s in group if s in plan["stages"]):
            reason = _cannot_run(stage, plan, stages, deadline - time.monotonic(), budget_s)
            if reason is None:
                selected.append(stage)
            else:
                stages[stage] = {"status": reason[0], "seconds": 0.0, "error": reason[1], "result": None}
        if selected:
            cap = min(sum(CAPS_S[s] for s in selected), deadline - time.monotonic())
            stages.update(run_group(selected, plan_path, env, cap, out))
        for stage in (s for s in group if s in stages):
            print(
                f"{stage:<8} {stages[stage]['status']:<19} {stages[stage]['seconds']:6.1f} s "
                f"{stages[stage].get('error') or ''}",
                flush=True,
            )
    return stages


def _cannot_run(
    stage: str, plan: dict[str, Any], stages: dict[str, dict[str, Any]], left: float, budget_s: float
) -> tuple[str, str] | None:
    """(status, reason) for a stage not to start, or None."""
    if stage == "speech" and not Path(plan["speech_script"]).exists():
        return "not_available", f"benchmarks/{Path(plan['speech_script']).name} is not in this tree yet (issue #17)"
    build = stages.get("build", {"status": "ok"})  # not run yet: it runs first in the same process
    if stage in NEEDS_MODEL and build["status"] != "ok":
        return "skipped", f"needs the model from the build stage ({build['status']})"
    if left < 10:
        return "skipped", f"the {budget_s:.0f} s budget was spent"
    return None


def run_group(
    selected: list[str], plan_path: Path, env: dict[str, str], cap: float, out: Path
) -> dict[str, dict[str, Any]]:
    """One worker process for `selected`, killed at `cap` seconds with every process it started (its own session);
    each stage's record (partial on a timeout)."""
    log_path = out / "logs" / f"{selected[0]}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(selected), "--plan", str(plan_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            returncode: int | None = process.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    elapsed = time.monotonic() - start
    records = {}
    for stage in selected:
        path = out / "stages" / f"{stage}.json"
        record = (
            json.loads(path.read_text())
            if path.exists()
            else {"status": "running", "seconds": 0.0, "error": None, "result": None}
        )
        if record["status"] == "running":  # the process ended inside this stage, or before it
            if returncode is None:
                record["status"], record["error"] = "timeout", f"stopped at the {cap:.4g} s cap of its process"
            else:
                record["status"] = "failed"
                record["error"] = f"process exited with code {returncode}: {_tail(log_path)}"
            record["seconds"] = record["seconds"] or elapsed
        records[stage] = record
    return records


def _tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def install_wheels(wheels: Path, env: dict[str, str]) -> str:
    """pip-install every wheel in `wheels` (no index, no dependencies): for device images that lack some."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *files],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    return f"pip install of {len(files)} wheel(s): exit {done.returncode}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and workloads: checks every stage runs")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument(
        "--out",
        default=str(BENCH_DIR / "results" / "gpu"),
        help="output directory (default benchmarks/results/gpu, which git ignores)",
    )
    parser.add_argument("--model-dir", default=None, help="where the model is written / reused (default OUT/model)")
    parser.add_argument("--experts", type=int, default=None, help="experts per layer (default 16; smoke 4), top-8")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default) / float16 / float32 (smoke default)")
    parser.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32,64; smoke 1,4)")
    parser.add_argument("--attention-backend", default="auto", help="the engine's attention_backend")
    parser.add_argument("--speech-args", default=None, help="arguments for benchmarks/speech.py (one string)")
    parser.add_argument("--hf-experts", default="eager", help="HF experts_implementation where selectable")
    parser.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=None,
        help="memory bandwidth for the floor (default: measured with a device copy)",
    )
    parser.add_argument("--budget-s", type=float, default=470.0, help="all stages together (default 470)")
    parser.add_argument("--wheels", default=None, help="directory of wheels to pip-install first")
    parser.add_argument("--fail-stage", default=None, help="make this stage raise (tests the failure path)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    env = ensure_importable()
    if args.worker:
        run_worker(args.worker.split(","), Path(args.plan))
        return
    from gpu_report import write_report

    start = time.monotonic()
    wheels = install_wheels(Path(args.wheels), env) if args.wheels else None
    plan = make_plan(args)
    stages = run_all(plan, env, args.budget_s)
    build_env = ((stages.get("build") or {}).get("result") or {}).get("environment") or {}
    header = {
        "device": plan["device"],
        "device_name": build_env.get("device_name"),
        "dtype": plan["dtype"],
        "smoke": plan["smoke"],
        "model": f"{'smoke' if plan['smoke'] else '48-layer real-shape'} thinker, {plan['experts']} experts",
        "environment": build_env,
        "wheels": wheels,
        "plan": plan,
        "total_s": time.monotonic() - start,
    }
    write_report(Path(plan["out"]), header, stages)
    print((Path(plan["out"]) / "gpu_report.txt").read_text())


if __name__ == "__main__":
    main()
