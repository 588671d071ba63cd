"""The operator's own HTTPS servers (admission and push receiver): TLS and serving."""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
from pathlib import Path

import kopf
from aiohttp import web

from scangate.config import Settings

log = logging.getLogger("scangate")


def server_tls(settings: Settings, client_ca: Path | None = None) -> ssl.SSLContext:
    """The webhook's certificate; a self-signed one when none is configured. Never plain
    HTTP: admission reviews and push tokens must not travel in the clear.

    With `client_ca`, a client certificate is asked for and, when one is presented,
    verified against that bundle alone (a server context trusts nothing else); it stays
    optional at the TLS level so that a kubelet's probe of /readyz still gets in: the
    handlers that need it check it (client_verified)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                         cafile=str(client_ca) if client_ca else None)
    if client_ca:
        context.verify_mode = ssl.CERT_OPTIONAL
    cert, key = settings.webhook_cert_file, settings.webhook_key_file
    if cert and key:
        context.load_cert_chain(cert, key)
        return context
    pem, private = kopf.WebhookServer.build_certificate([settings.webhook_host or "localhost"])
    with tempfile.TemporaryDirectory() as directory:
        cert_path, key_path = Path(directory) / "tls.crt", Path(directory) / "tls.key"
        cert_path.write_bytes(pem)
        key_path.write_bytes(private)
        context.load_cert_chain(cert_path, key_path)
    return context


def client_verified(request: web.Request) -> bool:
    """Whether the caller presented a client certificate that the server's client CA
    verified (see server_tls)."""
    return bool(request.transport and request.transport.get_extra_info("peercert"))


async def serve(app: web.Application, settings: Settings, port: int, what: str,
                listening: asyncio.Event | None = None, client_ca: Path | None = None
                ) -> None:
    """Serve `app` over TLS on `port` until cancelled; `listening` is set once it is."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_address, port,
                       ssl_context=server_tls(settings, client_ca))
    await site.start()
    log.info(f"{what} listening", extra={"port": port})
    if listening is not None:
        listening.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
