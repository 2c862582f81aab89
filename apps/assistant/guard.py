"""What the assistant's HTTP server checks before any endpoint, as ASGI
middleware (`Guard`): only requests whose Host header names this server
(DNS rebinding), browser requests only from its own page unless
--allow-origin says otherwise (then with CORS headers), at most
--max-connections open connections (uvicorn's own cap answers in plain
text; this one in the API's JSON shape); and the headers every response
carries."""

import ipaddress
import logging
import re
import socket

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse, Response

from .errors import RequestError, busy

log = logging.getLogger("mlx_kvq.assistant")

PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
CORS_HEADERS = {"Vary": "Origin", "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Conversation-Id",
                "Access-Control-Expose-Headers": "X-Conversation-Id"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"", "0.0.0.0", "::"}
HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?")


def host_allowed(header: str, bound: str, port: int) -> bool:
    """Whether a Host header names this server."""
    m = HOST_RE.fullmatch(header.strip().lower())
    if not m or int(m.group(2) or 80) != port:
        return False
    name = m.group(1).strip("[]")
    if bound in WILDCARD:
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in {"localhost", socket.gethostname().lower(),
                            socket.getfqdn().lower()}
    return name in (LOOPBACK if bound in LOOPBACK else {bound.lower()})


def url_of(host: str, port: int) -> str:
    host = "127.0.0.1" if host in WILDCARD else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def error_response(e: RequestError, headers=None) -> JSONResponse:
    if e.status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(e.body(), e.status, headers)


class Guard:
    """ASGI middleware: the Host and Origin checks, the connection cap, and
    the headers every response carries."""

    def __init__(self, app, host: str, port: int, allow_origins, max_connections: int,
                 connections):
        self.app, self.host, self.port = app, host, port
        self.allow_origins = set(allow_origins)
        self.max_connections, self.connections = max_connections, connections
        self.refused = 0  # requests refused because too many connections were open

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        try:
            if self.connections() > self.max_connections:
                self.refused += 1
                raise busy(f"the server holds its limit of {self.max_connections} "
                           "connections (--max-connections); try again shortly")
            self._check_host(headers)
            cors = self._check_origin(scope["method"], headers)
        except RequestError as e:
            log.info("%s %s -> %d: %s", scope["method"], scope["path"][:200], e.status,
                     e.message)
            return await error_response(e, PAGE_HEADERS)(scope, receive, send)
        extra = {**PAGE_HEADERS, **({"Access-Control-Allow-Origin": cors, **CORS_HEADERS}
                                    if cors else {})}
        if scope["method"] == "OPTIONS":
            return await Response(status_code=204, headers=extra)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _check_host(self, headers: Headers):
        host = headers.get("host")
        if not host or not host_allowed(host, self.host, self.port):
            raise RequestError(403, f"Host {host!r} does not name this server; it answers "
                               f"at {url_of(self.host, self.port)}", code="bad_host")

    def _check_origin(self, method: str, headers: Headers):
        """The origin to allow in CORS headers (None: same origin); refuses others."""
        origin, site = headers.get("origin"), headers.get("sec-fetch-site")
        if origin == f"http://{headers['host']}":
            return None
        if origin is None and (site in (None, "same-origin", "none") or (
                method == "GET" and headers.get("sec-fetch-mode") == "navigate")):
            return None
        if "*" in self.allow_origins or origin in self.allow_origins:
            return origin or "*"
        raise RequestError(403, f"cross-origin request from {origin or site!r} refused; "
                           "start the server with --allow-origin ORIGIN to allow it",
                           code="cross_origin")
