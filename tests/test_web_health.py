"""/healthz and /readyz: alive is not the same as ready, and a dead database must say so."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from baragg.web import Liveness, worker_probe
from conftest import drop_database
from web_client import closed_port_database, get, running_server


@pytest.fixture
def closed_port_db():
    return closed_port_database()


def test_healthy_and_ready(db):
    with running_server(db) as server:
        health = get(server.url + "/healthz")
        ready = get(server.url + "/readyz")
    assert health.status == 200
    assert health.json()["status"] == "ok"
    assert ready.status == 200
    assert ready.json()["status"] == "ready"
    assert "schema current" in ready.json()["reason"]


def test_unreachable_database_alive_but_not_ready(closed_port_db):
    with running_server(closed_port_db, db_timeout=1) as server:
        assert get(server.url + "/healthz").status == 200
        ready = get(server.url + "/readyz")
        assert ready.status == 503
        assert ready.json()["status"] == "not ready"
        assert ready.json()["reason"].startswith("database unreachable")
        tasks = get(server.url + "/api/tasks")
        assert tasks.status == 503
        assert tasks.json()["error"].startswith("database unavailable")
        assert get(server.url + "/").status == 200  # the page itself still loads and says why


def test_database_dropped_while_serving(db, server_url):
    with running_server(db, db_timeout=1) as server:
        assert get(server.url + "/readyz").status == 200
        drop_database(server_url, conninfo_to_dict(db.url)["dbname"])
        ready = get(server.url + "/readyz")
        assert ready.status == 503
        assert "unreachable" in ready.json()["reason"]
        assert get(server.url + "/api/summary").status == 503
        assert get(server.url + "/healthz").status == 200


def test_pending_migrations_not_ready(empty_db):
    with running_server(empty_db) as server:
        ready = get(server.url + "/readyz")
        assert ready.status == 503
        assert "pending migration" in ready.json()["reason"]
        assert "0001_schema.sql" in ready.json()["reason"]
        res = get(server.url + "/api/tasks")
        assert res.status == 503
        assert "baragg db upgrade" in res.json()["error"]


def test_edited_migration_not_ready(db, conn):
    conn.execute("UPDATE baragg_schema_migrations SET checksum = 'x' WHERE version = 1")
    with running_server(db) as server:
        ready = get(server.url + "/readyz")
    assert ready.status == 503
    assert "edited" in ready.json()["reason"]


def test_silent_loop_is_not_alive(db):
    clock = [1000.0]
    liveness = Liveness(max_silence=60, clock=lambda: clock[0])
    with running_server(db, liveness=liveness, pages=False) as server:
        assert get(server.url + "/healthz").status == 200
        clock[0] += 61
        dead = get(server.url + "/healthz")
        assert dead.status == 503
        assert "no heartbeat" in dead.json()["reason"]
        liveness.beat()
        assert get(server.url + "/healthz").status == 200


def test_worker_probe_follows_the_claim_threads(db):
    class FakeWorker:
        stopping = False

    clock = [0.0]
    fake = FakeWorker()
    liveness = Liveness(
        probe=worker_probe(fake, thread_name=r"fake-claimer-\d+", grace=30, clock=lambda: clock[0])
    )
    release = threading.Event()
    with running_server(db, liveness=liveness, pages=False) as server:
        res = get(server.url + "/healthz")
        assert (res.status, res.json()["reason"]) == (200, "worker starting")
        clock[0] = 31  # the grace is over and no claim thread ever started
        assert get(server.url + "/healthz").status == 503
        thread = threading.Thread(target=release.wait, name="fake-claimer-0", daemon=True)
        thread.start()
        try:
            res = get(server.url + "/healthz")
            assert (res.status, res.json()["reason"]) == (200, "1 claim thread(s) running")
            fake.stopping = True
            res = get(server.url + "/healthz")
            assert (res.status, res.json()["reason"]) == (503, "worker is shutting down")
        finally:
            release.set()
            thread.join(10)


def test_recovers_after_the_database_drops_its_connections(db, conn, server_url):
    """A database restart kills the pooled connections; the next request must not see a dead one.

    The pool checks each connection it hands out and replaces dead ones, backing off about a second
    per dead connection: with two pooled connections that needs more than the tests' usual 1 s.
    """
    with running_server(db, db_timeout=10) as server:
        assert get(server.url + "/api/tasks").status == 200
        dbname = conninfo_to_dict(db.url)["dbname"]
        with psycopg.connect(server_url, autocommit=True) as admin:
            pids = [
                pid
                for (pid,) in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                    (dbname,),
                )
            ]
            assert pids
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
            # Termination is asynchronous: wait until those backends are gone (bounded).
            for _ in range(500):
                left = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s::int[])", (pids,)
                ).fetchone()[0]
                if not left:
                    break
                time.sleep(0.01)
        assert get(server.url + "/api/tasks").status == 200
        assert get(server.url + "/readyz").status == 200
