"""What stands between the network and the status server: the Host check, the optional token, and the
security headers of every response.

- **Host check** (against DNS rebinding: a page on ``evil.example`` whose name is re-pointed at
  127.0.0.1 may send requests to the server, but its ``Host`` header still says ``evil.example``).
  Allowed: the bound address, ``localhost``, any IP literal (a request addressed to an IP cannot
  come from a rebound name) and the names the operator lists (``--allowed-host``; ``*.example.com``
  matches subdomains, ``*`` turns the check off).
- **Token** (``BARAGG_TOKEN`` or ``--token-file``): every path except ``/healthz`` needs
  ``Authorization: Bearer TOKEN`` (Prometheus, curl) or HTTP Basic with the token as the password
  (browsers ask for it on the 401's challenge). Without a token, only a loopback address may be
  bound unless the operator says ``--insecure``.
- **Headers**: no framing (``X-Frame-Options``, CSP ``frame-ancestors``), scripts, styles and
  connections from the server itself only (CSP), no MIME sniffing, no referrer.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import os
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baragg.errors import InvalidInput

MIN_TOKEN_LENGTH = 16
OPEN_PATHS = frozenset({"/healthz"})  # answered without a token: a liveness probe has none
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")

# The one inline style of the page: the <style> element that Lightweight Charts 5.2.1 adds for its
# attribution logo (a constant text; tests/test_page_browser.py fails on any CSP violation).
CHART_LOGO_STYLE = "'sha256-3pRED1tOXas1FXFoPb9TGCjmYe9XQsmO9OV23khV2nY='"

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": (
        f"default-src 'self'; style-src 'self' {CHART_LOGO_STYLE}; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}

_PORT = re.compile(r":\d{1,5}")


def host_name(header: str) -> str | None:
    """The host part of a Host header, lower case, IPv6 in brackets, no port; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[: end + 1], header[end + 1 :]
    else:
        name, colon, port = header.partition(":")
        rest = colon + port
    if rest and not _PORT.fullmatch(rest):
        return None
    name = name.rstrip(".")
    return name or None


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
    except ValueError:
        return False
    return True


def allowed_host_names(bound_host: str, configured: Iterable[str]) -> list[str]:
    """The names a Host header may carry: local names, the bound address, the configured ones."""
    names = list(LOCAL_NAMES)
    bound = bound_host.strip().lower()
    if bound and bound not in ("0.0.0.0", "::"):
        names.append(f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound)
    for item in configured:
        for name in item.split(","):
            name = name.strip().lower().rstrip(".")
            if name:
                names.append(name)
    return names


def host_allowed(name: str, allowed: Iterable[str]) -> bool:
    if is_ip_literal(name):
        return True
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is a loopback address ("" and 0.0.0.0 are not)."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def load_token(token_file: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token: the first line of ``token_file``, else $BARAGG_TOKEN, else None (no token)."""
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise InvalidInput(
                f"--token-file {token_file}: cannot read it: {getattr(exc, 'strerror', None) or exc}"
            ) from exc
        token, where = (text.splitlines() or [""])[0].strip(), f"--token-file {token_file}"
    else:
        token, where = environ.get("BARAGG_TOKEN", "").strip(), "BARAGG_TOKEN"
        if not token:
            return None
    if len(token) < MIN_TOKEN_LENGTH or any(ord(c) < 33 or ord(c) > 126 for c in token):
        raise InvalidInput(
            f"{where}: the token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without "
            "spaces (e.g. the output of `openssl rand -hex 32`)"
        )
    return token


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without a token, unless the operator insists."""
    if token or insecure or is_loopback(host):
        return
    where = host or "all interfaces"
    raise InvalidInput(
        f"refusing to serve on {where} without a token: set BARAGG_TOKEN or --token-file (browsers and "
        "Prometheus can send it), or pass --insecure (e.g. behind a proxy that authenticates)"
    )


def _token_matches(header: str | None, token: bytes) -> bool:
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        given = value.encode("utf-8", "replace")
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        given = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(given, token)


class Guard:
    """ASGI middleware: Host check, token check, security headers on every response."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str], token: str | None) -> None:
        self.app = app
        self.allowed = list(allowed_hosts)
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        headers = Headers(scope=scope)
        name = host_name(headers.get("host", ""))
        if name is None or not host_allowed(name, self.allowed):
            await _error(
                send_with_headers,
                400,
                f"Host header not allowed: {headers.get('host', '')[:100]!r} "
                "(list the name with --allowed-host or BARAGG_ALLOWED_HOSTS)",
            )
            return
        if (
            self.token is not None
            and scope["path"] not in OPEN_PATHS
            and not _token_matches(headers.get("authorization"), self.token)
        ):
            await _error(
                send_with_headers,
                401,
                "a token is required (Authorization: Bearer TOKEN, or HTTP Basic with the token as password)",
                [
                    (b"www-authenticate", b'Basic realm="baragg", charset="UTF-8"'),
                    (b"www-authenticate", b'Bearer realm="baragg"'),
                ],
            )
            return
        await self.app(scope, receive, send_with_headers)


async def _error(send: Send, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = (json.dumps({"error": text}) + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
