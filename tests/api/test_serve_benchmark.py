"""benchmarks/serve.py run briefly against the real server (text, image and audio over streaming chat, and
completions): every key its docstring documents is in the JSON with sane values, failures carry their
reasons, and --plot writes the CDF PNGs."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pytest

from .server_fixture import API_KEY, running_server

NUM_PROMPTS = 6
SERVE_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


def _load_serve():
    spec = importlib.util.spec_from_file_location("omnistream_bench_serve", SERVE_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


serve = _load_serve()


def documented_keys() -> set[str]:
    """The result keys the module docstring promises: the vLLM list (braces expanded) plus ours."""
    doc = serve.__doc__
    vllm_block = doc.split("has the keys of `vllm bench serve`:")[1].split("\n(")[0]
    keys = set()
    for word in vllm_block.split():
        parts = re.split(r"\{([^}]*)\}", word)  # "{a,b}_{c,d}_ms" -> ["", "a,b", "_", "c,d", "_ms"]
        choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
        keys.update("".join(c) for c in itertools.product(*choices))
    ours = doc.split("plus ours:")[1].split(". Input lengths")[0]
    keys.update(re.findall(r"`([a-z_]+)`", ours))
    return keys


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "128",
                        "--max-num-batched-tokens", "256") as running:
        yield running


def _run(server, *flags: str) -> dict:
    args = serve.parse_args(["--base-url", server.url, "--api-key", API_KEY, "--disable-summary", *flags])
    return asyncio.run(serve.benchmark(args))


@pytest.fixture(scope="module")
def chat_result(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-bench")
    result = _run(server, "--backend", "openai-chat", "--dataset-name", "random,image,audio",
                  "--num-prompts", str(NUM_PROMPTS), "--num-warmups", "1", "--request-rate", "4",
                  "--max-concurrency", "4", "--random-input-len", "8:24", "--random-output-len", "3:6",
                  "--ignore-eos", "--image-sizes", "32x32,48x32", "--audio-seconds", "0.5:1",
                  "--goodput", "ttft:60000", "tpot:60000", "--seed", "7",
                  "--save-result", "--result-dir", str(out), "--result-filename", "chat.json", "--plot")
    saved = json.loads((out / "chat.json").read_text())
    return result, saved


def test_documented_keys_and_sane_values(chat_result):
    result, saved = chat_result
    keys = documented_keys()
    assert {"request_throughput", "p99_itl_ms", "p50_e2el_ms", "git_sha", "modality_counts"} <= keys
    assert keys <= set(saved), sorted(keys - set(saved))
    assert saved["num_prompts"] == NUM_PROMPTS and saved["completed"] + saved["failed"] == NUM_PROMPTS
    assert saved["failed"] == 0, saved["failure_reasons"]
    assert saved["failure_reasons"] == {} and saved["errors"] == [""] * NUM_PROMPTS
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput",
                "max_output_tokens_per_s", "request_goodput"):
        assert saved[key] > 0, key
    assert saved["request_goodput"] == pytest.approx(saved["request_throughput"])  # SLOs of a minute
    assert saved["total_token_throughput"] > saved["output_throughput"]
    assert 1 <= saved["max_concurrent_requests"] <= 4
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < saved[f"p50_{metric}_ms"] <= saved[f"p90_{metric}_ms"] <= saved[f"p99_{metric}_ms"], metric
        assert saved[f"median_{metric}_ms"] == saved[f"p50_{metric}_ms"] and saved[f"std_{metric}_ms"] >= 0
    assert saved["mean_ttft_ms"] <= saved["mean_e2el_ms"]
    assert all(0 < t <= e for t, e in zip(saved["ttfts"], saved["latencies"]))
    assert all(3 <= n <= 6 for n in saved["output_lens"]) and sum(saved["output_lens"]) == saved["total_output_tokens"]
    assert all(len(gaps) == n - 1 for gaps, n in zip(saved["itls"], saved["output_lens"]))  # one token per delta here
    assert all(n > 0 for n in saved["input_lens"]) and sum(saved["input_lens"]) == saved["total_input_tokens"]
    assert all(len(saved[k]) == NUM_PROMPTS for k in ("ttfts", "latencies", "start_times", "generated_texts"))
    assert saved["modality_counts"] == {m: {"requested": 2, "completed": 2, "failed": 0} for m in ("random", "image", "audio")}
    assert re.fullmatch(r"[0-9a-f]{40}", saved["git_sha"] or "0" * 40)
    assert saved["config"]["num_prompts"] == NUM_PROMPTS and saved["config"]["api_key"] == "<redacted>"
    assert saved["model_id"] and saved["backend"] == "openai-chat" and saved["goodput_config"] == {"ttft": 60000, "tpot": 60000}
    assert result["completed"] == saved["completed"]


def test_plot_writes_pngs(chat_result):
    pytest.importorskip("matplotlib")
    plots = chat_result[1]["plots"]
    assert sorted(Path(p).name for p in plots) == [f"chat-{m}-cdf.png" for m in ("e2el", "itl", "tpot", "ttft")]
    for path in plots:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_completions_backend(server):
    result = _run(server, "--backend", "openai-completions", "--num-prompts", "2", "--num-warmups", "0",
                  "--random-input-len", "8", "--random-output-len", "3", "--ignore-eos", "--disable-tqdm")
    assert result["completed"] == 2 and result["output_lens"] == [3, 3] and result["p99_ttft_ms"] > 0


def test_failures_are_counted_with_reasons(server):
    args = serve.parse_args(["--base-url", server.url, "--api-key", "wrong", "--model", "omnistream-tiny",
                             "--num-prompts", "2", "--num-warmups", "0", "--disable-tqdm", "--disable-summary"])
    result = asyncio.run(serve.benchmark(args))
    assert result["completed"] == 0 and result["failed"] == 2
    assert result["failure_reasons"] == {"HTTP 401: missing or invalid API key": 2}
    assert result["request_throughput"] == 0 and result["p99_ttft_ms"] == 0


def test_grpc_and_realtime_are_not_implemented_yet():
    for backend in ("grpc", "realtime"):
        with pytest.raises(SystemExit, match="not implemented yet"):
            asyncio.run(serve.benchmark(serve.parse_args(["--backend", backend])))


def test_sweep_finds_the_knee(server, tmp_path):
    path_before = list(sys.path)
    spec = importlib.util.spec_from_file_location("omnistream_bench_sweep", SERVE_PY.parent / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)  # it puts benchmarks/ on sys.path to import serve.py
    sys.path[:] = path_before
    out = tmp_path / "sweep.json"
    args = sweep.build_parser().parse_args(["--concurrency", "2,1", "--slo", "ttft:60000", "--out", str(out), "--plot"])
    summary = asyncio.run(sweep.sweep(args, ["--base-url", server.url, "--api-key", API_KEY, "--num-prompts", "2",
                                             "--num-warmups", "0", "--random-input-len", "8", "--random-output-len", "3",
                                             "--ignore-eos", "--disable-tqdm"]))
    assert [row["max_concurrency"] for row in summary["points"]] == [1, 2] and summary["knee"] == 2
    assert all(row["meets_slo"] and row["request_throughput"] > 0 for row in summary["points"])
    assert json.loads(out.read_text())["knee"] == 2
    if importlib.util.find_spec("matplotlib") is not None:
        assert [Path(p).name for p in summary["plots"]] == ["sweep-throughput.png", "sweep-latency.png"]
