"""benchmarks/compare_servers.py run briefly with vLLM disabled (omnistream alone, a tiny workload, as a
subprocess like a user would): the JSON and the printed table carry every metric and key, the values are
sane, the server is gone afterwards; and its ServerProcess stops a whole process group and the
descendants that left it, children that ignore SIGTERM included, and reports a server that dies before it
is ready with its log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare_servers  # noqa: E402
from server_process import ServerProcess, free_port  # noqa: E402

LEVELS = (1, 2)
NUM_PROMPTS = 2
OUTPUT_LEN = 3


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "compare.json"
    argv = [sys.executable, str(BENCHMARKS / "compare_servers.py"), "--no-vllm",
            "--max-concurrency", ",".join(map(str, LEVELS)), "--num-prompts", str(NUM_PROMPTS), "--input-len", "8",
            "--output-len", str(OUTPUT_LEN), "--num-warmups", "0", "--agreement-prompts", "1",
            "--agreement-tokens", "2", "--max-model-len", "64", "--max-num-batched-tokens", "64",
            "--omnistream-threads", "1", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "VLLM_PYTHON": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_json_has_every_key_and_sane_values(run):
    _, result = run
    for key in ("date", "git_sha", "git_dirty", "versions", "machine", "config", "vllm", "servers", "agreement",
                "comparison", "table_markdown", "offline", "wall_s"):
        assert key in result, key
    assert result["vllm"]["found"] is False and "--no-vllm" in result["vllm"]["how"]
    assert set(result["servers"]) == {"omnistream"} and result["agreement"] is None
    assert result["versions"]["torch"] and result["versions"]["omnistream"]
    ours = result["servers"]["omnistream"]
    assert ours["env"]["OMP_NUM_THREADS"] == "1" and "--no-enable-prefix-caching" in ours["command"]
    assert ours["startup_s"] > 0 and len(ours["loadavg_before"]) == 3 and len(ours["loadavg_after"]) == 3
    assert len(ours["greedy_texts"]) == 1 and ours["greedy_texts"][0]
    assert [level["max_concurrency"] for level in ours["levels"]] == list(LEVELS)
    for level in ours["levels"]:
        run_result = level["runs"][0]
        assert run_result["completed"] == NUM_PROMPTS and run_result["failed"] == 0, run_result["failure_reasons"]
        assert run_result["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS  # ignore_eos: exactly the asked length
        assert run_result["max_concurrent_requests"] <= level["max_concurrency"]
        median = level["median"]
        assert median["request_throughput"] > 0 and median["output_throughput"] > median["request_throughput"]
        for metric in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < median[f"mean_{metric}_ms"] <= median[f"p99_{metric}_ms"] * 1.0001, metric
        assert median["mean_ttft_ms"] < median["mean_e2el_ms"]


def test_comparison_rows_and_table(run):
    stdout, result = run
    metrics = [key for key, _, _ in compare_servers.TABLE_METRICS]
    rows = result["comparison"]
    assert [(row["max_concurrency"], row["metric"]) for row in rows] == [(c, m) for c in LEVELS for m in metrics]
    medians = {level["max_concurrency"]: level["median"] for level in result["servers"]["omnistream"]["levels"]}
    for row in rows:
        assert row["omnistream"] == medians[row["max_concurrency"]][row["metric"]]
        assert row["vllm"] is None and row["ratio_ours_vllm"] is None
    table = result["table_markdown"].splitlines()
    assert table[0].startswith("| max concurrency | metric | omnistream |") and "ours/vLLM" in table[0]
    assert len(table) == 2 + len(rows)
    for label in (label for _, label, _ in compare_servers.TABLE_METRICS):
        assert sum(label in line for line in table) == len(LEVELS), label
    assert "vLLM was not run" in stdout and result["table_markdown"] in stdout


def test_server_is_gone_afterwards(run):
    _, result = run
    assert not _port_open(result["servers"]["omnistream"]["url"])


_GROUP_SERVER = textwrap.dedent("""
    import http.server, os, signal, sys, time
    for own_session in (False, True):  # stuck workers ignoring SIGTERM: one in the group, one in its own session
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if own_session:
                os.setsid()
            open(sys.argv[2] + str(own_session), "w").write(str(os.getpid()))
            while True:
                time.sleep(1)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ready = all(os.path.exists(sys.argv[2] + str(own)) for own in (False, True))
            self.send_response(200 if ready else 503)
            self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_server_process_stops_the_whole_group_and_its_descendants(tmp_path):
    port = free_port()
    prefix = str(tmp_path / "worker")
    argv = [sys.executable, "-c", _GROUP_SERVER, str(port), prefix]
    with ServerProcess("group", argv, port, tmp_path / "log.txt", ready_timeout_s=30, stop_timeout_s=2) as server:
        leader = server.process.pid
        workers = [int(Path(prefix + own).read_text()) for own in ("False", "True")]
        assert _alive(leader) and all(map(_alive, workers))
        assert os.getpgid(workers[0]) == leader != os.getpgid(workers[1])
    try:
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:  # SIGKILLed; reaped by init
            time.sleep(0.05)
        assert not _alive(leader) and not any(map(_alive, workers))
        assert server.process is None and not _port_open(server.url)
    finally:  # a failure here leaves no stray process behind
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


def test_server_that_dies_before_ready_reports_its_log(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('no such model'); sys.exit(3)"]
    server = ServerProcess("broken", argv, free_port(), tmp_path / "log.txt", ready_timeout_s=30)
    with pytest.raises(RuntimeError, match=r"exited with status 3(.|\n)*no such model"):
        with server:
            pass
    assert server.process is None
