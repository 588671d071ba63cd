"""Addresses scangate refuses to send requests to on a user's word."""

from __future__ import annotations

import re

import pytest

from scangate.core.destinations import DestinationRefused, Destinations

DEFAULT = Destinations.of([], [("10.96.0.1", 443)])


@pytest.mark.parametrize(("address", "what"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("169.254.10.1", "link-local"),
    ("fe80::1%eth0", "link-local"), ("0.0.0.0", "unspecified"),
])
def test_refused_classes(address: str, what: str) -> None:
    with pytest.raises(DestinationRefused, match=what):
        DEFAULT.check("evil.example", 443, [address])


def test_ordinary_addresses_pass_and_one_bad_address_is_enough() -> None:
    DEFAULT.check("registry.example.com", 443, ["203.0.113.7", "10.1.2.3", "2001:db8::1"])
    with pytest.raises(DestinationRefused):
        DEFAULT.check("rebind.example", 443, ["203.0.113.7", "169.254.169.254"])


def test_the_api_server_is_refused_even_in_an_allowed_network() -> None:
    sandbox = Destinations.of(["127.0.0.0/8"], [("127.0.0.1", 6443)])
    sandbox.check("127.0.0.1", 5000, ["127.0.0.1"])
    with pytest.raises(DestinationRefused, match="API server"):
        sandbox.check("127.0.0.1", 6443, ["127.0.0.1"])
    with pytest.raises(DestinationRefused, match="API server"):
        DEFAULT.check("kubernetes.default.svc", 443, ["10.96.0.1"])
    DEFAULT.check("some-service", 8443, ["10.96.0.1"])  # another port of that address


# -- IPv4 inside IPv6, and Azure's WireServer ---------------------------------------------

@pytest.mark.parametrize(("address", "reaches", "what"), [
    ("::127.0.0.1", "127.0.0.1", "loopback"),                  # IPv4-compatible
    ("::ffff:127.0.0.1", "127.0.0.1", "loopback"),             # IPv4-mapped
    ("[::ffff:a9fe:a9fe]", "169.254.169.254", "cloud metadata"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254", "cloud metadata"),  # NAT64
    ("64:ff9b:1::a9fe:a9fe", "169.254.169.254", "cloud metadata"),  # NAT64, local use
    ("::ffff:0:a9fe:a9fe", "169.254.169.254", "cloud metadata"),  # IPv4-translated
    ("2002:a9fe:a9fe::1", "169.254.169.254", "cloud metadata"),   # 6to4
    ("2002:7f00:1::", "127.0.0.1", "loopback"),
    ("2001:0:a9fe:a9fe::", "169.254.169.254", "cloud metadata"),   # Teredo server
    ("168.63.129.16", "168.63.129.16", "cloud metadata"),          # Azure WireServer
    ("64:ff9b::a83f:8110", "168.63.129.16", "cloud metadata"),
])
def test_ipv4_addresses_inside_ipv6_ones_are_judged_as_what_they_reach(
        address: str, reaches: str, what: str) -> None:
    with pytest.raises(DestinationRefused, match=f"{re.escape(reaches)}.*a {what} address"):
        Destinations().check("h.example", 443, [address])


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111",
                                     "168.63.129.17", "::ffff:8.8.8.8"])
def test_public_addresses_inside_ipv6_stay_allowed(address: str) -> None:
    Destinations().check("h.example", 443, [address])


def test_an_allowed_network_allows_its_embeddings_too() -> None:
    Destinations.of(["127.0.0.0/8"], []).check("h", 80, ["::ffff:127.0.0.1", "::127.0.0.1"])


def test_the_api_server_is_refused_inside_ipv6_too() -> None:
    destinations = Destinations.of(["10.0.0.0/8"], [("10.0.0.1", 6443)])
    with pytest.raises(DestinationRefused, match="API server"):
        destinations.check("h", 6443, ["64:ff9b::a00:1"])
