"""The push receiver's token check over a real HTTP connection: a token that is not
text (bytes that are no UTF-8) is refused with 401 like any wrong token, never a 500."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
from aiohttp import web

from scangate.config import Settings
from scangate.scanning.push import PushReceiver

TOKEN = "the-push-token"


class SecretOnly:
    """The one Kube call the token check makes: the push token's Secret."""

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name},
                "data": {"token": base64.b64encode(TOKEN.encode()).decode()}}


async def answers(headers: list[dict[bytes, bytes]]) -> list[httpx.Response]:
    async def on_push(images: Any) -> list[Any]:
        return []

    receiver = PushReceiver(SecretOnly(), Settings(), on_push)  # type: ignore[arg-type]
    app = web.Application()
    app.router.add_post("/push", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with httpx.AsyncClient() as client:
            return [await client.post(f"http://127.0.0.1:{port}/push", headers=h,
                                      content=b'{"image": "r.example/a/b:1"}')
                    for h in headers]
    finally:
        await runner.cleanup()


def test_a_token_that_is_not_text_is_refused_with_401() -> None:
    odd = [b"Bearer \xff\xfe", b"\xff\xfe", b"Bearer \xc3", b"Bearer " + TOKEN.encode() + b"\xff"]
    got = asyncio.run(answers([{b"Authorization": v} for v in odd]
                              + [{b"X-Scangate-Token": b"\xff\xfe"}]))
    assert [r.status_code for r in got] == [401] * 5, [r.text for r in got]
    assert all(r.json() == {"error": "a valid push token is required"} for r in got)


def test_the_right_token_still_passes() -> None:
    got = asyncio.run(answers([{b"Authorization": f"Bearer {TOKEN}".encode()}]))
    assert got[0].status_code == 200, got[0].text
