"""benchmarks/serve.py run briefly against the real server, HTTP and gRPC on one engine (text, image and
audio over streaming chat, completions, gRPC Generate with media bytes, live gRPC Sessions paced in 100 ms
chunks): every key its docstring documents is in the JSON with sane values, failures carry their reasons,
--plot writes the CDF PNGs, and sweep.py finds the knee of chat and of live streams."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pytest

from omnistream.engine.entrypoints.grpc_server import GrpcServer

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


def _expand(block: str) -> set[str]:
    keys = set()
    for word in block.split():
        parts = re.split(r"\{([^}]*)\}", word)  # "{a,b}_{c,d}_ms" -> ["", "a,b", "_", "c,d", "_ms"]
        choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
        keys.update("".join(c) for c in itertools.product(*choices))
    return keys


def documented_keys() -> set[str]:
    """The result keys the module docstring promises: the vLLM list (braces expanded) plus ours."""
    doc = serve.__doc__
    keys = _expand(doc.split("has the keys of `vllm bench serve`:")[1].split("\n(")[0])
    ours = doc.split("plus ours:")[1].split(". Input lengths")[0]
    keys.update(re.findall(r"`([a-z_]+)`", ours))
    return keys


def documented_live_keys() -> set[str]:
    """The keys the docstring promises for --backend grpc-session, on top of the others."""
    return _expand(serve.__doc__.split("`--backend realtime` add the live-audio keys:")[1].split("\nwhere")[0])


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "128",
                        "--max-num-batched-tokens", "256") as running:
        yield running


@pytest.fixture(scope="module")
def grpc_target(server):
    """The gRPC API beside the HTTP one, on the same engine (as `serve --grpc-port`)."""
    grpc_server = GrpcServer(server.llm, argparse.Namespace(**{**vars(server.args), "grpc_port": 0}))
    port = grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(grace=1)


def _run(server, *flags: str) -> dict:
    args = serve.parse_args(["--base-url", server.url, "--api-key", API_KEY, "--disable-summary", *flags])
    return asyncio.run(serve.benchmark(args))


CHAT_LOAD = ("--dataset-name", "random,image,audio", "--num-prompts", str(NUM_PROMPTS), "--num-warmups", "1",
             "--request-rate", "4", "--max-concurrency", "4", "--random-input-len", "8:24", "--random-output-len", "3:6",
             "--ignore-eos", "--image-sizes", "32x32,48x32", "--audio-seconds", "0.5:1", "--seed", "7")


@pytest.fixture(scope="module")
def chat_result(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-bench")
    result = _run(server, "--backend", "openai-chat", *CHAT_LOAD, "--goodput", "ttft:60000", "tpot:60000",
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


def test_realtime_needs_a_model_and_speech():
    with pytest.raises(SystemExit, match="--model"):
        asyncio.run(serve.benchmark(serve.parse_args(["--backend", "realtime", "--num-prompts", "1"])))
    with pytest.raises(SystemExit):
        serve.parse_args(["--backend", "realtime", "--dataset-name", "random"])


def _check_common(saved: dict, n: int, output_range: tuple[int, int]) -> None:
    """What every successful run's JSON must show, whatever the backend."""
    assert saved["completed"] == n and saved["failed"] == 0, saved["failure_reasons"]
    assert saved["errors"] == [""] * n and saved["failure_reasons"] == {}
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s"):
        assert saved[key] > 0, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < saved[f"p50_{metric}_ms"] <= saved[f"p90_{metric}_ms"] <= saved[f"p99_{metric}_ms"], metric
        assert saved[f"median_{metric}_ms"] == saved[f"p50_{metric}_ms"] and saved[f"std_{metric}_ms"] >= 0
    assert all(0 < t <= e for t, e in zip(saved["ttfts"], saved["latencies"]))
    low, high = output_range
    assert all(low <= k <= high for k in saved["output_lens"]) and sum(saved["output_lens"]) == saved["total_output_tokens"]
    assert all(len(gaps) <= k - 1 for gaps, k in zip(saved["itls"], saved["output_lens"]))
    assert all(k > 0 for k in saved["input_lens"]) and sum(saved["input_lens"]) == saved["total_input_tokens"]
    assert all(len(saved[k]) == n for k in ("ttfts", "latencies", "start_times", "generated_texts", "itls"))
    assert re.fullmatch(r"[0-9a-f]{40}", saved["git_sha"] or "0" * 40) and saved["config"]["api_key"] == "<redacted>"


