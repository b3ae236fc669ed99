"""The malformed-input corpus of benchmarks/reliability.py: deterministic hostile requests for the HTTP API, the
Realtime WebSocket and gRPC. Valid bodies get each edge value (integers past 64 bits, NaN, lone surrogates,
wrong types) in each field, one field at a time; then the classes that once broke servers: out-of-vocabulary
token ids, forged media headers (a 9000×9000 PNG, a WAV of 8000 s in 16 KB), corrupt media, a huge fan-out,
max_tokens past the context, bodies that are not JSON, and protobuf messages whose bytes were flipped.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import random
import struct
import wave
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from omnistream.engine.grpc_gen import omnistream_pb2 as pb

EDGES = [2**64, -(2**64), 10**20, 2**63, float("nan"), float("inf"), -1, 0, "a\ud800b", "", [], {}, None, True,
         [10**20], ["\udfff"]]
GRPC_EDGES = {"uint32": [0, 2**32 - 1, 2**31], "int32": [-(2**31), 2**31 - 1, -1], "int64": [-(2**63), 2**63 - 1],
              "double": [float("nan"), float("inf"), -1.0, 1e308, 0.0], "bool": [True],
              "string": ["", "\u00ff" * 40]}


@dataclass
class Probe:
    front: str  # "http", "realtime" or "grpc"
    kind: str  # what is malformed
    payload: Any  # http: (route, body bytes, content type); realtime: a text frame; grpc: (method, request)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield (*prefix, key)
        yield from _paths(item, (*prefix, key))


def _with(body: Any, path: tuple, value: Any) -> Any:
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def _json(body: Any) -> bytes:
    return json.dumps(body).encode()  # NaN and Infinity as Python writes them; surrogates as \u escapes


def png(width: int, height: int, forged: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    if forged is not None:
        at = data.index(b"IHDR")
        data[at + 4 : at + 12] = struct.pack(">II", *forged)
        data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


def wav(samples: int, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.ones(samples, "<i2").tobytes())
    return buffer.getvalue()


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def http_probes(max_model_len: int, rng: random.Random) -> list[Probe]:
    text = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    sampling = {"max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 1, "stop": ["x"],
                "stop_token_ids": [5], "min_tokens": 1, "n": 1, "presence_penalty": 0.1}
    bases = [("/v1/chat/completions", {"messages": [text], **sampling, "logprobs": True, "top_logprobs": 1,
                                       "mm_processor_kwargs": {"fps": 2}}),
             ("/v1/completions", {"prompt": [9707, 11], **sampling, "logprobs": 1}),
             ("/tokenize", {"messages": [text], "add_generation_prompt": True}),
             ("/detokenize", {"tokens": [9707, 11]})]
    probes = [Probe("http", f"edge value in {route} {'.'.join(map(str, path))}",
                    (route, _json(_with(body, path, value)), "application/json"))
              for route, body in bases for path in _paths(body) for value in EDGES]

    def chat(kind: str, content: Any, **extra: Any) -> Probe:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}
        return Probe("http", kind, ("/v1/chat/completions", _json(body), "application/json"))

    def part(kind: str, mime: str, data: bytes) -> list[dict[str, Any]]:
        url = _data_url(mime, data)
        parts = {"image": {"type": "image_url", "image_url": {"url": url}},
                 "video": {"type": "video_url", "video_url": {"url": url}},
                 "audio": {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode()}}}
        return [parts[kind], {"type": "text", "text": "?"}]

    for token in (999_999_999, -1, 2**63 - 1):
        probes.append(chat("out-of-vocabulary stop_token_ids", "Hi", stop_token_ids=[token], min_tokens=1))
        probes.append(Probe("http", "out-of-vocabulary prompt ids",
                            ("/v1/completions", _json({"prompt": [token], "max_tokens": 2}), "application/json")))
        probes.append(Probe("http", "out-of-vocabulary detokenize",
                            ("/detokenize", _json({"tokens": [token]}), "application/json")))
    probes.append(chat("forged 9000x9000 PNG header", part("image", "image/png", png(8, 8, forged=(9000, 9000)))))
    probes.append(chat("8000 s WAV in 16 KB (1 Hz)", part("audio", "audio/wav", wav(8000, 1))))
    for kind in ("image", "audio", "video"):
        for size in (0, 1, 16, 500):
            garbage = bytes(rng.getrandbits(8) for _ in range(size))
            probes.append(chat(f"corrupt {kind}", part(kind, f"{kind}/x", garbage)))
    fan_out = {"prompt": ["a"] * 400, "n": 128, "max_tokens": 1}
    probes.append(Probe("http", "fan-out 400 prompts x n=128", ("/v1/completions", _json(fan_out), "application/json")))
    probes.append(chat("max_tokens past the context", "Hi", max_tokens=max_model_len))
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (b"", b"{", b"[]", b"null", b"\xff\xfe", deep, b'{"messages": "' + b"a" * 1000):
        probes.append(Probe("http", "not a JSON object", ("/v1/chat/completions", body, "application/json")))
    probes.append(Probe("http", "form body on a JSON route", ("/v1/chat/completions", b"a=b", "text/plain")))
    form_fields = ["max_tokens", "temperature", "response_format", "stream", "prompt", "language", "model"]
    for name in form_fields:
        for value in ("", "abc", str(10**20), "nan", "-1", "\u00ff" * 10):
            form = ("/v1/audio/transcriptions", {name: value}, "form")
            probes.append(Probe("http", f"transcription {name}", form))
    return probes


def realtime_probes() -> list[Probe]:
    pcm = base64.b64encode(np.zeros(2400, "<i2").tobytes()).decode()
    events = [
        {"type": "session.update", "session": {"type": "realtime", "instructions": "Hi", "max_output_tokens": 2,
                                               "temperature": 0, "top_k": 3, "seed": 1, "audio": {"input": {
                                                   "format": {"type": "audio/pcm", "rate": 24000},
                                                   "turn_detection": {"type": "server_vad", "threshold": 0.5}}}}},
        {"type": "input_audio_buffer.append", "audio": pcm},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Hi"}, {"type": "input_audio", "audio": pcm}]}},
        {"type": "response.create", "response": {"max_output_tokens": 2, "temperature": 0}},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Hi"}, {"type": "input_image", "image_url": _data_url("image/png", png(8, 8)),
                                                   "detail": "auto"}]}},
    ]
    probes = [Probe("realtime", f"edge value in {event['type']} {'.'.join(map(str, path))}",
                    json.dumps(_with(event, path, value)))
              for event in events for path in _paths(event) for value in EDGES[:8]]
    for text in ("", "{", "[]", "null", '{"type": 5}', '{"type": "no.such.event"}', '{"type": "a\\ud800"}',
                 "[" * 10_000 + "]" * 10_000):
        probes.append(Probe("realtime", "not an event", text))
    rng = random.Random(1)
    images = [("forged 9000x9000 PNG header", _data_url("image/png", png(8, 8, forged=(9000, 9000)))),
              ("remote image URL", "http://example.com/a.png"), ("local image path", "file:///etc/passwd"),
              ("image URL that is not one", "not a url \u00ff"), ("bad base64", "data:image/png;base64,@@")]
    images += [("corrupt image", _data_url("image/png", bytes(rng.getrandbits(8) for _ in range(size))))
               for size in (0, 1, 16, 500)]
    for kind, url in images:
        item = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}
        probes.append(Probe("realtime", kind, json.dumps({"type": "conversation.item.create", "item": item})))
    return probes


def _grpc_edits(message: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(field path, a copy of `message` with that scalar set to an edge value of its type), field by field."""
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None and not field.is_repeated:
            for path, edited in _grpc_edits(getattr(message, field.name), f"{prefix}{field.name}."):
                copy_ = type(message)()
                copy_.CopyFrom(message)
                getattr(copy_, field.name).CopyFrom(edited)
                yield path, copy_
            continue
        kind = {field.TYPE_UINT32: "uint32", field.TYPE_INT32: "int32", field.TYPE_INT64: "int64",
                field.TYPE_DOUBLE: "double", field.TYPE_BOOL: "bool", field.TYPE_STRING: "string"}.get(field.type)
        for value in GRPC_EDGES.get(kind, []) if not field.is_repeated else []:
            copy_ = type(message)()
            copy_.CopyFrom(message)
            setattr(copy_, field.name, value)
            yield prefix + field.name, copy_


