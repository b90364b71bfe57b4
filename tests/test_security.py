"""Least privilege (DESIGN.md 10b): on a database made like a Supabase project (API roles, and default
privileges that grant them everything new in schema public), `baragg db upgrade` leaves nothing of
baragg's to anon, authenticated or PUBLIC; the worker role can do its whole job; read access is given
to a role explicitly; Supabase's database linter finds nothing (tests/supabase_like.py).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pg_sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import supabase_like
from baragg import cli, migrate
from baragg.db import Database
from ops_helpers import baragg

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
NOW = T0 + timedelta(days=2)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def tables(conn: psycopg.Connection) -> list[str]:
    """Every table in schema public (all of them baragg's in a test database), partitions included."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p') AND c.relnamespace = 'public'::regnamespace"
        " ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def routine_calls(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """Every function and procedure in schema public, with a call of it (NULL for every argument)."""
    rows = conn.execute(
        """
        SELECT p.oid::regprocedure::text, p.prokind, p.proname,
               ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) WITH ORDINALITY u(t, o) ORDER BY o)
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1
        """
    ).fetchall()
    calls = []
    for ident, kind, name, argtypes in rows:
        args = ", ".join(f"NULL::{t}" for t in argtypes)
        verb = "CALL" if kind == "p" else "SELECT"
        calls.append((ident, f'{verb} public."{name}"({args})'))
    return calls


def column_of(conn: psycopg.Connection, table: str) -> str:
    return conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1", (f"public.{table}",)
    ).fetchone()[0]


def denied(conn: psycopg.Connection, statement: str | pg_sql.Composable) -> bool:
    """Whether ``statement`` fails for lack of privilege (run in a savepoint, rolled back). Any other
    outcome means the privilege check passed (it comes before constraints and function bodies)."""
    try:
        with conn.transaction():
            conn.execute(statement)
            raise _Rollback
    except psycopg.errors.InsufficientPrivilege:
        return True
    except (_Rollback, psycopg.Error):
        return False


class _Rollback(Exception):
    pass


@contextlib.contextmanager
def as_role(db: Database, role: str) -> Iterator[psycopg.Connection]:
    """A connection (in a transaction, rolled back at the end) acting as ``role`` (SET ROLE)."""
    with db.connect() as conn:
        conn.execute(pg_sql.SQL("SET ROLE {}").format(pg_sql.Identifier(role)))
        try:
            yield conn
        finally:
            conn.rollback()


def table_attempts(conn: psycopg.Connection, table: str) -> dict[str, pg_sql.Composable]:
    t = pg_sql.Identifier("public", table)
    col = pg_sql.Identifier(column_of(conn, table))
    return {
        "select": pg_sql.SQL("SELECT 1 FROM {} LIMIT 1").format(t),
        "insert": pg_sql.SQL("INSERT INTO {} DEFAULT VALUES").format(t),
        "update": pg_sql.SQL("UPDATE {} SET {} = {}").format(t, col, col),
        "delete": pg_sql.SQL("DELETE FROM {}").format(t),
        "truncate": pg_sql.SQL("TRUNCATE {}").format(t),
    }


def some_bars(db: Database) -> None:
    """EURUSD with a 4h task, two days of 1m bars, aggregated (as the owner)."""
    with db.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO core_asset_registry_all (canonical_symbol, calc_4h) VALUES ('EURUSD', true)"
        )
        conn.execute(
            "INSERT INTO data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, source)"
            " SELECT 'EURUSD', '1m', t, 1.1, 1.2, 1.0, 1.15, 10, 'test'"
            " FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', interval '1 minute') t",
            (T0, NOW),
        )
        conn.execute("SELECT sync_agg_state_from_registry('prod', %s)", (T0,))
        conn.execute("UPDATE data_agg_state SET agg_start_utc = %s", (T0,))
    done = baragg(db, "run", "--once", "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr


@pytest.fixture
def worker_db(supabase_db: Database) -> Iterator[Database]:
    """The Supabase-like database reached as a LOGIN role that is a member of baragg_worker."""
    name = f"baragg_test_worker_{uuid.uuid4().hex[:8]}"
    with supabase_db.connect(autocommit=True) as conn:
        conn.execute(pg_sql.SQL("CREATE ROLE {} LOGIN IN ROLE baragg_worker").format(pg_sql.Identifier(name)))
    params = conninfo_to_dict(supabase_db.url)
    params["user"] = name
    params.pop("password", None)
    try:
        yield Database(make_conninfo(**params))
    finally:
        with supabase_db.connect(autocommit=True) as conn:
            conn.execute(pg_sql.SQL("DROP ROLE {}").format(pg_sql.Identifier(name)))


# ---------------------------------------------------------------------------------------------
# anon, authenticated, PUBLIC
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_can_touch_no_table(supabase_db: Database, role: str) -> None:
    some_bars(supabase_db)
    with as_role(supabase_db, role) as conn:
        found = tables(conn)
        assert {"data_bars", "derived_data_bars", "data_agg_state", "core_asset_registry_all",
                "agg_timeframes", "agg_invalidations", "baragg_schema_migrations",
                "baragg_schema_repeatables"} <= set(found)  # fmt: skip
        allowed = [
            f"{action} {table}"
            for table in found
            for action, statement in table_attempts(conn, table).items()
            if not denied(conn, statement)
        ]
        assert allowed == []
        for sequence in ("data_bars_id_seq", "derived_data_bars_id_seq"):
            assert denied(conn, pg_sql.SQL("SELECT nextval({})").format(pg_sql.Literal(sequence)))


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_can_execute_no_function(supabase_db: Database, role: str) -> None:
    with as_role(supabase_db, role) as conn:
        calls = routine_calls(conn)
        assert len(calls) > 30
        allowed = [ident for ident, call in calls if not denied(conn, call)]
    assert allowed == []


def test_nothing_is_granted_to_public(supabase_db: Database) -> None:
    with supabase_db.connect(autocommit=True) as conn:
        grants = conn.execute(
            """
            SELECT c.oid::regclass::text, a.privilege_type
            FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
            WHERE c.relnamespace = 'public'::regnamespace AND a.grantee = 0
            UNION ALL
            SELECT p.oid::regprocedure::text, a.privilege_type
            FROM pg_proc p CROSS JOIN LATERAL aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) a
            WHERE p.pronamespace = 'public'::regnamespace AND a.grantee = 0
            """
        ).fetchall()
        no_rls = conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
            " AND NOT relrowsecurity"
        ).fetchall()
    assert grants == []
    assert no_rls == []


def test_the_attacks_of_the_issue_fail_as_anon(supabase_db: Database) -> None:
    """Issue 13: with the anon key one could rewrite a bar, lease every task until 2090, move a cursor
    to 2030 and empty data_bars. Each is refused now, and the data is as it was."""
    some_bars(supabase_db)
    with supabase_db.connect(autocommit=True) as conn:
        before = conn.execute(
            "SELECT (SELECT count(*) FROM data_bars), (SELECT max(high) FROM derived_data_bars),"
            " (SELECT max(last_agg_bar_ts_utc) FROM data_agg_state)"
        ).fetchone()
    with as_role(supabase_db, "authenticator") as conn:
        conn.execute("SET ROLE anon")  # what PostgREST does for a request with the anon key
        assert denied(conn, "UPDATE derived_data_bars SET high = 999")
        assert denied(conn, "SELECT agg_claim_tasks('x', 100000, 2000000000)")
        assert denied(
            conn, "SELECT agg_finish('EURUSD', '5m', true, '2030-01-01', NULL, NULL, NULL, now(), NULL)"
        )
        assert denied(conn, "TRUNCATE data_bars")
    with supabase_db.connect(autocommit=True) as conn:
        after = conn.execute(
            "SELECT (SELECT count(*) FROM data_bars), (SELECT max(high) FROM derived_data_bars),"
            " (SELECT max(last_agg_bar_ts_utc) FROM data_agg_state)"
        ).fetchone()
    assert after == before and before[0] == 2 * 1440 and before[1] == 1.2


# ---------------------------------------------------------------------------------------------
# the worker role
# ---------------------------------------------------------------------------------------------
def test_a_member_of_baragg_worker_runs_everything(
    supabase_db: Database, worker_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LOGIN role in baragg_worker (and nothing else) registers, ingests, runs, checks and tidies."""
    csv = tmp_path / "bars.csv"
    minutes = [T0 + timedelta(minutes=i) for i in range(2 * 1440)]
    csv.write_text(
        "ts_utc,open,high,low,close,vol\n"
        + "".join(f"{t.isoformat()},1.1,1.2,1.0,1.15,{1 + i % 5}\n" for i, t in enumerate(minutes))
    )

    def run(*args: str | Path) -> tuple[int, str, str]:
        code = cli.main(["--database-url", worker_db.url, *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    def ok(*args: str | Path) -> str:
        code, out, err = run(*args)
        assert code == 0, f"{args}: {err}{out}"
        return out

    ok("registry", "add", "EURUSD", "--calc-4h", "--calc-1d")
    ok("registry", "sync")
    ok("ingest", csv, "--symbol", "EURUSD")
    ok("backfill", "--from", T0.isoformat(), "--now", NOW.isoformat())
    # Late data: a corrected minute fires the triggers (as the worker), the next run rewrites the bars.
    csv.write_text(f"ts_utc,open,high,low,close,vol\n{minutes[30].isoformat()},1.1,1.9,1.0,1.15,3\n")
    ok("ingest", csv, "--symbol", "EURUSD")
    ok("run", "--once", "--now", NOW.isoformat())
    for timeframe in ("5m", "1d"):
        ok("verify", "EURUSD", timeframe)
    assert '"status": "idle"' in ok("status", "--json")
    ok("registry", "set", "EURUSD", "--no-calc-1d")
    ok("registry", "sync")
    ok("cleanup", "legacy-derived", "--dry-run")
    ok("db", "status")
    with worker_db.connect(autocommit=True) as conn:
        assert conn.execute(
            "SELECT high FROM derived_data_bars WHERE timeframe = '1d' AND ts_utc = %s AND deleted_at IS NULL",
            (T0,),
        ).fetchone() == (1.9,)
        # ... and nothing beyond its job.
        assert denied(conn, "TRUNCATE data_bars")
        assert denied(conn, "DELETE FROM derived_data_bars")
        assert denied(conn, "UPDATE agg_timeframes SET expected_source_bars = 1")
    assert run("db", "upgrade")[0] == 1
    code, _, err = run("db", "grant-read", "authenticated")
    assert code == 1 and "owner" in err


# ---------------------------------------------------------------------------------------------
# grant-read / revoke-read
# ---------------------------------------------------------------------------------------------
def test_grant_read_lets_a_role_read_the_bars_and_nothing_else(supabase_db: Database) -> None:
    some_bars(supabase_db)
    granted = baragg(supabase_db, "db", "grant-read", "authenticated")
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout.strip() == "authenticated can read data_bars and derived_data_bars"

    def check() -> None:
        with as_role(supabase_db, "authenticated") as conn:
            assert conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()[0] > 0
            assert conn.execute("SELECT count(*) FROM data_bars").fetchone()[0] == 2 * 1440
            allowed = [
                f"{action} {table}"
                for table in tables(conn)
                for action, statement in table_attempts(conn, table).items()
                if not denied(conn, statement)
            ]
            assert allowed == ["select data_bars", "select derived_data_bars"]
            assert [ident for ident, call in routine_calls(conn) if not denied(conn, call)] == []
        with as_role(supabase_db, "anon") as conn:
            assert denied(conn, "SELECT 1 FROM derived_data_bars")

    check()
    # Kept when the security file is applied again (a later upgrade).
    with supabase_db.connect(autocommit=True) as conn:
        conn.execute("UPDATE baragg_schema_repeatables SET checksum = 'old'")
    migrate.upgrade(supabase_db)
    check()
    again = baragg(supabase_db, "db", "grant-read", "authenticated")
    assert again.stdout.strip().endswith("(it could already)")

    revoked = baragg(supabase_db, "db", "revoke-read", "authenticated")
    assert revoked.returncode == 0, revoked.stderr
    with as_role(supabase_db, "authenticated") as conn:
        assert denied(conn, "SELECT 1 FROM derived_data_bars")
        assert denied(conn, "SELECT 1 FROM data_bars")
    assert baragg(supabase_db, "db", "revoke-read", "authenticated").stdout.strip() == (
        "authenticated had no read access"
    )


def test_grant_read_refuses_an_unknown_role(supabase_db: Database) -> None:
    for action in ("grant-read", "revoke-read"):
        done = baragg(supabase_db, "db", action, "no_such_role")
        assert done.returncode == 2
        assert done.stderr.strip() == "baragg: error: role 'no_such_role' does not exist"
    done = baragg(supabase_db, "db", "revoke-read", "baragg_reader")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_baragg_reader_members_read_the_bars(supabase_db: Database) -> None:
    """A login role for a dashboard: a member of baragg_reader reads bars, nothing else."""
    some_bars(supabase_db)
    name = f"baragg_test_reader_{uuid.uuid4().hex[:8]}"
    with supabase_db.connect(autocommit=True) as conn:
        conn.execute(pg_sql.SQL("CREATE ROLE {} IN ROLE baragg_reader").format(pg_sql.Identifier(name)))
    try:
        with as_role(supabase_db, name) as conn:
            assert conn.execute("SELECT count(*) FROM derived_data_bars").fetchone()[0] > 0
            assert denied(conn, "SELECT 1 FROM data_agg_state")
            assert denied(conn, "UPDATE derived_data_bars SET high = 999")
    finally:
        with supabase_db.connect(autocommit=True) as conn:
            conn.execute(pg_sql.SQL("DROP ROLE {}").format(pg_sql.Identifier(name)))


# ---------------------------------------------------------------------------------------------
# search_path
# ---------------------------------------------------------------------------------------------
def test_every_function_pins_an_empty_search_path(supabase_db: Database) -> None:
    """SET search_path = '' on every function of baragg's (what the linter's lint 0011 and Supabase's
    advice ask): no object a caller puts earlier in its search_path can stand in for one of baragg's."""
    with supabase_db.connect(autocommit=True) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
            " WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1"
        ).fetchall()
    assert len(rows) > 40
    assert [ident for ident, config in rows if 'search_path=""' not in (config or [])] == []
    # The only other settings: the catch-up's planner switches (index plans whatever the statistics,
    # a plan for each call's arguments) and its work_mem (a call's bars in memory), and UTC months for
    # the partition functions.
    others = {c for _, config in rows for c in config or [] if c != 'search_path=""'}
    assert others <= {
        "enable_seqscan=off",
        "enable_bitmapscan=off",
        "plan_cache_mode=force_custom_plan",
        "work_mem=64MB",
        "TimeZone=UTC",
    }


def test_function_files_name_baragg_objects_with_their_schema() -> None:
    """With search_path = '' an unqualified name would not be found, and SQL function bodies are
    checked at creation, but PL/pgSQL bodies only when a statement runs: so the source is checked here,
    outside comments and string literals, for a name of baragg's not written as public.name."""
    files = [f for f in migrate.functions_dir().iterdir() if f.name.endswith(".sql")]
    texts = {f.name: f.read_text(encoding="utf-8") for f in files}
    names = set(TABLE_NAMES)
    for text in texts.values():
        names |= set(re.findall(r"CREATE OR REPLACE FUNCTION\s+(?:public\.)?(\w+)", text))
    bare = re.compile(r"(?<![\w.\"%])(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b(?!\s*\.)")
    found = []
    for name, text in texts.items():
        for code in sql_code(text):
            found += [f"{name}: {m.group(1)}" for m in bare.finditer(code)]
        headers = re.findall(r"CREATE OR REPLACE FUNCTION[^$]*?AS \$\$", text, re.S)
        found += [f"{name}: no SET search_path = '' in {h.split('(')[0]}" for h in headers
                  if "SET search_path = ''" not in h]  # fmt: skip
    assert found == []


TABLE_NAMES = (
    "core_asset_registry_all", "data_bars", "derived_data_bars", "data_agg_state", "agg_timeframes",
    "agg_invalidations", "agg_sessions", "agg_session_days", "baragg_schema_migrations",
    "baragg_schema_repeatables",
)  # fmt: skip


def sql_code(text: str) -> list[str]:
    """The parts of a SQL file that are code: without -- comments and '...' string literals."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text.startswith("--", i):
            parts.append(text[start:i])
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
            start = i
        elif text[i] == "'":
            parts.append(text[start:i])
            i += 1
            while i < len(text) and not (text[i] == "'" and text[i + 1 : i + 2] != "'"):
                i += 2 if text[i : i + 2] == "''" else 1
            i += 1
            start = i
        else:
            i += 1
    parts.append(text[start:])
    return parts


# ---------------------------------------------------------------------------------------------
# Supabase's linter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lint", sorted(supabase_like.LINTS))
def test_supabase_linter_finds_nothing(supabase_db: Database, lint: str) -> None:
    baragg(supabase_db, "db", "grant-read", "authenticated")  # the usual setup for charts in an app
    with supabase_db.connect(autocommit=True) as conn:
        assert supabase_like.lint(conn, lint) == []


def test_the_lints_find_what_they_are_about(db: Database) -> None:
    """The lint copies are not vacuous: each reports the mistake it exists for."""
    with db.connect(autocommit=True) as conn:
        supabase_like.create_roles(conn)
        conn.execute("CREATE TABLE lint_probe (a int REFERENCES agg_timeframes (duration_rank), b int)")
        conn.execute("CREATE INDEX lint_probe_1 ON lint_probe (b)")
        conn.execute("CREATE INDEX lint_probe_2 ON lint_probe (b)")
        conn.execute("CREATE FUNCTION lint_probe_f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        found = {
            name
            for name in supabase_like.LINTS
            if any("lint_probe" in obj for obj, _ in supabase_like.lint(conn, name))
        }
    assert found == {
        "0001_unindexed_foreign_keys",
        "0004_no_primary_key",
        "0009_duplicate_index",
        "0011_function_search_path_mutable",
        "0013_rls_disabled_in_public",
    }
