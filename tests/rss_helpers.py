"""Peak memory of one `baragg` command, measured from outside (issue 14: bounded memory).

The command runs under a small wrapper process whose only child it is, so that
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the command's own peak RSS, not the largest of every
subprocess the test session ever started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from baragg.db import Database

_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def baragg_peak_rss(
    db: Database | None, *args: str | Path, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python -m baragg.cli ARGS` against ``db``: (the finished process, its peak RSS in MiB)."""
    environment = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "BARAGG_DEBUG"}}
    if db is not None:
        environment["DATABASE_URL"] = db.url
    environment.update(env or {})
    with tempfile.TemporaryDirectory() as directory:
        report = Path(directory) / "maxrss"
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _WRAPPER,
                str(report),
                sys.executable,
                "-m",
                "baragg.cli",
                *map(str, args),
            ],
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
        )
        kib = int(report.read_text())  # Linux reports kilobytes
    return done, kib / 1024
