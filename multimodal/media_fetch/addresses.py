"""Which resolved addresses a media fetch may connect to: the blocked networks (loopback, private,
link-local, ULA, multicast, reserved, documentation...), IPv4 addresses embedded in IPv6 ones, and the
default resolver."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> addresses as text

BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",  # "this network", unspecified
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services)
    "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15",  # IETF protocol assignments, 6to4 relays, benchmarking
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
    "::/96",  # unspecified, loopback, IPv4-compatible
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard
    "2001::/23",  # IETF protocol assignments (Teredo...)
    "2001:db8::/32",  # documentation
    "fc00::/7",  # unique local
    "fe80::/10", "fec0::/10",  # link-local, site-local
    "ff00::/8",  # multicast
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, 6to4, well-known NAT64), else None."""
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_blocked(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """True when the address, or the IPv4 address it carries, lies in one of the networks."""
    candidates = [address, embedded_ipv4(address)]
    return any(c is not None and c.version == n.version and c in n for n in networks for c in candidates)


def system_resolver(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives for the host, in its order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
