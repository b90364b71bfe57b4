"""Time partitions (monthly by ts_utc) and retention of the raw 1m bars (DESIGN.md 11).

The SQL is in functions/05_partitions.sql; this module orchestrates it:

- ``maintain``: create this month's partitions and the next ones, move rows out of the default
  partitions (``db upgrade``, the worker's registry sync);
- ``ensure_months``: the partitions of the months an ingest is about to write, in their own short
  transaction (creating one takes a brief lock on the default partition, which must not be held for a
  whole ingest);
- ``convert``: ``baragg db partition``, the online, resumable conversion of an unpartitioned table;
- ``retention``: ``baragg retention --raw 90d``, dropping whole 1m partitions that every level has
  finished with.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from baragg.db import Database
from baragg.errors import BaraggError, InvalidInput
from baragg.sql import query

log = logging.getLogger(__name__)

TABLES = ("data_bars", "derived_data_bars")
DEFAULT_BATCH_ROWS = 50_000
MONTHS_AHEAD = 2
_LOCK_TIMEOUT = "5s"
_SWAP_ATTEMPTS = 20


def maintain(conn: psycopg.Connection, ahead: int = MONTHS_AHEAD) -> int:
    """Partitions for this month and ``ahead`` months, and for every month found in a default
    partition; returns how many were created (0 on an unpartitioned database)."""
    created = 0
    for table in TABLES:  # one transaction per table: housekeeping holds its locks briefly
        with conn.transaction():
            row = conn.execute(query("partitions_maintain"), {"ahead": ahead, "table": table}).fetchone()
        created += int(row[0]) if row and row[0] is not None else 0
    return created


def months(first: datetime, last: datetime) -> list[datetime]:
    """The start of every month from ``first``'s to ``last``'s (in ``first``'s time zone): the months a
    span of rows needs partitions for."""
    month = first.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    found = []
    while month <= last:
        found.append(month)
        month = (month + timedelta(days=32)).replace(day=1)
    return found


def ensure_months(db: Database, table: str, months: Sequence[datetime]) -> int:
    """Create the partitions of ``months`` that are missing, in a transaction of their own."""
    if not months:
        return 0
    with side_connection(db) as conn:
        return ensure_months_on(conn, table, months)


def side_connection(db: Database) -> psycopg.Connection:
    """An autocommit connection for ``ensure_months_on``, beside a caller's long transaction."""
    conn = db.connect(autocommit=True)
    # Never queue behind a long transaction (the caller's own ingest may hold the default partition).
    conn.execute("SET lock_timeout = '2s'")
    return conn


def ensure_months_on(conn: psycopg.Connection, table: str, months: Sequence[datetime]) -> int:
    """``ensure_months`` on an open ``side_connection`` (an ingest keeps one for all its chunks)."""
    if not months:
        return 0
    row = conn.execute(query("partitions_ensure"), {"table": table, "months": list(months)}).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def table_kinds(conn: psycopg.Connection) -> dict[str, tuple[str, str | None]]:
    """Each bar table's relkind ('r' plain, 'p' partitioned) and its conversion phase, if any."""
    return {name: (kind, phase) for name, kind, phase in conn.execute(query("partitions_kind"))}


def is_partitioned(conn: psycopg.Connection) -> bool:
    kinds = table_kinds(conn)
    return all(kinds.get(t, ("r", None))[0] == "p" for t in TABLES)


# ---------------------------------------------------------------------------------------------
# baragg db partition
# ---------------------------------------------------------------------------------------------
@dataclass
class TableConversion:
    table: str
    rows_copied: int = 0
    rows_replayed: int = 0
    verified_rows: int = 0
    swap_replayed: int = 0
    already: bool = False


@dataclass
class ConversionReport:
    tables: list[TableConversion] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tables": [t.__dict__ for t in self.tables]}


def convert(
    db: Database,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    pause: float = 0.0,
    on_batch: Callable[[str, str, int], None] | None = None,
) -> ConversionReport:
    """Convert data_bars and derived_data_bars into monthly partitioned tables, online.

    Every step is one transaction (setup; each batch of the copy with its last key; each batch of the
    replay; the swap), so a kill at any point resumes where it stopped. ``pause`` sleeps between
    batches (to leave the server room); ``on_batch(table, step, rows)`` is called after each batch.
    """
    from baragg import migrate

    with db.connect(autocommit=True) as conn:
        if conn.execute(query("on_citus")).fetchone()[0]:
            raise BaraggError(
                "db partition: the bar tables are distributed (Citus); time partitions of distributed "
                "tables are not supported yet (see README, Scaling out)"
            )
    report = ConversionReport()
    for table in TABLES:
        item = TableConversion(table)
        report.tables.append(item)
        with db.connect(autocommit=True) as conn:
            kind, phase = table_kinds(conn).get(table, ("r", None))
            if kind == "p":
                item.already = True
                continue
            if phase != "copying":
                _locked(conn, query("partitions_setup"), {"table": table})
                log.info("%s: partitioned copy and change log set up", table)
            step_params = {"table": table, "rows": batch_rows}
            for step in ("copy", "replay"):
                for _ in range(10**9):  # ends when a batch finds nothing
                    row = conn.execute(query(f"partitions_{step}"), step_params).fetchone()
                    rows = int(row[0]) if row and row[0] is not None else 0
                    if step == "copy":
                        item.rows_copied += rows
                    else:
                        item.rows_replayed += rows
                    if on_batch:
                        on_batch(table, step, rows)
                    if rows == 0:
                        break
                    if pause:
                        time.sleep(pause)
            item.verified_rows = _verify(db, table)
            repeatables = [m for m in migrate.discover() if m.repeatable]
            for attempt in range(1, _SWAP_ATTEMPTS + 1):
                try:
                    with conn.transaction():
                        conn.execute("SELECT set_config('lock_timeout', %s, true)", (_LOCK_TIMEOUT,))
                        row = conn.execute(query("partitions_swap"), {"table": table}).fetchone()
                        item.swap_replayed = int(row[0]) if row and row[0] is not None else 0
                        # Triggers, grants and row-level security on the new table, in the swap's
                        # transaction: no write reaches it without its invalidation triggers.
                        migrate.reapply_repeatables(conn, repeatables)
                    break
                except psycopg.errors.LockNotAvailable:
                    if attempt == _SWAP_ATTEMPTS:
                        raise BaraggError(
                            f"{table}: could not take the lock for the swap in {_SWAP_ATTEMPTS} tries "
                            f"(long transactions on it?); run `baragg db partition` again to resume"
                        ) from None
                    log.warning("%s: the swap waits for a lock (try %d)", table, attempt)
                    time.sleep(min(2.0, 0.2 * attempt))
            if on_batch:
                on_batch(table, "swap", item.swap_replayed)
            log.info(
                "%s: partitioned (%d rows copied, old table kept as %s_unpartitioned)",
                table,
                item.rows_copied,
                table,
            )
    with db.connect(autocommit=True) as conn:
        maintain(conn)
    return report


def _locked(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> None:
    """Run one DDL step with a lock timeout, retried: it must not queue writers behind it for long."""
    for attempt in range(1, _SWAP_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (_LOCK_TIMEOUT,))
                conn.execute(sql, params)
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == _SWAP_ATTEMPTS:
                raise BaraggError(
                    f"could not take a lock in {_SWAP_ATTEMPTS} tries; try again later"
                ) from None
            time.sleep(min(2.0, 0.2 * attempt))


def _verify(db: Database, table: str) -> int:
    """Both tables in one snapshot, leaving out the keys still logged: rows and content must be equal."""
    for _ in range(5):
        with db.connect() as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            row = conn.execute(query("partitions_compare"), {"table": table}).fetchone()
            conn.rollback()
        assert row is not None
        old_rows, new_rows, old_hash, new_hash, logged = row
        if old_rows == new_rows and old_hash == new_hash:
            log.info("%s: copy verified (%d rows equal, %d keys still logged)", table, old_rows, logged)
            return int(old_rows)
    raise BaraggError(
        f"{table}: the partitioned copy differs from the table ({old_rows} rows vs {new_rows}); "
        "nothing was swapped; report this, the table itself is untouched"
    )


# ---------------------------------------------------------------------------------------------
# baragg retention
# ---------------------------------------------------------------------------------------------
_AGE = re.compile(r"^\s*(\d+)\s*(d|days?|w|weeks?)\s*$", re.IGNORECASE)


def parse_age(text: str) -> timedelta:
    """'90d', '12w' → a timedelta; anything else is refused naming the value."""
    match = _AGE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise InvalidInput(f"--raw {text!r}: expected a number of days or weeks, e.g. 90d or 12w")
    n = int(match.group(1))
    return timedelta(weeks=n) if match.group(2).lower().startswith("w") else timedelta(days=n)


@dataclass
class PartitionFate:
    name: str
    start: datetime
    end: datetime
    dropped: bool = False
    blocked_by: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "partition": self.name,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "dropped": self.dropped,
            "kept_because": self.blocked_by,
        }


def retention(
    db: Database, older_than: timedelta, *, dry_run: bool = False, now: datetime | None = None
) -> list[PartitionFate]:
    """Drop the 1m partitions of data_bars that end before now - ``older_than`` and that every level has
    finished with; oldest first, stopping at the first that must stay (the 1m rows kept are one span).

    Derived bars are kept. The dropped months are recorded (baragg_retention_log): verify checks 5m
    bars only from the oldest 1m row kept.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    fates: list[PartitionFate] = []
    with db.connect(autocommit=True) as conn:
        if not is_partitioned(conn):
            raise BaraggError(
                "data_bars is not partitioned: retention drops whole monthly partitions; "
                "run `baragg db partition` first"
            )
        candidates = [
            (name, start, end)
            for name, start, end in conn.execute(query("partitions_list"), {"table": "data_bars"})
            if start is not None and end is not None and end <= cutoff
        ]
        for name, start, end in candidates:
            fate = PartitionFate(name, start, end)
            fates.append(fate)
            with conn.transaction():
                if not dry_run:
                    conn.execute(query("retention_lock"))
                fate.blocked_by = [
                    r[0] for r in conn.execute(query("retention_blockers"), {"start": start, "end": end})
                ]
                if fate.blocked_by or dry_run:
                    pass
                else:
                    conn.execute(
                        psycopg.sql.SQL("ALTER TABLE public.data_bars DETACH PARTITION public.{}").format(
                            psycopg.sql.Identifier(name)
                        )
                    )
                    conn.execute(psycopg.sql.SQL("DROP TABLE public.{}").format(psycopg.sql.Identifier(name)))
                    conn.execute(query("retention_record"), {"name": name, "start": start, "end": end})
                    fate.dropped = True
            if fate.blocked_by:
                break
    return fates


def raw_horizon(conn: psycopg.Connection) -> datetime | None:
    """Where the 1m rows begin after retention dropped older months (None: nothing dropped)."""
    row = conn.execute(query("retention_horizon")).fetchone()
    return row[0] if row else None
