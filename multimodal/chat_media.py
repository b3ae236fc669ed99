"""Media inside OpenAI-style chat messages: collects each content part's media source, in order.

Parts: `image_url`, `input_audio` ({data: base64, format}), `audio_url`, `video_url`, and the
offline forms `image`, `audio`, `video` (a path, bytes, a PIL image, `(array, sample_rate)` for
audio, `(frames, fps)` for video). URLs may be data: URLs or local paths (file://); remote URLs
are fetched only by a server, through the `fetch_url` hook its media policy gives
(multimodal/media_fetch), so without one they are an error.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omnistream.multimodal.errors import MediaDecodeError, MediaError

_PART_MODALITY = {
    "image_url": "image", "image": "image",
    "input_audio": "audio", "audio_url": "audio", "audio": "audio",
    "video_url": "video", "video": "video",
}

UrlFetcher = Callable[[str, str], Any]  # (url, modality) -> a media source


def decode_data_url(url: str, modality: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise MediaError(f"{modality}: only base64 data: URLs are supported")
    return decode_base64(payload, modality)


def decode_base64(payload: str, modality: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaDecodeError(f"{modality}: invalid base64 data ({exc})") from exc


def _local_or_data(url: str, modality: str) -> Any:
    if url.startswith("data:"):
        return decode_data_url(url, modality)
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url:
        raise MediaError(f"{modality}: remote URLs are not fetched here ({url.split('://')[0]}://…)")
    return Path(url)


def part_source(part: dict[str, Any], fetch_url: UrlFetcher | None = None) -> tuple[str, Any]:
    """(modality, media source) of one media content part."""
    kind = part.get("type")
    modality = _PART_MODALITY[kind]
    value = part.get(kind)
    if kind == "input_audio":
        if not isinstance(value, dict) or "data" not in value:
            raise MediaError("audio: input_audio needs {'data': base64, 'format': ...}")
        return modality, decode_base64(value["data"], modality)
    if kind.endswith("_url"):
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise MediaError(f"{modality}: {kind} needs a url")
        if fetch_url is not None and not url.startswith("data:"):
            return modality, fetch_url(url, modality)
        return modality, _local_or_data(url, modality)
    if value is None:
        raise MediaError(f"{modality}: the {kind} part has no {kind!r} field")
    if isinstance(value, str):
        return modality, _local_or_data(value, modality)
    return modality, value


def collect_media(messages: list[dict[str, Any]], fetch_url: UrlFetcher | None = None) -> dict[str, list[Any]]:
    """multi_modal_data for a conversation: each modality's sources in order of appearance."""
    media: dict[str, list[Any]] = {}
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") in _PART_MODALITY:
                modality, source = part_source(part, fetch_url)
                media.setdefault(modality, []).append(source)
    return media
