"""A throwaway PostgreSQL 15 cluster with pg_cron, for the pg_cron tests.

Debian's server binaries (/usr/lib/postgresql/15/bin) and its postgresql-15-cron package (installed by
.ci/run when missing). initdb refuses to run as root, so as root the cluster belongs to a system user
created for it (baragg-pgtest) and is run with runuser. It listens on a free loopback port, trusts local
connections, and is stopped and deleted at the end. Callers skip (with the reason) when it cannot start.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import make_conninfo

BIN = Path(os.environ.get("BARAGG_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "baragg-pgtest"
CRON_DATABASE = "postgres"


class Unavailable(Exception):
    """Why the cluster cannot be had here (the tests skip with this text)."""


@dataclass
class Cluster:
    directory: Path
    port: int
    run_as: str | None  # OS user to run the server as (None: the current one)

    def url(self, dbname: str = CRON_DATABASE, user: str = "postgres") -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, dbname=dbname, user=user)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def stop(self) -> None:
        _run(
            self.run_as,
            [str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop"],
        )

    def log_tail(self, lines: int = 40) -> str:
        log = self.directory / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _run(user: str | None, args: list[str]) -> subprocess.CompletedProcess[str]:
    command = ["runuser", "-u", user, "--", *args] if user else args
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _os_user() -> str | None:
    """None when not root; else the system user for the cluster, created when missing."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise Unavailable(f"cannot create the OS user {OS_USER}: {made.stderr.strip()}") from None
    if shutil.which("runuser") is None:
        raise Unavailable("runuser is missing (needed to run PostgreSQL as a non-root user)")
    return OS_USER


def start(*, pg_cron: bool = True) -> Cluster:
    """initdb + start; with pg_cron preloaded and CREATE EXTENSION pg_cron in the postgres database."""
    for binary in ("initdb", "pg_ctl", "postgres"):
        if not (BIN / binary).exists():
            raise Unavailable(f"no PostgreSQL server binaries in {BIN} ({binary} missing)")
    if pg_cron:
        libdir = subprocess.run([str(BIN / "pg_config"), "--pkglibdir"], capture_output=True, text=True)
        if not (Path(libdir.stdout.strip()) / "pg_cron.so").exists():
            raise Unavailable("pg_cron is not installed for this server (apt-get install postgresql-15-cron)")
    user = _os_user()
    directory = Path(tempfile.mkdtemp(prefix="baragg-pg15-"))
    if user:
        shutil.chown(directory, user)
    cluster = Cluster(directory, _free_port(), user)
    init = _run(
        user,
        [str(BIN / "initdb"), "-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--locale=C.UTF-8", "--no-sync"],
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise Unavailable(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
    settings = [
        f"port = {cluster.port}",
        "listen_addresses = '127.0.0.1'",
        f"unix_socket_directories = '{directory}'",
        "fsync = off",
        "synchronous_commit = off",
        "max_connections = 40",
    ]
    if pg_cron:
        settings += [
            "shared_preload_libraries = 'pg_cron'",
            f"cron.database_name = '{CRON_DATABASE}'",
            "cron.host = '127.0.0.1'",
        ]
    with (cluster.data / "postgresql.conf").open("a") as conf:
        conf.write("\n".join(settings) + "\n")
    started = _run(
        user,
        [str(BIN / "pg_ctl"), "-D", str(cluster.data), "-l", str(directory / "server.log"), "-w", "-t", "60",
         "start"],
    )  # fmt: skip
    if started.returncode != 0:
        tail = cluster.log_tail(5)
        shutil.rmtree(directory, ignore_errors=True)
        raise Unavailable(f"PostgreSQL 15 did not start: {tail or started.stderr.strip()}")
    return cluster


def remove(cluster: Cluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.directory, ignore_errors=True)
