"""A throwaway PostgreSQL cluster that a test may stop and start (restarts, outages).

Uses the system's PostgreSQL binaries (Debian's postgresql-NN: initdb, pg_ctl), run as an unprivileged
user because initdb refuses root (``baragg_pg``, created when running as root and missing). Listens
on a free port of 127.0.0.1 with trust authentication. Tests that need it skip (with the reason)
where the binaries are missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

USER = "baragg_pg"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/NN/bin with initdb and pg_ctl ($BARAGG_PG_BINDIR first)."""
    candidates = [os.environ.get("BARAGG_PG_BINDIR", "")]
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    for c in candidates:
        if c and all(os.access(Path(c, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def unavailable_reason() -> str | None:
    """Why a cluster cannot be made here, or None."""
    if find_bindir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser"
        try:
            pwd.getpwnam(USER)
        except KeyError:
            if shutil.which("useradd") is None:
                return f"no user {USER} and no useradd to create it"
    return None


class Cluster:
    """initdb + pg_ctl in a temporary directory; ``stop()``/``start()`` to simulate outages."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        assert self.bindir is not None
        self.root = Path(tempfile.mkdtemp(prefix="baragg-pgcluster-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.sockets.mkdir()
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", USER], check=True, capture_output=True
                )
            self.as_user = ["runuser", "-u", USER, "--"]
            entry = pwd.getpwnam(USER)
            for path in (self.root, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        res = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {res.stderr.strip()[-2000:]}")

    def start(self, wait: bool = True) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.sockets}"
            " -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=60"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w" if wait else "-W",
            "start",
        )
        if wait:
            self.wait_ready()

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
