"""Where scangate may send a request on a user's word.

Registry URLs, image hosts, token realms and (later) notification receivers are
named by users, and scangate's requests carry its network position and sometimes
credentials. Addresses that only an attacker would name are refused: loopback
(the operator's own pod), link-local and the cloud metadata services (instance
credentials), and the cluster's API server. An operator configuration may allow
some of these networks by CIDR (the sandbox allows its loopback registry); the
API server's own address and port are refused even then.

An IPv4 address can be written inside an IPv6 one that reaches it (IPv4-mapped and
-compatible, SIIT's IPv4-translated, NAT64's well-known prefix, 6to4, Teredo): such an
address is judged as each IPv4 address it carries as well as by itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Metadata services: AWS/Azure/GCP/OpenStack (169.254.169.254, inside link-local), AWS's
# IPv6 one, Alibaba Cloud's, Oracle Cloud's, and Azure's WireServer (168.63.129.16: the
# VM agent's channel, which hands out extension settings and certificates).
METADATA = tuple(ipaddress.ip_network(n) for n in (
    "169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32", "192.0.0.192/32",
    "168.63.129.16/32"))
REFUSED = (
    ("loopback", tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128"))),
    ("unspecified", tuple(ipaddress.ip_network(n) for n in ("0.0.0.0/8", "::/128"))),
    ("cloud metadata", METADATA),
    ("link-local", tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10"))),
)


class DestinationRefused(ValueError):
    """A request scangate will not make."""


# IPv6 prefixes whose last 32 bits are an IPv4 address that the IPv6 one reaches.
_LAST_32_BITS = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96",            # IPv4-compatible (deprecated, still routed by some stacks)
    "::ffff:0:0/96",    # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT)
    "64:ff9b::/96",     # NAT64, the well-known prefix
    "64:ff9b:1::/48",   # NAT64, local use
))
_6TO4 = ipaddress.IPv6Network("2002::/16")


def _address(value: str) -> Address:
    address = ipaddress.ip_address(value.strip("[]").split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def embedded(address: Address) -> list[Address]:
    """`address` and the IPv4 addresses an IPv6 one carries, which it may reach."""
    found: list[Address] = [address]
    if isinstance(address, ipaddress.IPv4Address):
        return found
    packed = int(address)
    if any(address in n for n in _LAST_32_BITS):
        found.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
    if address in _6TO4:
        found.append(ipaddress.IPv4Address((packed >> 80) & 0xFFFFFFFF))
    if address.teredo:
        found += address.teredo  # (server, client)
    return found


@dataclass(frozen=True)
class Destinations:
    """The operator's policy of addresses it refuses to reach."""

    allowed: tuple[Network, ...] = ()
    """Networks allowed although they fall in a refused class."""
    api_server: frozenset[tuple[Address, int]] = field(default_factory=frozenset)
    """The API server's addresses and ports: always refused."""

    @classmethod
    def of(cls, allowed: Iterable[str], api_server: Iterable[tuple[str, int]]) -> Destinations:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in allowed),
                   frozenset((_address(host), port) for host, port in api_server))

    def check(self, host: str, port: int, addresses: Iterable[str]) -> None:
        """Refuse `host:port` if any address it resolves to is refused."""
        for text in addresses:
            for address in embedded(_address(text)):
                self._check_one(host, port, text, address)

    def _check_one(self, host: str, port: int, text: str, address: Address) -> None:
        if (address, port) in self.api_server:
            raise DestinationRefused(f"{host}:{port} is the cluster's API server")
        if any(address in n for n in self.allowed):
            return
        shown = str(address) if str(_address(text)) == str(address) else (
            f"{text.strip('[]')} (which reaches {address})")
        for what, networks in REFUSED:
            if any(address in n for n in networks):
                raise DestinationRefused(
                    f"{host} resolves to {shown}, a {what} address; scangate does not "
                    "send requests there unless its allowedNetworks configuration "
                    "allows it")
