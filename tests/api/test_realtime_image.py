"""`input_image` parts over `WS /v1/realtime`, driven with the official `openai` client: an image item answered
greedily equals the chat completion with that image at that place (text and usage), image and speech in one turn
too; an http image URL is fetched under the server's media policy; bad images, refused URLs and unsupported
`detail` values are error events naming the field, and the session goes on."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.multimodal.media_fetch import MediaPolicy
from tests.multimodal.media_server import WITHOUT_LOOPBACK, Reply, Resolver, media_server

from .server_fixture import openai_client, running_server, wav_bytes
from .test_realtime import recv_until, respond, setup

MAX_TOKENS = 6
RATE = 16_000
MANUAL_16K = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}}


def png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_flat(height: int, width: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


IMAGE = png(90, 150, 0)  # 96 x 160 after resizing: 15 image tokens


def speech(seconds: float, seed: int) -> np.ndarray:
    """PCM16 speech-like audio at 16 kHz whose loudest frame comes first (live log-mel then equals offline)."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * np.random.default_rng(seed).standard_normal(len(t))
    wave[:1600] += 0.7 * np.sin(2 * np.pi * 440 * t[:1600])
    return np.round(wave / np.abs(wave).max() * 0.5 * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def media_host():
    with media_server() as server:
        server.routes.update({"/image.png": Reply(body=IMAGE), "/text.txt": Reply(body=b"hello")})
        yield server


@pytest.fixture(scope="module")
def server(media_host):
    policy = MediaPolicy(
        allowed_domains=("media.test",),
        blocked_networks=WITHOUT_LOOPBACK,
        max_bytes=200_000,
        resolver=Resolver({"media.test": ["127.0.0.1"]}),
    )
    with running_server(
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--num-kv-blocks",
        "512",
        "--max-num-batched-tokens",
        "128",
        media_policy=policy,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def user_item(*content: dict) -> dict:
    return {"type": "message", "role": "user", "content": list(content)}


def image_part(url: str, detail: str | None = "auto") -> dict:
    return {"type": "input_image", "image_url": url, **({"detail": detail} if detail else {})}


def realtime_answer(client, *content: dict, **session) -> tuple[str, object, object]:
    """A fresh conversation: one user item, one greedy response; the answer's text, the item as echoed in
    conversation.item.done and the response's usage."""
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=MAX_TOKENS, **session)
        connection.conversation.item.create(item=user_item(*content))
        item = recv_until(connection, "conversation.item.done")[-1].item
        text, done, _ = respond(connection)
        return text, item, done.response.usage


def chat_answer(client, *content: dict) -> tuple[str, object]:
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": list(content)}],
    )
    return completion.choices[0].message.content, completion.usage


def test_an_image_item_is_answered_as_the_chat_completion_with_that_image(client):
    url = data_url(IMAGE)
    text, item, usage = realtime_answer(
        client, {"type": "input_text", "text": "Look: "}, image_part(url), {"type": "input_text", "text": "What is it?"}
    )
    expected, chat_usage = chat_answer(
        client,
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is it?"},
    )
    assert text == expected
    assert [part.type for part in item.content] == ["input_text", "input_image", "input_text"]
    assert (item.content[1].image_url, item.content[1].detail) == (url, "auto")
    details = usage.input_token_details
    assert usage.input_tokens == chat_usage.prompt_tokens
    assert details.image_tokens == chat_usage.prompt_tokens_details.image_tokens == 15
    assert details.text_tokens == usage.input_tokens - 15 and details.audio_tokens == 0


def test_image_and_speech_in_one_turn_equal_the_chat_completion(client):
    pcm = speech(2.3, 1)
    url = data_url(IMAGE)
    audio = base64.b64encode(pcm.tobytes()).decode()
    text, item, usage = realtime_answer(
        client, image_part(url, detail="high"), {"type": "input_audio", "audio": audio}, **MANUAL_16K
    )
    wav = base64.b64encode(wav_bytes(pcm, RATE)).decode()
    expected, chat_usage = chat_answer(
        client,
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
    )
    assert text == expected
    assert item.content[0].detail == "high" and item.content[1].type == "input_audio"
    assert usage.input_tokens == chat_usage.prompt_tokens
    assert usage.input_token_details.audio_tokens == chat_usage.prompt_tokens_details.audio_tokens > 0


