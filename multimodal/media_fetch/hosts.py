"""Remote media URLs: parsing an http(s) URL, normalising its host (lower case, IDNA) and matching it
against the allowed domains."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from omnistream.multimodal.media_fetch.errors import MediaURLNotAllowed

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
# characters kept as they are in the request line; anything else (spaces, controls, non-ASCII) is %-encoded
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?"


@dataclass(frozen=True)
class RemoteURL:
    """An http(s) URL reduced to what one request needs."""

    scheme: str  # "http" or "https"
    host: str  # ASCII: an IDNA-encoded name, or an IP literal's canonical text (no brackets)
    port: int
    target: str  # the request line's path and query, %-encoded

    @property
    def is_ip_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def normalise_host(host: str) -> str:
    """The lower-case ASCII form of a host name (IDNA, one trailing dot dropped), or the canonical text of
    an IP literal (brackets optional). ValueError for anything else."""
    text = host.removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        ascii_host = text.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"{host!r} is not a valid host name") from exc
    if not _HOSTNAME.fullmatch(ascii_host):
        raise ValueError(f"{host!r} is not a valid host name")
    return ascii_host


def host_allowed(host: str, domains: Iterable[str]) -> bool:
    """A name matches an allowed domain exactly or as a subdomain; an IP literal only exactly."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return any(host == domain or host.endswith("." + domain) for domain in domains)
    return host in domains


def parse_remote_url(url: str, modality: str) -> RemoteURL:
    """The URL's parts, or MediaURLNotAllowed for another scheme, credentials, or a malformed host or port."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MediaURLNotAllowed(f"{modality}: the media URL is malformed") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise MediaURLNotAllowed(f"{modality}: only http and https media URLs are fetched")
    if "@" in parts.netloc:
        raise MediaURLNotAllowed(f"{modality}: media URLs with credentials (user@host) are refused")
    try:
        host = normalise_host(parts.hostname or "")
    except ValueError as exc:
        raise MediaURLNotAllowed(f"{modality}: the media URL has no valid host") from exc
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return RemoteURL(scheme, host, port or _DEFAULT_PORTS[scheme], target)
