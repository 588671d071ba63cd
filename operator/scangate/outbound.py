"""Requests to hosts that users name (registries, token realms, notification receivers):
checked against the operator's address policy just before they are sent."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from scangate.core.destinations import Destinations


async def check_destination(destinations: Destinations, request: httpx.Request) -> None:
    """For httpx's request hook (it runs before every request, redirects included):
    raises DestinationRefused for an address the policy refuses, httpx.ConnectError for
    a name that does not resolve (as httpx would fail on its own lookup)."""
    host = request.url.host
    port = request.url.port or (443 if request.url.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                                 type=socket.SOCK_STREAM)
        except OSError as e:
            raise httpx.ConnectError(f"cannot resolve {host}: {e}", request=request) from None
        addresses = [str(info[4][0]) for info in infos]
    destinations.check(host, port, addresses)
