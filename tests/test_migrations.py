"""Migrations: applied in order, once each, under a lock; the seed's production state upgrades in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from baragg import migrate, partitions
from baragg.db import Database
from baragg.errors import BaraggError
from catalog import snapshot

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_TABLES = {
    "core_asset_registry_all": "canonical_symbol",
    "data_bars": "id",
    "derived_data_bars": "id",
    "data_agg_state": "canonical_symbol, timeframe",
}


def table_rows(conn: psycopg.Connection, table: str, columns: list[str], order: str) -> list[tuple]:
    return conn.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()


def legacy_columns(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    return [r[0] for r in rows]


def test_fresh_upgrade_applies_all_then_nothing(empty_db: Database) -> None:
    shipped = migrate.discover()
    assert [m.name for m in migrate.upgrade(empty_db)] == [m.name for m in shipped]
    assert migrate.upgrade(empty_db) == []
    states = migrate.status(empty_db)
    assert [s.state for s in states] == ["applied"] * len(shipped)


def test_status_lists_pending_before_upgrade(empty_db: Database) -> None:
    states = migrate.status(empty_db)
    assert states and all(s.state == "pending" for s in states)


def test_concurrent_upgrades_apply_each_migration_once(empty_db: Database) -> None:
    errors: list[BaseException] = []
    results: list[list[migrate.Migration]] = []

    def run() -> None:
        try:
            results.append(migrate.upgrade(empty_db))
        except BaseException as exc:  # pragma: no cover - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "an upgrade still runs after 120 s (waiting on a lock?)"
    assert not errors
    applied = sorted(len(r) for r in results)
    assert applied == [0, 0, len(migrate.discover())]
    with empty_db.connect() as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM baragg_schema_migrations")]
    assert sorted(versions) == sorted(set(versions))


def write_migrations(directory: Path, names: list[str]) -> None:
    for name in names:
        (directory / name).write_text("SELECT 1;\n")


def test_discover_refuses_a_gap(tmp_path: Path) -> None:
    write_migrations(tmp_path, ["0001_a.sql", "0003_c.sql"])
    with pytest.raises(BaraggError, match="0002 is missing"):
        migrate.discover(tmp_path)


def test_discover_refuses_a_duplicate_number(tmp_path: Path) -> None:
    write_migrations(tmp_path, ["0001_a.sql", "0001_b.sql"])
    with pytest.raises(BaraggError, match="share number 0001"):
        migrate.discover(tmp_path)


def test_edited_migration_is_reported(empty_db: Database, tmp_path: Path) -> None:
    write_migrations(tmp_path, ["0001_a.sql"])
    migrate.upgrade(empty_db, migrate.discover(tmp_path))
    (tmp_path / "0001_a.sql").write_text("SELECT 2;\n")
    states = migrate.status(empty_db, migrate.discover(tmp_path))
    assert states[0].state == "edited"
    assert "edited after it was applied" in migrate.warnings_for(states)[0]


def test_failed_migration_leaves_nothing_behind(empty_db: Database, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE t_ok (x int);\n")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE t_bad (x int);\nSELECT no_such_function();\n")
    with pytest.raises(BaraggError, match=r"0002_bad\.sql failed"):
        migrate.upgrade(empty_db, migrate.discover(tmp_path))
    with empty_db.connect() as conn:
        assert conn.execute(
            "SELECT to_regclass('t_ok') IS NOT NULL, to_regclass('t_bad') IS NULL"
        ).fetchone() == (
            True,
            True,
        )
        assert [r[0] for r in conn.execute("SELECT version FROM baragg_schema_migrations")] == [1]


def test_upgrade_from_seed_production_state(empty_db: Database, db: Database) -> None:
    """The seed's production database upgrades in place to exactly a fresh install, losing nothing."""
    with empty_db.connect(autocommit=True) as conn:
        conn.execute((FIXTURES / "seed_production.sql").read_text())
        before = {
            table: (cols := legacy_columns(conn, table), table_rows(conn, table, cols, order))
            for table, order in LEGACY_TABLES.items()
        }
    migrate.upgrade(empty_db)
    # A database with rows keeps plain tables until `baragg db partition` (a new install is partitioned):
    # upgraded and converted, it is a fresh install, but for which months have partitions.
    partitions.convert(empty_db)
    with empty_db.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE data_bars_unpartitioned, derived_data_bars_unpartitioned")
    with empty_db.connect() as upgraded, db.connect() as fresh:
        months = month_partitions(upgraded) + month_partitions(fresh)
        assert snapshot(upgraded, exclude_tables=months) == snapshot(fresh, exclude_tables=months)
        for table, order in LEGACY_TABLES.items():
            cols, rows = before[table]
            assert table_rows(upgraded, table, cols, order) == rows, f"rows of {table} changed"
        cursors = upgraded.execute(
            "SELECT canonical_symbol, timeframe, last_agg_bar_ts_utc FROM data_agg_state ORDER BY 1, 2"
        ).fetchall()
        assert ("EURUSD", "5m") in {(s, t) for s, t, _ in cursors}
        first = snapshot(upgraded)
    assert migrate.upgrade(empty_db) == []
    with empty_db.connect() as conn:
        assert snapshot(conn) == first


