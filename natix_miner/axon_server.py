"""The axon's HTTP server, hardened: what a slow, oversized, malformed or off-route request costs.

bittensor's axon is uvicorn (h11) + FastAPI + its own middleware. Left as it is, it keeps a
connection that dribbles its headers open forever (uvicorn arms no timer before the first
answer), serves a base `/Synapse` route that nobody guards (a fresh keypair gets 200, and each
call adds an entry to the axon's nonce table), and answers a signed but malformed body with 500.
`harden` changes that, from the outside in:

- `GuardedH11Protocol` (uvicorn's h11 protocol plus two timers): a request's headers must arrive
  within `server.header_timeout_s` of the connection opening (or of the previous answer), its
  body within `server.body_timeout_s` of the headers (else 408); it also stamps the time the
  request's first byte arrived, from which the forward measures its answer budget.
- `Shield`, the outermost ASGI app: only POST to the served synapse routes passes (404 / 405
  otherwise, before bittensor sees the request, so no per-request error line), with a header
  block within `server.max_header_bytes` (431; h11 already refuses a larger one that arrives in
  pieces), headers that parse into the synapse (400, bittensor answers 500), a declared body
  length within the decode caps (411 / 413), and the body read as JSON whatever content type
  the caller gave (FastAPI answers 500 to a JSON body without one).
- the body check that replaces the axon's `verify_body_integrity`: not JSON or not an object
  -> 400, fields of the wrong type -> 422, body hash not the signed one -> 400.
- the base `/Synapse` route is removed; uvicorn's keep-alive and connection limit are set.
"""

import asyncio
import collections
import json
import time
from typing import Any, Callable, Iterable

import h11
from fastapi import HTTPException, Request
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from natix_miner import request_context
from natix_miner.logsafe import clip
from natix_miner.settings import MinerSettings, ServerSettings

# The axon's default route, answered by a `ping` forward that no blacklist guards.
BASE_ROUTE = "Synapse"
# Room for the synapse's JSON around the base64 image (terminal infos, field names).
BODY_OVERHEAD_BYTES = 64 * 1024


def protocol_class(settings: ServerSettings) -> type:
    """uvicorn's h11 protocol with header and body timeouts and a first-byte arrival stamp."""

    class GuardedH11Protocol(H11Protocol):
        header_timeout_s = settings.header_timeout_s
        body_timeout_s = settings.body_timeout_s

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._natix_timer: Any = None
            self._natix_first_byte: Any = None
            self._natix_in_body = False
            super().connection_made(transport)
            self._natix_arm(self.header_timeout_s, self._natix_header_timeout)

        def _natix_arm(self, delay: float, callback: Callable[[], None]) -> None:
            self._natix_cancel()
            self._natix_timer = self.loop.call_later(delay, callback)

        def _natix_cancel(self) -> None:
            if self._natix_timer is not None:
                self._natix_timer.cancel()
                self._natix_timer = None

        def data_received(self, data: bytes) -> None:
            if self._natix_first_byte is None and self.conn.their_state is h11.IDLE:
                self._natix_first_byte = time.monotonic()
            scope_before = self.scope
            super().data_received(data)
            if self.scope is not None and self.scope is not scope_before:
                # A new request's task was created (not yet run): hand it its arrival time.
                self.scope["state"]["natix_arrival"] = self._natix_first_byte or time.monotonic()
                self._natix_first_byte = None
            state = self.conn.their_state
            if state is h11.SEND_BODY and not self._natix_in_body:
                self._natix_in_body = True
                self._natix_arm(self.body_timeout_s, self._natix_body_timeout)
            elif state is not h11.SEND_BODY and state is not h11.IDLE:
                self._natix_in_body = False
                self._natix_cancel()  # request complete: the forward bounds its own time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._natix_in_body = False
                self._natix_arm(self.header_timeout_s, self._natix_header_timeout)

        def connection_lost(self, exc: Any) -> None:
            self._natix_cancel()
            super().connection_lost(exc)

        def _natix_header_timeout(self) -> None:
            self._natix_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def _natix_body_timeout(self) -> None:
            self._natix_timer = None
            if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
                return
            try:
                if self.cycle is not None and not self.cycle.response_started:
                    msg = b'{"message": "request body not received in time"}'
                    self.transport.write(self.conn.send(h11.Response(status_code=408, headers=[
                        (b"content-type", b"application/json"), (b"connection", b"close"),
                        (b"content-length", str(len(msg)).encode())])))
                    self.transport.write(self.conn.send(h11.Data(data=msg)))
                    self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return GuardedH11Protocol


