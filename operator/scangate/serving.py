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


def server_tls(settings: Settings) -> ssl.SSLContext:
    """The webhook's certificate; a self-signed one when none is configured. Never plain
    HTTP: admission reviews and push tokens must not travel in the clear."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
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


async def serve(app: web.Application, settings: Settings, port: int, what: str,
                listening: asyncio.Event | None = None) -> None:
    """Serve `app` over TLS on `port` until cancelled; `listening` is set once it is."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_address, port, ssl_context=server_tls(settings))
    await site.start()
    log.info(f"{what} listening", extra={"port": port})
    if listening is not None:
        listening.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
