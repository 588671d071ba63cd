"""Requests to hosts that users name (registries, token realms, notification receivers):
each connection goes to an address that was checked against the operator's address policy.

A check before the request and a connection made afterwards would resolve the name twice,
and a name that answers first with an allowed address and then with a refused one (DNS
rebinding) would pass the check and reach the refused address. So the name is resolved
once, in the transport, as the connection is made: every address it gave is checked, and
the connection goes to one of exactly those addresses. TLS still verifies the name (SNI
and the certificate are the URL's host) and the Host header is unchanged.

Because the transport decides where to connect, environment proxies (HTTP_PROXY,
HTTPS_PROXY, NO_PROXY) are not used for these requests (trust_env=False): a proxy would
resolve the name again, out of the policy's sight.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import typing
from collections.abc import Awaitable, Callable

import httpcore
import httpx

from scangate.core.destinations import Destinations

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""A host name and port -> its addresses, in the order to try them."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of `host` as the system resolves them (getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend that resolves a name once, refuses it when any of its
    addresses is refused (DestinationRefused), and connects to a checked address."""

    def __init__(self, destinations: Destinations, resolver: Resolver | None = None) -> None:
        self.destinations = destinations
        self.resolver = resolver or system_resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port)
        self.destinations.check(host, port, addresses)
        error: Exception | None = None
        for address in addresses:  # only these: never the name again
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout,
                                                     local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        assert error is not None
        raise error

    async def _addresses(self, host: str, port: int) -> list[str]:
        literal = host.strip("[]")
        if _is_address(literal):
            return [literal]
        try:
            addresses = await self.resolver(host, port)
        except OSError as e:
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from None
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no address")
        return addresses

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION]
                                  | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("scangate does not connect to unix sockets for users")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the pinned backend (and no environment proxies)."""

    def __init__(self, destinations: Destinations, *, verify: ssl.SSLContext | bool = True,
                 resolver: Resolver | None = None) -> None:
        super().__init__(verify=verify, trust_env=False)
        # httpx makes its pool without a way to name the backend; the pool reads it here.
        self._pool._network_backend = PinnedBackend(destinations, resolver)  # type: ignore[union-attr]


def pinned_client(destinations: Destinations, *, verify: ssl.SSLContext | bool = True,
                  timeout: float = 10.0, resolver: Resolver | None = None
                  ) -> httpx.AsyncClient:
    """An httpx client whose every connection (redirects included) goes to an address the
    policy allows, resolved once; redirects are left to the caller."""
    return httpx.AsyncClient(
        transport=PinnedTransport(destinations, verify=verify, resolver=resolver),
        timeout=timeout, follow_redirects=False, trust_env=False)
