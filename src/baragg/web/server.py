"""The HTTP server behind `baragg serve` and `baragg worker --metrics-port`.

Starlette routes on uvicorn (asyncio, HTTP/1.1): an idle or half-open connection costs a socket, not
a thread. Database work runs on a bounded pool of threads (``DB_THREADS``, as many as the connection
pool holds); /healthz never waits for it. A connection must send a whole request head within
``read_timeout`` seconds, idle keep-alive connections close after ``KEEP_ALIVE_SECONDS``, and beyond
``max_connections`` open connections requests get 503 at once. Every page asset is served from here,
so the page works with no internet. The Host check, the token and the security headers are in
``baragg.web.guard``.

Routes: ``/`` and ``/static/*`` (the status page, unless pages are off), ``/api/*`` (JSON, see
docs/api.md), ``/metrics`` (Prometheus), ``/healthz`` (the process and its loop are alive),
``/readyz`` (the database is reachable and its schema current).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import mimetypes
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import anyio
import psycopg
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from baragg import __version__, migrate
from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.metrics import Metrics, default_metrics
from baragg.web import api
from baragg.web.guard import Guard, allowed_host_names

log = logging.getLogger(__name__)

# How long a request waits for the database before it answers 503: a status page must say
# "database down" quickly rather than hang.
DB_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 10.0  # to send a whole request head, from connecting or from the last response
KEEP_ALIVE_SECONDS = 5  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 512  # open connections; beyond them a request is answered 503 at once
DB_THREADS = 8  # threads doing database work for requests, = the connection pool's size
GZIP_MIN_BYTES = 4096


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
        if getattr(worker, "waiting_for_database", False):
            return True, "worker waiting for the database"
        threads = [t for t in threading.enumerate() if pattern.fullmatch(t.name) and t.is_alive()]
        if threads:
            return True, f"{len(threads)} claim thread(s) running"
        if clock() - started <= grace:
            return True, "worker starting"
        return False, "no claim thread is running"

    return probe


def readiness(db: Database, timeout: float = DB_TIMEOUT_SECONDS) -> tuple[bool, str]:
    """Whether the database answers and its schema is exactly what this baragg ships.

    The reason never names the server (host, port, URL): /readyz may be reachable by more people than
    the database; the error itself goes to this process's log.
    """
    quick = dataclasses.replace(db, url=make_conninfo(db.url, connect_timeout=str(max(1, int(timeout)))))
    try:
        states = migrate.status(quick)
    except (BaraggError, psycopg.Error) as exc:
        _log_once(f"readiness check: database unreachable: {_first_line(exc)}")
        return False, "database unreachable (the server's log has the error)"
    pending = [s.name for s in states if s.state == "pending"]
    if pending:
        return False, f"schema not current: {len(pending)} pending migration(s), first {pending[0]}"
    problems = migrate.warnings_for(states)
    if problems:
        return False, f"schema differs: {problems[0]}"
    return True, f"database reachable, schema current ({len(states)} migrations)"


_last_logged: list[str] = [""]


def _log_once(message: str) -> None:
    """A WARNING when the problem is new, DEBUG while it repeats (probes poll every few seconds)."""
    level = logging.DEBUG if _last_logged[0] == message else logging.WARNING
    _last_logged[0] = message
    log.log(level, "%s", message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def deadline_protocol(read_timeout: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request head.

    uvicorn closes idle keep-alive connections, but any byte resets that timer and a connection that
    never sends a request is never timed out: a client trickling its headers (slowloris) or opening
    connections and sending nothing would hold them forever. Here a connection that has not sent a
    complete request line and headers ``read_timeout`` seconds after it opened (or after its previous
    response) is closed.
    """

    class DeadlineH11Protocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.head_deadline = self.loop.call_later(read_timeout, self._expire)

        def _disarm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _expire(self) -> None:
            self.head_deadline = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError, UnicodeError) as exc:
        raise BaraggError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise BaraggError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    return sock