def test_grpc_backend_sends_the_same_prompts_as_chat(server, grpc_target, chat_result, tmp_path):
    """The same seeded workload over gRPC Generate: the media travel as bytes, so the server counts exactly the
    prompt tokens it counted over HTTP chat."""
    _run(server, "--backend", "grpc", "--grpc-target", grpc_target, *CHAT_LOAD, "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "grpc.json")
    saved = json.loads((tmp_path / "grpc.json").read_text())
    assert documented_keys() <= set(saved), sorted(documented_keys() - set(saved))
    assert not documented_live_keys() & set(saved)
    _check_common(saved, NUM_PROMPTS, (3, 6))
    assert saved["backend"] == "grpc" and saved["model_id"] == chat_result[1]["model_id"]
    assert saved["input_lens"] == chat_result[1]["input_lens"] and saved["output_lens"] == chat_result[1]["output_lens"]
    assert saved["modality_counts"] == {m: {"requested": 2, "completed": 2, "failed": 0} for m in ("random", "image", "audio")}
    one = ("--backend", "grpc", "--grpc-target", grpc_target, "--num-prompts", "1", "--num-warmups", "0",
           "--random-input-len", "4", "--random-output-len", "2", "--ignore-eos", "--disable-tqdm")
    text = _run(server, *one, "--dataset-name", "random")
    video = _run(server, *one, "--dataset-name", "video", "--video-frames", "2", "--video-size", "32x32",
                 "--video-fps", "2", "--video-audio", "with")  # the same text (the seed draws it first) + 1 s of video
    assert text["completed"] == video["completed"] == 1
    assert video["input_lens"][0] > text["input_lens"][0] + 13  # frames, and the soundtrack's 13 audio tokens


@pytest.fixture(scope="module")
def live_result(server, grpc_target, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-bench-live")
    _run(server, "--backend", "grpc-session", "--grpc-target", grpc_target, "--num-prompts", "3", "--num-warmups", "1",
         "--max-concurrency", "2", "--audio-seconds", "0.6:1.0", "--pace", "2", "--random-output-len", "3:4",
         "--ignore-eos", "--seed", "3", "--save-result", "--result-dir", str(out), "--result-filename", "live.json",
         "--plot", "--disable-tqdm")
    return json.loads((out / "live.json").read_text())


def test_grpc_session_backend_reports_live_audio_metrics(live_result):
    saved = live_result
    keys = documented_keys() | documented_live_keys()
    assert {"p99_eos_ttft_ms", "p50_chunk_lag_ms", "audio_seconds_per_s"} <= keys
    assert keys <= set(saved), sorted(keys - set(saved))
    _check_common(saved, 3, (3, 4))
    assert saved["backend"] == "grpc-session" and saved["modality_counts"] == {"audio": {"requested": 3, "completed": 3, "failed": 0}}
    seconds = [len(lags) for lags in saved["chunk_lags"]]  # one lag per 100 ms chunk
    assert all(6 <= k <= 10 for k in seconds)
    assert 0.6 * 3 <= saved["total_audio_seconds"] <= 1.0 * 3
    assert saved["total_audio_seconds"] == pytest.approx(sum(seconds) * 0.1, abs=0.3)
    assert saved["audio_seconds_per_s"] == pytest.approx(saved["total_audio_seconds"] / saved["duration"])
    for eos, ttft, chunks in zip(saved["eos_ttfts"], saved["ttfts"], seconds):
        assert 0 < eos < ttft and ttft >= (chunks - 1) * 0.1 / 2  # speech paced at 2x ends before the first token
    lags = [lag for per_request in saved["chunk_lags"] for lag in per_request]
    assert all(lag >= 0 for lag in lags) and saved["max_chunk_lag_ms"] == pytest.approx(max(lags) * 1000)
    for metric in ("eos_ttft", "chunk_lag"):
        assert 0 <= saved[f"p50_{metric}_ms"] <= saved[f"p90_{metric}_ms"] <= saved[f"p99_{metric}_ms"], metric
        assert saved[f"median_{metric}_ms"] == saved[f"p50_{metric}_ms"]
    assert saved["p50_eos_ttft_ms"] > 0 and saved["config"]["pace"] == 2 and saved["config"]["chunk_ms"] == 100


def test_grpc_session_plots(live_result):
    pytest.importorskip("matplotlib")
    names = sorted(Path(p).name for p in live_result["plots"])
    assert names == [f"live-{m}-cdf.png" for m in ("chunk_lag", "e2el", "eos_ttft", "itl", "tpot", "ttft")]


def test_realtime_backend_streams_speech_over_the_websocket(server):
    result = _run(server, "--backend", "realtime", "--model", "omnistream-tiny", "--num-prompts", "2",
                  "--num-warmups", "0", "--max-concurrency", "2", "--audio-seconds", "0.6:0.8", "--pace", "2",
                  "--random-output-len", "3", "--seed", "5", "--disable-tqdm")
    assert documented_keys() | documented_live_keys() <= set(result)
    assert result["completed"] == 2 and result["failed"] == 0, result["failure_reasons"]
    assert result["total_output_tokens"] == 2 * 3  # max_output_tokens reached the session
    assert all(6 <= len(lags) <= 8 for lags in result["chunk_lags"])  # one per 100 ms chunk
    for eos, ttft in zip(result["eos_ttfts"], result["ttfts"]):
        assert 0 < eos < ttft
    wrong = serve.parse_args(["--base-url", server.url, "--api-key", "wrong", "--backend", "realtime", "--model",
                              "omnistream-tiny", "--num-prompts", "1", "--num-warmups", "0", "--audio-seconds", "0.3",
                              "--pace", "4", "--disable-tqdm", "--disable-summary"])
    refused = asyncio.run(serve.benchmark(wrong))
    assert refused["failed"] == 1 and "401" in next(iter(refused["failure_reasons"]))


def test_grpc_failures_are_counted_with_reasons(server, grpc_target):
    for backend in ("grpc", "grpc-session"):
        args = serve.parse_args(["--backend", backend, "--grpc-target", grpc_target, "--api-key", "wrong",
                                 "--model", "omnistream-tiny", "--num-prompts", "2", "--num-warmups", "0",
                                 "--audio-seconds", "0.3", "--pace", "4", "--disable-tqdm", "--disable-summary"])
        result = asyncio.run(serve.benchmark(args))
        assert result["completed"] == 0 and result["failed"] == 2, backend
        [(reason, count)] = result["failure_reasons"].items()
        assert count == 2 and reason.startswith("gRPC UNAUTHENTICATED: missing or invalid API key"), reason


def test_grpc_backends_need_a_target_and_sessions_need_audio():
    with pytest.raises(SystemExit):
        serve.parse_args(["--backend", "grpc"])
    with pytest.raises(SystemExit):
        serve.parse_args(["--backend", "grpc-session", "--grpc-target", "x:1", "--dataset-name", "random"])
    assert serve.parse_args(["--backend", "grpc-session", "--grpc-target", "x:1"]).dataset_name == ["audio"]


def _load_sweep():
    path_before = list(sys.path)
    spec = importlib.util.spec_from_file_location("omnistream_bench_sweep", SERVE_PY.parent / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)  # it puts benchmarks/ on sys.path to import serve.py
    sys.path[:] = path_before
    return sweep


def test_sweep_finds_the_knee(server, tmp_path):
    sweep = _load_sweep()
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


def test_sweep_of_live_streams_finds_the_knee(server, grpc_target, tmp_path):
    sweep = _load_sweep()
    out = tmp_path / "live.json"
    args = sweep.build_parser().parse_args(["--concurrency", "1,2", "--slo", "eos_ttft:60000", "chunk_lag:60000",
                                            "--out", str(out), "--plot"])
    summary = asyncio.run(sweep.sweep(args, [
        "--backend", "grpc-session", "--grpc-target", grpc_target, "--api-key", API_KEY, "--num-prompts", "2",
        "--num-warmups", "0", "--audio-seconds", "0.5", "--pace", "2", "--random-output-len", "2", "--ignore-eos",
        "--disable-tqdm"]))
    assert [row["max_concurrency"] for row in summary["points"]] == [1, 2] and summary["knee"] == 2
    for row in summary["points"]:
        assert row["meets_slo"] and row["audio_seconds_per_s"] > 0 and row["p99_eos_ttft_ms"] > 0
        assert 0 <= row["median_chunk_lag_ms"] <= row["p99_chunk_lag_ms"] <= row["max_chunk_lag_ms"]
    tight = sweep.build_parser().parse_args(["--concurrency", "1", "--slo", "eos_ttft:0.001"])
    assert asyncio.run(sweep.sweep(tight, [
        "--backend", "grpc-session", "--grpc-target", grpc_target, "--api-key", API_KEY, "--num-prompts", "1",
        "--num-warmups", "0", "--audio-seconds", "0.3", "--pace", "4", "--random-output-len", "2", "--ignore-eos",
        "--disable-tqdm"]))["knee"] is None  # no first token comes within a microsecond of the end of speech
    if importlib.util.find_spec("matplotlib") is not None:
        assert [Path(p).name for p in summary["plots"]] == ["live-throughput.png", "live-latency.png"]


def test_the_knee_is_held_by_every_lower_load():
    sweep = _load_sweep()
    rows = [{"load": 1, "meets_slo": True}, {"load": 2, "meets_slo": False}, {"load": 4, "meets_slo": True}]
    assert sweep.knee_point(rows)["load"] == 1 and sweep.knee_point(rows[1:]) is None


def test_live_slo_needs_the_session_backend():
    sweep = _load_sweep()
    args = sweep.build_parser().parse_args(["--concurrency", "1", "--slo", "chunk_lag:100"])
    with pytest.raises(SystemExit, match="grpc-session"):
        asyncio.run(sweep.sweep(args, ["--backend", "openai-chat"]))