def month_partitions(conn: psycopg.Connection) -> tuple[str, ...]:
    """The monthly partitions of the bar tables (which months exist depends on the data and the clock)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE c.relname ~ '_p[0-9]{8}$'"
    ).fetchall()
    return tuple(r[0] for r in rows)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed on this machine")
def test_migration_files_apply_as_is_with_psql(empty_db: Database, db: Database) -> None:
    for m in migrate.discover():
        path = m.path()
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", empty_db.url, "-f", str(path)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    with empty_db.connect() as by_psql, db.connect() as by_baragg:
        exclude = ("baragg_schema_migrations", "baragg_schema_repeatables")
        assert snapshot(by_psql, exclude_tables=exclude) == snapshot(by_baragg, exclude_tables=exclude)


def test_database_of_the_previous_cut_upgrades_without_edits(empty_db: Database, db: Database) -> None:
    """0002-0004 held the functions until they moved to the repeatable files: such a database counts as
    current for those migrations (no "edited" warning), gets the repeatable files once, and ends equal to
    a fresh install."""
    migrate.upgrade(empty_db)
    with empty_db.connect(autocommit=True) as conn:
        for version, checksums in migrate._SUPERSEDED_CHECKSUMS.items():
            conn.execute(
                "UPDATE baragg_schema_migrations SET checksum = %s WHERE version = %s",
                (min(checksums), version),
            )
        conn.execute("DROP TABLE baragg_schema_repeatables")
    states = migrate.status(empty_db)
    assert {s.state for s in states if s.version is not None} == {"applied"}
    assert {s.state for s in states if s.version is None} == {"pending"}
    applied = migrate.upgrade(empty_db)
    assert applied and all(m.repeatable for m in applied)
    assert not migrate.warnings_for(migrate.status(empty_db))
    with empty_db.connect() as upgraded, db.connect() as fresh:
        assert snapshot(upgraded) == snapshot(fresh)
        recorded = upgraded.execute(
            "SELECT checksum FROM baragg_schema_migrations ORDER BY version"
        ).fetchall()
    assert [r[0] for r in recorded] == [m.checksum for m in migrate.discover() if not m.repeatable]


def test_changed_repeatable_file_is_reapplied(empty_db: Database, tmp_path: Path) -> None:
    numbered, functions = tmp_path / "migrations", tmp_path / "functions"
    numbered.mkdir()
    functions.mkdir()
    (numbered / "0001_t.sql").write_text("CREATE TABLE t (x int);\n")
    (functions / "10_f.sql").write_text(
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';\n"
    )
    (functions / "20_g.sql").write_text(
        "CREATE OR REPLACE FUNCTION g() RETURNS int LANGUAGE sql AS 'SELECT f()';\n"
    )
    assert [m.name for m in migrate.upgrade(empty_db, migrate.discover(numbered, functions))] == [
        "0001_t.sql",
        "10_f.sql",
        "20_g.sql",
    ]
    assert migrate.upgrade(empty_db, migrate.discover(numbered, functions)) == []
    (functions / "10_f.sql").write_text(
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 2';\n"
    )
    states = migrate.status(empty_db, migrate.discover(numbered, functions))
    assert [(s.name, s.state) for s in states] == [
        ("0001_t.sql", "applied"),
        ("10_f.sql", "pending"),
        ("20_g.sql", "applied"),
    ]
    assert [m.name for m in migrate.upgrade(empty_db, migrate.discover(numbered, functions))] == ["10_f.sql"]
    with empty_db.connect() as conn:
        assert conn.execute("SELECT g()").fetchone() == (2,)


def test_failed_repeatable_changes_nothing(empty_db: Database, tmp_path: Path) -> None:
    numbered, functions = tmp_path / "migrations", tmp_path / "functions"
    numbered.mkdir()
    functions.mkdir()
    (numbered / "0001_t.sql").write_text("SELECT 1;\n")
    (functions / "10_f.sql").write_text(
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';\n"
    )
    (functions / "20_bad.sql").write_text("SELECT no_such_function();\n")
    with pytest.raises(BaraggError, match=r"repeatable 20_bad\.sql failed"):
        migrate.upgrade(empty_db, migrate.discover(numbered, functions))
    with empty_db.connect() as conn:
        assert conn.execute("SELECT to_regproc('f') IS NULL").fetchone() == (True,)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baragg.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=240,
    )


def test_cli_db_upgrade_twice_and_status(empty_db: Database) -> None:
    env = {"DATABASE_URL": empty_db.url}
    first = run_cli("db", "upgrade", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_schema.sql" in first.stdout
    second = run_cli("db", "upgrade", env=env)
    assert second.returncode == 0 and "nothing to apply" in second.stdout
    status = run_cli("db", "status", env=env)
    assert status.returncode == 0 and "applied" in status.stdout


def test_cli_bad_usage_is_one_line_and_exit_2(empty_db: Database) -> None:
    result = run_cli("db", "frobnicate", env={"DATABASE_URL": empty_db.url})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "invalid choice" in result.stderr


def test_cli_unreachable_database_is_one_line_and_exit_1() -> None:
    result = run_cli("db", "status", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing"})
    assert result.returncode == 1
    assert result.stderr.startswith("baragg: error: cannot connect") and result.stderr.count("\n") == 1
