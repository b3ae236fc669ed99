"""Reliability of `omnistream serve` (the embedded model, each scenario on a server of its own) under hostile load,
with one summary table:

- KV pressure: N concurrent greedy streams on a KV pool of 10 % of their need; all complete, each output equals
  the same request run alone (on a sample, or all with --solo-sample N), the pool is empty afterwards.
- Mass disconnects: D streams that hang up after their first chunk; everything freed, and the RSS of the server
  and of its engine core before/after (after a warm-up round of the same).
- Malformed inputs: the corpus of malformed_corpus.py over HTTP, Realtime and gRPC: counts of 4xx (or error
  events, client statuses), 5xx (internal errors), hangs and engine deaths.
- Engine-core kill: streams in flight end with engine_dead, then the server exits with its code for a supervisor.
- SIGTERM: the answers in flight finish, then the server and its core exit 0.

    python benchmarks/reliability.py --streams 500 --disconnects 200 --out reliability.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from malformed_corpus import Probe, grpc_probes, http_probes, realtime_probes, wav
from server_process import ServerProcess, free_port
from websockets.asyncio.client import connect

from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc

BLOCK = 16
TIMEOUT_S = 60.0  # an answer later than this is a hang
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED}
ENGINE_DEAD_EXIT_CODE = 3
SERVICE = "/omnistream.v1.Omnistream"


def _server(name: str, log_dir: Path, *flags: str, grpc_port: int | None = None) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "omnistream.engine.entrypoints.cli", "serve", "--port", str(port),
            "--dtype", "float32", "--log-level", "info", *flags]
    if grpc_port is not None:
        argv += ["--grpc-port", str(grpc_port)]
    return ServerProcess(name, argv, port, log_dir / f"{name}.log")


def _core_pid(server: ServerProcess) -> int:
    match = re.search(r"engine core ready in process (\d+)", server.log_path.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"no engine core pid in {server.log_path}")
    return int(match.group(1))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(omnistream_\w+) (\S+)$", text, re.M)}


async def _wait_idle(client: httpx.AsyncClient, timeout: float = 120) -> tuple[dict[str, float], float]:
    """The engine's metrics once no request runs or waits and no KV block is used; and how long that took."""
    start = time.monotonic()
    while True:
        metrics = await _metrics(client)
        idle = not metrics["omnistream_num_requests_running"] and not metrics["omnistream_num_requests_waiting"]
        if (idle and not metrics["omnistream_kv_cache_usage_perc"]) or time.monotonic() - start > timeout:
            return metrics, time.monotonic() - start
        await asyncio.sleep(0.05)


async def _stream_text(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, list[str]]:
    """A streamed completion's text and finish reasons."""
    text, reasons = [], []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    reasons.append(chunk["error"].get("code") or "error")
                for choice in chunk.get("choices", []):
                    text.append(choice["text"])
                    if choice.get("finish_reason"):
                        reasons.append(choice["finish_reason"])
    return "".join(text), reasons


# ---- 1. KV pressure -------------------------------------------------------------------------------------------


