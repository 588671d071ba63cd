"""Addresses scangate refuses to send requests to on a user's word."""

from __future__ import annotations

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