class StatusServer:
    """Serves the status page, the JSON API, /metrics and the health endpoints for one database.

    Nothing happens at construction; start() (background thread) or serve_forever() binds the port.
    ``allowed_hosts`` adds names to the Host check; ``token`` (when set) is required everywhere but
    /healthz (see baragg.web.guard).
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
        allowed_hosts: Sequence[str] = (),
        token: str | None = None,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
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
        self.allowed_hosts = allowed_host_names(host, allowed_hosts)
        self.token = token
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._pool: ConnectionPool | None = None
        self._thread: threading.Thread | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._static: dict[str, tuple[bytes, str]] = {}

    # -- life cycle -------------------------------------------------------------------------
    def bind(self) -> None:
        """Open the port and the connection pool (the pool connects in the background)."""
        if self._server is not None:
            return
        self._socket = listen(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._pool = ConnectionPool(
            self.db.url,
            min_size=1,
            max_size=DB_THREADS,
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
        for name in ("uvicorn", "uvicorn.error"):  # its start/stop chatter is not the operator's news
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        config = uvicorn.Config(
            self.app(),
            lifespan="off",
            loop="asyncio",
            http=deadline_protocol(self.read_timeout),
            ws="none",
            interface="asgi3",
            limit_concurrency=self.max_connections,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            timeout_graceful_shutdown=5,
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (uvicorn's handlers; it re-raises the signal after a
        graceful stop, so the caller's handlers still decide the exit)."""
        self.bind()
        assert self._server is not None and self._socket is not None
        log.info("serving on %s", self.url)
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self.close()

    def start(self) -> StatusServer:
        """Serve from a daemon thread (the worker's way); returns self once the port answers."""
        self.bind()
        assert self._server is not None and self._socket is not None
        server, sock = self._server, self._socket
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="baragg-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            self.close()
            raise BaraggError(f"the status server on {self.url} did not start")
        log.info("serving on %s", self.url)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=15)
                self._thread = None
            self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
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

    # -- the application --------------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [
            Route("/metrics", self.get_metrics),
            Route("/healthz", self.get_healthz),
            Route("/readyz", self.get_readyz),
        ]
        if self.pages:
            routes += [
                Route("/", self.get_index),
                Route("/index.html", self.get_index),
                Route("/static/{name:path}", self.get_static),
                Route("/api/tasks", self.get_tasks),
                Route("/api/summary", self.get_summary),
                Route("/api/symbols", self.get_symbols),
                Route("/api/bars", self.get_bars),
                Route("/api/config", self.get_config),
            ]
        return Starlette(
            routes=routes,
            middleware=[
                Middleware(Guard, allowed_hosts=self.allowed_hosts, token=self.token),
                Middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES, compresslevel=5),
            ],
            exception_handlers={HTTPException: self.http_error},
        )

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return json_response({"error": f"not found: {request.url.path}"}, 404)
        if exc.status_code == 405:
            return json_response({"error": f"method not allowed: {request.method} (GET and HEAD only)"}, 405)
        return json_response({"error": exc.detail}, exc.status_code)

    async def in_thread(self, request: Request, work: Callable[[dict[str, str]], Response]) -> Response:
        """Run ``work(params)`` (database work) on the bounded thread pool; map errors to statuses."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(DB_THREADS)
        try:
            params = query_params(request.scope.get("query_string", b""))
            return await anyio.to_thread.run_sync(work, params, limiter=self._limiter)
        except api.UnknownSymbol as exc:
            return json_response({"error": str(exc)}, 404)
        except InvalidInput as exc:
            return json_response({"error": str(exc)}, 400)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            return json_response(
                {"error": f"schema not current (run `baragg db upgrade`): {_first_line(exc)}"}, 503
            )
        except (PoolTimeout, psycopg.OperationalError, BaraggError) as exc:
            # Never the server's address in a response; the log has the error.
            _log_once(f"request {request.url.path}: database unavailable: {_first_line(exc)}")
            return json_response({"error": "database unavailable (the server's log has the error)"}, 503)
        except psycopg.DataError as exc:  # a value PostgreSQL refused (range, encoding)
            return json_response({"error": f"bad parameter: {_first_line(exc)}"}, 400)
        except Exception as exc:  # the server keeps serving; the log has the traceback
            log.exception("error serving %s", request.url.path)
            return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)

    # -- endpoints --------------------------------------------------------------------------
    async def get_metrics(self, request: Request) -> Response:
        return await self.in_thread(
            request,
            lambda _: Response(
                self.metrics.exposition(),
                media_type=CONTENT_TYPE_LATEST,
                headers={"cache-control": "no-store"},
            ),
        )

    async def get_healthz(self, request: Request) -> Response:
        # Answered on the event loop: never waits behind database work.
        alive, reason = self.liveness.check()
        return json_response({"status": "ok" if alive else "dead", "reason": reason}, 200 if alive else 503)

    async def get_readyz(self, request: Request) -> Response:
        def work(_: dict[str, str]) -> Response:
            ready, reason = readiness(self.db, self.db_timeout)
            return json_response(
                {"status": "ready" if ready else "not ready", "reason": reason}, 200 if ready else 503
            )

        return await self.in_thread(request, work)

    async def get_tasks(self, request: Request) -> Response:
        def work(params: dict[str, str]) -> Response:
            no_params(params)
            with self.connection() as conn:
                return json_response(api.tasks(conn, self.now))

        return await self.in_thread(request, work)

    async def get_summary(self, request: Request) -> Response:
        def work(params: dict[str, str]) -> Response:
            no_params(params)
            with self.connection() as conn:
                return json_response(api.summary(conn, self.now))

        return await self.in_thread(request, work)

    async def get_symbols(self, request: Request) -> Response:
        def work(params: dict[str, str]) -> Response:
            no_params(params)
            with self.connection() as conn:
                return json_response(api.symbols(conn))

        return await self.in_thread(request, work)

    async def get_bars(self, request: Request) -> Response:
        def work(params: dict[str, str]) -> Response:
            parsed = api.bars_params(params)
            with self.connection() as conn:
                text = api.bars_json(conn, parsed)
            return Response(
                text.encode(), media_type="application/json", headers={"cache-control": "no-store"}
            )

        return await self.in_thread(request, work)

    async def get_config(self, request: Request) -> Response:
        try:
            no_params(query_params(request.scope.get("query_string", b"")))
        except InvalidInput as exc:
            return json_response({"error": str(exc)}, 400)
        return json_response({"version": __version__, "refresh_seconds": self.refresh_seconds})

    async def get_index(self, request: Request) -> Response:
        return self.static_file("index.html")

    async def get_static(self, request: Request) -> Response:
        return self.static_file(request.path_params["name"])

    def static_file(self, name: str) -> Response:
        """A file of the package's static/ folder (read once), or 404."""
        if name not in self._static:
            if not name or "/" in name or "\\" in name or name.startswith("."):
                return json_response({"error": f"not found: /static/{name}"}, 404)
            entry = resources.files("baragg.web").joinpath("static").joinpath(name)
            if not entry.is_file():
                return json_response({"error": f"not found: /static/{name}"}, 404)
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript"):
                ctype += "; charset=utf-8"
            self._static[name] = (entry.read_bytes(), ctype)
        body, ctype = self._static[name]
        return Response(body, headers={"content-type": ctype, "cache-control": "no-cache"})


