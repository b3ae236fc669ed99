"""MediaPolicy.fetch against a real HTTP(S) server on 127.0.0.1: allowed names (mapped to loopback by an
injected resolver, with loopback taken off the blocked list for those tests only), the default policy's
refusals (addresses, domains, credentials, redirects), the byte cap, the total timeout, TLS SNI and
certificate checks, and local files under the allowed directory. No error message may carry a resolved
address or a local path."""

from __future__ import annotations

import io
import ipaddress
import os
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnistream.engine.entrypoints.cli import build_parser
from omnistream.multimodal.errors import MediaError, MediaLimitError
from omnistream.multimodal.image import load_image
from omnistream.multimodal.media_fetch import (
    BLOCKED_NETWORKS,
    MediaFetchError,
    MediaFetchTimeout,
    MediaPolicy,
    MediaTooLargeError,
    MediaURLNotAllowed,
)
from omnistream.multimodal.media_fetch.addresses import is_blocked
from tests.multimodal.media import encode_audio
from tests.multimodal.media_server import (
    WITHOUT_LOOPBACK,
    MediaServer,
    Reply,
    Resolver,
    make_certificates,
    media_server,
)


def _png() -> bytes:
    pixels = (np.arange(24 * 24 * 3).reshape(24, 24, 3) % 251).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
WAV = encode_audio("wav", "pcm_s16le", rate=16000, seconds=0.5)


def loopback_policy(domains: tuple[str, ...] = ("media.test",), table: dict[str, list[str]] | None = None,
                    **kwargs: object) -> MediaPolicy:
    """A policy whose allowed names resolve to the test server, with loopback unblocked (tests only)."""
    resolver = Resolver(table or {"media.test": ["127.0.0.1"]})
    return MediaPolicy(allowed_domains=domains, resolver=resolver, blocked_networks=WITHOUT_LOOPBACK, **kwargs)


@pytest.fixture
def server() -> Iterator[MediaServer]:
    with media_server() as running:
        running.routes.update({"/image.png": Reply(body=PNG, headers={"Content-Type": "image/png"}),
                               "/audio.wav": Reply(body=WAV, headers={"Content-Type": "audio/wav"})})
        yield running


def refused(fetch: Callable[[], object], kind: type[MediaError], *secrets: str) -> str:
    """The error's message, after checking its type and that it names none of the secrets."""
    with pytest.raises(kind) as error:
        fetch()
    message = str(error.value)
    assert message.startswith(("image:", "audio:")), message
    for secret in secrets:
        assert secret not in message, message
    return message


# ---- allowed fetches --------------------------------------------------------------------------------


def test_allowed_name_is_fetched_from_the_address_it_was_checked_at(server):
    policy = loopback_policy()
    assert policy.fetch(server.url("/image.png"), "image") == PNG
    assert policy.fetch(server.url("/audio.wav"), "audio") == WAV
    # media.test exists in no DNS: only a connection to the address checked once per fetch can have worked
    assert policy.resolver.calls == ["media.test", "media.test"]
    assert [seen.host for seen in server.seen] == [f"media.test:{server.port}"] * 2
    assert load_image(policy.fetch(server.url("/image.png"), "image")).size == (24, 24)


@pytest.mark.parametrize("host", ["MEDIA.Test", "media.test.", "cdn.media.test", "a.b.media.test"])
def test_subdomains_and_spellings_of_an_allowed_domain(server, host):
    policy = loopback_policy(table={host.lower().rstrip("."): ["127.0.0.1"]})
    assert policy.fetch(server.url("/image.png", host), "image") == PNG


def test_idna_names_match_in_either_spelling(server):
    policy = loopback_policy(domains=("bücher.test",), table={"xn--bcher-kva.test": ["127.0.0.1"]})
    for host in ("xn--bcher-kva.test", "BÜCHER.test", "ｂüｃｈｅｒ．test"):
        assert policy.fetch(server.url("/image.png", host), "image") == PNG
    assert server.seen[0].host == f"xn--bcher-kva.test:{server.port}"


