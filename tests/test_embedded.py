"""The embedded server as a user meets it: ready without `db upgrade`, and stopped when the last
live baragg process exits, also after one of them was killed with kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

HANDLES = ".handle_pids.json"


def environment() -> dict[str, str]:
    drop = {"DATABASE_URL", "BARAGG_DATA_DIR", "BARAGG_DEBUG", "COLUMNS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def cli(data_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baragg.cli", "--data-dir", str(data_dir), *map(str, args)],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=180,
    )


def start_worker(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "baragg.cli", "--data-dir", str(data_dir), "worker", "--interval", "0.5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )


def postmaster(data_dir: Path) -> psutil.Process | None:
    """The embedded server's main process, if it runs."""
    pid_file = data_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        process = psutil.Process(pid)
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return None
    return process if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None


def wait_until_registered(data_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until ``proc`` is in the server's list of users (it has started the server and uses it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handles = data_dir / HANDLES
        if handles.exists() and str(proc.pid) in handles.read_text() and postmaster(data_dir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError("the worker did not start the embedded server in time")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: concurrent pytest sessions of the same user prune each other's old
    # numbered base directories, which would pull the data directory from under the server.
    parent = Path(tempfile.mkdtemp(prefix="baragg-embedded-"))
    path = parent / "pg"
    try:
        yield path
    finally:
        server = postmaster(path)  # never leave a server behind, whatever the test did
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(parent, ignore_errors=True)


def test_the_readme_first_steps_on_a_fresh_data_dir(data_dir: Path) -> None:
    """Clone to one's own data aggregated: registry add, ingest, backfill, verify; no db upgrade."""
    added = cli(data_dir, "registry", "add", "EURUSD")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "added EURUSD"
    assert "prepared the embedded database" in added.stderr
    csv = data_dir.parent / "eurusd_1m.csv"
    start = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday long ago: final under any real clock
    rows = [f"{(start + timedelta(minutes=i)).isoformat()},1.1,1.2,1.0,1.15" for i in range(1440)]
    csv.write_text("\n".join(["ts_utc,open,high,low,close", *rows]) + "\n")
    loaded = cli(data_dir, "ingest", csv, "--symbol", "EURUSD")
    assert loaded.returncode == 0 and loaded.stderr == "", loaded.stderr  # nothing left to apply: silent
    done = cli(data_dir, "backfill")
    assert done.returncode == 0, done.stderr
    assert "312 bars created" in done.stdout  # 288 5m + 24 1h: the whole day, from its first row
    checked = cli(data_dir, "verify", "EURUSD", "1h")
    assert checked.returncode == 0 and "24 bars checked: 24 equal" in checked.stdout, checked.stdout
    status = cli(data_dir, "db", "status")
    assert status.returncode == 0 and "pending" not in status.stdout


def test_the_server_stops_after_the_last_live_user_even_when_one_was_killed(data_dir: Path) -> None:
    victim = start_worker(data_dir)
    try:
        wait_until_registered(data_dir, victim)
        victim.send_signal(signal.SIGKILL)  # no exit hook runs: its PID stays in the list
    finally:
        victim.wait(30)
    assert postmaster(data_dir) is not None  # nobody stopped it (the killed process could not)

    later = cli(data_dir, "registry", "list")  # the next user cleans the dead PID up ...
    assert later.returncode == 0, later.stderr
    assert postmaster(data_dir) is None  # ... and, being the last live user, stops the server
    assert (data_dir / HANDLES).read_text().strip() == "[]"


def test_a_live_user_keeps_the_server_running(data_dir: Path) -> None:
    daemon = start_worker(data_dir)
    try:
        wait_until_registered(data_dir, daemon)
        other = cli(data_dir, "registry", "list")
        assert other.returncode == 0, other.stderr
        assert postmaster(data_dir) is not None  # the worker still uses it
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(30)
    assert postmaster(data_dir) is None
