"""MediaPolicy: what a server may fetch for a media URL, built from the serve flags, and `fetch`, the
`(url, modality) -> bytes` hook the chat handlers (HTTP and gRPC) pass to collect_media.

Remote http(s) fetching is off unless domains are allowed; local files are refused unless a directory
is allowed. The resolver and the blocked networks are constructor arguments so that tests can map a name
to a loopback test server; the command line never changes them.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from omnistream.multimodal.chat_media import decode_data_url
from omnistream.multimodal.media_fetch.addresses import BLOCKED_NETWORKS, IPNetwork, Resolver, system_resolver
from omnistream.multimodal.media_fetch.errors import MediaTooLargeError, MediaURLNotAllowed
from omnistream.multimodal.media_fetch.hosts import normalise_host
from omnistream.multimodal.media_fetch.local import read_local
from omnistream.multimodal.media_fetch.remote import fetch_remote

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_MEDIA_BYTES = 256 << 20
DEFAULT_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: tuple[str, ...] = ()  # empty: remote fetching is off
    allowed_local_path: Path | None = None  # None: local files are refused
    timeout_s: float = DEFAULT_TIMEOUT_S  # per URL, every redirect hop included
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    resolver: Resolver = system_resolver
    blocked_networks: tuple[IPNetwork, ...] = BLOCKED_NETWORKS
    ssl_context: ssl.SSLContext = field(default_factory=ssl.create_default_context)

    def __post_init__(self) -> None:
        """Normalised domains and a fully resolved directory; a bad setting is a ValueError naming its flag."""
        try:
            domains = tuple(normalise_host(domain) for domain in self.allowed_domains)
        except ValueError as exc:
            raise ValueError(f"--allowed-media-domains: {exc}") from exc
        object.__setattr__(self, "allowed_domains", domains)
        if self.allowed_local_path is not None:
            root = Path(self.allowed_local_path).resolve()
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path: {self.allowed_local_path} is not a directory")
            object.__setattr__(self, "allowed_local_path", root)
        if not self.timeout_s > 0:
            raise ValueError(f"--media-fetch-timeout must be positive, got {self.timeout_s}")
        if self.max_bytes < 1:
            raise ValueError(f"--max-media-bytes must be positive, got {self.max_bytes}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MediaPolicy:
        """The policy the serve flags ask for (flags a namespace lacks keep their defaults)."""
        local = getattr(args, "allowed_local_media_path", None)
        return cls(
            allowed_domains=tuple(getattr(args, "allowed_media_domains", None) or ()),
            allowed_local_path=Path(local) if local else None,
            timeout_s=getattr(args, "media_fetch_timeout", DEFAULT_TIMEOUT_S),
            max_bytes=getattr(args, "max_media_bytes", DEFAULT_MAX_MEDIA_BYTES),
        )

    def fetch(self, url: str, modality: str) -> bytes:
        """The media bytes of an http(s), data: or file:// URL or a bare path, or a MediaError saying why not.
        Blocking: call it off the event loop."""
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError as exc:
            raise MediaURLNotAllowed(f"{modality}: the media URL is malformed") from exc
        if scheme in ("http", "https"):
            if not self.allowed_domains:
                raise MediaURLNotAllowed(f"{modality}: remote media URLs are not fetched by this server "
                                         "(--allowed-media-domains is empty)")
            return fetch_remote(url, modality, self)
        if scheme == "data":
            data = decode_data_url(url, modality)
            if len(data) > self.max_bytes:
                raise MediaTooLargeError(modality, self.max_bytes, len(data))
            return data
        if scheme in ("file", ""):
            return read_local(url, modality, self.allowed_local_path, self.max_bytes)
        raise MediaURLNotAllowed(f"{modality}: only http, https, data and file media URLs are supported")
