"""The CLI's error paths where a user meets them (issue 14, item 9): one readable line and the right
exit code, no password anywhere, closed pipes, `--debug` anywhere, ports, `registry sync` output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import psycopg
import pytest

from baragg.db import Database
from ops_helpers import baragg

SECRET = "Sup3rS3cretPw"


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# --- passwords --------------------------------------------------------------------------------------

MALFORMED_URLS = [
    f"postgresql:/app:{SECRET}@db.example.com/bars",  # one slash: libpq quotes the whole string
    f"postgresql//app:{SECRET}@db.example.com/bars",
    f"postgresql://app:{SECRET}%zz@db.example.com/bars",  # bad percent-encoding: libpq quotes the password
    f"postgresql://app:{SECRET}@db.example.com/bars?sslmode",
    f"host=db.example.com password={SECRET} port",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_a_malformed_database_url_is_bad_input_and_its_password_is_never_printed(url: str) -> None:
    done = baragg(None, "--database-url", url, "registry", "list")
    assert done.returncode == 2, done.stderr
    line = one_line(done)
    assert (
        line.startswith("baragg: error: malformed database URL") and SECRET not in done.stderr + done.stdout
    )
    from_env = baragg(None, "--debug", "status", env={"DATABASE_URL": url})
    assert from_env.returncode == 2
    assert "Traceback" in from_env.stderr and SECRET not in from_env.stderr + from_env.stdout


def test_a_url_that_cannot_connect_does_not_show_its_password() -> None:
    done = baragg(None, "--debug", "--database-url", f"postgresql://app:{SECRET}@127.0.0.1:1/bars", "status")
    assert done.returncode == 1
    assert "cannot connect to the database" in done.stderr and SECRET not in done.stderr + done.stdout


# --- ports, --debug anywhere, registry sync ------------------------------------------------------------


def test_a_port_out_of_range_is_a_usage_error() -> None:
    done = baragg(None, "serve", "--port", "99999")
    assert done.returncode == 2 and "port 99999 is out of range (0-65535)" in one_line(done)
    done = baragg(None, "worker", "--metrics-port", "-1")
    assert done.returncode == 2 and "out of range" in one_line(done)


def test_debug_after_the_subcommand_means_the_same_as_before_it(db: Database, tmp_path) -> None:
    listed = baragg(db, "registry", "list", "--json", "--debug")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    failed = baragg(db, "ingest", tmp_path / "missing.csv", "--symbol", "X", "--debug")
    assert failed.returncode == 2
    assert "Traceback" in failed.stderr and failed.stderr.strip().endswith("no such file")


def test_registry_sync_prints_text_and_json_only_when_asked(db: Database) -> None:
    assert baragg(db, "registry", "add", "EURUSD").returncode == 0
    text = baragg(db, "registry", "sync")
    assert text.returncode == 0, text.stderr
    assert (
        text.stdout.splitlines()[0]
        == "registry synced (env prod): 2 created, 0 enabled, 0 disabled, 0 corrected"
    )
    assert "  created: EURUSD 1h, EURUSD 5m" in text.stdout
    machine = baragg(db, "registry", "sync", "--json")
    assert json.loads(machine.stdout)["created"] == []


# --- a closed pipe (`baragg verify ... | head -1`) ------------------------------------------------------


def baragg_into_closed_pipe(db: Database, *args: str) -> subprocess.CompletedProcess:
    """Run baragg with stdout on a pipe whose reader has already gone (as `| head -1` after its line)."""
    environment = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "BARAGG_DEBUG"}}
    environment["DATABASE_URL"] = db.url
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "baragg.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            timeout=300,
        )
    finally:
        os.close(write_end)


@pytest.fixture
def verified(db: Database, conn: psycopg.Connection) -> Database:
    """EURUSD: ten 1m bars, a 5m task past them, and the two 5m bars they make (flat prices)."""
    t0 = datetime(2024, 1, 2, 10, 0, tzinfo=UTC)
    conn.execute("INSERT INTO core_asset_registry_all (canonical_symbol) VALUES ('EURUSD')")
    conn.execute(
        "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, source)"
        " SELECT 'EURUSD', '1m', t, 1, 1, 1, 1, 'test'"
        " FROM generate_series(%s::timestamptz, %s::timestamptz + interval '9 minutes', interval '1 minute') t",
        (t0, t0),
    )
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close,"
        " source_timeframe, source_candles, expected_candles, quality_score, derivation_version)"
        " SELECT 'EURUSD', '5m', t, 1, 1, 1, 1, '1m', 5, 5, 2, 1"
        " FROM generate_series(%s::timestamptz, %s::timestamptz + interval '5 minutes', interval '5 minutes') t",
        (t0, t0),
    )
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, agg_start_utc,"
        " last_agg_bar_ts_utc) VALUES ('EURUSD', '5m', '1m', %s, %s::timestamptz + interval '10 minutes')",
        (t0, t0),
    )
    return db


def test_a_closed_pipe_keeps_the_commands_own_exit_code(verified: Database, conn: psycopg.Connection) -> None:
    equal = baragg_into_closed_pipe(verified, "verify", "EURUSD", "5m")
    assert equal.returncode == 0, equal.stderr
    assert equal.stderr == ""  # no BrokenPipeError, no "Exception ignored"
    listed = baragg_into_closed_pipe(verified, "registry", "list", "--json")
    assert (listed.returncode, listed.stderr) == (0, "")
    conn.execute("UPDATE derived_data_bars SET high = 2 WHERE ts_utc = '2024-01-02 10:05+00'")
    different = baragg_into_closed_pipe(verified, "verify", "EURUSD", "5m")
    assert (different.returncode, different.stderr) == (1, "")
