"""The HTTP server behind `baragg serve` and `baragg worker --metrics-port`.

Standard library only (ThreadingHTTPServer): a handful of routes, no templates, static files shipped
in the package. Every page asset is served from here, so the page works with no internet.

Routes: ``/`` and ``/static/*`` (the status page, unless pages are off), ``/api/*`` (JSON, see
docs/api.md), ``/metrics`` (Prometheus), ``/healthz`` (the process and its loop are alive),
``/readyz`` (the database is reachable and its schema current).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import mimetypes
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from baragg import __version__, migrate
from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.metrics import Metrics, default_metrics
from baragg.web import api

log = logging.getLogger(__name__)

# How long a request waits for the database before it answers 503: a status page must say
# "database down" quickly rather than hang.
DB_TIMEOUT_SECONDS = 5


Probe = Callable[[], tuple[bool, str]]


class Liveness:
    """What /healthz reports: alive unless a probe says otherwise or the heartbeat went silent.

    ``beat()`` is the heartbeat (silence longer than ``max_silence`` is death); ``probe`` is any other
    check, e.g. that the worker's claim threads still run. With neither (``baragg serve``) the process
    answering the request is proof enough.
    """

    def __init__(
        self,
        max_silence: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe: Probe | None = None,
    ) -> None:
        self.max_silence = max_silence
        self.probe = probe
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def beat(self) -> None:
        with self._lock:
            self._last = self._clock()

    def check(self) -> tuple[bool, str]:
        reason = "alive"
        if self.probe is not None:
            alive, reason = self.probe()
            if not alive:
                return False, reason
        if self.max_silence is None:
            return True, reason
        with self._lock:
            silence = self._clock() - self._last
        if silence > self.max_silence:
            return False, f"no heartbeat from the loop for {silence:.0f}s (limit {self.max_silence:.0f}s)"
        return True, f"{reason}; last heartbeat {silence:.1f}s ago"


def worker_probe(
    worker: Any,
    thread_name: str = r"baragg-worker-\d+",
    grace: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> Probe:
    """Alive while the worker is not stopping and its claim threads run (after a start-up grace).

    The daemon (baragg.worker.Worker) names its claim threads ``baragg-worker-N`` (its connection
    pool's threads are ``baragg-worker-worker-N``: not claim threads); they catch every error and end
    only when the worker stops, so no such thread means the loop is dead.
    """
    started = clock()
    pattern = re.compile(thread_name)

    def probe() -> tuple[bool, str]:
        if getattr(worker, "stopping", False):
            return False, "worker is shutting down"
        threads = [t for t in threading.enumerate() if pattern.fullmatch(t.name) and t.is_alive()]
        if threads:
            return True, f"{len(threads)} claim thread(s) running"
        if clock() - started <= grace:
            return True, "worker starting"
        return False, "no claim thread is running"

    return probe


def readiness(db: Database, timeout: float = DB_TIMEOUT_SECONDS) -> tuple[bool, str]:
    """Whether the database answers and its schema is exactly what this baragg ships."""
    quick = dataclasses.replace(db, url=make_conninfo(db.url, connect_timeout=str(max(1, int(timeout)))))
    try:
        states = migrate.status(quick)
    except (BaraggError, psycopg.Error) as exc:
        return False, f"database unreachable: {str(exc).strip().splitlines()[0]}"
    pending = [s.name for s in states if s.state == "pending"]
    if pending:
        return False, f"schema not current: {len(pending)} pending migration(s), first {pending[0]}"
    problems = migrate.warnings_for(states)
    if problems:
        return False, f"schema differs: {problems[0]}"
    return True, f"database reachable, schema current ({len(states)} migrations)"


class StatusServer:
    """Serves the status page, the JSON API, /metrics and the health endpoints for one database.

    Nothing happens at construction; start() (background thread) or serve_forever() binds the port.
    """

    def __init__(
        self,
        db: Database,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        metrics: Metrics | None = None,
        liveness: Liveness | None = None,
        pages: bool = True,
        refresh_seconds: float = 5.0,
        db_timeout: float = DB_TIMEOUT_SECONDS,
        now: datetime | None = None,
    ) -> None:
        self.db = db
        self.db_timeout = db_timeout
        self.now = now  # a fixed clock for the page and the JSON API (tests, replays); None: real time
        self.host = host
        self.port = port
        self.metrics = metrics if metrics is not None else default_metrics()
        self.liveness = liveness if liveness is not None else Liveness()
        self.pages = pages
        self.refresh_seconds = refresh_seconds
        self._httpd: ThreadingHTTPServer | None = None
        self._pool: ConnectionPool | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------
    def bind(self) -> None:
        """Open the port and the connection pool (the pool connects in the background)."""
        if self._httpd is not None:
            return
        self._pool = ConnectionPool(
            self.db.url,
            min_size=1,
            max_size=8,
            kwargs={
                **self.db.connect_kwargs(),
                "autocommit": True,
                "connect_timeout": max(1, round(self.db_timeout)),
            },
            open=False,
            name="baragg-web",
            check=ConnectionPool.check_connection,
            timeout=self.db_timeout,
            # A failed background connect gives up at once; the next request tries again, so the
            # page recovers as soon as the database is back, without a growing backoff.
            reconnect_timeout=0,
        )
        self._pool.open(wait=False)
        self.metrics.watch_database(self.connection)
        handler = type("BoundHandler", (Handler,), {"app": self})
        server_class = ThreadingHTTPServer
        if ":" in self.host:  # an IPv6 address such as :: or ::1
            server_class = type(
                "ThreadingHTTPServerV6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}
            )
        try:
            self._httpd = server_class((self.host, self.port), handler)
        except OSError as exc:
            self._pool.close()
            raise BaraggError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self.bind()
        assert self._httpd is not None
        log.info("serving on %s", self.url)
        try:
            self._httpd.serve_forever(poll_interval=0.5)
        finally:
            self.close()

    def start(self) -> StatusServer:
        """Serve from a daemon thread (the worker's way); returns self once the port is open."""
        self.bind()
        assert self._httpd is not None
        httpd = self._httpd
        self._thread = threading.Thread(
            target=lambda: httpd.serve_forever(poll_interval=0.1), name="baragg-web", daemon=True
        )
        self._thread.start()
        log.info("serving on %s", self.url)
        return self

    def close(self) -> None:
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(timeout=5)
                self._thread = None
            self._httpd.server_close()
            self._httpd = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if self._pool is None:
            raise BaraggError("the server is not started")
        with self._pool.connection(timeout=self.db_timeout) as conn:
            yield conn


class Handler(BaseHTTPRequestHandler):
    """Routes one request. ``app`` is set on a per-server subclass."""

    app: StatusServer
    server_version = f"baragg/{__version__}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        try:
            params = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
        except ValueError:
            self.send_json({"error": "malformed query string"}, HTTPStatus.BAD_REQUEST)
            return
        try:
            route = self.routes().get(path)
            if route is not None:
                route(params)
            elif path.startswith("/static/") and self.app.pages:
                self.send_static(path.removeprefix("/static/"))
            else:
                self.send_json({"error": f"not found: {path}"}, HTTPStatus.NOT_FOUND)
        except api.UnknownSymbol as exc:
            self.send_json({"error": str(exc)}, HTTPStatus.NOT_FOUND)
        except InvalidInput as exc:
            self.send_json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except (PoolTimeout, psycopg.OperationalError, BaraggError) as exc:
            self.send_json(
                {"error": f"database unavailable: {str(exc).strip().splitlines()[0]}"},
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            self.send_json(
                {
                    "error": f"schema not current (run `baragg db upgrade`): {str(exc).strip().splitlines()[0]}"
                },
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # the server keeps serving; the log has the traceback
            log.exception("error serving %s", self.path)
            self.send_json(
                {"error": f"internal error: {type(exc).__name__}"}, HTTPStatus.INTERNAL_SERVER_ERROR
            )

    def routes(self) -> dict[str, Callable[[dict[str, str]], None]]:
        routes: dict[str, Callable[[dict[str, str]], None]] = {
            "/metrics": self.get_metrics,
            "/healthz": self.get_healthz,
            "/readyz": self.get_readyz,
        }
        if self.app.pages:
            routes.update(
                {
                    "/": lambda _: self.send_static("index.html"),
                    "/index.html": lambda _: self.send_static("index.html"),
                    "/api/tasks": self.get_tasks,
                    "/api/summary": self.get_summary,
                    "/api/symbols": self.get_symbols,
                    "/api/bars": self.get_bars,
                    "/api/config": self.get_config,
                    "/api/cron": self.get_cron,
                }
            )
        return routes

    # -- endpoints --------------------------------------------------------------------------
    def get_metrics(self, _: dict[str, str]) -> None:
        self.send_body(self.app.metrics.exposition(), CONTENT_TYPE_LATEST)

    def get_healthz(self, _: dict[str, str]) -> None:
        alive, reason = self.app.liveness.check()
        self.send_json(
            {"status": "ok" if alive else "dead", "reason": reason},
            HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE,
        )

    def get_readyz(self, _: dict[str, str]) -> None:
        ready, reason = readiness(self.app.db, self.app.db_timeout)
        self.send_json(
            {"status": "ready" if ready else "not ready", "reason": reason},
            HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
        )

    def get_tasks(self, params: dict[str, str]) -> None:
        self.no_params(params)
        with self.app.connection() as conn:
            self.send_json(api.tasks(conn, self.app.now))

    def get_summary(self, params: dict[str, str]) -> None:
        self.no_params(params)
        with self.app.connection() as conn:
            self.send_json(api.summary(conn, self.app.now))

    def get_symbols(self, params: dict[str, str]) -> None:
        self.no_params(params)
        with self.app.connection() as conn:
            self.send_json(api.symbols(conn))

    def get_bars(self, params: dict[str, str]) -> None:
        parsed = api.bars_params(params)
        with self.app.connection() as conn:
            text = api.bars_json(conn, parsed)
        self.send_body(text.encode(), "application/json")

    def get_cron(self, params: dict[str, str]) -> None:
        self.no_params(params)
        with self.app.connection() as conn:
            self.send_json(api.cron(conn))

    def get_config(self, params: dict[str, str]) -> None:
        self.no_params(params)
        self.send_json({"version": __version__, "refresh_seconds": self.app.refresh_seconds})

    @staticmethod
    def no_params(params: dict[str, str]) -> None:
        if params:
            raise InvalidInput(f"unknown parameter: {sorted(params)[0]}")

    # -- responses --------------------------------------------------------------------------
    def send_static(self, name: str) -> None:
        static = resources.files("baragg.web").joinpath("static")
        if not name or "/" in name or name.startswith("."):
            self.send_json({"error": f"not found: /static/{name}"}, HTTPStatus.NOT_FOUND)
            return
        entry = static.joinpath(name)
        if not entry.is_file():
            self.send_json({"error": f"not found: /static/{name}"}, HTTPStatus.NOT_FOUND)
            return
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
            ctype += "; charset=utf-8"
        self.send_body(entry.read_bytes(), ctype, cache="no-cache")

    def send_json(self, value: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_body((json.dumps(value, default=str) + "\n").encode(), "application/json", status)

    def send_body(
        self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK, cache: str = "no-store"
    ) -> None:
        gzipped = len(body) > 4096 and "gzip" in self.headers.get("Accept-Encoding", "")
        if gzipped:
            body = gzip.compress(body, compresslevel=5)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Vary", "Accept-Encoding")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def start_for_worker(db: Database, worker: Any, host: str, port: int, *, pages: bool = False) -> StatusServer:
    """Serve /metrics, /healthz and /readyz (and, with pages, the status page and API) from a
    background thread beside a running worker daemon; /healthz follows its claim threads."""
    server = StatusServer(db, host, port, pages=pages, liveness=Liveness(probe=worker_probe(worker)))
    return server.start()
