"""A scripted HTTP(S) server on 127.0.0.1 for media-fetch tests (each path answers a fixed status, headers
and body, optionally dripped byte by byte; every request's path, Host header and TLS SNI are kept), and the
test-only policy parts that let an allowed name reach it: a fixed resolver and the blocked networks
without loopback."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from omnistream.multimodal.media_fetch import BLOCKED_NETWORKS

WITHOUT_LOOPBACK = tuple(n for n in BLOCKED_NETWORKS if n != ipaddress.ip_network("127.0.0.0/8"))


class Resolver:
    """Maps names to fixed addresses and records the lookups (an unknown name fails as in DNS)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table: dict[str, list[str]] = table
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError("unknown name")
        return self.table[host]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: the body ends when the connection closes
    drip_s: float = 0.0  # > 0: the whole answer (status line included) is sent one byte per drip_s


@dataclass
class Seen:
    path: str
    host: str | None
    sni: str | None


class MediaServer:
    def __init__(self, httpd: ThreadingHTTPServer, scheme: str) -> None:
        self.httpd, self.scheme = httpd, scheme
        self.port = httpd.server_address[1]
        self.routes: dict[str, Reply] = {}
        self.seen: list[Seen] = []
        self.sni: list[str | None] = []

    def url(self, path: str, host: str = "media.test") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        media: MediaServer = self.server.media  # type: ignore[attr-defined]
        sni = media.sni[-1] if media.sni else None
        media.seen.append(Seen(self.path, self.headers.get("Host"), sni))
        reply = media.routes.get(self.path, Reply(404, b"not found"))
        head = [f"HTTP/1.1 {reply.status} X", "Connection: close", *(f"{k}: {v}" for k, v in reply.headers.items())]
        if reply.content_length:
            head.append(f"Content-Length: {len(reply.body)}")
        answer = ("\r\n".join(head) + "\r\n\r\n").encode() + reply.body
        try:
            if reply.drip_s > 0:
                for i in range(len(answer)):
                    self.wfile.write(answer[i:i + 1])
                    self.wfile.flush()
                    time.sleep(reply.drip_s)
            else:
                self.wfile.write(answer)
        except OSError:
            pass  # the client gave up (a timeout or a size limit under test)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def media_server(tls: ssl.SSLContext | None = None) -> Iterator[MediaServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    media = MediaServer(httpd, "https" if tls else "http")
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: media.sni.append(name)
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.media = media  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield media
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def make_certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """(CA certificate, leaf certificate for `name`, leaf key), made with the openssl command line."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=omnistream test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={name}")
    (directory / "leaf.ext").write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                                        "authorityKeyIdentifier=keyid,issuer\nkeyUsage=digitalSignature\n"
                                        "extendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    return directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"

