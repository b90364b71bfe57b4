"""Helpers for the operator-tool tests: run the real `baragg` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from baragg.db import Database


def baragg(
    db: Database | None, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m baragg.cli ARGS` against ``db``; returns the finished process (text output)."""
    environment = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "BARAGG_DEBUG"}}
    if db is not None:
        environment["DATABASE_URL"] = db.url
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "baragg.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=240,  # under the per-test limit (pyproject), so the command is named when it hangs
    )


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path
