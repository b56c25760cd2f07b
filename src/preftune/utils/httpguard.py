"""What both local servers (`serve`, `label`) check before they act on a request (layer 0, stdlib).

Why stdlib and not an ASGI stack: both servers are small, single-user, localhost tools; the bugs
found in them were missing checks (Host, Origin, content type, Content-Length), which a framework
would not have added by itself either, and a framework plus an ASGI server would be two more
runtime dependencies for every user. The checks live here once, with tests that send each
hostile header on a raw socket.

- `Host` must name the address the server is bound to, or a loopback name when it is bound to
  loopback (DNS rebinding sends the attacker's hostname). A server bound to 0.0.0.0/:: on
  purpose accepts any Host.
- State-changing requests (POST) must be `application/json` (a cross-origin form or `text/plain`
  POST cannot set it without a CORS preflight, which we never answer), and an `Origin`, when
  sent, must be this server's own.
- `Content-Length`: exactly one header, digits only, at most the cap; otherwise 400/411/413,
  never a traceback.
"""

from __future__ import annotations

import hmac
import socket
import sys
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

from .errors import DataError
from .safeio import loads_json

__all__ = ["Refused", "QuietServer", "check_host", "check_post", "read_body", "check_bearer", "LOOPBACK_NAMES"]

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_ANY = {"0.0.0.0", "::", ""}


class Refused(Exception):
    """An HTTP status and a one-line reason the handler sends back as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class QuietServer(ThreadingHTTPServer):
    """A threading server that never prints a traceback for a client's bad request: a failure
    inside a handler is one line on stderr (the handler has already answered what it could)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler):
        if ":" in str(address[0]):
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            return  # the client went away
        print(f"preftune server: request from {client_address[0]} failed: {type(err).__name__}: {err}",
              file=sys.stderr)


def _names(server) -> set[str]:
    host, port = server.server_address[:2]
    bound = {str(host), f"[{host}]" if ":" in str(host) else str(host)}
    if str(host).startswith("127.") or host == "::1":
        bound |= LOOPBACK_NAMES
    return {n for name in bound for n in (name, f"{name}:{port}")}


def check_host(handler) -> None:
    """Refuse a request whose Host header names anything but this server."""
    host = handler.server.server_address[0]
    if str(host) in _ANY:
        return
    value = (handler.headers.get_all("Host") or [None])
    if len(value) != 1 or value[0] is None or value[0].strip().lower() not in _names(handler.server):
        raise Refused(421, "Host header does not name this server (only local requests are served)")


def check_post(handler) -> None:
    """JSON content type, and an Origin (if any) that is this server."""
    kind = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, "Content-Type must be application/json")
    origin = handler.headers.get("Origin")
    if origin is not None:  # browsers send it on cross-origin POSTs; it must be this very server
        parts = urlsplit(origin)
        if parts.scheme != "http" or parts.netloc.lower() != (handler.headers.get("Host") or "").strip().lower():
            raise Refused(403, "cross-origin request refused")


def read_body(handler, cap: int) -> bytes:
    """The request body, with a strictly parsed Content-Length of at most `cap` bytes."""
    values = handler.headers.get_all("Content-Length") or []
    if handler.headers.get("Transfer-Encoding"):
        raise Refused(411, "chunked bodies are not accepted; send Content-Length")
    if not values:
        raise Refused(411, "Content-Length is required")
    if len(values) > 1 or not values[0].strip().isdigit() or not values[0].strip().isascii():
        raise Refused(400, "Content-Length must be one non-negative integer")
    length = int(values[0].strip())
    if length > cap:
        raise Refused(413, f"request body over {cap} bytes")
    data = handler.rfile.read(length)
    if len(data) != length:
        raise Refused(400, "request body shorter than its Content-Length")
    return data


def parse_json(data: bytes):
    """A JSON body, or 400: the same strict reader as every file (safeio.loads_json): NaN/Infinity
    and duplicate keys refused, nesting bounded."""
    try:
        return loads_json(data, "request body")
    except DataError as err:
        raise Refused(400, f"{err.field}: {err.problem}"[:300]) from None


def check_bearer(handler, api_key: str | None) -> None:
    """With an API key set, every request needs `Authorization: Bearer KEY` (constant-time compare)."""
    if not api_key:
        return
    got = handler.headers.get("Authorization") or ""
    scheme, _, token = got.strip().partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 9110)
    # bytes, not str: compare_digest raises on a non-ASCII str, which left the client with no answer
    if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), api_key.encode()):
        raise Refused(401, "missing or wrong API key (Authorization: Bearer KEY)")