def json_response(value: Any, status: int = 200) -> Response:
    return Response(
        (json.dumps(value, default=str) + "\n").encode(),
        status_code=status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def query_params(raw: bytes) -> dict[str, str]:
    """The query string as a dict; NUL and other control characters are bad input, not a 500."""
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, max_num_fields=50)
    except ValueError as exc:
        raise InvalidInput("malformed query string (at most 50 parameters)") from exc
    for key, value in pairs:
        if _CONTROL.search(key) or _CONTROL.search(value):
            raise InvalidInput(f"{_CONTROL.sub('?', key)[:40]}: contains a control character")
    return dict(pairs)


def no_params(params: dict[str, str]) -> None:
    if params:
        raise InvalidInput(f"unknown parameter: {sorted(params)[0]}")


def start_for_worker(
    db: Database,
    worker: Any,
    host: str,
    port: int,
    *,
    pages: bool = False,
    allowed_hosts: Sequence[str] = (),
    token: str | None = None,
) -> StatusServer:
    """Serve /metrics, /healthz and /readyz (and, with pages, the status page and API) from a
    background thread beside a running worker daemon; /healthz follows its claim threads."""
    server = StatusServer(
        db,
        host,
        port,
        pages=pages,
        liveness=Liveness(probe=worker_probe(worker)),
        allowed_hosts=allowed_hosts,
        token=token,
    )
    return server.start()
