"""`baragg demo`: runs end to end on its own embedded database and says what to try next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_on_its_own_data_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "BARAGG_DATA_DIR"}}
    # A DATABASE_URL in the environment must not be used by the demo.
    env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/must-not-be-used"
    done = subprocess.run(
        [sys.executable, "-m", "baragg.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,  # under the per-test limit (pyproject), so the command is named when it hangs
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "registered EURUSD, XAUUSD, XPTUSD (sparse)" in out
    assert "late correction: EURUSD 2025-09-17 14:32" in out and "(updated 1 bar)" in out
    for timeframe in ("5m", "15m", "1h", "4h", "1d", "1w"):
        assert f" {timeframe} " in out
    assert "5 bars re-aggregated over the corrected minute" in out  # late data (DESIGN.md 5) handled
    assert "EURUSD 1h:" in out and "bars equal" in out and "different" not in out
    assert "(including the bars over the corrected minute 09-17 14:32)" in out
    assert "Try next:" in out and f"--data-dir {tmp_path / 'demo'} status" in out
    assert (tmp_path / "demo").is_dir()
