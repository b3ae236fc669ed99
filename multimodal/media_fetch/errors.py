"""Errors of the media fetch policy: refused URLs, failed fetches, timeouts and oversized media.

All are MediaError (a ValueError), so servers answer them as client errors (HTTP 400, gRPC
INVALID_ARGUMENT). Messages name the modality, the rule and the flag that sets it, never a resolved
address, a local path or a low-level network error text (which may hold either).
"""

from __future__ import annotations

from omnistream.multimodal.errors import MediaError, MediaLimitError


class MediaURLNotAllowed(MediaError):
    """The policy refuses the URL: scheme, host, resolved address or local path."""


class MediaFetchError(MediaError):
    """An allowed URL could not be fetched: DNS, connection, TLS, HTTP status or redirects."""


class MediaFetchTimeout(MediaFetchError):
    """The whole fetch (every hop, headers and body) took longer than the policy's timeout."""

    def __init__(self, modality: str, seconds: float) -> None:
        super().__init__(f"{modality}: fetching the URL took longer than the limit of {seconds:g} s "
                         "(--media-fetch-timeout)")


class MediaTooLargeError(MediaLimitError):
    """The media's bytes (declared or received so far) are above the policy's byte limit."""

    def __init__(self, modality: str, maximum: int, size: int | None = None) -> None:
        value = f"{size} bytes" if size is not None else f"more than {maximum} bytes"
        super().__init__(modality, "media size", value, f"{maximum} bytes (--max-media-bytes)")