async def kv_pressure(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    prompt_len, max_tokens = 16, args.max_tokens
    need = args.streams * math.ceil((prompt_len + max_tokens - 1) / BLOCK)
    pool = max(math.ceil(need * 0.10), math.ceil((prompt_len + max_tokens) / BLOCK))
    rng = random.Random(0)
    prompts = [[1000 + i] + [rng.randrange(1000, 100_000) for _ in range(prompt_len - 1)]
               for i in range(args.streams)]  # a distinct first token: no prefix is shared
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with _server("kv-pressure", log_dir, "--num-kv-blocks", str(pool),
                 "--max-model-len", str(min(256, pool * BLOCK)),
                 "--max-queued-requests", str(args.streams)) as server:
        limits = httpx.Limits(max_connections=args.streams + 8)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            before = await _metrics(client)
            start = time.monotonic()
            results = await asyncio.gather(*(_stream_text(client, {**body, "prompt": p}) for p in prompts))
            elapsed = time.monotonic() - start
            after, _ = await _wait_idle(client)
            sample = rng.sample(range(args.streams), min(args.solo_sample, args.streams))
            equal = 0
            for i in sample:
                solo = (await client.post("/v1/completions", json={**body, "prompt": prompts[i]})).json()
                equal += solo["choices"][0]["text"] == results[i][0]
    complete = sum(reasons == ["length"] for _, reasons in results)
    return {"streams": args.streams, "max_tokens": max_tokens, "blocks_needed": need, "pool_blocks": pool,
            "completed": complete, "solo_checked": len(sample), "equal_to_solo": equal,
            "preemptions": after["omnistream_num_preemptions_total"] - before["omnistream_num_preemptions_total"],
            "kv_usage_after": after["omnistream_kv_cache_usage_perc"], "seconds": round(elapsed, 1)}


# ---- 2. mass disconnects -------------------------------------------------------------------------------------


async def _hang_up(client: httpx.AsyncClient, index: int) -> bool:
    body = {"messages": [{"role": "user", "content": f"Story {index}"}], "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return True  # leaving the block closes the connection mid-answer
    return False


async def disconnects(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    core = _core_pid(server)
    pids = {"server": server.process.pid, "core": core}
    limits = httpx.Limits(max_connections=args.disconnects + 8)
    rounds = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        for _ in range(2):  # a warm-up round, then the measured one
            rss_before = {name: _rss_mb(pid) for name, pid in pids.items()}
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as hangups:
                started = await asyncio.gather(*(_hang_up(hangups, i) for i in range(args.disconnects)))
            metrics, freed_s = await _wait_idle(client)
            await asyncio.sleep(1.0)
            rss_after = {name: _rss_mb(pid) for name, pid in pids.items()}
            rounds.append({"streams_started": sum(started), "freed_s": round(freed_s, 2),
                           "kv_usage_after": metrics["omnistream_kv_cache_usage_perc"],
                           "running_after": metrics["omnistream_num_requests_running"],
                           **{f"rss_{k}_mb": [round(rss_before[k]), round(rss_after[k])] for k in pids},
                           **{f"rss_{k}_change_pct": round(100 * (rss_after[k] / rss_before[k] - 1), 1)
                              for k in pids}})
    return {"disconnects": args.disconnects, "warm_up": rounds[0], **rounds[1]}


# ---- 3. malformed inputs ---------------------------------------------------------------------------------------


def _tally() -> dict[str, int]:
    return {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0, "hangs": 0, "engine_deaths": 0}


async def _http_probe(client: httpx.AsyncClient, probe: Probe, tally: dict[str, int], failures: list[str]) -> None:
    route, body, content_type = probe.payload
    try:
        if content_type == "form":
            files = {"file": ("a.wav", wav(1600, 16000), "audio/wav")}
            response = await client.post(route, data=body, files=files)
        else:
            response = await client.post(route, content=body, headers={"content-type": content_type})
    except httpx.TimeoutException:
        tally["hangs"] += 1
        failures.append(f"hang: {probe.kind}")
        return
    bad = response.status_code >= 500 or "internal_server_error" in response.text
    tally["5xx" if bad else "2xx" if response.status_code < 300 else "4xx"] += 1
    if bad:
        failures.append(f"{response.status_code}: {probe.kind}")


async def _realtime_probe(url: str, headers: dict[str, str], probe: Probe, tally: dict[str, int],
                          failures: list[str]) -> None:
    """One event on a fresh connection, then a ping the server answers after it (an unknown event)."""
    try:
        async with connect(url, additional_headers=headers, open_timeout=TIMEOUT_S) as ws:
            await asyncio.wait_for(ws.recv(), TIMEOUT_S)
            await ws.send(probe.payload)
            await ws.send(json.dumps({"type": "bench.ping", "event_id": "ping"}))
            errors, responding, pinged = 0, False, False
            while not pinged or responding:  # until the ping's answer, and the end of a response it started
                reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
                if reply["type"] == "error" and reply["error"]["type"] == "server_error":
                    tally["5xx"] += 1
                    failures.append(f"server_error: {probe.kind}")
                    return
                if reply["type"] == "error" and reply["error"].get("event_id") == "ping":
                    pinged = True
                elif reply["type"] == "error":
                    errors += 1
                started, done = reply["type"] == "response.created", reply["type"] == "response.done"
                responding = (responding or started) and not done
            tally["4xx" if errors else "2xx"] += 1
    except (asyncio.TimeoutError, TimeoutError):
        tally["hangs"] += 1
        failures.append(f"hang: {probe.kind}")
    except Exception as exc:  # noqa: BLE001 - a closed connection (1011) or a refused upgrade
        tally["5xx"] += 1
        failures.append(f"{type(exc).__name__}: {probe.kind}")


async def _grpc_probe(channel: grpc.aio.Channel, probe: Probe, tally: dict[str, int], failures: list[str]) -> None:
    method, request = probe.payload
    stub = pb_grpc.OmnistreamStub(channel)
    calls = {
        "Generate": lambda: stub.Generate(request, timeout=TIMEOUT_S),
        "GenerateRaw": lambda: channel.unary_stream(f"{SERVICE}/Generate")(request, timeout=TIMEOUT_S),
        "Session": lambda: stub.Session(iter(request), timeout=TIMEOUT_S),
        "SessionRaw": lambda: channel.stream_stream(f"{SERVICE}/Session")(iter(request), timeout=TIMEOUT_S),
    }
    try:
        outputs = [output async for output in calls[method]()]
        session_errors = [o.error.code for o in outputs if isinstance(o, pb.SessionOutput) and o.HasField("error")]
        if grpc.StatusCode.INTERNAL.value[0] in session_errors:
            raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, None, None, "a SessionError")
        tally["4xx" if session_errors else "2xx"] += 1
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally["hangs"] += 1
        elif exc.code() in CLIENT_CODES:
            tally["4xx"] += 1
            return
        else:
            tally["5xx"] += 1
        failures.append(f"{exc.code().name}: {probe.kind}")


async def _bounded(jobs: list, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def run(job: Any) -> None:
        async with gate:
            await job

    await asyncio.gather(*(run(job) for job in jobs))


async def malformed(args: argparse.Namespace, server: ServerProcess, grpc_port: int) -> dict[str, Any]:
    rng = random.Random(0)
    corpus = {"http": http_probes(args.max_model_len, rng), "realtime": realtime_probes(),
              "grpc": grpc_probes(args.max_model_len, rng)}
    tallies = {front: _tally() for front in corpus}
    failures: list[str] = []
    ws_url = server.url.replace("http://", "ws://") + "/v1/realtime?model=omnistream-tiny"
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client, \
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        for front, probes in corpus.items():
            tally = tallies[front]
            tally["requests"] = len(probes)
            jobs = {"http": lambda p: _http_probe(client, p, tally, failures),
                    "realtime": lambda p: _realtime_probe(ws_url, {}, p, tally, failures),
                    "grpc": lambda p: _grpc_probe(channel, p, tally, failures)}[front]
            await _bounded([jobs(probe) for probe in probes], args.concurrency)
            if (await client.get("/health")).status_code != 200 or server.process.poll() is not None:
                tally["engine_deaths"] += 1
                break
    total = {key: sum(t[key] for t in tallies.values()) for key in _tally()}
    return {"total": total, **tallies, "failures": failures[:20]}


# ---- 4. engine-core kill, 5. SIGTERM --------------------------------------------------------------------------


async def _streams_in_flight(client: httpx.AsyncClient, count: int, max_tokens: int) -> list[asyncio.Task]:
    """`count` streamed completions (each returns its finish reasons or error codes), once each has sent its first
    chunk."""
    first = [asyncio.Event() for _ in range(count)]

    async def run(index: int) -> list[str]:
        reasons = []
        body = {"prompt": f"Tale {index}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    first[index].set()
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            reasons.append(chunk["error"].get("code") or "error")
                        reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
        except httpx.HTTPError as exc:
            reasons.append(type(exc).__name__)
        finally:
            first[index].set()
        return reasons

    tasks = [asyncio.create_task(run(i)) for i in range(count)]
    await asyncio.gather(*(event.wait() for event in first))
    return tasks


async def core_kill(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with _server("core-kill", log_dir) as server:
        core = _core_pid(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            tasks = await _streams_in_flight(client, 8, 400)
            killed = time.monotonic()
            os.kill(core, signal.SIGKILL)
            reasons = await asyncio.gather(*tasks)
        streams_ended_s = time.monotonic() - killed
        code = await asyncio.to_thread(server.process.wait, 120)
        exited_s = time.monotonic() - killed
    return {"streams": len(reasons), "ended_engine_dead": sum("engine_dead" in r for r in reasons),
            "streams_ended_s": round(streams_ended_s, 2), "exit_code": code, "exited_s": round(exited_s, 2)}


async def sigterm(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with _server("sigterm", log_dir) as server:
        core = _core_pid(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            tasks = await _streams_in_flight(client, 8, 64)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            reasons = await asyncio.gather(*tasks)
        code = await asyncio.to_thread(server.process.wait, 120)
        exited_s = time.monotonic() - sent
        deadline = time.monotonic() + 10
        while Path(f"/proc/{core}").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        core_gone = not Path(f"/proc/{core}").exists()
    return {"streams": len(reasons), "finished": sum(r == ["length"] for r in reasons), "exit_code": code,
            "exited_s": round(exited_s, 2), "core_gone": core_gone}


# ---- the table --------------------------------------------------------------------------------------------------


def _rss(disconnects: dict[str, Any], process: str) -> str:
    before, after = disconnects[f"rss_{process}_mb"]
    return f"{before}→{after} MB ({disconnects[f'rss_{process}_change_pct']:+}%)"


def _malformed_row(bad: dict[str, Any]) -> tuple[str, str, bool]:
    total = bad["total"]
    return ("Malformed inputs", f"{total['requests']} (HTTP {bad['http']['requests']}, Realtime "
                                f"{bad['realtime']['requests']}, gRPC {bad['grpc']['requests']}): "
                                f"{total['4xx']} 4xx, {total['2xx']} 2xx, {total['5xx']} 5xx, {total['hangs']} hangs, "
                                f"{total['engine_deaths']} engine deaths",
            total["requests"] >= 1000 and not (total["5xx"] or total["hangs"] or total["engine_deaths"]))


def table(results: dict[str, Any]) -> str:
    if set(results) == {"config", "malformed"}:  # --malformed-only
        rows = [_malformed_row(results["malformed"])]
    else:
        rows = _rows(results)
    lines = ["| scenario | result | target met |", "| --- | --- | --- |"]
    lines += [f"| {name} | {result} | {'yes' if ok else 'no'} |" for name, result, ok in rows]
    return "\n".join(lines)


def _rows(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    names = ("kv_pressure", "disconnects", "malformed", "core_kill", "sigterm")
    kv, dc, bad, kill, term = (results[name] for name in names)
    rss = max(abs(dc["rss_server_change_pct"]), abs(dc["rss_core_change_pct"]))
    rows = [
        ("KV pressure", f"{kv['streams']} streams on {kv['pool_blocks']} of {kv['blocks_needed']} blocks: "
                        f"{kv['completed']} complete, {kv['equal_to_solo']}/{kv['solo_checked']} equal to solo, "
                        f"{kv['preemptions']:.0f} preemptions, KV usage after {kv['kv_usage_after']:.0%}",
         kv["completed"] == kv["streams"] and kv["equal_to_solo"] == kv["solo_checked"]
         and not kv["kv_usage_after"]),
        ("Mass disconnects", f"{dc['disconnects']} hang-ups: freed in {dc['freed_s']} s, RSS server "
                             f"{_rss(dc, 'server')}, core {_rss(dc, 'core')}",
         not dc["kv_usage_after"] and rss <= 5),
        _malformed_row(bad),
        ("Engine-core kill", f"{kill['ended_engine_dead']}/{kill['streams']} streams end engine_dead in "
                             f"{kill['streams_ended_s']} s; server exits {kill['exit_code']} in "
                             f"{kill['exited_s']} s",
         kill["ended_engine_dead"] == kill["streams"] and kill["exit_code"] == ENGINE_DEAD_EXIT_CODE),
        ("SIGTERM drain", f"{term['finished']}/{term['streams']} answers finish; exit {term['exit_code']} in "
                          f"{term['exited_s']} s; core gone: {term['core_gone']}",
         term["finished"] == term["streams"] and term["exit_code"] == 0 and term["core_gone"]),
    ]
    return rows


async def main(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="omnistream-reliability-"))
    results: dict[str, Any] = {"config": vars(args)}
    print(f"server logs in {log_dir}", file=sys.stderr)
    if args.malformed_only:
        grpc_port = free_port()
        with _server("hostile", log_dir, "--max-model-len", str(args.max_model_len), grpc_port=grpc_port) as server:
            results["malformed"] = await malformed(args, server, grpc_port)
        return results
    results["kv_pressure"] = await kv_pressure(args, log_dir)
    grpc_port = free_port()
    with _server("hostile", log_dir, "--max-model-len", str(args.max_model_len), grpc_port=grpc_port) as server:
        results["disconnects"] = await disconnects(args, server)
        results["malformed"] = await malformed(args, server, grpc_port)
    results["core_kill"] = await core_kill(args, log_dir)
    results["sigterm"] = await sigterm(args, log_dir)
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams under KV pressure")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each KV-pressure stream generates")
    parser.add_argument("--solo-sample", type=int, default=100,
                        help="streams rerun alone to compare their outputs (all: the value of --streams)")
    parser.add_argument("--disconnects", type=int, default=200, help="streams that hang up mid-answer, per round")
    parser.add_argument("--max-model-len", type=int, default=512,
                        help="of the server that takes the disconnects and the malformed corpus")
    parser.add_argument("--concurrency", type=int, default=8, help="malformed requests in flight at once")
    parser.add_argument("--log-dir", default=None, help="where the servers' logs go (default: a temporary folder)")
    parser.add_argument("--malformed-only", action="store_true", help="run the malformed-input corpus alone")
    parser.add_argument("--out", default=None, help="write every number as JSON here")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    outcome = asyncio.run(main(arguments))
    if arguments.out:
        Path(arguments.out).write_text(json.dumps(outcome, indent=2))
    print(table(outcome))
