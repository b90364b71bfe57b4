"""The asset registry (core_asset_registry_all): which symbols exist and which timeframes they get.

The worker's ``sync_agg_state_from_registry`` (migration 0003) turns registry rows into tasks; this
module only edits and lists the rows, and asks the database to sync.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from baragg import sessions
from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.sql import query

# Settable columns, in the order `registry list` shows them.
FIELDS = (
    "provider_ticker",
    "asset_class",
    "source",
    "active",
    "test_active",
    "is_sparse",
    "calc_15m",
    "calc_4h",
    "calc_1d",
    "calc_1w",
    "calc_1mo",
    "session",
    "notes",
    "agg_start_utc",  # where new tasks of the symbol start (None: from its first source row)
)

# The naming rule; migration 0007 puts the same rule on the table as a CHECK (keep them equal).
SYMBOL_RULE = r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,63}"
_SYMBOL = re.compile(SYMBOL_RULE)


@dataclass(frozen=True)
class Change:
    symbol: str
    created: bool
    # The symbol's existing tasks that keep their own start although --agg-start was given:
    # (timeframe, agg_start_utc or None for "from the first source row").
    kept_starts: tuple[tuple[str, datetime | None], ...] = ()
    # What changing the session or --sparse rebuilt (agg_rebuild_symbol's result), when it did.
    rebuilt: dict[str, Any] | None = None


def check_symbol(symbol: str) -> str:
    if not _SYMBOL.fullmatch(symbol):
        from baragg.terminal import printable

        raise InvalidInput(
            f"symbol '{printable(symbol)}' is not a valid symbol (a letter or digit first, then letters, digits "
            "and . _ : / -, at most 64 characters)"
        )
    return symbol


def _params(symbol: str, settings: dict[str, Any]) -> dict[str, Any]:
    unknown = set(settings) - set(FIELDS)
    if unknown:
        raise InvalidInput(f"unknown registry column(s): {', '.join(sorted(unknown))}")
    return {"symbol": symbol, **{name: settings.get(name) for name in FIELDS}}


def add(db: Database, symbol: str, **settings: Any) -> Change:
    """Create the symbol, or update the columns given (the others keep their values)."""
    check_symbol(symbol)
    params = _params(symbol, settings)
    with db.connect() as conn:
        _resolve_session(conn, params)
        before = _rebuild_key(conn, symbol)
        created = conn.execute(query("registry_insert_new"), params).fetchone() is not None
        if not created:
            conn.execute(query("registry_update"), params)
        kept = _kept_starts(conn, symbol, settings)
        rebuilt = _after_change(conn, symbol, before)
        conn.commit()
    return Change(symbol, created, kept, rebuilt)


def set_fields(db: Database, symbol: str, **settings: Any) -> Change:
    """Change columns of an existing symbol; an unknown symbol is an error."""
    if not any(v is not None for v in settings.values()):
        raise InvalidInput("registry set: nothing to change (give at least one flag, e.g. --calc-4h)")
    params = _params(symbol, settings)
    with db.connect() as conn:
        _resolve_session(conn, params)
        before = _rebuild_key(conn, symbol)
        row = conn.execute(query("registry_update"), params).fetchone()
        if row is None:
            from baragg.terminal import printable

            name = printable(symbol)
            raise InvalidInput(f"unknown symbol '{name}' (add it with: baragg registry add {name})")
        kept = _kept_starts(conn, symbol, settings)
        rebuilt = _after_change(conn, symbol, before)
        conn.commit()
    return Change(symbol, False, kept, rebuilt)


def _kept_starts(conn: Any, symbol: str, settings: dict[str, Any]) -> tuple[tuple[str, datetime | None], ...]:
    """With --agg-start, the symbol's existing tasks whose start differs: the registry sync creates
    new tasks with the registry's start but never moves an existing task's (DESIGN.md 7)."""
    start = settings.get("agg_start_utc")
    if start is None:
        return ()
    rows = conn.execute(query("registry_existing_task_starts"), {"symbol": symbol}).fetchall()
    return tuple((timeframe, begin) for timeframe, begin in rows if begin != start)


def names_breaking_the_rule(db: Database) -> list[str]:
    """Registry names that do not follow the naming rule: kept from before migration 0007's CHECK,
    which is then NOT VALID (it checks new and changed rows only)."""
    with db.connect() as conn:
        return [name for (name,) in conn.execute(query("registry_bad_symbols"))]


def _resolve_session(conn: Any, params: dict[str, Any]) -> None:
    """An exchange calendar code becomes a session on first use; an unknown name is an error."""
    if params.get("session") is not None:
        params["session"] = sessions.resolve(conn, params["session"]).name


def _rebuild_key(conn: Any, symbol: str) -> tuple[str, bool] | None:
    """What decides a symbol's windows and stored bars beyond the data: its session and is_sparse."""
    row = conn.execute(query("registry_rebuild_key"), {"symbol": symbol}).fetchone()
    return (row[0], bool(row[1])) if row else None


def _after_change(conn: Any, symbol: str, before: tuple[str, bool] | None) -> dict[str, Any] | None:
    """Materialise the session's days over the symbol's data, and rebuild its bars when the session or
    is_sparse changed (DESIGN.md 3b: from the stored sources, in this transaction)."""
    after = _rebuild_key(conn, symbol)
    assert after is not None
    span = conn.execute(query("registry_symbol_span"), {"symbol": symbol}).fetchone()
    if span and span[0] is not None:
        sessions.ensure_days(
            conn, after[0], span[0].date() - sessions.LOOKBACK, span[1].date() + sessions.LOOKBACK
        )
    if before is None or before == after:
        return None
    return conn.execute(query("registry_rebuild"), {"symbol": symbol}).fetchone()[0]


def list_assets(db: Database) -> list[dict[str, Any]]:
    with db.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query("registry_list")))


def sync(db: Database, env: str = "prod") -> Any:
    """Create/disable/re-enable tasks from the registry (the database function does the work)."""
    with db.connect() as conn:
        if not conn.execute(query("registry_sync_exists")).fetchone()[0]:  # type: ignore[index]
            raise BaraggError(
                "the database has no sync_agg_state_from_registry function: run `baragg db upgrade` first"
            )
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query("registry_sync"), {"env": env})
            rows = cur.fetchall() if cur.description else []
        conn.commit()
        # The trading days the sessions in use need (as the worker's sync does): a symbol put on a
        # session by SQL and run only by the pg_cron round gets its days here.
        from baragg import sessions

        sessions.ensure_for_sync(conn)
    if len(rows) == 1 and len(rows[0]) == 1:
        return next(iter(rows[0].values()))
    return rows
