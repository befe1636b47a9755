"""What the server refuses before the app parses anything: an ASGI layer in front of the routes.

In order: a Host header the server does not answer to (421; DNS rebinding), a missing or wrong API key (401 /
403), an upload endpoint called without a multipart body (415), a body over the size limit (413, counted as it
arrives, so a client that lies in Content-Length or sends chunks cannot pass it), a body that does not arrive
within the body timeout (408; a slow client must not hold one of the server's connections for ever) and an empty
body (400). A body under the limit is read here and replayed to the app, so at most ``max_bytes`` per request is
held. Refusals that leave a body unread close the connection, so its sender cannot keep it open by trickling on.

DNS rebinding: a web page on ``evil.example`` whose name the attacker re-points at 127.0.0.1 makes the visitor's
browser send requests to a server on the visitor's loopback, with ``Host: evil.example``. A keyless server on
loopback answers only to its loopback names; one with an API key need not check (the page cannot know the key).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from typing import Any

from fastapi.responses import JSONResponse

PUBLIC_PATHS = ("/health",)  # liveness probes carry no key
# Pages a browser navigates to cannot send a header: they ask for the key by HTTP Basic authentication (any user
# name, the key as password), and the browser then sends it with the page's own API calls.
BROWSER_PATHS = ("/", "/docs", "/docs/oauth2-redirect", "/openapi.json")
UPLOAD_PATHS = ("/v1/predict", "/v1/explain")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def error(status: int, message: str, *, close: bool = False, **headers: str) -> JSONResponse:
    """The server's one shape of refusal: ``{"detail": message}`` (`vitlab.serve.app.ErrorBody`)."""
    if close:  # the rest of the request is not read: the connection cannot carry another one
        headers["Connection"] = "close"
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


def default_allowed_hosts(api_key: str | None) -> tuple[str, ...]:
    """The Host names a server answers to unless told: its loopback names without a key, any with one."""
    return ("*",) if api_key else LOOPBACK_HOSTS


def host_name(host: str) -> str:
    """``Host`` header value -> the name without the port, lower case: ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, with or without a port
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name.rstrip(".") if colon and port.isdigit() else host.rstrip(".")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` (a Host header) names one of ``allowed``: exact names, ``*.example.org`` for its
    subdomains, ``*`` for any. The port is not compared: a rebinding page reaches the port either way."""
    name = host_name(host)
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class Guard:
    """ASGI layer: Host, API key, content type, size and arrival time of a body, refused before the app."""

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None,
        max_bytes: int,
        allowed_hosts: tuple[str, ...] | None = None,
        body_timeout_s: float = 60.0,
    ) -> None:
        self.app, self.max_bytes, self.body_timeout_s = app, max_bytes, body_timeout_s
        # compared as UTF-8 bytes on both sides: a header is bytes, and a key typed as "clé" arrives as UTF-8
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.allowed_hosts = tuple(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts(api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}  # bytes -> bytes
        refusal = self._check_host(headers) or self._check_key(scope["path"], headers)
        if refusal is None and scope["path"] in UPLOAD_PATHS and scope["method"] == "POST":
            refusal = self._check_upload_headers(headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, refusal = await self._read_body(receive)
        if refusal is None and not body and scope["path"] in UPLOAD_PATHS:
            refusal = error(400, "the request body is empty: send the image as multipart/form-data field 'file'")
        if refusal is not None:
            return await refusal(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect

        await self.app(scope, replay, send)

    def _check_host(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if host_allowed(host, self.allowed_hosts):
            return None
        return error(
            421,
            f"this server does not answer to Host {host or '(none)'!r}; it answers to {', '.join(self.allowed_hosts)} "
            "(vitlab serve --allowed-host NAME adds a name)",
        )

    def _check_key(self, path: str, headers: dict[bytes, bytes]) -> JSONResponse | None:
        if self.api_key is None or path in PUBLIC_PATHS:
            return None
        given = given_key(headers)
        if given and hmac.compare_digest(given, self.api_key):  # constant time
            return None
        if path in BROWSER_PATHS:  # 401 with a Basic challenge, wrong key too: the browser asks (again)
            message = "the API key is wrong" if given else "this page needs the server's API key"
            return error(401, message, **{"WWW-Authenticate": 'Basic realm="vitlab", charset="UTF-8"'})
        if given:
            return error(403, "the API key is wrong")
        return error(
            401,
            "this server needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            **{"WWW-Authenticate": "Bearer"},
        )

    def _check_upload_headers(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if not ctype.lower().startswith("multipart/form-data"):
            return error(
                415,
                f"Content-Type is {ctype or 'missing'!s}: send the image as multipart/form-data field 'file' "
                "(curl -F file=@image.png)",
            )
        length = headers.get(b"content-length", b"").decode("latin-1") or None
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return error(413, f"the upload is {length} bytes; the limit is {self.max_bytes} bytes", close=True)
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, JSONResponse | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s  # for the whole body: a trickle of bytes does not extend it
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                return b"", error(408, f"the request body did not arrive within {self.body_timeout_s:g} s", close=True)
            if message["type"] == "http.disconnect":
                return b"", error(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # stop reading: the rest of the body is never held
                return b"", error(413, f"the upload is over the limit of {self.max_bytes} bytes", close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def given_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a request carries, as bytes: ``Authorization: Bearer KEY``, ``X-API-Key: KEY``, or HTTP Basic's
    password (the browser sends it as UTF-8: the challenge says ``charset="UTF-8"``)."""
    scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer":
        return value.strip()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except ValueError:
            return None
    return headers.get(b"x-api-key")
