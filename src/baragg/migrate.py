"""Apply and report the .sql migrations shipped in baragg/sql.

Two kinds, as Flyway has them:
- *numbered* migrations (``migrations/NNNN_name.sql``: tables, indexes, data) apply in order, each once,
  in its own transaction together with the row that records it;
- *repeatable* files (``functions/NN_name.sql``: functions and the triggers that name them) are
  re-applied whenever one of them changes (by checksum), all of them in order in one transaction, after
  the numbered ones. A change to a function is then a diff of that function, not a new copy of it.

Everything runs under an advisory lock, so two upgrades started at once serialise and nothing applies
twice. The files are plain SQL (they also apply as-is with ``psql -f``, numbered files first) and are
re-runnable, because a database in the seed's production state already holds some of what they create.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from importlib.abc import Traversable

import psycopg

from baragg.db import Database
from baragg.errors import BaraggError
from baragg.sql import query

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_REPEATABLE_NAME = re.compile(r"^(\d{2})_([a-z0-9_]+)\.sql$")

# Checksums a numbered migration had before it was re-cut, accepted as "applied": 0002-0004 held the
# functions too until they moved to the repeatable files (same objects, nothing to re-apply).
_SUPERSEDED_CHECKSUMS: dict[int, frozenset[str]] = {
    2: frozenset({"64a94ce7de6d382edd2d23ac780489a6a8b5d91f9bdfba32b45c07e5f5c86489"}),
    3: frozenset({"052743cc418e2b45f8295cc42896226a7548e51b297724808f1842128b570669"}),
    4: frozenset({"b5060caaa309298145b818939c5e74d4c3f275a7b9be09e1b4acba0d672afdfc"}),
}


@dataclass(frozen=True)
class Migration:
    """One shipped file: a numbered migration (``version`` set) or a repeatable one (``version`` None)."""

    version: int | None
    name: str
    sql: str

    @property
    def repeatable(self) -> bool:
        return self.version is None

    @property
    def label(self) -> str:
        """``0003`` for a numbered migration, ``R`` (repeatable) for a function file."""
        return "R" if self.version is None else f"{self.version:04d}"

    def path(self) -> Traversable:
        """The shipped file (for ``psql -f`` and the Supabase export)."""
        return (functions_dir() if self.repeatable else migrations_dir()).joinpath(self.name)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationState:
    version: int | None
    name: str
    state: str  # applied | pending | edited | unknown
    applied_at: datetime | None


def migrations_dir() -> Traversable:
    return resources.files("baragg.sql").joinpath("migrations")


def functions_dir() -> Traversable:
    return resources.files("baragg.sql").joinpath("functions")


def discover(directory: Traversable | None = None, functions: Traversable | None = None) -> list[Migration]:
    """Every shipped file in the order it applies: the numbered migrations, then the repeatable ones.

    A custom ``directory`` without ``functions`` means numbered migrations only (tests of the rules).
    """
    if directory is not None and functions is None:
        return _numbered(directory)
    return _numbered(directory or migrations_dir()) + _repeatables(functions or functions_dir())


def _repeatables(directory: Traversable) -> list[Migration]:
    found = []
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        if not _REPEATABLE_NAME.match(entry.name):
            raise BaraggError(f"repeatable file {entry.name!r} is not named NN_name.sql")
        found.append(Migration(None, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.name)


def _numbered(directory: Traversable) -> list[Migration]:
    """The numbered migrations in order; a gap or a duplicate number is refused."""
    found: dict[int, Migration] = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if not match:
            raise BaraggError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise BaraggError(
                f"two migrations share number {version:04d}: {found[version].name}, {entry.name}"
            )
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    versions = sorted(found)
    expected = list(range(1, len(versions) + 1))
    if versions != expected:
        missing = sorted(set(expected) - set(versions)) or [versions[-1]]
        raise BaraggError(f"migration numbers have a gap: {missing[0]:04d} is missing")
    return [found[v] for v in versions]


def _applied(conn: psycopg.Connection) -> dict[int, tuple[str, str, datetime]]:
    exists = conn.execute("SELECT to_regclass('baragg_schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return {v: (name, checksum, at) for v, name, checksum, at in conn.execute(query("migrations_applied"))}


def _applied_repeatables(conn: psycopg.Connection) -> dict[str, tuple[str, datetime]]:
    exists = conn.execute("SELECT to_regclass('baragg_schema_repeatables') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return {name: (checksum, at) for name, checksum, at in conn.execute(query("repeatables_applied"))}


def _same(m: Migration, recorded_checksum: str) -> bool:
    """Whether a recorded numbered migration is the shipped one (or an accepted earlier cut of it)."""
    return recorded_checksum == m.checksum or recorded_checksum in _SUPERSEDED_CHECKSUMS.get(
        m.version or 0, frozenset()
    )


def status(db: Database, migrations: list[Migration] | None = None) -> list[MigrationState]:
    """Every migration, shipped or recorded, with its state."""
    migrations = migrations if migrations is not None else discover()
    with db.connect(autocommit=True) as conn:
        applied = _applied(conn)
        repeatables = _applied_repeatables(conn)
    states = []
    for m in migrations:
        if m.repeatable:
            checksum, at = repeatables.get(m.name, ("", None))
            # A changed repeatable file is simply due to be re-applied.
            states.append(
                MigrationState(None, m.name, "applied" if checksum == m.checksum else "pending", at)
            )
        elif m.version not in applied:
            states.append(MigrationState(m.version, m.name, "pending", None))
        else:
            _, checksum, at = applied[m.version]
            states.append(
                MigrationState(m.version, m.name, "applied" if _same(m, checksum) else "edited", at)
            )
    known = {m.version for m in migrations}
    unknown = [
        MigrationState(version, name, "unknown", at)
        for version, (name, _, at) in sorted(applied.items())
        if version not in known
    ]
    numbered = sorted((s for s in states if s.version is not None), key=lambda s: s.version or 0)
    return numbered + unknown + [s for s in states if s.version is None]


def warnings_for(states: list[MigrationState]) -> list[str]:
    out = []
    for s in states:
        if s.state == "edited":
            out.append(f"migration {s.name} was edited after it was applied (checksum differs)")
        elif s.state == "unknown":
            out.append(
                f"migration {s.version:04d} ({s.name}) is applied but not shipped: the database is newer"
            )
    return out


def upgrade(db: Database, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration in order; return the ones applied (none: already current)."""
    migrations = migrations if migrations is not None else discover()
    applied_now: list[Migration] = []
    with db.connect(autocommit=True) as conn:
        conn.execute(query("migrations_lock"))
        try:
            try:
                conn.execute(query("migrations_table"))
            except psycopg.errors.InsufficientPrivilege as exc:
                raise BaraggError(
                    f"{str(exc).strip().splitlines()[0]}: run `baragg db upgrade` as the owner of "
                    "baragg's tables (the role that created them), not as a worker or reader role"
                ) from exc
            applied = _applied(conn)
            for m in migrations:
                if m.repeatable:
                    continue
                if m.version in applied:
                    if not _same(m, applied[m.version][1]):
                        log.warning("migration %s was edited after it was applied (checksum differs)", m.name)
                    elif applied[m.version][1] != m.checksum:
                        conn.execute(
                            query("migrations_rechecksum"), {"version": m.version, "checksum": m.checksum}
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(m.sql)
                        conn.execute(
                            query("migrations_record"),
                            {"version": m.version, "name": m.name, "checksum": m.checksum},
                        )
                except psycopg.Error as exc:
                    raise BaraggError(
                        f"migration {m.name} failed: {str(exc).strip().splitlines()[0]}"
                    ) from exc
                log.info("applied migration %s", m.name)
                applied_now.append(m)
            # A new table needs the last repeatable (security: grants, row-level security) too.
            applied_now += _apply_repeatables(
                conn, [m for m in migrations if m.repeatable], force=bool(applied_now)
            )
            _maintain_partitions(conn)
        finally:
            conn.execute(query("migrations_unlock"))
    return applied_now


def _maintain_partitions(conn: psycopg.Connection) -> None:
    """This month's partitions and the next ones (DESIGN.md 11), where the schema has the function."""
    exists = conn.execute(
        "SELECT to_regprocedure('public.baragg_partitions_maintain(integer, text)') IS NOT NULL"
    )
    row = exists.fetchone()
    if row and row[0]:
        from baragg import partitions

        try:
            partitions.maintain(conn)
        except psycopg.Error as exc:  # housekeeping gives way to writers; the worker retries
            log.warning("could not create the next partitions now (%s)", str(exc).strip().splitlines()[0])


def reapply_repeatables(
    conn: psycopg.Connection, repeatables: list[Migration] | None = None
) -> list[Migration]:
    """Re-apply every repeatable file in ``conn``'s transaction, changed or not: after a change the
    files react to that no checksum shows (``baragg db distribute``: triggers on the new shards,
    functions/50_citus.sql; ``baragg db partition``: triggers on the new partitioned table)."""
    chosen = repeatables if repeatables is not None else [m for m in discover() if m.repeatable]
    return _apply_repeatables(conn, chosen, force=True)


def _apply_repeatables(
    conn: psycopg.Connection, repeatables: list[Migration], *, force: bool = False
) -> list[Migration]:
    """Re-apply every repeatable file, in order and in one transaction, when any of them changed
    (or ``force``: a numbered migration was just applied).

    All of them, not just the changed one: a SQL function's body is checked against the functions it
    calls when it is created, so a changed signature must be followed by its callers. And the last one
    (security) must follow any new table or function: they arrive with the grants this file revokes.
    """
    conn.execute(query("repeatables_table"))
    recorded = _applied_repeatables(conn)
    if not force and all(recorded.get(m.name, ("",))[0] == m.checksum for m in repeatables):
        return []
    current = None
    try:
        with conn.transaction():
            for current in repeatables:
                conn.execute(current.sql)
                conn.execute(
                    query("repeatables_record"), {"name": current.name, "checksum": current.checksum}
                )
    except psycopg.Error as exc:
        name = current.name if current else "?"
        raise BaraggError(f"repeatable {name} failed: {str(exc).strip().splitlines()[0]}") from exc
    changed = [m for m in repeatables if recorded.get(m.name, ("",))[0] != m.checksum]
    for m in changed:
        log.info("applied repeatable %s", m.name)
    return changed


def require_current(db: Database) -> None:
    """Refuse to work on a database whose schema is missing or behind the shipped migrations, with
    the command that fixes it. A database whose migrations were applied with psql (nothing recorded)
    passes when baragg's tables are there; a missing object is then reported where it is used."""
    states = status(db)
    pending = [s.name for s in states if s.state == "pending"]
    if not pending:
        return
    if len(pending) < len(states):
        raise BaraggError(
            f"the database schema is behind this baragg: {len(pending)} migration(s) pending "
            f"({', '.join(pending)}); run `baragg db upgrade`"
        )
    with db.connect(autocommit=True) as conn:
        present = conn.execute(query("schema_present")).fetchone()
    if not present or not present[0]:
        raise BaraggError("the database has no baragg schema: run `baragg db upgrade`")