def grpc_probes(max_model_len: int, rng: random.Random) -> list[Probe]:
    base = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=2, temperature=0.5),
                              media_options=pb.MediaOptions(fps=2.0))
    probes = [Probe("grpc", f"Generate edge value in {path}", ("Generate", request))
              for path, request in _grpc_edits(base)]
    for token in (999_999_999, 2**32 - 1):
        probes.append(Probe("grpc", "Generate out-of-vocabulary token_ids",
                            ("Generate", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[token])))))
    probes.append(Probe("grpc", "Generate max_tokens past the context", ("Generate", pb.GenerateRequest(
        text="Hi", sampling=pb.SamplingParams(max_tokens=max_model_len)))))
    for mime, data in (("image/png", png(8, 8, forged=(9000, 9000))), ("audio/wav", wav(8000, 1)),
                       ("video/mp4", b"\x00" * 64), ("image/png", b"")):
        probes.append(Probe("grpc", f"Generate bad media {mime}", ("Generate", pb.GenerateRequest(
            text="<|vision_start|><|image_pad|><|vision_end|>", media=[pb.MediaItem(data=data, mime_type=mime)]))))
    raw = bytearray(base.SerializeToString())
    for _ in range(120):
        flipped = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
        probes.append(Probe("grpc", "Generate bytes flipped", ("GenerateRaw", bytes(flipped))))
    config = pb.SessionConfig(sampling=pb.SamplingParams(max_tokens=2), sample_rate=16000, audio_window_s=1)
    for path, edited in _grpc_edits(config):
        session = ("Session", [pb.SessionInput(config=edited)])
        probes.append(Probe("grpc", f"Session config edge value in {path}", session))
    opening = pb.SessionInput(config=config)
    bad_inputs = [
        [pb.SessionInput(audio=pb.AudioChunk(data=b"\x01"))],
        [pb.SessionInput(video_frame=pb.VideoFrame(data=b"x"))],
        [pb.SessionInput(video_frame=pb.VideoFrame(data=png(8, 8, forged=(9000, 9000)), mime_type="image/png"))],
        [pb.SessionInput(image=pb.Image(data=png(8, 8, forged=(9000, 9000)), mime_type="image/png"))],
        [pb.SessionInput(image=pb.Image(data=b"\x89PNG\r\n")), pb.SessionInput(image=pb.Image())],
        [pb.SessionInput(image=pb.Image(data=png(8, 8), mime_type="audio/wav"))],
        [pb.SessionInput(text=pb.TextInput(text="Hi")),
         pb.SessionInput(commit=pb.Commit(sampling=pb.SamplingParams(max_tokens=2**32 - 1)))],
        [pb.SessionInput(commit=pb.Commit(logprobs=2**32 - 1))], [pb.SessionInput(config=config)],
        [pb.SessionInput()], [pb.SessionInput(cancel=pb.Cancel())] * 3,
    ]
    probes += [Probe("grpc", "Session bad input", ("Session", [opening, *inputs])) for inputs in bad_inputs]
    probes.append(Probe("grpc", "Session bytes that do not parse", ("SessionRaw", [b"\xff\xff\xff"])))
    return probes
