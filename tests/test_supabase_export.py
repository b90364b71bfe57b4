"""`baragg db export-migrations DIR`: Supabase CLI migration files that, applied in name order (as
`supabase db push` does; here with psql), build the same database as `baragg db upgrade`."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import supabase_like
from baragg import cli, migrate, supabase
from baragg.db import Database
from catalog import snapshot
from conftest import create_database, drop_database, url_for

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed on this machine")


@pytest.fixture
def empty_supabase_db(server_url: str) -> Iterator[Database]:
    """A Supabase-like database with nothing of baragg's yet."""
    name = f"baragg_sbx_{uuid.uuid4().hex[:12]}"
    create_database(server_url, name)
    try:
        with psycopg.connect(url_for(server_url, name), autocommit=True) as conn:
            supabase_like.create_roles(conn)
            supabase_like.apply_default_privileges(conn)
        yield Database(url_for(server_url, name))
    finally:
        drop_database(server_url, name)


def apply_in_order(db: Database, directory: Path) -> list[str]:
    """What `supabase db push` does: every file in version (name) order, each in one transaction."""
    names = sorted(p.name for p in directory.glob("*.sql"))
    for name in names:
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", db.url,
             "-f", str(directory / name)],
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    return names


def test_exported_files_build_what_upgrade_builds(
    empty_supabase_db: Database, supabase_db: Database, tmp_path: Path
) -> None:
    written = supabase.export_migrations(tmp_path)
    shipped = migrate.discover()
    numbered = [m for m in shipped if not m.repeatable]
    assert [e.path.name for e in written] == [
        *(f"202507010000{m.version:02d}_baragg_{m.name}" for m in numbered),
        f"202507010000{len(numbered) + 1:02d}_baragg_functions_{supabase.functions_hash(migrate.discover()[len(numbered) :])}.sql",
    ]
    apply_in_order(empty_supabase_db, tmp_path)
    with empty_supabase_db.connect() as by_files, supabase_db.connect() as by_upgrade:
        assert snapshot(by_files) == snapshot(by_upgrade)
    # baragg sees the schema as current: nothing pending, nothing to apply.
    assert {s.state for s in migrate.status(empty_supabase_db)} == {"applied"}
    assert migrate.upgrade(empty_supabase_db) == []
    with empty_supabase_db.connect(autocommit=True) as conn:
        assert supabase_like.lint(conn, "0013_rls_disabled_in_public") == []


def test_export_is_deterministic_and_adds_only_what_is_missing(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    supabase.export_migrations(first)
    supabase.export_migrations(second)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == {
        p.name: p.read_bytes() for p in second.iterdir()
    }
    assert supabase.export_migrations(first) == []


def test_a_later_export_comes_after_the_projects_own_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_supabase_db: Database, supabase_db: Database
) -> None:
    """Upgrading: the directory holds an earlier export and the project's own later migrations; a new
    numbered migration and changed functions are stamped after the newest file, so that `supabase db
    push` applies them next, and the result is again what `baragg db upgrade` builds."""
    supabase.export_migrations(tmp_path)
    newest_numbered = max(tmp_path.glob("*_baragg_0*.sql"))
    newest_numbered.unlink()  # as if exported by the version before that migration existed
    for old in tmp_path.glob("*_baragg_functions_*.sql"):
        old.unlink()
    (tmp_path / "20260301120000_my_table.sql").write_text("CREATE TABLE my_table (id int PRIMARY KEY);\n")
    (tmp_path / "20240101000000_README.md").write_text("not a migration\n")

    written = [e.path.name for e in supabase.export_migrations(tmp_path)]
    assert written == [
        "20260301120001" + newest_numbered.name[14:],
        "20260301120002_baragg_functions_" + supabase.functions_hash(
            [m for m in migrate.discover() if m.repeatable]) + ".sql",
    ]  # fmt: skip

    # A changed function file alone: one new functions file, after everything.
    shipped = migrate.discover()
    edited = [
        dataclasses.replace(m, sql=m.sql + "\n-- edited\n") if m.name.startswith("10_") else m
        for m in shipped
    ]
    monkeypatch.setattr(migrate, "discover", lambda *a, **k: edited)
    again = [e.path.name for e in supabase.export_migrations(tmp_path)]
    assert len(again) == 1 and again[0].startswith("20260301120003_baragg_functions_")
    assert again[0] != written[-1]
    monkeypatch.undo()

    apply_in_order(empty_supabase_db, tmp_path)
    with empty_supabase_db.connect() as by_files, supabase_db.connect() as by_upgrade:
        assert snapshot(by_files, exclude_tables=("my_table",)) == snapshot(by_upgrade)


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["db", "export-migrations", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("wrote ") for line in out)
    assert cli.main(["db", "export-migrations", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip().endswith("nothing to write")
    (tmp_path / "file").write_text("x")
    assert cli.main(["db", "export-migrations", str(tmp_path / "file")]) == 2
