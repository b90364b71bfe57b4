"""A tiny HTTP client and a running status server for the web tests."""

from __future__ import annotations

import gzip
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from baragg.db import Database
from baragg.metrics import Metrics
from baragg.web import Liveness, StatusServer


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as res:
            status, hdrs, body = res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        status, hdrs, body = err.code, dict(err.headers), err.read()
    lowered = {k.lower(): v for k, v in hdrs.items()}  # header names are case-insensitive
    if lowered.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return Response(status, lowered, body)


@contextmanager
def running_server(
    db: Database,
    *,
    metrics: Metrics | None = None,
    liveness: Liveness | None = None,
    pages: bool = True,
    now: datetime | None = None,
    db_timeout: float = 5,
    token: str | None = None,
) -> Iterator[StatusServer]:
    """A StatusServer on a free port with its own metrics registry, stopped afterwards."""
    server = StatusServer(
        db,
        "127.0.0.1",
        0,
        metrics=metrics or Metrics(),
        liveness=liveness,
        pages=pages,
        refresh_seconds=1,
        db_timeout=db_timeout,  # a dead database answers 503 after this long (tests of it pass 1)
        now=now,
        token=token,
    )
    with server:
        yield server


def closed_port_database() -> Database:
    """A database URL on a local port where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Database(f"postgresql://postgres@127.0.0.1:{port}/baragg")
