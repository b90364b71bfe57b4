"""`baragg registry add | set | list | sync` through the real command."""

from __future__ import annotations

import json

import psycopg

from baragg.db import Database
from ops_helpers import baragg


def asset(conn: psycopg.Connection, symbol: str) -> dict:
    cur = conn.execute("SELECT * FROM core_asset_registry_all WHERE canonical_symbol = %s", (symbol,))
    row = cur.fetchone()
    assert row is not None
    return dict(zip([d.name for d in cur.description], row, strict=True))


def test_add_with_defaults_then_flags(db: Database, conn: psycopg.Connection) -> None:
    done = baragg(db, "registry", "add", "EURUSD")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "added EURUSD"
    row = asset(conn, "EURUSD")
    assert (row["active"], row["test_active"], row["is_sparse"], row["calc_4h"], row["base_timeframe"]) == (
        True,
        True,
        False,
        False,
        "1m",
    )
    done = baragg(
        db,
        "registry",
        "add",
        "EURUSD",
        "--calc-4h",
        "--calc-1d",
        "--sparse",
        "--provider-ticker",
        "C:EURUSD",
        "--asset-class",
        "fx",
        "--source",
        "massive_api",
        "--test-inactive",
        "--notes",
        "major pair",
    )
    assert done.returncode == 0 and done.stdout.strip() == "updated EURUSD"
    row = asset(conn, "EURUSD")
    assert (row["calc_4h"], row["calc_1d"], row["calc_15m"], row["is_sparse"], row["test_active"]) == (
        True,
        True,
        False,
        True,
        False,
    )
    assert (row["provider_ticker"], row["asset_class"], row["source"], row["notes"]) == (
        "C:EURUSD",
        "fx",
        "massive_api",
        "major pair",
    )


def test_add_again_keeps_columns_not_given(db: Database, conn: psycopg.Connection) -> None:
    assert baragg(db, "registry", "add", "XAUUSD", "--calc-4h", "--notes", "gold").returncode == 0
    assert baragg(db, "registry", "add", "XAUUSD", "--inactive").returncode == 0
    row = asset(conn, "XAUUSD")
    assert (row["calc_4h"], row["notes"], row["active"]) == (True, "gold", False)


def test_set_changes_flags_and_refuses_unknown_symbols(db: Database, conn: psycopg.Connection) -> None:
    assert baragg(db, "registry", "add", "XAUUSD", "--calc-4h").returncode == 0
    done = baragg(db, "registry", "set", "XAUUSD", "--no-calc-4h", "--calc-1w")
    assert done.returncode == 0, done.stderr
    row = asset(conn, "XAUUSD")
    assert (row["calc_4h"], row["calc_1w"]) == (False, True)
    done = baragg(db, "registry", "set", "NOPE", "--calc-4h")
    assert done.returncode == 2 and "unknown symbol 'NOPE'" in done.stderr
    done = baragg(db, "registry", "set", "XAUUSD")
    assert done.returncode == 2 and "nothing to change" in done.stderr


def test_list_shows_every_symbol(db: Database) -> None:
    for symbol in ("XAUUSD", "EURUSD"):
        assert baragg(db, "registry", "add", symbol).returncode == 0
    done = baragg(db, "registry", "list", "--json")
    assert [r["canonical_symbol"] for r in json.loads(done.stdout)] == ["EURUSD", "XAUUSD"]
    human = baragg(db, "registry", "list")
    assert "EURUSD" in human.stdout and "XAUUSD" in human.stdout


def test_bad_symbol_and_bad_flag_exit_2(db: Database) -> None:
    done = baragg(db, "registry", "add", "bad symbol!")
    assert done.returncode == 2 and "not a valid symbol" in done.stderr
    done = baragg(db, "registry", "add", "EURUSD", "--calc-2h")
    assert done.returncode == 2
    assert done.stderr == "baragg: error: baragg: unrecognized arguments: --calc-2h\n"


def test_sync_creates_tasks(db: Database, conn: psycopg.Connection) -> None:
    assert baragg(db, "registry", "add", "EURUSD", "--calc-4h").returncode == 0
    done = baragg(db, "registry", "sync")
    assert done.returncode == 0, done.stderr
    tasks = {tf for (tf,) in conn.execute("SELECT timeframe FROM data_agg_state WHERE enabled")}
    assert {"5m", "1h", "4h"} <= tasks and "15m" not in tasks
    assert baragg(db, "registry", "set", "EURUSD", "--no-calc-4h").returncode == 0
    assert baragg(db, "registry", "sync").returncode == 0
    assert conn.execute("SELECT enabled FROM data_agg_state WHERE timeframe = '4h'").fetchone() == (False,)
