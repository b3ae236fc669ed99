"""benchmarks/gpu.py, the one-command GPU report, run end to end on CPU in its smoke mode: every stage is in the
JSON with its numbers, a stage made to fail is recorded as failed (its target "not measured") while the stages
after it still run, and the floor's byte count equals the parameters of the model the benchmark builds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omnistream.engine.checkpoint.default_model import thinker_weight_shapes
from omnistream.engine.checkpoint.model_config import ThinkerConfig
from omnistream.engine.model_executor.loader import default_dtype, load_model
from omnistream.engine.model_executor.models.registry import get_model_class

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

from gpu_floor import decode_step_bytes, expected_experts
from gpu_model import real_shape, smoke_shape, thinker_config, write_checkpoint

STAGES = ("build", "floor", "forward", "decode", "profile", "compare", "parity", "live", "speech", "gputests")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_bench")
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "gpu.py"), "--device", "cpu", "--smoke", "--out", str(out)]
        + ["--fail-stage", "floor", "--stages", ",".join(STAGES[:-1])],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "gpu_report.json").read_text())
    report["_text"] = (out / "gpu_report.txt").read_text()
    return report


def test_every_stage_reports_numbers(smoke_report: dict) -> None:
    stages = smoke_report["stages"]
    assert list(stages) == list(STAGES[:-1])  # gputests: its own test below
    for name in ("build", "forward", "decode", "profile", "compare", "parity", "live"):
        assert stages[name]["status"] == "ok", (name, stages[name]["error"])
    batches = smoke_report["plan"]["batches"]
    decode = stages["decode"]["result"]
    assert [row["batch"] for row in decode["rows"]] == batches
    for row in decode["rows"]:
        assert row["steps"] == smoke_report["plan"]["steps"]
        assert row["step_ms"] > 0
        assert row["output_tok_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1e3))
    assert decode["graphs_on"] is False  # graphs never run on CPU
    forward = stages["forward"]["result"]
    assert [row["batch"] for row in forward["rows"]] == batches
    assert forward["graphs"] == "stand-in"  # CPU: replay reruns the eager forward on the padded buffers
    for row in forward["rows"]:
        assert row["step_ms"] > 0 and row["eager_ms"] > 0 and row["graph"]
        assert row["graph_tokens_equal_eager"] is True
    profile = stages["profile"]["result"]
    assert profile["was_decode_step"] and profile["top_ops"]
    assert all(op["self_ms"] >= 0 and op["calls"] > 0 for op in profile["top_ops"])
    compare = stages["compare"]["result"]
    assert compare["engine_output_tok_s"] > 0 and compare["hf_output_tok_s"] > 0
    assert compare["speedup_vs_hf"] == pytest.approx(compare["hf_elapsed_s"] / compare["engine_elapsed_s"])
    assert compare["greedy_agreement"]["of"] == smoke_report["plan"]["compare"]["num_prompts"]
    parity = stages["parity"]["result"]
    assert parity["of"] == smoke_report["plan"]["parity"]["num_prompts"]
    assert parity["identical"] and parity["identical_requests"] == parity["of"]
    live = stages["live"]["result"]
    assert [row["audio_s"] for row in live["rows"]] == smoke_report["plan"]["live_durations"]
    assert live["short_eos_to_first_ms"] > 0 and live["long_eos_to_first_ms"] > 0
    speech_present = (BENCH_DIR / "speech.py").exists()
    assert stages["speech"]["status"] == ("ok" if speech_present else "not_available")


def test_a_failing_stage_is_recorded_and_the_rest_run(smoke_report: dict) -> None:
    floor = smoke_report["stages"]["floor"]
    assert floor["status"] == "failed"
    assert "failure injected into stage floor" in floor["error"]
    targets = {t["name"]: t for t in smoke_report["targets"]}
    assert targets["floor_fraction_b1"]["status"] == "not measured"
    decode_b1 = next(r for r in smoke_report["stages"]["decode"]["result"]["rows"] if r["batch"] == 1)
    assert targets["decode_step_ms_b1"]["value"] == decode_b1["step_ms"]
    assert targets["decode_step_ms_b1"]["status"] == ("met" if decode_b1["step_ms"] <= 5 else "missed")
    assert targets["fp32_greedy_identical"]["status"] == "met"
    assert "floor    failed" in smoke_report["_text"]


def test_floor_bytes_are_the_parameters_a_step_reads(tmp_path: Path) -> None:
    shape = smoke_shape(experts=4)
    model_dir, _, _ = write_checkpoint(tmp_path, shape, torch.float32, torch.device("cpu"))
    model, config = load_model(model_dir, None, "cpu")
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    decoder = {name: p.numel() for name, p in model.named_parameters() if not name.startswith(("audio", "visual"))}
    experts = sum(n for name, n in decoder.items() if ".mlp.w13" in name or ".mlp.w2" in name)
    rest = sum(n for name, n in decoder.items() if "embed_tokens" not in name) - experts
    every_expert = decode_step_bytes(text, batch=10_000, context=0, element_size=4)
    assert every_expert["dense"] + every_expert["lm_head"] == 4 * rest
    assert every_expert["experts"] == pytest.approx(4 * experts)
    one = decode_step_bytes(text, batch=1, context=7, element_size=2)
    assert one["experts"] == pytest.approx(2 * experts * shape.top_k / shape.experts)
    kv_per_token = 2 * config.text.num_key_value_heads * config.text.head_dim * config.text.num_hidden_layers
    assert one["kv_cache"] == 2 * 8 * kv_per_token
    assert expected_experts(shape.experts, shape.top_k, 1) == pytest.approx(shape.top_k)


def test_the_real_shape_config_builds_our_model_with_every_checkpoint_tensor() -> None:
    """The GPU run's config (48 layers, 16 experts, the real audio tower) is valid for our model classes, and the
    checkpoint the benchmark writes for it holds exactly the model's parameters (built on meta: no memory)."""
    config = thinker_config(real_shape(experts=16), "bfloat16")
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = get_model_class(config)(ThinkerConfig.from_dict(config), "auto")
    params = dict(model.named_parameters())
    assert model.num_layers == 48
    assert tuple(params["model.layers.47.mlp.w13"].shape) == (16, 2 * 768, 2048)
    written = sum(math.prod(dims) for dims in thinker_weight_shapes(config).values())
    assert written == sum(p.numel() for p in params.values())


