"""Apply and report the numbered .sql migrations shipped in baragg/sql/migrations.

Each file applies in its own transaction together with the row that records it, under an advisory
lock, so two upgrades started at once serialise and nothing applies twice. The files are plain SQL
(they also apply as-is with ``psql -f``) and are written to be re-runnable, because a database in the
seed's production state already holds some of what they create.
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


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    state: str  # applied | pending | edited | unknown
    applied_at: datetime | None


def migrations_dir() -> Traversable:
    return resources.files("baragg.sql").joinpath("migrations")


def discover(directory: Traversable | None = None) -> list[Migration]:
    """The shipped migrations in order; a gap or a duplicate number is refused."""
    directory = directory or migrations_dir()
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


def status(db: Database, migrations: list[Migration] | None = None) -> list[MigrationState]:
    """Every migration, shipped or recorded, with its state."""
    migrations = migrations if migrations is not None else discover()
    with db.connect(autocommit=True) as conn:
        applied = _applied(conn)
    states = []
    for m in migrations:
        if m.version not in applied:
            states.append(MigrationState(m.version, m.name, "pending", None))
        else:
            _, checksum, at = applied[m.version]
            states.append(
                MigrationState(m.version, m.name, "applied" if checksum == m.checksum else "edited", at)
            )
    known = {m.version for m in migrations}
    for version, (name, _, at) in sorted(applied.items()):
        if version not in known:
            states.append(MigrationState(version, name, "unknown", at))
    return sorted(states, key=lambda s: s.version)


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
            conn.execute(query("migrations_table"))
            applied = _applied(conn)
            for m in migrations:
                if m.version in applied:
                    if applied[m.version][1] != m.checksum:
                        log.warning("migration %s was edited after it was applied (checksum differs)", m.name)
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
        finally:
            conn.execute(query("migrations_unlock"))
    return applied_now
