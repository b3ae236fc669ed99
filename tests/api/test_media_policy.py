"""Media URLs through the real server and the official openai client: an http URL on an allow-listed host
(mapped to a loopback test server by the injected resolver) and a file under the allowed directory give
the same answer as the same bytes sent inline; URLs the policy refuses give a 400 OpenAI error body that
names the rule and leaks no address or path; gRPC media URLs go through the same policy."""

from __future__ import annotations

import argparse
import base64

import grpc
import openai
import pytest

from omnistream.engine.entrypoints.grpc_server import GrpcServer
from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from omnistream.multimodal.media_fetch import MediaPolicy
from tests.multimodal.media_server import (
    WITHOUT_LOOPBACK,
    Reply,
    Resolver,
    media_server,
)

from .server_fixture import (
    API_KEY,
    openai_client,
    png_data_url,
    running_server,
    wav_base64,
)

PNG_URL = png_data_url()
PNG = base64.b64decode(PNG_URL.partition(",")[2])
WAV_B64 = wav_base64(0.5)
WAV = base64.b64decode(WAV_B64)
PRIVATE = "10.0.0.9"


@pytest.fixture(scope="module")
def media_host():
    with media_server() as server:
        server.routes.update({
            "/image.png": Reply(body=PNG), "/audio.wav": Reply(body=WAV),
            "/to-elsewhere": Reply(302, headers={"Location": server.url("/image.png", "elsewhere.test")}),
        })
        yield server


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media-root")
    (root / "image.png").write_bytes(PNG)
    (root.parent / "outside.png").write_bytes(PNG)
    return root


@pytest.fixture(scope="module")
def policy(media_root):
    return MediaPolicy(allowed_domains=("media.test",), allowed_local_path=media_root,
                       blocked_networks=WITHOUT_LOOPBACK,
                       resolver=Resolver({"media.test": ["127.0.0.1"], "inside.media.test": [PRIVATE]}))


@pytest.fixture(scope="module")
def server(media_host, policy):
    with running_server("--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "128",
                        "--max-num-batched-tokens", "256", media_policy=policy) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def grpc_stub(server, policy):
    grpc_server = GrpcServer(server.llm, argparse.Namespace(**{**vars(server.args), "grpc_port": 0}), policy)
    port = grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.OmnistreamStub(channel)
    finally:
        grpc_server.stop(grace=1)


def _ask(client: openai.OpenAI, part: dict) -> object:
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
    return client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=6, temperature=0)


def _same_answer(fetched: object, inline: object) -> None:
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert fetched.choices[0].finish_reason == inline.choices[0].finish_reason == "length"
    assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens


def test_image_and_audio_urls_on_an_allowed_host(client, media_host):
    fetched = _ask(client, {"type": "image_url", "image_url": {"url": media_host.url("/image.png")}})
    _same_answer(fetched, _ask(client, {"type": "image_url", "image_url": {"url": PNG_URL}}))
    fetched = _ask(client, {"type": "audio_url", "audio_url": {"url": media_host.url("/audio.wav")}})
    _same_answer(fetched, _ask(client, {"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "wav"}}))
    assert [(seen.path, seen.host) for seen in media_host.seen[-2:]] == [
        ("/image.png", f"media.test:{media_host.port}"), ("/audio.wav", f"media.test:{media_host.port}")]


def test_a_file_under_the_allowed_path(client, media_root):
    fetched = _ask(client, {"type": "image_url", "image_url": {"url": f"file://{media_root}/image.png"}})
    _same_answer(fetched, _ask(client, {"type": "image_url", "image_url": {"url": PNG_URL}}))


@pytest.mark.parametrize("where, rule", [
    ("http://elsewhere.test/image.png", "--allowed-media-domains"),
    ("http://127.0.0.1:{port}/image.png", "--allowed-media-domains"),
    ("http://inside.media.test:{port}/image.png", "address"),
    ("{media}/to-elsewhere", "--allowed-media-domains"),
    ("file://{root}/../outside.png", "--allowed-local-media-path"),
    ("/etc/passwd", "--allowed-local-media-path"),
])
def test_refused_urls_are_400_error_bodies(client, media_host, media_root, where, rule):
    url = where.format(port=media_host.port, media=media_host.url(""), root=media_root)
    requests_before = len(media_host.seen)
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, {"type": "image_url", "image_url": {"url": url}})
    error = refused.value.body
    assert refused.value.status_code == 400
    assert error["type"] == "invalid_request_error" and rule in error["message"]
    for secret in ("127.0.0.1", PRIVATE, str(media_root.parent), "/etc"):
        assert secret not in error["message"]
    assert len(media_host.seen) - requests_before == (1 if where.startswith("{media}") else 0)


def _generate(stub, item: pb.MediaItem) -> str:
    request = pb.GenerateRequest(text="<|audio_start|><|audio_pad|><|audio_end|>What is this?", media=[item],
                                 sampling=pb.SamplingParams(max_tokens=6, temperature=0.0))
    metadata = [("authorization", f"Bearer {API_KEY}")]
    return "".join(response.text for response in stub.Generate(request, metadata=metadata))


def test_grpc_media_urls_follow_the_same_policy(grpc_stub, media_host):
    fetched = _generate(grpc_stub, pb.MediaItem(url=media_host.url("/audio.wav"), mime_type="audio/wav"))
    assert fetched == _generate(grpc_stub, pb.MediaItem(data=WAV, mime_type="audio/wav"))
    with pytest.raises(grpc.RpcError) as refused:
        _generate(grpc_stub, pb.MediaItem(url=f"http://inside.media.test:{media_host.port}/audio.wav",
                                          mime_type="audio/wav"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in refused.value.details()
    assert PRIVATE not in refused.value.details()