class Shield:
    """Outermost ASGI app: arrival context, routes, methods, header and body-length caps."""

    def __init__(self, app: Any, routes: dict[str, type], *, max_header_bytes: int,
                 max_body_bytes: int) -> None:
        self.app = app
        self.routes = {f"/{name}": cls for name, cls in routes.items()}
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.refused: collections.Counter = collections.Counter()

    async def _answer(self, send: Callable, status: int, reason: str, message: str) -> None:
        self.refused[reason] += 1
        body = json.dumps({"message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        request_context.begin(scope.get("state", {}).get("natix_arrival"))
        synapse_cls = self.routes.get(scope["path"])
        if synapse_cls is None:
            await self._answer(send, 404, "unknown_route", "unknown route")
            return
        if scope["method"] != "POST":
            await self._answer(send, 405, "bad_method", "only POST is served")
            return
        raw_headers = scope["headers"]
        if sum(len(k) + len(v) for k, v in raw_headers) > self.max_header_bytes:
            await self._answer(send, 431, "headers_too_large",
                               f"request headers over {self.max_header_bytes} bytes")
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        try:  # what bittensor's middleware does next; it answers a failure with 500
            synapse_cls.from_headers(headers)
        except (ValidationError, TypeError, ValueError):
            await self._answer(send, 400, "bad_headers",
                               "request headers do not parse into the synapse")
            return
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # The body is JSON whatever the caller said (FastAPI answers 500 otherwise).
            scope = dict(scope, headers=[(k, v) for k, v in raw_headers if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        length = headers.get("content-length")
        if length is None:
            await self._answer(send, 411, "no_length", "a content-length is required")
            return
        try:
            size = int(length)
        except ValueError:
            await self._answer(send, 400, "bad_length", "content-length is not a number")
            return
        if size > self.max_body_bytes:
            await self._answer(send, 413, "body_too_large",
                               f"body of {size} bytes > {self.max_body_bytes} accepted")
            return
        await self.app(scope, receive, send)


def body_check(axon: Any) -> Callable:
    """A drop-in for `Axon.verify_body_integrity` that answers 400/422 instead of 500."""

    async def verify_body_integrity(request: Request) -> dict:
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "request body is not JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "request body must be a JSON object")
        name = request.url.path.split("/")[1]
        cls = axon.forward_class_types.get(name)
        if cls is None:
            raise HTTPException(404, "unknown route")
        try:
            synapse = cls(**data)
        except (ValidationError, TypeError, ValueError) as exc:
            raise HTTPException(422, f"body does not fit {name}: {clip(str(exc), 300)}") from None
        if synapse.body_hash != request.headers.get("computed_body_hash", ""):
            raise HTTPException(400, "body hash differs from the signed computed_body_hash")
        return data

    return verify_body_integrity


def prepare(axon: Any) -> None:
    """Before any `attach`: our body check replaces the axon's (500 -> 400/422)."""
    axon.verify_body_integrity = body_check(axon)


def remove_route(axon: Any, name: str) -> None:
    """Stop serving route `name` (its forward, guard functions and FastAPI route)."""
    for table in (axon.forward_class_types, axon.blacklist_fns, axon.priority_fns,
                  axon.forward_fns, axon.verify_fns):
        table.pop(name, None)
    for router in (axon.router, axon.app.router):
        router.routes = [r for r in router.routes if getattr(r, "path", None) != f"/{name}"]


def harden(axon: Any, settings: MinerSettings) -> Shield:
    """After the `attach` calls, before `axon.start()`: routes, timeouts, caps. Returns the shield."""
    remove_route(axon, BASE_ROUTE)
    server = settings.server
    config = axon.fast_config
    config.http = protocol_class(server)
    config.timeout_keep_alive = server.keep_alive_s
    config.limit_concurrency = server.max_connections
    config.h11_max_incomplete_event_size = server.max_header_bytes
    shield = Shield(axon.app, dict(axon.forward_class_types),
                    max_header_bytes=server.max_header_bytes,
                    max_body_bytes=settings.decode.max_base64_chars + BODY_OVERHEAD_BYTES)
    config.app = shield
    return shield
