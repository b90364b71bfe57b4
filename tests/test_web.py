"""The JSON API behind the status page, the static assets, and `baragg serve` itself."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from baragg.metrics import Metrics
from baragg.web import StatusServer, api
from obs_data import NOW, add_symbols, standard_fixture
from stream_lines import LineReader
from web_client import get, running_server


@pytest.fixture
def served(db, conn):
    fixture = standard_fixture(conn)
    with running_server(db) as server:
        yield server, fixture


def by_key(tasks):
    return {(t["symbol"], t["timeframe"]): t for t in tasks}


def test_task_lag_behind_frontier_and_now(db, conn):
    standard_fixture(conn)
    tasks = by_key(api.tasks(conn, now=NOW)["tasks"])
    # 1m data runs through 15:06, so the last complete 5m window ends at 15:05: the cursor is there.
    assert tasks["ESZ4", "5m"]["frontier_utc"] == "2024-11-22T15:05:00Z"
    assert tasks["ESZ4", "5m"]["lag_frontier_seconds"] == 0
    assert tasks["ESZ4", "5m"]["lag_now_seconds"] == 0  # its window 15:05-15:10 is still open
    # 5m bars run through 15:00-15:05: the hours up to 15:00 are complete; the 1h cursor is at 13:00.
    assert tasks["ESZ4", "1h"]["frontier_utc"] == "2024-11-22T15:00:00Z"
    assert tasks["ESZ4", "1h"]["lag_frontier_seconds"] == 7200
    assert tasks["ESZ4", "1h"]["lag_now_seconds"] == 3600 + 7 * 60 + 30  # 13:00-14:00 ended at 14:00
    assert tasks["ESZ4", "15m"]["lag_frontier_seconds"] == 0
    # No source data (GC) or no cursor yet: lag is unknown, not zero.
    assert tasks["GCZ4", "5m"]["lag_frontier_seconds"] is None
    assert tasks["GCZ4", "1h"]["cursor_utc"] is None
    assert tasks["GCZ4", "1h"]["lag_now_seconds"] is None


def test_weekly_frontier_starts_on_monday(db, conn):
    add_symbols(conn, "W")
    conn.execute(
        "INSERT INTO derived_data_bars (canonical_symbol, timeframe, ts_utc, open, high, low, close)"
        " VALUES ('W', '1d', '2024-11-21', 1, 1, 1, 1)"  # a Thursday
    )
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, last_agg_bar_ts_utc)"
        " VALUES ('W', '1w', '1d', '2024-11-11')"
    )
    (task,) = api.tasks(conn, now=NOW)["tasks"]
    assert task["frontier_utc"] == "2024-11-18T00:00:00Z"  # the Monday of the week being built
    assert task["lag_frontier_seconds"] == 7 * 86400


def test_api_tasks_and_summary(served):
    server, _ = served
    res = get(server.url + "/api/tasks")
    assert res.status == 200
    assert res.headers["content-type"] == "application/json"
    tasks = by_key(res.json()["tasks"])
    assert len(tasks) == 7
    gc = tasks["GCZ4", "5m"]
    assert (gc["state"], gc["streak"], gc["last_error"]) == (
        "hard_failed",
        4,
        "division by zero in catchup_aggregation_range",
    )
    assert tasks["CLZ4", "15m"]["state"] == "disabled"
    assert tasks["CLZ4", "5m"]["lease_owner"] == "host-a:4242:ab12cd:0"
    assert tasks["CLZ4", "5m"]["lease_expires_utc"] == "2024-11-22T15:11:30Z"
    assert tasks["ESZ4", "5m"]["bars_created"] == 600
    assert tasks["ESZ4", "5m"]["cursor_utc"] == "2024-11-22T15:05:00Z"

    summary = get(server.url + "/api/summary").json()
    assert summary["tasks"] == 7
    assert summary["by_state"] == {"disabled": 1, "hard_failed": 1, "idle": 4, "running": 1}
    assert {(a["symbol"], a["timeframe"], a["state"]) for a in summary["alerts"]} == {
        ("GCZ4", "5m", "hard_failed"),
        ("CLZ4", "15m", "disabled"),
    }
    assert summary["worst_lag"]["1h"]["lag_frontier_seconds"] == 7200
    assert summary["worst_lag"]["1h"]["symbol_frontier"] == "ESZ4"


def test_disabled_flag_wins_over_status(db, conn):
    standard_fixture(conn)
    conn.execute(
        "UPDATE data_agg_state SET enabled = false WHERE canonical_symbol = 'ESZ4' AND timeframe = '1h'"
    )
    tasks = by_key(api.tasks(conn)["tasks"])
    assert tasks["ESZ4", "1h"]["status"] == "idle"
    assert tasks["ESZ4", "1h"]["state"] == "disabled"


def test_api_symbols(served):
    server, _ = served
    symbols = {s["symbol"]: s for s in get(server.url + "/api/symbols").json()["symbols"]}
    assert set(symbols) == {"ESZ4", "GCZ4", "CLZ4"}
    assert symbols["ESZ4"]["timeframes"] == ["1m", "5m", "15m", "1h"]
    assert symbols["CLZ4"]["timeframes"] == ["5m", "15m"]


def test_api_bars_columns(served):
    server, fx = served
    body = get(server.url + "/api/bars?symbol=ESZ4&timeframe=5m").json()
    assert body["count"] == 600
    assert body["truncated"] is False
    cols = body["columns"]
    assert set(cols) == {
        "ts",
        "open",
        "high",
        "low",
        "close",
        "vol",
        "quality",
        "source_candles",
        "expected_candles",
    }
    assert all(len(v) == 600 for v in cols.values())
    assert cols["ts"][0] == int(fx["start_5m"].timestamp())
    assert cols["ts"] == sorted(cols["ts"])
    assert set(cols["quality"]) == {-1, 0, 1, 2}
    assert all(
        lo <= min(o, c) <= max(o, c) <= hi
        for o, hi, lo, c in zip(cols["open"], cols["high"], cols["low"], cols["close"], strict=True)
    )


def test_api_bars_limit_takes_the_latest_and_range_is_half_open(served):
    server, fx = served
    body = get(server.url + "/api/bars?symbol=ESZ4&timeframe=5m&limit=100").json()
    assert body["count"] == 100
    assert body["truncated"] is True
    assert body["columns"]["ts"][-1] == int(fx["end_5m"].timestamp()) - 300
    exactly_all = get(server.url + "/api/bars?symbol=ESZ4&timeframe=5m&limit=600").json()
    assert (exactly_all["count"], exactly_all["truncated"]) == (600, False)
    older = get(
        server.url + f"/api/bars?symbol=ESZ4&timeframe=5m&limit=100&to={body['columns']['ts'][0]}"
    ).json()
    assert (
        older["columns"]["ts"][-1] == body["columns"]["ts"][0] - 300
    )  # continues where the first page began
    start = int(fx["start_5m"].timestamp())
    body = get(server.url + f"/api/bars?symbol=ESZ4&timeframe=5m&from={start}&to={start + 3600}").json()
    assert body["count"] == 12
    body = get(
        server.url
        + "/api/bars?symbol=ESZ4&timeframe=5m&from=2024-11-22T14:00:00Z&to=2024-11-22T15:00:00+00:00"
    ).json()
    assert body["count"] == 12
    assert body["columns"]["ts"][0] == int(datetime(2024, 11, 22, 14, tzinfo=UTC).timestamp())


def test_api_bars_1m_from_data_bars(served):
    server, _ = served
    body = get(server.url + "/api/bars?symbol=ESZ4&timeframe=1m").json()
    assert body["count"] == 62
    assert set(body["columns"]["quality"]) == {None}


def test_api_bars_empty(served):
    server, _ = served
    body = get(server.url + "/api/bars?symbol=GCZ4&timeframe=1h").json()
    assert body["count"] == 0
    assert body["columns"]["ts"] == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("timeframe=5m", "symbol: required"),
        ("symbol=ESZ4&timeframe=7m", "timeframe: must be one of"),
        ("symbol=ESZ4", "timeframe: must be one of"),
        ("symbol=ESZ4&timeframe=5m&limit=abc", "limit: not an integer"),
        ("symbol=ESZ4&timeframe=5m&limit=0", "limit: must be between"),
        ("symbol=ESZ4&timeframe=5m&limit=100000000", "limit: must be between"),
        ("symbol=ESZ4&timeframe=5m&from=yesterday", "from: not ISO 8601"),
        ("symbol=ESZ4&timeframe=5m&to=nan", "to: not a finite number"),
        ("symbol=ESZ4&timeframe=5m&from=2024-02-01&to=2024-01-01", "from: must be before to"),
        ("symbol=ESZ4&timeframe=5m&color=red", "unknown parameter: color"),
    ],
)
def test_api_bars_bad_parameters_are_400(served, query, message):
    server, _ = served
    res = get(server.url + "/api/bars?" + query)
    assert res.status == 400
    assert res.headers["content-type"] == "application/json"
    assert res.text.count("\n") == 1  # one line
    assert set(res.json()) == {"error"}
    assert message in res.json()["error"]


def test_api_unknown_symbol_is_404_and_unknown_parameter_400(served):
    server, _ = served
    res = get(server.url + "/api/bars?symbol=NOPE&timeframe=5m")
    assert res.status == 404
    assert "not in the registry" in res.json()["error"]
    assert get(server.url + "/api/tasks?x=1").status == 400
    assert get(server.url + "/api/nothing").status == 404


def test_large_responses_are_gzipped(served):
    server, _ = served
    res = get(server.url + "/api/bars?symbol=ESZ4&timeframe=5m", headers={"Accept-Encoding": "gzip"})
    assert res.headers["content-encoding"] == "gzip"
    assert res.json()["count"] == 600


def test_page_and_assets_are_served_locally(served):
    server, _ = served
    page = get(server.url + "/")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, "the page loads its assets"
    for src in sources:
        if src.startswith("data:"):
            continue
        assert src.startswith("/static/"), f"{src} is not served by baragg"
        assert get(server.url + src).status == 200
    lib = get(server.url + "/static/lightweight-charts.standalone.production.js")
    assert "javascript" in lib.headers["content-type"]
    assert b"TradingView Lightweight Charts" in lib.body[:400]
    for bad in ("/static/../server.py", "/static/.hidden", "/static/", "/static/nope.js"):
        assert get(server.url + bad).status == 404, bad


def test_pages_off_serves_only_metrics_and_health(db, conn):
    standard_fixture(conn)
    with running_server(db, pages=False) as server:
        assert get(server.url + "/").status == 404
        assert get(server.url + "/api/tasks").status == 404
        assert get(server.url + "/metrics").status == 200
        assert get(server.url + "/healthz").status == 200


def test_cli_serve(db, conn):
    standard_fixture(conn)
    env = {**os.environ, "DATABASE_URL": db.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "baragg.cli", "serve", "--port", "0", "--now", "2024-11-22T15:07:30"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    stderr = LineReader(proc, proc.stderr)
    try:
        url = stderr.wait_for(r"(http://127\.0\.0\.1:\d+)/", timeout=60).group(1)
        assert get(url + "/healthz").status == 200
        body = get(url + "/api/tasks").json()
        assert body["now"] == "2024-11-22T15:07:30Z"  # --now without an offset is UTC
        assert by_key(body["tasks"])["ESZ4", "1h"]["lag_now_seconds"] == 3600 + 7 * 60 + 30
    finally:
        proc.terminate()
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise
    assert returncode == 0, stderr.rest(timeout=10)  # SIGTERM is a clean stop


def test_cli_serve_port_in_use_is_one_line_error(db):
    with running_server(db) as server:
        res = subprocess.run(
            [sys.executable, "-m", "baragg.cli", "serve", "--port", str(server.port)],
            env={**os.environ, "DATABASE_URL": db.url},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert res.stderr.startswith("baragg: error: cannot listen on 127.0.0.1:")
    assert res.stderr.count("\n") == 1


def test_listens_on_ipv6(db):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = StatusServer(db, "::1", 0, metrics=Metrics(), db_timeout=1)
    with server:
        assert server.url.startswith("http://[::1]:")
        assert get(server.url + "/healthz").status == 200
