"""The Fleet gateway of a deployment: the one door SuperNodes use, which opens onto the Fleet
API and nothing else.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr``: register a node's
key, start a run) and the Runtime API (SuperExec, ServerApps) on one HTTP port. Whoever
reaches that port reaches all three, and registering a key is open to anyone who can (the
SuperLink cannot tell an operator from a stranger). So ``reefl deploy`` binds the SuperLink
to the loopback interface, where only this host's users and processes reach it, and puts this
gateway on the address the SuperNodes connect to: it forwards ``/v1/fleet/...`` and
``/health`` to the SuperLink, headers and body untouched (a SuperNode's signed requests stay
valid), and answers every other path with 404. With TLS it serves the deployment's server
certificate and checks the SuperLink's against the CA.

``python -m reefl.launch.gateway LISTEN UPSTREAM [--certfile F --keyfile F --cafile F]``.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# What SuperNodes use (flwr/supernode/fleet_http_client.py): /v1/fleet/<rpc> and /health.
# Strict: one plain segment after /v1/fleet/, so no dot segment or escape can lead elsewhere.
FLEET_PATH = re.compile(r"/v1/fleet/[A-Za-z0-9_-]+|/health")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length", "host"}
REFUSAL = {"detail": "this address serves only Flower's Fleet API (SuperNodes); the Control "
                     "API is on the SuperLink host's loopback interface"}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def is_fleet_path(path: str) -> bool:
    """Whether ``path`` (as sent, undecoded) is a Fleet API call or the health check."""
    return FLEET_PATH.fullmatch(path) is not None


def make_app(upstream: str, verify: ssl.SSLContext | bool = True, transport: Any = None
             ) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The gateway as an ASGI app forwarding Fleet API requests to ``upstream`` (the
    SuperLink's ``http(s)://127.0.0.1:PORT``); ``transport``: httpx's, for tests."""
    import httpx

    client = httpx.AsyncClient(base_url=upstream, verify=verify, transport=transport,
                               timeout=httpx.Timeout(120.0, connect=10.0))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        sent = scope.get("raw_path") or scope["path"].encode("latin-1")
        if not is_fleet_path(sent.decode("latin-1")):
            await _answer(send, 404, json.dumps(REFUSAL).encode(),
                          [(b"content-type", b"application/json")])
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            response = await client.request(scope["method"], scope["path"], params=query or None,
                                            headers=headers, content=bytes(body))
        except httpx.HTTPError as err:
            await _answer(send, 502, json.dumps({"detail": f"SuperLink unreachable: {err}"})
                          .encode(), [(b"content-type", b"application/json")])
            return
        kept = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
                if k.lower() not in HOP_BY_HOP]
        await _answer(send, response.status_code, response.content, kept)

    return app


async def _answer(send: Send, status: int, body: bytes,
                  headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """Serve the gateway on LISTEN (``host:port``) until stopped."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m reefl.launch.gateway")
    parser.add_argument("listen", help="host:port the SuperNodes connect to")
    parser.add_argument("upstream", help="the SuperLink, e.g. https://127.0.0.1:9093")
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    parser.add_argument("--cafile", help="the CA that signed the SuperLink's certificate")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=args.cafile)
                                     if args.cafile else True)
    uvicorn.run(make_app(args.upstream, verify), host=host.strip("[]"), port=int(port),
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, log_level="warning",
                lifespan="on")


if __name__ == "__main__":
    main()