def test_redirects_are_followed_and_rechecked(server):
    server.routes["/moved"] = Reply(302, headers={"Location": "/image.png"})
    server.routes["/elsewhere"] = Reply(301, headers={"Location": server.url("/moved", "cdn.media.test")})
    policy = loopback_policy(table={"media.test": ["127.0.0.1"], "cdn.media.test": ["127.0.0.1"]})
    assert policy.fetch(server.url("/elsewhere"), "image") == PNG
    assert [seen.path for seen in server.seen] == ["/elsewhere", "/moved", "/image.png"]
    assert policy.resolver.calls == ["media.test", "cdn.media.test", "cdn.media.test"]


def test_the_next_checked_address_is_tried_when_one_refuses_connections(server):
    policy = loopback_policy(table={"media.test": ["127.0.0.2", "127.0.0.1"]})  # nothing listens on 127.0.0.2
    assert policy.fetch(server.url("/image.png"), "image") == PNG


# ---- the default policy's refusals ------------------------------------------------------------------


def test_remote_fetching_is_off_by_default(server):
    message = refused(lambda: MediaPolicy().fetch(server.url("/image.png", "127.0.0.1"), "image"),
                      MediaURLNotAllowed, "127.0.0.1")
    assert "--allowed-media-domains" in message
    assert server.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                  "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "[::1]", "[::]",
                                  "[::ffff:127.0.0.1]", "[::ffff:a00:1]", "[fe80::1]", "[fc00::1]", "[fd12::1]",
                                  "[ff02::1]", "[2002:7f00:1::]", "[64:ff9b::a9fe:a9fe]"])
def test_default_policy_refuses_addresses_that_are_not_public(server, host):
    bare = host.strip("[]")
    policy = MediaPolicy(allowed_domains=(bare,))  # listed: only the address rules can refuse it
    message = refused(lambda: policy.fetch(server.url("/image.png", host), "image"), MediaURLNotAllowed, bare)
    assert "address" in message
    assert server.seen == []


