"""derived_data_bars -> core_asset_registry_all (migration 0012): the foreign key's rule, checked once per
statement instead of once per bar. What a user relied on from the foreign key still holds: a derived bar
of an unknown symbol is refused, a registry row with derived bars cannot be deleted, renamed or
truncated away, and a delete racing a write of the same symbol cannot leave bars without their row."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import psycopg
import pytest

from baragg.db import Database

pytestmark = pytest.mark.timeout(60)

TS = datetime(2025, 7, 7, 10, 0, tzinfo=UTC)
INSERT_BAR = """
INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source,
                               source_timeframe, source_candles, expected_candles, quality_score)
VALUES (%s, '5m', %s, 1, 2, 0.5, 1.5, 'test', '1m', 5, 5, 2)"""


def register(conn: psycopg.Connection, *symbols: str) -> None:
    for symbol in symbols:
        conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES (%s)", (symbol,))
    conn.commit()


def test_no_per_row_foreign_key_on_derived_bars(conn: psycopg.Connection) -> None:
    """The point of 0012: writing a derived bar runs no per-row RI trigger (data_bars keeps its key)."""
    fks = conn.execute(
        "SELECT conrelid::regclass::text FROM pg_constraint WHERE contype = 'f'"
        " AND confrelid = 'core_asset_registry_all'::regclass AND conparentid = 0 ORDER BY 1"
    ).fetchall()
    assert ("derived_data_bars",) not in fks
    assert ("data_bars",) in fks


def test_a_derived_bar_of_an_unknown_symbol_is_refused(conn: psycopg.Connection) -> None:
    register(conn, "AAA")
    with pytest.raises(psycopg.errors.ForeignKeyViolation) as info:
        conn.execute(INSERT_BAR, ("NOPE", TS))
    assert info.value.diag.constraint_name == "derived_canonical_symbol_fkey"
    assert "Key (canonical_symbol)=(NOPE)" in (info.value.diag.message_detail or "")
    conn.rollback()
    # One unknown symbol among known ones fails the whole statement: nothing is written.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            INSERT_BAR.replace("VALUES (%s, '5m', %s, 1, 2, 0.5, 1.5, 'test', '1m', 5, 5, 2)", "")
            + " SELECT s, '5m', %s, 1, 2, 0.5, 1.5, 'test', '1m', 5, 5, 2 FROM unnest(%s::text[]) s",
            (TS, ["AAA", "ZZZ"]),
        )
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM derived_data_bars").fetchone() == (0,)
    conn.execute(INSERT_BAR, ("AAA", TS))
    conn.commit()
    # Moving a bar to an unknown symbol is refused too.
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("UPDATE derived_data_bars SET canonical_symbol = 'NOPE'")
    conn.rollback()


def test_a_registry_row_with_derived_bars_stays(conn: psycopg.Connection) -> None:
    """No 1m rows (e.g. dropped by `retention --raw`): only the derived bars hold the row."""
    register(conn, "AAA", "BBB")
    conn.execute(INSERT_BAR, ("AAA", TS))
    conn.commit()
    for statement in (
        "DELETE FROM core_asset_registry_all WHERE canonical_symbol = 'AAA'",
        "UPDATE core_asset_registry_all SET canonical_symbol = 'AAB' WHERE canonical_symbol = 'AAA'",
    ):
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as info:
            conn.execute(statement)
        assert "still referenced" in (info.value.diag.message_detail or "")
        conn.rollback()
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        conn.execute("TRUNCATE core_asset_registry_all CASCADE")
    conn.rollback()
    # A row without bars goes; a change that keeps the key is free.
    conn.execute("UPDATE core_asset_registry_all SET is_sparse = true WHERE canonical_symbol = 'AAA'")
    conn.execute("DELETE FROM core_asset_registry_all WHERE canonical_symbol = 'BBB'")
    conn.commit()
    assert conn.execute("SELECT count(*) FROM core_asset_registry_all").fetchone() == (1,)


def in_thread(conn: psycopg.Connection, statement: str, params: tuple = ()) -> tuple[threading.Thread, list]:
    """Run ``statement`` and commit on ``conn`` in a thread; the list gets None or the error."""
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            conn.execute(statement, params)
            conn.commit()
            outcome.append(None)
        except psycopg.Error as exc:
            conn.rollback()
            outcome.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    return thread, outcome


def test_a_delete_racing_a_write_leaves_no_orphan(db: Database) -> None:
    """The writer locks the symbol's registry row (KEY SHARE) before it checks it: a DELETE of that
    row waits for the writer's commit and then fails; in the other order the write fails."""
    with db.connect() as writer, db.connect() as deleter:
        register(writer, "AAA")
        writer.execute(INSERT_BAR, ("AAA", TS))  # not committed yet
        deleter.execute("SET lock_timeout = '20s'")
        thread, outcome = in_thread(
            deleter, "DELETE FROM core_asset_registry_all WHERE canonical_symbol = 'AAA'"
        )
        thread.join(1.0)
        assert thread.is_alive(), "the DELETE must wait for the writer's lock"
        writer.commit()
        thread.join(20)
        assert isinstance(outcome[0], psycopg.errors.ForeignKeyViolation)

        # The other order: the DELETE first (it holds the row), the write waits, then fails.
        register(writer, "BBB")
        deleter.execute("DELETE FROM core_asset_registry_all WHERE canonical_symbol = 'BBB'")
        thread, outcome = in_thread(writer, INSERT_BAR, ("BBB", TS))
        thread.join(1.0)
        assert thread.is_alive(), "the write must wait for the DELETE's lock"
        deleter.commit()
        thread.join(20)
        assert isinstance(outcome[0], psycopg.errors.ForeignKeyViolation)
        orphans = writer.execute(
            "SELECT count(*) FROM derived_data_bars d WHERE NOT EXISTS"
            " (SELECT 1 FROM core_asset_registry_all r WHERE r.canonical_symbol = d.canonical_symbol)"
        ).fetchone()
        assert orphans == (0,)
