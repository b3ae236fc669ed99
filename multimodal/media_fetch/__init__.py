"""The server's media URL policy: which remote (http/https) and local (file://) media it may fetch,
and the fetcher itself (`MediaPolicy.fetch(url, modality) -> bytes`)."""

from omnistream.multimodal.media_fetch.addresses import BLOCKED_NETWORKS, system_resolver
from omnistream.multimodal.media_fetch.errors import (
    MediaFetchError,
    MediaFetchTimeout,
    MediaTooLargeError,
    MediaURLNotAllowed,
)
from omnistream.multimodal.media_fetch.policy import DEFAULT_MAX_MEDIA_BYTES, DEFAULT_TIMEOUT_S, MediaPolicy

__all__ = [
    "BLOCKED_NETWORKS",
    "DEFAULT_MAX_MEDIA_BYTES",
    "DEFAULT_TIMEOUT_S",
    "MediaFetchError",
    "MediaFetchTimeout",
    "MediaPolicy",
    "MediaTooLargeError",
    "MediaURLNotAllowed",
    "system_resolver",
]