@pytest.mark.parametrize("addresses", [["127.0.0.1"], ["10.1.2.3"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"],
                                       ["93.184.215.14", "10.0.0.7"], ["2606:2800:21f:cb07::1", "fd00::7"]])
def test_a_name_is_refused_when_any_of_its_addresses_is_not_public(server, addresses):
    policy = MediaPolicy(allowed_domains=("media.test",), resolver=Resolver({"media.test": addresses}))
    refused(lambda: policy.fetch(server.url("/image.png"), "image"), MediaURLNotAllowed, *addresses)
    assert server.seen == []


def test_blocked_networks_cover_embedded_ipv4_forms():
    for text in ("::ffff:10.0.0.1", "2002:a9fe:a9fe::1", "64:ff9b::7f00:1"):
        assert is_blocked(ipaddress.ip_address(text), BLOCKED_NETWORKS), text
    for text in ("93.184.215.14", "2606:2800:21f:cb07::1", "::ffff:93.184.215.14", "2002:5db8:d70e::1"):
        assert not is_blocked(ipaddress.ip_address(text), BLOCKED_NETWORKS), text


@pytest.mark.parametrize("url", [
    "http://elsewhere.test/image.png",
    "http://media.test.elsewhere.test/image.png",
    "http://evilmedia.test/image.png",
    "http://media.test@elsewhere.test/image.png",
    "http://user:pass@media.test/image.png",
    "http://elsewhere.test#@media.test/image.png",
    "http://elsewhere.test\\@media.test/image.png",
    "ftp://media.test/image.png",
    "gopher://media.test/image.png",
    "http://media.test:99999/image.png",
    "http:///image.png",
])
def test_names_off_the_list_and_url_tricks_are_refused_before_any_lookup(url):
    policy = loopback_policy()
    refused(lambda: policy.fetch(url, "image"), MediaURLNotAllowed)
    assert policy.resolver.calls == []


def test_a_redirect_is_refused_when_its_target_is_not_allowed(server):
    server.routes.update({
        "/to-other-domain": Reply(302, headers={"Location": server.url("/image.png", "elsewhere.test")}),
        "/to-private-name": Reply(307, headers={"Location": server.url("/image.png", "inside.media.test")}),
        "/to-metadata": Reply(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
        "/to-file": Reply(302, headers={"Location": "file:///etc/passwd"}),
    })
    policy = loopback_policy(domains=("media.test", "169.254.169.254"),
                             table={"media.test": ["127.0.0.1"], "inside.media.test": ["10.0.0.8"]})
    for path in ("/to-other-domain", "/to-private-name", "/to-metadata", "/to-file"):
        refused(lambda: policy.fetch(server.url(path), "image"), MediaURLNotAllowed, "10.0.0.8", "169.254", "/etc")
    assert [seen.path for seen in server.seen] == ["/to-other-domain", "/to-private-name", "/to-metadata", "/to-file"]


def test_redirect_chains_are_limited(server):
    server.routes["/loop"] = Reply(302, headers={"Location": "/loop"})
    message = refused(lambda: loopback_policy(max_redirects=3).fetch(server.url("/loop"), "image"), MediaFetchError)
    assert "3" in message and len(server.seen) == 4


def test_error_statuses_and_unresolvable_names(server):
    refused(lambda: loopback_policy().fetch(server.url("/missing.png"), "image"), MediaFetchError, "127.0.0.1")
    policy = loopback_policy(domains=("test",))
    refused(lambda: policy.fetch(server.url("/image.png", "nowhere.test"), "image"), MediaFetchError)


# ---- size and time ----------------------------------------------------------------------------------


def test_declared_and_streamed_bodies_over_the_cap_are_refused(server):
    server.routes["/undeclared.png"] = Reply(body=PNG, content_length=False)
    cap = len(PNG) - 1
    for path in ("/image.png", "/undeclared.png"):
        with pytest.raises(MediaTooLargeError) as error:
            loopback_policy(max_bytes=cap).fetch(server.url(path), "image")
        assert isinstance(error.value, MediaLimitError)
        assert f"{cap} bytes" in str(error.value) and "--max-media-bytes" in str(error.value)
    assert loopback_policy(max_bytes=len(PNG)).fetch(server.url("/undeclared.png"), "image") == PNG


@pytest.mark.parametrize("reply", [Reply(body=PNG, drip_s=0.05), Reply(body=b"", drip_s=0.5)],
                         ids=["slow-body", "slow-headers"])
def test_a_slow_server_runs_into_the_total_timeout(server, reply):
    server.routes["/slow.png"] = reply
    started = time.monotonic()
    message = refused(lambda: loopback_policy(timeout_s=1.0).fetch(server.url("/slow.png"), "image"),
                      MediaFetchTimeout, "127.0.0.1")
    elapsed = time.monotonic() - started
    assert "--media-fetch-timeout" in message
    assert 0.9 < elapsed < 5.0, elapsed  # each byte comes well within any per-read timeout: only a total one ends it


def test_a_slow_resolver_runs_into_the_total_timeout(server):
    def slow(host: str, port: int) -> list[str]:
        time.sleep(3.0)
        return ["127.0.0.1"]

    policy = MediaPolicy(allowed_domains=("media.test",), resolver=slow, blocked_networks=WITHOUT_LOOPBACK,
                         timeout_s=0.5)
    started = time.monotonic()
    refused(lambda: policy.fetch(server.url("/image.png"), "image"), MediaFetchTimeout)
    assert time.monotonic() - started < 2.5
    assert server.seen == []


# ---- TLS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("media-tls"), "media.test")


def test_https_sends_the_name_for_sni_and_checks_the_certificate_against_it(certificates):
    ca, cert, key = certificates
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(ca))
    with media_server(tls) as server:
        server.routes["/image.png"] = Reply(body=PNG)
        policy = loopback_policy(domains=("test",), ssl_context=trusting,
                                 table={"media.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        assert policy.fetch(server.url("/image.png"), "image") == PNG
        assert server.seen[0].sni == "media.test" and server.seen[0].host == f"media.test:{server.port}"
        # same address, a name the certificate does not cover: the check uses the name, not the address
        message = refused(lambda: policy.fetch(server.url("/image.png", "other.test"), "image"), MediaFetchError,
                          "127.0.0.1")
        assert "certificate" in message
        untrusting = loopback_policy(ssl_context=ssl.create_default_context())
        refused(lambda: untrusting.fetch(server.url("/image.png"), "image"), MediaFetchError)
        assert len(server.seen) == 1


# ---- local files ------------------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path) -> Path:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "image.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(root / "sub" / "image.png", root / "inside-link.png")
    return root


def test_local_files_are_refused_without_an_allowed_path(media_root):
    for url in (f"file://{media_root}/sub/image.png", str(media_root / "sub" / "image.png")):
        message = refused(lambda: MediaPolicy().fetch(url, "image"), MediaURLNotAllowed, str(media_root))
        assert "--allowed-local-media-path" in message


def test_local_files_under_the_allowed_path_are_read(media_root):
    policy = MediaPolicy(allowed_local_path=media_root)
    for url in (f"file://{media_root}/sub/image.png", f"file://localhost{media_root}/sub/image.png",
                str(media_root / "sub" / "image.png"), "sub/image.png", f"file://{media_root}/sub/../inside-link.png",
                f"file://{media_root}/sub/image%2Epng"):
        assert policy.fetch(url, "image") == PNG, url


def test_local_paths_escaping_the_allowed_path_are_refused(media_root):
    policy = MediaPolicy(allowed_local_path=media_root)
    outside = media_root.parent / "secret.png"
    for url in (f"file://{outside}", str(outside), "../secret.png", f"file://{media_root}/../secret.png",
                f"file://{media_root}/sub/..%2F..%2Fsecret.png", f"file://{media_root}/escape.png", "escape.png",
                f"file://{media_root}/sub", f"file://{media_root}/missing.png", "/etc/passwd", "file:///etc/passwd",
                f"file://otherhost{media_root}/sub/image.png", f"{media_root}/sub/image.png\x00.txt"):
        refused(lambda: policy.fetch(url, "image"), MediaURLNotAllowed, str(media_root.parent), "/etc")


def test_local_files_over_the_cap_are_refused(media_root):
    policy = MediaPolicy(allowed_local_path=media_root, max_bytes=len(PNG) - 1)
    message = refused(lambda: policy.fetch("sub/image.png", "image"), MediaTooLargeError, str(media_root))
    assert "--max-media-bytes" in message


def test_data_urls_and_other_schemes():
    import base64

    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert MediaPolicy().fetch(url, "image") == PNG
    refused(lambda: MediaPolicy(max_bytes=len(PNG) - 1).fetch(url, "image"), MediaTooLargeError)
    for url in ("javascript:alert(1)", "ws://media.test/a.png", "c:\\media\\a.png"):
        refused(lambda: loopback_policy().fetch(url, "image"), MediaURLNotAllowed)


# ---- flags ------------------------------------------------------------------------------------------


def test_serve_flags_build_the_policy(tmp_path):
    args = build_parser().parse_args(["serve", "--allowed-media-domains", "Media.Test", "bücher.test",
                                      "--allowed-local-media-path", str(tmp_path), "--media-fetch-timeout", "2.5",
                                      "--max-media-bytes", "1000"])
    policy = MediaPolicy.from_args(args)
    assert policy.allowed_domains == ("media.test", "xn--bcher-kva.test")
    assert policy.allowed_local_path == tmp_path.resolve()
    assert (policy.timeout_s, policy.max_bytes, policy.blocked_networks) == (2.5, 1000, BLOCKED_NETWORKS)
    default = MediaPolicy.from_args(build_parser().parse_args(["serve"]))
    assert default.allowed_domains == () and default.allowed_local_path is None


@pytest.mark.parametrize("flags", [["--allowed-media-domains", "bad domain"], ["--allowed-media-domains", "a/b"],
                                   ["--allowed-local-media-path", "/nonexistent/omnistream-media"]])
def test_bad_policy_flags_are_errors_naming_the_flag(flags):
    with pytest.raises(ValueError, match=flags[0]):
        MediaPolicy.from_args(build_parser().parse_args(["serve", *flags]))


@pytest.mark.parametrize("flags", [["--media-fetch-timeout", "0"], ["--media-fetch-timeout", "inf"],
                                   ["--max-media-bytes", "0"]])
def test_bad_numeric_flags_are_refused_by_the_parser(flags):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *flags])