def test_a_stage_past_its_cap_is_killed_and_recorded_as_timeout(tmp_path: Path) -> None:
    import gpu

    plan = gpu.make_plan(gpu.build_parser().parse_args(["--device", "cpu", "--smoke", "--out", str(tmp_path)]))
    for sub in ("stages", "logs"):
        (tmp_path / sub).mkdir()
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    start = time.monotonic()
    records = gpu.run_group(["build", "floor"], plan_path, gpu.ensure_importable(), 0.5, tmp_path)
    assert time.monotonic() - start < 5
    assert [r["status"] for r in records.values()] == ["timeout", "timeout"]
    assert "0.5 s cap" in records["build"]["error"]


def test_gpu_tests_stage_counts_passes_skips_and_failures(tmp_path: Path) -> None:
    from gpu_tests import run_gpu_tests

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\ndef test_ok():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_broken():\n    assert 1 == 2, 'kernel differs'\n\n"
        "@pytest.mark.gpu\n@pytest.mark.skip(reason='no device')\ndef test_skipped():\n    pass\n\n"
        "def test_not_gpu():\n    pass\n"
    )
    (tmp_path / "tests" / "test_cpu_only.py").write_text("def test_cpu():\n    pass\n")
    result = run_gpu_tests(tmp_path, tmp_path)
    assert result["files"] == ["tests/test_fake.py"]
    assert (result["tests"], result["passed"], result["skipped"]) == (3, 1, 1)
    assert [f["test"].rsplit("::", 1)[1] for f in result["failed"]] == ["test_broken"]
    assert "kernel differs" in result["failed"][0]["message"]


def test_the_report_reads_partial_stage_results() -> None:
    """A stage cut off mid-way leaves a partial result (what it emitted so far); the report still renders, and the
    targets that need the missing figures are "not measured"."""
    from gpu_report import evaluate, summary

    stages = {
        "decode": {
            "status": "timeout",
            "seconds": 9.0,
            "error": "stopped",
            "result": {
                "load_s": 1.0,
                "runner_setup_s": 0.1,
                "graphs_on": True,
                "attention_backend": "triton",
                "context": 8,
                "rows": [{"batch": 1, "step_ms": 4.0, "p10_ms": 3.9, "p90_ms": 4.2, "steps": 3, "output_tok_s": 250.0}],
            },
        },
        "compare": {
            "status": "timeout",
            "seconds": 9.0,
            "error": "stopped",
            "result": {"workload": {}, "engine_elapsed_s": 2.0, "engine_output_tok_s": 100.0},
        },
        "live": {"status": "failed", "seconds": 1.0, "error": "boom", "result": {}},
    }
    targets = {t["name"]: t for t in evaluate(stages)}
    assert targets["decode_step_ms_b1"]["status"] == "met"
    assert {targets[name]["status"] for name in ("output_tok_s_b32", "speedup_vs_hf", "live_short_ms")} == {
        "not measured"
    }
    text = summary({"stages": stages, "targets": list(targets.values())})
    assert "ours 100 out tok/s (HF not measured)" in text and "decode   timeout" in text


def test_speech_stage_records_the_table_of_benchmarks_speech(tmp_path: Path) -> None:
    """The speech stage runs benchmarks/speech.py's command line (a stand-in here, printing a table as it does)
    with the plan's arguments and keeps its rows; a failing script is an error naming its exit code."""
    from gpu_stages import stage_speech

    script = tmp_path / "speech.py"
    script.write_text(
        "import sys\n"
        "print('engine start-up: 1.00 s')\n"
        "print('| voices | steps | ms |')\n"
        "print('|---|---|---|')\n"
        "for v in sys.argv[sys.argv.index('--voices') + 1:]:\n"
        "    print(f'| {v} | 1 (max 1) | {int(v) * 10}.0 |')\n"
    )
    plan = {"speech_script": str(script), "speech_args": ["--voices", "1", "8"], "out": str(tmp_path)}
    result = stage_speech(plan, lambda partial: None)
    assert result["rows"] == [["1", "1 (max 1)", "10.0"], ["8", "1 (max 1)", "80.0"]]
    assert "engine start-up" in (tmp_path / "speech.log").read_text()
    script.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="code 3"):
        stage_speech(plan, lambda partial: None)


def test_the_model_is_reused_only_for_the_same_spec_and_nothing_else_is_removed(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not the benchmark's")
    cpu = torch.device("cpu")
    model_dir, _, reused = write_checkpoint(tmp_path, smoke_shape(experts=4), torch.float32, cpu)
    first_write = (model_dir / "config.json").stat().st_mtime_ns
    assert not reused
    assert write_checkpoint(tmp_path, smoke_shape(experts=4), torch.float32, cpu)[2]
    assert (model_dir / "config.json").stat().st_mtime_ns == first_write
    assert not write_checkpoint(tmp_path, smoke_shape(experts=2), torch.float32, cpu)[2]
    assert json.loads((model_dir / "config.json").read_text())["text_config"]["num_experts"] == 2
    assert (tmp_path / "notes.txt").exists()
