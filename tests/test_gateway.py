"""The Fleet gateway of ``reefl deploy`` (``launch.gateway``): Fleet API requests go through
to the SuperLink unchanged; the Control and Runtime APIs are not reachable through it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from reefl.launch.deployment import parse_fleet_address
from reefl.launch.errors import RunConfigError
from reefl.launch.gateway import make_app


def _through_gateway(method: str, path: str, body: bytes = b"",
                     headers: dict[str, str] | None = None) -> tuple[httpx.Response, list]:
    """One request through the gateway to a recording stand-in SuperLink."""
    seen: list[httpx.Request] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"from the superlink:" + request.content,
                              headers={"content-type": "application/protobuf"})

    app = make_app("https://127.0.0.1:9", transport=httpx.MockTransport(superlink))

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="https://gateway") as client:
            return await client.request(method, path, content=body, headers=headers)

    return asyncio.run(call()), seen


def test_the_fleet_api_goes_through_unchanged() -> None:
    response, seen = _through_gateway("POST", "/v1/fleet/pull-messages", b"\x08\x01",
                                      {"x-flwr-signature": "abc", "content-type": "x/y"})
    assert response.status_code == 200 and response.content == b"from the superlink:\x08\x01"
    assert len(seen) == 1 and seen[0].url.path == "/v1/fleet/pull-messages"
    assert seen[0].headers["x-flwr-signature"] == "abc" and seen[0].content == b"\x08\x01"
    assert _through_gateway("GET", "/health")[0].status_code == 200


@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/start-run",
                                  "/v1/runtime/pull-messages", "/docs", "/v1/fleetx/a",
                                  "/v1/fleet/a/b"])
def test_everything_else_is_refused(path: str) -> None:
    response, seen = _through_gateway("POST", path, b"x")
    assert response.status_code == 404 and seen == []
    assert "only Flower's Fleet API" in response.json()["detail"]


@pytest.mark.parametrize("raw", [b"/v1/fleet/../control/list-nodes",
                                 b"/v1/fleet/%2e%2e/control/list-nodes",
                                 b"/v1/fleet/pull-messages%2f..%2f..%2fcontrol"])
def test_a_path_that_could_lead_elsewhere_is_refused(raw: bytes) -> None:
    """As a raw HTTP request would send it (the ASGI scope's raw_path, not normalised)."""
    from reefl.launch.gateway import make_app

    sent: list[dict] = []

    async def call() -> None:
        app = make_app("https://127.0.0.1:9", transport=httpx.MockTransport(
            lambda request: httpx.Response(500)))
        scope = {"type": "http", "method": "POST", "path": raw.decode(), "raw_path": raw,
                 "query_string": b"", "headers": []}

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 404


def test_fleet_address_parsing() -> None:
    assert parse_fleet_address("127.0.0.1") == ("127.0.0.1", 0)
    assert parse_fleet_address("10.0.0.5:9092") == ("10.0.0.5", 9092)
    assert parse_fleet_address("[::1]:9092") == ("::1", 9092)
    for bad in ("example.org", "10.0.0.5:x", "10.0.0.5:70000"):
        with pytest.raises(RunConfigError, match="--fleet-address"):
            parse_fleet_address(bad)
