"""`input_image` content parts of Realtime user messages: checked, fetched and preprocessed as chat requests' images.

`image_url` is a data: URL (base64) or a URL the server's media policy allows (http(s) from allowed domains, file://
under the allowed directory), fetched by that policy with its byte limit and timeout; the image is decoded and
resized by the offline image preprocessing (the pixel budget of chat completions). `detail` "auto" and "high" both
mean that budget (as in chat completions, where `detail` changes nothing); "low" is refused, since chat completions
have no smaller budget to equal. Every failure is a RealtimeError naming the part's field.
"""

from __future__ import annotations

from typing import Any

from omnistream.engine.entrypoints.openai.realtime.protocol import RealtimeError
from omnistream.multimodal.errors import MediaError
from omnistream.multimodal.image import ImageInputs, preprocess_image
from omnistream.multimodal.media_fetch import MediaPolicy

DETAILS = (None, "auto", "high")


def check_image_part(part: Any, param: str) -> None:
    """RealtimeError unless the part has an `image_url` string and a `detail` this server honours."""
    if not isinstance(part.image_url, str) or not part.image_url:
        raise RealtimeError(
            "an input_image part needs `image_url` (a data: URL or an allowed http(s) URL)", param=f"{param}.image_url"
        )
    if part.detail not in DETAILS:
        raise RealtimeError(
            f'detail {part.detail!r} is not supported: use "auto" or "high" (both give the image '
            "the pixel budget of chat completions; there is no low-detail budget)",
            param=f"{param}.detail",
        )


def load_image_part(part: Any, param: str, policy: MediaPolicy, max_decoded_pixels: int) -> ImageInputs:
    """The part's image, fetched under `policy` and preprocessed; blocking (call it off the event loop)."""
    try:
        data = policy.fetch(part.image_url, "image")
        return preprocess_image(data, max_decoded_pixels=max_decoded_pixels)
    except MediaError as exc:
        raise RealtimeError(str(exc), code="invalid_image", param=f"{param}.image_url") from None


def image_content(part: Any) -> dict[str, Any]:
    """The part as conversation items echo it."""
    return {"type": "input_image", "image_url": part.image_url, "detail": part.detail or "auto"}
