"""``baragg db export-migrations DIR``: baragg's schema as Supabase CLI migration files.

The Supabase CLI applies ``supabase/migrations/<version>_<name>.sql`` in version order, each once
(``supabase db push``), and knows nothing of repeatable files. So:

- each numbered migration becomes one file, ``<stamp>_baragg_<NNNN>_<name>.sql``;
- the function files, in order and with the security file last, become one file
  ``<stamp>_baragg_functions_<hash>.sql`` (they are applied together, as ``baragg db upgrade`` does);
  a new one is written whenever their content changes, and after any new numbered file (a new table
  needs the grants and row-level security of the security file);
- every file records itself in baragg's own bookkeeping tables, so that ``baragg db status`` and
  ``/readyz`` see the schema as current, and a later ``baragg db upgrade`` has nothing to do.

Stamps are deterministic: into an empty directory, 2025-07-01 00:00:NN (NN = the migration number),
then the functions; a later export adds only what is missing, stamped one second after the newest
migration already in the directory (yours included), so ``supabase db push`` applies it next.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from baragg import migrate
from baragg.errors import InvalidInput
from baragg.sql import query

BASE_STAMP = datetime(2025, 7, 1)
_STAMP_FORMAT = "%Y%m%d%H%M%S"
_VERSIONED = re.compile(r"^(\d{14})_.*\.sql$")
_NUMBERED = re.compile(r"^\d{14}_baragg_(\d{4})_[a-z0-9_]+\.sql$")
_FUNCTIONS = re.compile(r"^\d{14}_baragg_functions_([0-9a-f]{12})\.sql$")


@dataclass(frozen=True)
class Exported:
    path: Path
    what: str  # "0001_schema.sql" or "functions"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def numbered_file(m: migrate.Migration) -> str:
    """A numbered migration as a Supabase migration: the file, then the row that records it."""
    assert m.version is not None
    return (
        f"-- baragg migration {m.name}, exported by `baragg db export-migrations`: re-export, do not edit.\n"
        f"{query('migrations_table')};\n\n"
        f"{m.sql.rstrip()}\n\n"
        "INSERT INTO baragg_schema_migrations (version, name, checksum)\n"
        f"VALUES ({m.version}, {_literal(m.name)}, {_literal(m.checksum)})\n"
        "ON CONFLICT (version) DO UPDATE SET checksum = excluded.checksum;\n"
    )


def functions_file(repeatables: list[migrate.Migration]) -> str:
    """Every function file in order (security last), then the rows that record them."""
    parts = [
        "-- baragg functions, triggers and security, exported by `baragg db export-migrations`: re-export,\n"
        "-- do not edit. " + ", ".join(m.name for m in repeatables) + ".\n",
        f"{query('repeatables_table')};\n",
    ]
    for m in repeatables:
        parts.append(f"-- ==== {m.name} ====\n{m.sql.rstrip()}\n")
    for m in repeatables:
        parts.append(
            "INSERT INTO baragg_schema_repeatables AS r (name, checksum)\n"
            f"VALUES ({_literal(m.name)}, {_literal(m.checksum)})\n"
            "ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now();\n"
        )
    return "\n".join(parts)


def functions_hash(repeatables: list[migrate.Migration]) -> str:
    digest = hashlib.sha256()
    for m in repeatables:
        digest.update(f"{m.name}\0{m.checksum}\0".encode())
    return digest.hexdigest()[:12]


def export_migrations(directory: Path) -> list[Exported]:
    """Write what ``directory`` lacks of baragg's migrations; return the files written (none: current)."""
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    shipped = migrate.discover()
    numbered = [m for m in shipped if not m.repeatable]
    repeatables = [m for m in shipped if m.repeatable]

    existing = sorted(p.name for p in directory.iterdir() if _VERSIONED.match(p.name))
    have_numbered = {int(match.group(1)) for name in existing if (match := _NUMBERED.match(name))}
    have_functions = {match.group(1) for name in existing if (match := _FUNCTIONS.match(name))}
    newest = max((datetime.strptime(name[:14], _STAMP_FORMAT) for name in existing), default=None)

    if newest is None:
        stamps = (BASE_STAMP + timedelta(seconds=n) for n in range(1, 10**6))
    else:
        stamps = (newest + timedelta(seconds=n) for n in range(1, 10**6))
    written: list[Exported] = []
    for m in numbered:
        if m.version in have_numbered:
            continue
        assert m.version is not None
        stamp = BASE_STAMP + timedelta(seconds=m.version) if newest is None else next(stamps)
        written.append(_write(directory, stamp, f"baragg_{m.name}", numbered_file(m), m.name))
    digest = functions_hash(repeatables)
    if written or digest not in have_functions:
        if newest is None:
            stamp = BASE_STAMP + timedelta(seconds=(numbered[-1].version or 0) + 1)
        else:
            stamp = next(stamps)
        written.append(
            _write(
                directory, stamp, f"baragg_functions_{digest}.sql", functions_file(repeatables), "functions"
            )
        )
    return written


def _write(directory: Path, stamp: datetime, name: str, text: str, what: str) -> Exported:
    path = directory / f"{stamp.strftime(_STAMP_FORMAT)}_{name}"
    path.write_text(text, encoding="utf-8")
    return Exported(path, what)
