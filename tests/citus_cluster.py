"""A real Citus cluster on one machine: a coordinator and two workers, three PostgreSQL 15 servers on
three ports (tests/pg_cluster.py's throwaway clusters with ``shared_preload_libraries = 'citus'``).

Citus is built from ../shared/vendor/citus (``build.sh``, which ``.ci/run`` runs when it is missing);
tests that need it skip with ``unavailable_reason()`` where it is not installed.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import psycopg

from pg_cluster import Cluster, find_bindir
from pg_cluster import unavailable_reason as cluster_unavailable

SETTINGS = {
    "shared_preload_libraries": "citus",
    "max_prepared_transactions": "100",
    "citus.log_remote_commands": "off",
    # one machine, 2 cores: keep each node's background work small
    "max_worker_processes": "16",
}


def unavailable_reason() -> str | None:
    """Why a Citus cluster cannot be made here (no server binaries, or Citus not installed), or None."""
    reason = cluster_unavailable()
    if reason:
        return reason
    bindir = find_bindir()
    assert bindir is not None
    libdir = subprocess.run([str(bindir / "pg_config"), "--pkglibdir"], capture_output=True, text=True)
    if not (Path(libdir.stdout.strip()) / "citus.so").exists():
        return (
            f"Citus is not installed for PostgreSQL {bindir.parent.name} "
            "(build it with ../shared/vendor/citus/build.sh, as .ci/run does)"
        )
    return None


class CitusCluster:
    """Coordinator + ``workers`` worker nodes; ``url`` is the coordinator's (where baragg connects)."""

    def __init__(self, workers: int = 2) -> None:
        self.nodes: list[Cluster] = []
        try:
            for _ in range(workers + 1):
                self.nodes.append(Cluster(settings=SETTINGS))
            for node in self.nodes:
                with psycopg.connect(node.url, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.coordinator.port,))
                for node in self.workers:
                    conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (node.port,))
        except BaseException:
            self.destroy()
            raise

    @property
    def coordinator(self) -> Cluster:
        return self.nodes[0]

    @property
    def workers(self) -> list[Cluster]:
        return self.nodes[1:]

    @property
    def url(self) -> str:
        return self.coordinator.url

    def new_database(self, name: str) -> str:
        """A fresh database with Citus on every node (Citus propagates CREATE DATABASE only from 13 on
        when asked, so it is made node by node and the workers are added to it); returns its URL."""
        for node in self.nodes:
            with psycopg.connect(node.url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            with psycopg.connect(_with_db(node.url, name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        with psycopg.connect(_with_db(self.url, name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.coordinator.port,))
            for node in self.workers:
                conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (node.port,))
        return _with_db(self.url, name)

    def destroy(self) -> None:
        """Stop every node at once (immediate: a throwaway cluster needs no clean shutdown) and
        remove their files."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node._run(str(node.bindir / "pg_ctl"), "-D", str(node.data), "-m", "immediate", "-w", "stop")
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.destroy()


def _with_db(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name
