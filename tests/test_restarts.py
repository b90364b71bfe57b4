"""Workers against a PostgreSQL that starts late, goes away and comes back, through the real CLI.

A cluster of the system's PostgreSQL (tests/pg_cluster.py) is stopped and started for real; those
tests skip, with the reason, where its binaries are missing. The last one cuts a worker's session on
the shared test server instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest

from baragg import migrate
from baragg.db import Database
from conftest import create_database, url_for
from pg_cluster import Cluster, unavailable_reason
from scheduling_helpers import (
    T0,
    add_assets,
    add_minutes,
    hours_ago,
    iso,
    popen_cli,
    run_cli,
    sql1,
    task,
    tasks_from,
)
from web_client import closed_port_database, get

pytestmark = pytest.mark.slow

CLUSTER_SKIP = unavailable_reason()
# The outage of test_worker_resumes_within_seconds_after_an_outage (60 to reproduce issue 14's report).
OUTAGE_SECONDS = float(os.environ.get("BARAGG_TEST_OUTAGE_SECONDS", "10"))
needs_cluster = pytest.mark.skipif(
    CLUSTER_SKIP is not None, reason=f"no PostgreSQL cluster to restart: {CLUSTER_SKIP}"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture
def cluster_db(cluster: Cluster) -> Iterator[Database]:
    """A fresh database at the current schema on the restartable cluster (left running afterwards)."""
    name = f"baragg_r_{uuid.uuid4().hex[:10]}"
    create_database(cluster.url, name)
    db = Database(url_for(cluster.url, name))
    migrate.upgrade(db)
    yield db
    if not _up(cluster):
        cluster.start()


def _up(cluster: Cluster) -> bool:
    try:
        psycopg.connect(cluster.url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


class Lines:
    """Collects a process's stderr lines in a thread (so its pipe never fills) with their arrival time."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append((time.monotonic(), line))

    def count(self, text: str) -> int:
        return sum(1 for _, line in self.lines if text in line)

    def wait_for(self, text: str, n: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.count(text) < n:
            assert time.monotonic() < deadline, f"never saw {n} x {text!r}: {self.text()[-3000:]}"
            time.sleep(0.05)

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def stop_process(proc: subprocess.Popen[str], timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def poll_until(check, timeout: float, what: str) -> float:
    """Poll ``check()`` every 20 ms until true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return time.monotonic()
        except psycopg.OperationalError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def bars(url: str) -> int:
    """5m bars stored."""
    with psycopg.connect(url, connect_timeout=2) as c:
        return c.execute("SELECT count(*) FROM derived_data_bars WHERE timeframe = '5m'").fetchone()[0]


# ---------------------------------------------------------------------------------------------
# Item 10: a daemon started before the database, and an outage
# ---------------------------------------------------------------------------------------------
@needs_cluster
def test_worker_started_before_the_database_waits_and_starts_within_seconds(cluster, cluster_db):
    start = hours_ago(3)  # the daemon runs on the real clock: two hours that ended an hour ago
    with cluster_db.connect(autocommit=True) as conn:
        add_assets(conn, ["AAA"])
        add_minutes(conn, ["AAA"], start, start + timedelta(hours=2))
        tasks_from(conn, start)
    cluster.stop()
    proc = popen_cli("worker", "--interval", "1", url=cluster_db.url)
    lines = Lines(proc)
    try:
        lines.wait_for("the database is not reachable", n=3, timeout=30)
        assert proc.poll() is None, lines.text()
        assert "WARNING" in lines.text() and "retrying in" in lines.text()
        cluster.start()  # returns once the server accepts connections
        back = time.monotonic()
        first = poll_until(lambda: bars(cluster_db.url) > 0, 30, "the first bars")
    finally:
        code = stop_process(proc)
    assert code == 0, lines.text()[-3000:]
    print(f"first bars {first - back:.2f}s after the database accepted connections")
    assert first - back < 6, lines.text()[-3000:]


@needs_cluster
def test_startup_timeout_and_sigterm_while_waiting(cluster, cluster_db):
    cluster.stop()
    try:
        started = time.monotonic()
        res = run_cli("worker", "--startup-timeout", "2", url=cluster_db.url, timeout=60)
        assert res.returncode == 1
        assert time.monotonic() - started < 15
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(
            "baragg: error: the database was not reachable within --startup-timeout 2s:"
        ), res.stderr
        assert res.stderr.count("the database is not reachable") >= 2

        proc = popen_cli("worker", url=cluster_db.url)
        lines = Lines(proc)
        lines.wait_for("the database is not reachable", n=2, timeout=30)
        stopped = time.monotonic()
        assert stop_process(proc, timeout=15) == 0
        assert time.monotonic() - stopped < 5
    finally:
        cluster.start()


@needs_cluster
def test_worker_resumes_within_seconds_after_an_outage(cluster, cluster_db):
    start = hours_ago(4)  # the daemon runs on the real clock: data that ended an hour ago at the latest
    with cluster_db.connect(autocommit=True) as conn:
        add_assets(conn, ["AAA"])
        add_minutes(conn, ["AAA"], start, start + timedelta(hours=2))
        tasks_from(conn, start)
    proc = popen_cli("worker", "--interval", "1", url=cluster_db.url)
    lines = Lines(proc)
    try:
        poll_until(lambda: bars(cluster_db.url) == 24, 60, "the first two hours")
        cluster.stop()
        time.sleep(OUTAGE_SECONDS)  # long enough to reach the longest backoff
        assert proc.poll() is None, lines.text()[-3000:]
        cluster.start()
        back = time.monotonic()
        # New data for the next hour, and the task due: the worker must pick it up as soon as it can.
        with cluster_db.connect(autocommit=True) as conn:
            add_minutes(conn, ["AAA"], start + timedelta(hours=2), start + timedelta(hours=3))
            conn.execute("UPDATE data_agg_state SET next_run_at = now() WHERE timeframe = '5m'")
        first = poll_until(lambda: bars(cluster_db.url) > 24, 30, "bars after the outage")
    finally:
        code = stop_process(proc)
    assert code == 0, lines.text()[-3000:]
    print(f"resumed {first - back:.2f}s after the database came back")
    assert first - back < 6, lines.text()[-3000:]
    assert lines.count("WARNING") >= 3 and lines.count("the database is unavailable") >= 3, lines.text()[
        -3000:
    ]


# ---------------------------------------------------------------------------------------------
# Item 11: a restart during `run --once`
# ---------------------------------------------------------------------------------------------
@needs_cluster
def test_a_run_cut_off_by_a_restart_is_taken_over_by_the_next_run_at_once(cluster, cluster_db):
    with cluster_db.connect(autocommit=True) as conn:
        add_assets(conn, ["AAA"])
        add_minutes(conn, ["AAA"], T0, T0 + timedelta(days=2))
    now = T0 + timedelta(days=2, hours=1)
    victim = popen_cli(
        "run", "--once", "--now", iso(now), "--max-windows", "40", url=cluster_db.url,
        env={"BARAGG_TEST_PAUSE_BETWEEN_CALLS": "0.3"},
    )  # fmt: skip
    lines = Lines(victim)
    try:
        with cluster_db.connect(autocommit=True) as conn:
            poll_until(
                lambda: sql1(
                    conn,
                    "SELECT status = 'running' AND last_agg_bar_ts_utc > %s FROM data_agg_state"
                    " WHERE canonical_symbol = 'AAA' AND timeframe = '5m'",
                    T0 + timedelta(hours=2),
                ),
                60,
                "progress of the victim",
            )
        cluster.stop()  # the restart: the run loses its connection and cannot record anything
        assert victim.wait(60) == 1, lines.text()[-3000:]
    finally:
        if victim.poll() is None:
            victim.kill()
        cluster.start()
    assert "lost the database connection" in lines.text(), lines.text()[-3000:]
    with cluster_db.connect(autocommit=True) as conn:
        held = task(conn, "AAA", "5m")
        assert held["status"] == "running"  # nothing could be written: the lease runs 5 more minutes
        assert held["lease_expires_at"] > now + timedelta(minutes=4)

        # The next run (same clock: well inside the lease) takes it over and finishes it.
        started = time.monotonic()
        after = run_cli("run", "--once", "--now", iso(now), url=cluster_db.url, timeout=120)
        assert after.returncode == 0, after.stderr
        assert time.monotonic() - started < 30
        done = task(conn, "AAA", "5m")
        assert done["status"] == "idle" and done["last_agg_bar_ts_utc"] == T0 + timedelta(days=2)
        assert done["total_rescues"] == 1
        assert done["last_rescue"].startswith(f"the database session of worker {held['lease_owner']}")
        assert "ended before its lease ran out" in done["last_rescue"]
        assert sql1(conn, "SELECT count(*) FROM derived_data_bars WHERE timeframe = '5m'") == 2 * 288
        assert sql1(conn, "SELECT total_bars_created FROM data_agg_state WHERE timeframe = '5m'") == 2 * 288


def test_a_run_whose_session_is_cut_records_the_failure(db, conn):
    """The session dies but the server stays up (pg_terminate_backend, as a proxy or failover does):
    the run reconnects, records a transient failure and exits normally; nothing stays running."""
    add_assets(conn, ["AAA"])
    add_minutes(conn, ["AAA"], T0, T0 + timedelta(days=2))
    now = T0 + timedelta(days=2, hours=1)
    victim = popen_cli(
        "run", "--once", "--now", iso(now), "--max-windows", "40", url=db.url,
        env={"BARAGG_TEST_PAUSE_BETWEEN_CALLS": "0.3"},
    )  # fmt: skip
    try:
        poll_until(
            lambda: sql1(
                conn,
                "SELECT status = 'running' AND last_agg_bar_ts_utc > %s FROM data_agg_state"
                " WHERE canonical_symbol = 'AAA' AND timeframe = '5m'",
                T0 + timedelta(hours=2),
            ),
            60,
            "progress of the victim",
        )
        pid = task(conn, "AAA", "5m")["lease_backend_pid"]
        assert sql1(conn, "SELECT pg_terminate_backend(%s)", pid)
        _, err = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == 0, err
    assert "lost the database connection" in err
    t = task(conn, "AAA", "5m")
    assert t["status"] == "idle" and t["lease_owner"] is None
    assert t["last_error"].startswith("AdminShutdown") or "terminat" in t["last_error"], t["last_error"]
    assert t["total_transient_failures"] == 1


def test_worker_waiting_for_the_database_is_alive_but_not_ready():
    """`worker --metrics-port`: while it waits for the database, /healthz says alive (an orchestrator
    must not restart it for the database's sake) and /readyz says why it is not ready."""
    dead = closed_port_database()
    proc = popen_cli("worker", "--metrics-port", "0", url=dead.url)
    lines = Lines(proc)
    try:
        lines.wait_for("serving on http://", timeout=60)
        url = re.search(r"serving on (http://127\.0\.0\.1:\d+)", lines.text()).group(1)
        lines.wait_for("the database is not reachable", n=2, timeout=30)
        health = get(url + "/healthz")
        assert (health.status, health.json()["reason"]) == (200, "worker waiting for the database")
        ready = get(url + "/readyz")
        assert ready.status == 503 and ready.json()["reason"].startswith("database unreachable")
    finally:
        assert stop_process(proc, timeout=30) == 0
