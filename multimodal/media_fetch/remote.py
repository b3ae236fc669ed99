"""Fetching an allowed http(s) media URL.

Every hop (the URL and each redirect target) passes the same checks: scheme, allowed domain, and every
address the host resolves to. The connection then goes to a checked address, not to a second DNS lookup
(so a rebinding DNS answer cannot swap in a private address), while the Host header, TLS SNI and the
certificate check use the URL's host name. Redirects are followed by hand up to the policy's limit; the
body is streamed under the byte cap; one deadline covers every hop, and a watchdog shuts the socket down
when it passes, so a server dripping bytes cannot hold a request past it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol
from urllib.parse import urljoin

from omnistream.multimodal.errors import MediaError
from omnistream.multimodal.media_fetch.addresses import IPNetwork, Resolver, is_blocked
from omnistream.multimodal.media_fetch.errors import (
    MediaFetchError,
    MediaFetchTimeout,
    MediaTooLargeError,
    MediaURLNotAllowed,
)
from omnistream.multimodal.media_fetch.hosts import (
    RemoteURL,
    host_allowed,
    parse_remote_url,
)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 16
_HEADERS = {"User-Agent": "omnistream-media-fetch", "Accept": "*/*", "Accept-Encoding": "identity",
            "Connection": "close"}
# DNS lookups run here so that a slow resolver cannot outlast the fetch's deadline
_DNS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="media-dns")


class _Deadline:
    def __init__(self, seconds: float, modality: str) -> None:
        self.seconds, self.modality = seconds, modality
        self.end = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def left(self) -> float:
        """Seconds left; MediaFetchTimeout once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise MediaFetchTimeout(self.modality, self.seconds)
        return left


class _Watchdog:
    """Shuts the current socket down when the deadline passes, which ends any read blocked on it."""

    def __init__(self, deadline: _Deadline, sock: socket.socket) -> None:
        self.sock = sock
        self._timer = threading.Timer(max(0.0, deadline.end - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the plain-socket method, also under TLS
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


class RemotePolicy(Protocol):
    """What a fetch reads of the media policy (policy.MediaPolicy is one; declared here so that the policy,
    which calls fetch_remote, is not imported back)."""

    allowed_domains: tuple[str, ...]
    timeout_s: float
    max_bytes: int
    max_redirects: int
    resolver: Resolver
    blocked_networks: tuple[IPNetwork, ...]
    ssl_context: ssl.SSLContext


def fetch_remote(url: str, modality: str, policy: RemotePolicy) -> bytes:
    """The body of an http(s) URL under the policy, following its redirects."""
    deadline = _Deadline(policy.timeout_s, modality)
    for _ in range(policy.max_redirects + 1):
        target = parse_remote_url(url, modality)
        if not host_allowed(target.host, policy.allowed_domains):
            raise MediaURLNotAllowed(f"{modality}: the media URL's host is not in --allowed-media-domains")
        addresses = _checked_addresses(target, modality, policy, deadline)
        answer = _exchange(target, addresses, modality, policy, deadline)
        if isinstance(answer, bytes):
            return answer
        url = urljoin(url, answer)
    raise MediaFetchError(f"{modality}: the media URL redirected more than {policy.max_redirects} times")


def _checked_addresses(target: RemoteURL, modality: str, policy: RemotePolicy, deadline: _Deadline) -> list[str]:
    """The host's addresses, refused when any of them is in a blocked network."""
    if target.is_ip_literal:
        found: list[str] = [target.host]
    else:
        lookup = _DNS.submit(policy.resolver, target.host, target.port)
        try:
            found = list(lookup.result(timeout=deadline.left()))
        except FutureTimeout:
            raise MediaFetchTimeout(modality, policy.timeout_s) from None
        except OSError as exc:
            raise MediaFetchError(f"{modality}: the media URL's host could not be resolved") from exc
    try:
        addresses = [ipaddress.ip_address(text) for text in found]
    except ValueError as exc:
        raise MediaFetchError(f"{modality}: the media URL's host could not be resolved") from exc
    if not addresses:
        raise MediaFetchError(f"{modality}: the media URL's host could not be resolved")
    if any(is_blocked(address, policy.blocked_networks) for address in addresses):
        raise MediaURLNotAllowed(f"{modality}: the media URL's host resolves to a loopback, private, link-local "
                                 "or otherwise non-public address")
    return [str(address) for address in addresses]


def _exchange(target: RemoteURL, addresses: list[str], modality: str, policy: RemotePolicy,
              deadline: _Deadline) -> bytes | str:
    """One GET over a pinned connection: the body (bytes), or a redirect's Location (str)."""
    raw = _connect(target, addresses, modality, deadline)
    watchdog = _Watchdog(deadline, raw)
    conn: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if target.scheme == "https":
            watchdog.sock = policy.ssl_context.wrap_socket(raw, server_hostname=target.host)
            conn = http.client.HTTPSConnection(target.host, target.port, context=policy.ssl_context)
        else:
            conn = http.client.HTTPConnection(target.host, target.port)
        conn.sock = watchdog.sock  # connected to the checked address: the connection never resolves the name
        conn.request("GET", target.target, headers=_HEADERS)
        response = conn.getresponse()
        return _answer(response, modality, policy.max_bytes, deadline)
    except MediaError:
        raise
    except ssl.SSLCertVerificationError as exc:
        raise MediaFetchError(f"{modality}: the media server's TLS certificate could not be verified") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired:
            raise MediaFetchTimeout(modality, policy.timeout_s) from exc
        raise MediaFetchError(f"{modality}: the media server's answer could not be read") from exc
    finally:
        watchdog.cancel()
        for part in (response, conn, watchdog.sock):
            if part is not None:
                part.close()


def _answer(response: http.client.HTTPResponse, modality: str, max_bytes: int, deadline: _Deadline) -> bytes | str:
    if response.status in _REDIRECTS:
        location = response.getheader("location")
        if not location:
            raise MediaFetchError(f"{modality}: the media server answered a redirect without a Location")
        return location
    if response.status != 200:
        raise MediaFetchError(f"{modality}: the media server answered HTTP {response.status}")
    return _read_capped(response, modality, max_bytes, deadline)


def _connect(target: RemoteURL, addresses: list[str], modality: str, deadline: _Deadline) -> socket.socket:
    """A TCP connection to the first checked address that accepts one."""
    for address in addresses:
        try:
            return socket.create_connection((address, target.port), timeout=deadline.left())
        except OSError:
            continue
    deadline.left()
    raise MediaFetchError(f"{modality}: could not connect to the media URL's host")


def _read_capped(response: http.client.HTTPResponse, modality: str, max_bytes: int, deadline: _Deadline) -> bytes:
    declared = response.getheader("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise MediaTooLargeError(modality, max_bytes, int(declared))
    body = bytearray()
    while chunk := response.read1(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise MediaTooLargeError(modality, max_bytes)
        deadline.left()
    deadline.left()  # the watchdog ends a late body like a closed connection would
    if declared is not None and declared.strip().isdigit() and len(body) != int(declared):
        raise MediaFetchError(f"{modality}: the media server's answer ended before its declared length")
    return bytes(body)
