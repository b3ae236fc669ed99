"""`omnistream serve` as a real process: SIGTERM lets the answer in flight finish, then the server and its
engine-core process exit (no orphan); a killed engine core ends the answer in flight with engine_dead, then the
server exits with ENGINE_DEAD_EXIT_CODE for its supervisor to restart it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from omnistream.engine.entrypoints.serve import ENGINE_DEAD_EXIT_CODE
from tests.processes import gone_within

from .server_fixture import API_KEY, AUTH, http_client, running_server


def _start_server() -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnistream.engine.entrypoints.cli", "serve", "--port", "0", "--api-key", API_KEY,
         "--dtype", "float32", "--num-kv-blocks", "64", "--log-level", "info"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], pattern: str, proc: subprocess.Popen, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if match := re.search(pattern, line):
                return match
        assert proc.poll() is None, "".join(lines)
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the server log:\n{''.join(lines)}")


def test_sigterm_drains_the_answer_in_flight_then_exits_with_its_engine_core():
    proc, lines = _start_server()
    try:
        core = int(_wait_for(lines, r"engine core ready in process (\d+)", proc).group(1))
        url = _wait_for(lines, r"Uvicorn running on (http://\S+)", proc).group(1)
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 60, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60) as response:
            events = response.iter_lines()
            assert next(events).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            chunks = [json.loads(line[6:]) for line in events if line.startswith("data: {")]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] == "length"  # the answer in flight ran to its end
        assert proc.wait(60) == 0, "".join(lines)
        assert gone_within(core, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_engine_core_makes_the_server_exit_with_its_code_for_a_supervisor():
    proc, lines = _start_server()
    try:
        core = int(_wait_for(lines, r"engine core ready in process (\d+)", proc).group(1))
        url = _wait_for(lines, r"Uvicorn running on (http://\S+)", proc).group(1)
        body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60) as response:
            events = response.iter_lines()
            assert next(events).startswith("data: ")
            os.kill(core, signal.SIGKILL)
            rest = list(events)
        assert any('"engine_dead"' in line for line in rest)  # the answer in flight fails, it does not hang
        assert proc.wait(60) == ENGINE_DEAD_EXIT_CODE, "".join(lines)
        assert any("exiting with code 3 so that a supervisor restarts the server" in line for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_engine_core_turns_health_and_requests_into_503_within_seconds():
    with running_server("--dtype", "float32", "--num-kv-blocks", "64") as server:
        with http_client(server) as client:
            body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 400, "ignore_eos": True,
                    "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                events = response.iter_lines()
                assert next(events).startswith("data: ")
                os.kill(server.llm.core.pid, signal.SIGKILL)
                killed = time.monotonic()
                rest = list(events)  # the stream in flight ends with an error event, it does not hang
            assert any('"engine_dead"' in line for line in rest) and time.monotonic() - killed < 10
            while client.get("/health").status_code != 503:
                assert time.monotonic() - killed < 5
                time.sleep(0.05)
            assert client.get("/ready").status_code == 503
            refused = client.post("/v1/chat/completions", json={"messages": body["messages"], "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
