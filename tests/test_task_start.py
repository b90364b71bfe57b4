"""Where a task starts (agg_start_utc) and which symbol names the database accepts, through the real
command: new tasks aggregate their symbol's whole history; an explicit start comes from the registry;
the seed's tasks keep their cut-off; rows before a start are reported, never silently skipped."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baragg import migrate
from baragg.db import Database
from baragg.errors import InvalidInput
from baragg.registry import check_symbol
from ops_helpers import baragg, write_csv

FIXTURES = Path(__file__).parent / "fixtures"
MONDAY_2024 = datetime(2024, 3, 4, tzinfo=UTC)
AFTER = "2024-03-07T00:10:00Z"  # a fixed clock after the data


def load_minutes(conn: psycopg.Connection, symbol: str, start: datetime, days: int) -> None:
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source)"
        " SELECT %s, '1m', t, 1, 2, 0.5, 1.5, 10, 'test'"
        " FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', interval '1 minute') t",
        (symbol, start, start + timedelta(days=days)),
    )


def test_a_new_symbol_aggregates_its_history_from_the_first_row(db: Database, tmp_path: Path) -> None:
    """The README's first steps with 2024 data: registry add, ingest, backfill, verify."""
    assert baragg(db, "registry", "add", "EURUSD").returncode == 0
    rows = [f"{(MONDAY_2024 + timedelta(minutes=i)).isoformat()},1.1,1.2,1.0,1.15,5" for i in range(2 * 1440)]
    csv = write_csv(tmp_path / "eurusd_2024.csv", "ts_utc,open,high,low,close,vol", *rows)
    loaded = baragg(db, "ingest", csv, "--symbol", "EURUSD")
    assert loaded.returncode == 0, loaded.stderr
    done = baragg(db, "backfill", "--now", AFTER, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bars_created"] == 2 * 288 + 2 * 24  # every 5m and 1h window of the two days
    assert report["source_rows_before_start"] == []
    checked = baragg(db, "verify", "EURUSD", "1h")
    assert checked.returncode == 0 and "48 bars checked: 48 equal" in checked.stdout, checked.stdout
    status = json.loads(baragg(db, "status", "--json").stdout)
    assert {t["agg_start"] for t in status} == {None}  # no explicit start: from the first row


def test_an_explicit_start_from_the_registry_and_rows_before_it(
    db: Database, conn: psycopg.Connection
) -> None:
    start = "2024-03-05"
    added = baragg(db, "registry", "add", "EURUSD", "--calc-4h", "--agg-start", start)
    assert added.returncode == 0, added.stderr
    load_minutes(conn, "EURUSD", MONDAY_2024, 2)  # a day before the start, a day after
    done = baragg(db, "backfill", "--now", AFTER, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bars_created"] == 288 + 24 + 6
    # the 1h and 4h tasks' sources (5m, 1h bars) start at the start too: only the 1m rows are before it
    assert [(t["symbol"], t["timeframe"]) for t in report["source_rows_before_start"]] == [("EURUSD", "5m")]
    starts = {r[0] for r in conn.execute("SELECT agg_start_utc FROM data_agg_state")}
    assert starts == {datetime(2024, 3, 5, tzinfo=UTC)}

    plain = baragg(db, "backfill", "--now", AFTER)
    assert plain.returncode == 0  # said plainly, but not a failure
    note = "note: EURUSD has source rows from 2024-03-04 00:00 before the start of its 5m task(s) (2024-03-05 00:00)"
    assert note in plain.stderr and "baragg backfill --symbol EURUSD --from 2024-03-04" in plain.stderr

    status = baragg(db, "status", "--now", AFTER, "--json")
    by_tf = {t["timeframe"]: t for t in json.loads(status.stdout)}
    assert by_tf["5m"]["source_rows_before_start"] is True
    assert by_tf["5m"]["first_source_before_start"] == "2024-03-04 00:00:00+00:00"
    human = baragg(db, "status", "--now", AFTER)
    assert note in human.stdout.replace("\n", " ")


def test_a_later_agg_start_leaves_existing_tasks_alone_and_says_so(
    db: Database, conn: psycopg.Connection
) -> None:
    assert baragg(db, "registry", "add", "EURUSD").returncode == 0
    assert baragg(db, "registry", "sync").returncode == 0
    changed = baragg(db, "registry", "set", "EURUSD", "--agg-start", "2024-01-01", "--calc-4h")
    assert changed.returncode == 0, changed.stderr
    assert (
        "the existing ones keep their start (1h from its first source row, 5m from its first"
        in changed.stderr
    )
    assert baragg(db, "registry", "sync").returncode == 0
    starts = dict(conn.execute("SELECT timeframe, agg_start_utc::text FROM data_agg_state").fetchall())
    assert starts == {"5m": "-infinity", "1h": "-infinity", "4h": "2024-01-01 00:00:00+00"}
    listed = json.loads(baragg(db, "registry", "list", "--json").stdout)
    assert listed[0]["agg_start_utc"] == "2024-01-01 00:00:00+00:00"


def test_an_agg_start_in_the_future_is_refused(db: Database) -> None:
    done = baragg(db, "registry", "add", "EURUSD", "--agg-start", "2999-01-01")
    assert done.returncode == 2 and "--agg-start 2999-01-01 00:00 UTC is in the future" in done.stderr


def test_upgrading_the_seed_keeps_its_tasks_cut_off(empty_db: Database) -> None:
    with empty_db.connect(autocommit=True) as conn:
        conn.execute((FIXTURES / "seed_production.sql").read_text())
        seed_tasks = conn.execute("SELECT count(*) FROM data_agg_state").fetchone()[0]
    assert seed_tasks > 0
    upgraded = baragg(empty_db, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    with empty_db.connect(autocommit=True) as conn:
        assert conn.execute("SELECT DISTINCT agg_start_utc::text FROM data_agg_state").fetchall() == [
            ("2025-07-01 00:00:00+00",)
        ]
        conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('NEWSYM')")
        conn.execute("SELECT sync_agg_state_from_registry('prod')")
        new = conn.execute(
            "SELECT DISTINCT agg_start_utc::text FROM data_agg_state WHERE canonical_symbol = 'NEWSYM'"
        ).fetchall()
        assert new == [("-infinity",)]
        assert conn.execute(
            "SELECT count(*) FROM data_agg_state WHERE agg_start_utc = '2025-07-01'"
        ).fetchone() == (seed_tasks,)


# ---------------------------------------------------------------------------------------------
# symbol names (item 14)
# ---------------------------------------------------------------------------------------------
NAMES = st.text(
    alphabet=st.one_of(
        st.sampled_from(string.ascii_letters + string.digits + "._:/-"),
        st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs", "Ll", "Lu", "Nd", "Po", "Sm")),
    ),
    min_size=0,
    max_size=70,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES)
def test_the_database_check_is_the_rule_registry_add_applies(conn: psycopg.Connection, name: str) -> None:
    try:
        check_symbol(name)
        python_accepts = True
    except InvalidInput:
        python_accepts = False
    try:
        with conn.transaction():
            conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES (%s)", (name,))
            raise _Rollback
    except _Rollback:
        database_accepts = True
    except psycopg.errors.CheckViolation:
        database_accepts = False
    except psycopg.DataError:  # NUL: PostgreSQL text cannot hold it at all
        database_accepts = False
    assert python_accepts == database_accepts, repr(name)


class _Rollback(Exception):
    pass


@pytest.mark.parametrize("name", ["EURUSD\n", "EUR USD", "-X", "X\x1b[2J", "A" * 65, ""])
def test_bad_names_are_refused_by_registry_add_and_by_the_database(
    db: Database, conn: psycopg.Connection, name: str
) -> None:
    done = baragg(db, "registry", "add", "--", name)
    assert done.returncode == 2 and "is not a valid symbol" in done.stderr and "\x1b" not in done.stderr
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES (%s)", (name,))


def test_an_upgraded_database_keeps_its_bad_names_and_says_so(empty_db: Database) -> None:
    with empty_db.connect(autocommit=True) as conn:
        conn.execute((FIXTURES / "seed_production.sql").read_text())
        conn.execute(
            "INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('BAD NAME'), ('X\x1b[31m')"
        )
    upgraded = baragg(empty_db, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "2 registry symbol(s) do not follow the naming rule and were kept" in upgraded.stderr
    assert "'BAD NAME', 'X\\x1b[31m'" in upgraded.stderr and "\x1b" not in upgraded.stderr
    with empty_db.connect(autocommit=True) as conn:
        assert conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'core_asset_registry_all_symbol_check'"
        ).fetchone() == (False,)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('ANOTHER BAD')")
        assert conn.execute(
            "SELECT count(*) FROM core_asset_registry_all WHERE canonical_symbol = 'BAD NAME'"
        ).fetchone() == (1,)
    again = baragg(empty_db, "db", "upgrade")  # re-runnable, still says so
    assert again.returncode == 0 and "were kept" in again.stderr
    assert migrate.upgrade(empty_db) == []
