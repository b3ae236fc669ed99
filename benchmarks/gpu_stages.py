"""The GPU benchmark's stage bodies and the worker that runs them (benchmarks/gpu.py starts one worker process per
group of stages): each stage reads the plan, may emit partial results as it goes, and returns its result; the
worker writes stages/<stage>.json (status ok / failed / missing_dependency / skipped, seconds, error, result) and
turns an exception into a recorded failure so the next stage runs. Imports of torch and the engine happen inside
the stages, so a missing dependency is reported per stage."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

NEEDS_MODEL = ("floor", "forward", "decode", "profile", "compare", "live")
_reused: dict[str, Any] = {}  # what later stages of the same worker process take over (the model, the decode bench)


def stage_build(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    import torch
    from gpu_model import copy_tokenizer, real_shape, smoke_shape, write_checkpoint

    device = torch.device(plan["device"])
    shape = smoke_shape(plan["experts"]) if plan["smoke"] else real_shape(plan["experts"])
    start = time.perf_counter()
    model_dir, hf_dir, reused = write_checkpoint(
        Path(plan["model_dir"]).parent, shape, getattr(torch, plan["dtype"]), device
    )
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    tokenizer_error = copy_tokenizer(model_dir)
    return {
        "model_dir": str(model_dir),
        "hf_dir": str(hf_dir),
        "reused": reused,
        "write_s": time.perf_counter() - start,
        "checkpoint_gb": size / 1e9,
        "tokenizer": tokenizer_error or "copied",
        "shape": shape.__dict__,
        "environment": environment(device),
    }


def environment(device: Any) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": "cpu",
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["device_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    for module in ("transformers", "triton", "msgspec", "zmq", "llguidance", "av", "pytest"):
        try:
            env[module] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            env[module] = None
    return env


def stage_floor(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    import torch
    from gpu_floor import floor_rows, measure_bandwidth

    device = torch.device(plan["device"])
    text = json.loads((Path(plan["model_dir"]) / "config.json").read_text())["text_config"]
    measured = measure_bandwidth(device, plan["bandwidth_bytes"])
    bandwidth = plan["bandwidth_gbps"] * 1e9 if plan["bandwidth_gbps"] else measured
    element = torch.empty((), dtype=getattr(torch, plan["dtype"])).element_size()
    return {
        "measured_bandwidth_gbps": measured / 1e9,
        "bandwidth_gbps": bandwidth / 1e9,
        "context": plan["context"],
        "rows": floor_rows(text, plan["batches"], plan["context"], element, bandwidth),
    }


def loaded_model(plan: dict[str, Any]) -> tuple[Any, float]:
    """The benchmark model, loaded once per worker process, and the seconds its load took."""
    if "model" not in _reused:
        import torch
        from omnistream.engine.model_executor.loader import load_model

        start = time.perf_counter()
        device = torch.device(plan["device"])
        _reused["model"] = load_model(Path(plan["model_dir"]), plan["dtype"], device, plan["attention_backend"])[0]
        _reused["load_s"] = time.perf_counter() - start
    return _reused["model"], _reused["load_s"]


def stage_forward(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    import torch
    from gpu_forward import forward_rows

    model, load_s = loaded_model(plan)
    device = torch.device(plan["device"])
    result = forward_rows(
        model,
        device,
        plan["batches"],
        plan["context"],
        plan["steps"],
        lambda partial: emit({"load_s": load_s, **partial}),
    )
    return {"load_s": load_s, **result}


def _decode_bench(plan: dict[str, Any]) -> Any:
    import torch
    from gpu_decode import DecodeBench

    if "bench" not in _reused:
        max_batch = max(plan["batches"] + [plan["profile_batch"]])
        model = loaded_model(plan)[0]
        _reused["bench"] = DecodeBench(model, torch.device(plan["device"]), max_batch, plan["context"], plan["steps"])
    return _reused["bench"]


def stage_decode(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    from gpu_decode import decode_rows

    bench = _decode_bench(plan)
    header = {
        "load_s": _reused["load_s"],
        "runner_setup_s": bench.runner_setup_s,
        "graphs_on": bench.graphs_on,
        "attention_backend": bench.model.attention_backend,
        "context": plan["context"],
    }
    emit(header)
    rows = decode_rows(bench, plan["batches"], plan["steps"], lambda rows: emit({**header, "rows": rows}))
    return {**header, "rows": rows}


def stage_profile(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    from gpu_profile import profile_decode_step

    return profile_decode_step(_decode_bench(plan), plan["profile_batch"], Path(plan["out"]) / "profile.txt")


def stage_compare(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    from gpu_compare import engine_vs_hf

    return engine_vs_hf(
        Path(plan["model_dir"]),
        Path(plan["hf_dir"]),
        plan["device"],
        plan["dtype"],
        plan["attention_backend"],
        plan["compare"],
        plan["hf_batch_size"],
        plan["hf_experts"],
        emit,
    )


def stage_parity(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    from gpu_compare import tiny_parity

    spec = plan["parity"]
    return tiny_parity(plan["device"], spec["num_prompts"], tuple(spec["input_range"]), tuple(spec["output_range"]))


def stage_live(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    from gpu_live import live_latency

    return live_latency(
        Path(plan["model_dir"]), plan["device"], plan["dtype"], plan["live_durations"], plan["cpu_threads"]
    )


def stage_speech(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    """benchmarks/speech.py as its own command line has it (it prints a Markdown table): the rows, and the output."""
    command = [sys.executable, plan["speech_script"], *plan["speech_args"]]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    (Path(plan["out"]) / "speech.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"speech.py exited with code {done.returncode}: {done.stderr.strip()[-500:]}")
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and line[2:3].isdigit()
    ]
    return {"args": plan["speech_args"], "rows": rows, "output": done.stdout[-4000:]}


def stage_gputests(plan: dict[str, Any], emit: Callable[[dict], None]) -> dict[str, Any]:
    from gpu_tests import run_gpu_tests

    return run_gpu_tests(REPO_ROOT, Path(plan["out"]))


BODIES: dict[str, Callable[[dict[str, Any], Callable[[dict], None]], dict[str, Any]]] = {
    "build": stage_build,
    "floor": stage_floor,
    "forward": stage_forward,
    "decode": stage_decode,
    "profile": stage_profile,
    "compare": stage_compare,
    "parity": stage_parity,
    "live": stage_live,
    "speech": stage_speech,
    "gputests": stage_gputests,
}


def run_worker(stages: list[str], plan_path: Path) -> None:
    """Run `stages` in this process, each result written to stages/<stage>.json as it comes; a stage that needs
    the model is skipped when the build before it failed."""
    plan = json.loads(plan_path.read_text())
    if plan["cpu_threads"]:
        import torch

        torch.set_num_threads(plan["cpu_threads"])
    stage_dir = Path(plan["out"]) / "stages"
    build_status = "ok"
    for stage in stages:
        path = stage_dir / f"{stage}.json"
        start = time.perf_counter()
        if stage in NEEDS_MODEL and build_status != "ok":
            _write_stage(path, "skipped", 0.0, f"needs the model from the build stage ({build_status})", None)
            continue

        def emit(partial: dict, path: Path = path, start: float = start) -> None:
            _write_stage(path, "running", time.perf_counter() - start, None, partial)

        emit({})
        try:
            if plan["fail_stage"] == stage:
                raise RuntimeError(f"failure injected into stage {stage} (--fail-stage)")
            result = BODIES[stage](plan, emit)
            status, error = "ok", None
        except ImportError as exc:
            traceback.print_exc()
            missing = getattr(exc, "name", None)
            status, result = "missing_dependency", None
            error = (
                f"missing module {missing!r} (--wheels DIR installs wheels first): {exc}"
                if missing
                else (f"import failed: {exc}")
            )
        except Exception as exc:  # noqa: BLE001 - a stage's failure is recorded; the next stage still runs
            traceback.print_exc()
            status, error, result = "failed", f"{type(exc).__name__}: {exc}", None
        build_status = status if stage == "build" else build_status
        partial = json.loads(path.read_text()).get("result")
        _write_stage(path, status, time.perf_counter() - start, error, result if result is not None else partial)


def _write_stage(path: Path, status: str, seconds: float, error: str | None, result: dict | None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"status": status, "seconds": seconds, "error": error, "result": result}, default=str))
    tmp.replace(path)