def test_an_image_item_then_committed_speech_are_one_turn(client):
    """The image item and the audio buffer committed after it: the same turn as one item with both parts."""
    pcm = speech(1.7, 2)
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=MAX_TOKENS, **MANUAL_16K)
        connection.conversation.item.create(item=user_item(image_part(data_url(IMAGE), detail=None)))
        assert recv_until(connection, "conversation.item.done")[-1].item.content[0].detail == "auto"
        connection.input_audio_buffer.append(audio=base64.b64encode(pcm.tobytes()).decode())
        connection.input_audio_buffer.commit()
        recv_until(connection, "conversation.item.done")
        text, _, _ = respond(connection)
    wav = base64.b64encode(wav_bytes(pcm, RATE)).decode()
    expected, _ = chat_answer(
        client,
        {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
        {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
    )
    assert text == expected


def test_an_http_image_is_fetched_under_the_media_policy(client, media_host):
    text, item, usage = realtime_answer(client, image_part(media_host.url("/image.png")))
    expected, _ = realtime_answer(client, image_part(data_url(IMAGE)))[:2]
    assert text == expected and usage.input_token_details.image_tokens == 15
    assert item.content[0].image_url == media_host.url("/image.png")


def test_bad_images_are_error_events_and_the_session_goes_on(client, media_host):
    big = png(600, 600, 3)  # over the policy's 200 kB
    bad = [  # (image_url, what the error says)
        ("data:image/png;base64,@@@", "invalid base64"),
        (data_url(b"\xff\x00garbage") + "%%", "invalid base64"),
        ("data:image/png,raw", "only base64 data: URLs"),
        (data_url(b"this is not an image"), "cannot decode"),
        (data_url(IMAGE[: len(IMAGE) // 2]), "truncated"),
        (data_url(big), "media size is"),
        (media_host.url("/image.png", "elsewhere.test"), "not in --allowed-media-domains"),
        ("http://127.0.0.1/image.png", "not in --allowed-media-domains"),
        ("file:///etc/hostname", "local media files are not read"),
        (media_host.url("/text.txt"), "cannot decode"),
        (media_host.url("/missing.png"), "HTTP 404"),
    ]
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=MAX_TOKENS)
        errors = []
        for url, _ in bad:
            connection.conversation.item.create(item=user_item({"type": "input_text", "text": "Hi "}, image_part(url)))
            errors.append(recv_until(connection, "error")[-1].error)
        for part, param in (
            ({"type": "input_image"}, "item.content[0].image_url"),
            (image_part(data_url(IMAGE), detail="low"), "item.content[0].detail"),
            (image_part(data_url(IMAGE), detail="ultra"), "item.content[0].detail"),
        ):
            connection.conversation.item.create(item=user_item(part))
            error = recv_until(connection, "error")[-1].error
            assert error.param == param and error.type == "invalid_request_error", error
        # 1024 image tokens: past --max-model-len, refused before any part is sent
        too_long = user_item({"type": "input_text", "text": "Hi "}, image_part(data_url(png_flat(1024, 1024))))
        connection.conversation.item.create(item=too_long)
        too_long = recv_until(connection, "error")[-1].error
        # nothing of the refused items reached the engine: the next item is answered as in a fresh session
        connection.conversation.item.create(item=user_item(image_part(data_url(IMAGE))))
        recv_until(connection, "conversation.item.done")
        text, done, _ = respond(connection)
    assert too_long.param == "item.content" and "need 1026 tokens" in too_long.message, too_long
    for (url, says), error in zip(bad, errors):
        assert error.param == "item.content[1].image_url" and error.code == "invalid_image", (url, error)
        assert says in error.message, (url, error.message)
    fresh_text, _, fresh_usage = realtime_answer(client, image_part(data_url(IMAGE)))
    assert (text, done.response.usage.input_tokens) == (fresh_text, fresh_usage.input_tokens)


def test_an_image_event_over_16_mib_reaches_the_media_policy(client):
    """The WebSocket takes events up to --max-request-body-bytes (64 MiB), like HTTP bodies: an image past the
    policy's byte limit is an error event, not a closed connection."""
    payload = np.random.default_rng(5).integers(0, 256, 20 << 20, dtype=np.uint8).tobytes()
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=MAX_TOKENS)
        connection.conversation.item.create(item=user_item(image_part(data_url(payload))))
        error = recv_until(connection, "error")[-1].error
        assert error.code == "invalid_image" and "media size is 20971520 bytes" in error.message, error
        connection.conversation.item.create(item=user_item(image_part(data_url(IMAGE))))
        recv_until(connection, "conversation.item.done")
        assert respond(connection)[1].response.usage.input_token_details.image_tokens == 15
