"""The worker sizes each catch-up call of a backlog to the time budget left (issue 15): fewer, larger
calls when there is time, never fewer windows than --max-windows, never a call planned to overrun."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from baragg.timeframes import LADDER
from baragg.worker import _BUDGET_SHARE, _BUFFER_SHARE, _MAX_WINDOWS_CAP, _next_max_windows, _read_cap


@given(
    floor=st.integers(1, 5000),
    windows=st.integers(0, 10**7),
    seconds=st.floats(0, 600, allow_nan=False),
    remaining=st.floats(-60, 600, allow_nan=False),
    tasks=st.integers(0, 5000),
    cap=st.integers(1, 2 * _MAX_WINDOWS_CAP),
)
def test_next_call_fits_the_budget_left_and_never_drops_below_max_windows(
    floor: int, windows: int, seconds: float, remaining: float, tasks: int, cap: int
) -> None:
    n = _next_max_windows(floor, windows, seconds, remaining, tasks, cap)
    assert floor <= n <= max(floor, min(cap, _MAX_WINDOWS_CAP))
    if n > floor:
        # at the last call's rate, the next call takes at most the budget share of the time left
        assert n * tasks / (windows / seconds) <= remaining * _BUDGET_SHARE * 1.000001


def test_a_backlog_with_time_left_gets_larger_calls() -> None:
    # 100 tasks x 2,000 windows in 10 s, 50 s left: 80% of 50 s at 20,000 windows/s = 8,000 per task
    assert _next_max_windows(2000, 200_000, 10.0, 50.0, 100) == 8000
    # no time left, or nothing learnt from the last call: --max-windows
    assert _next_max_windows(2000, 200_000, 10.0, 0.0, 100) == 2000
    assert _next_max_windows(2000, 0, 10.0, 50.0, 100) == 2000


@given(
    timeframe=st.sampled_from(sorted(LADDER)),
    tasks=st.integers(2, 5000),
    pages=st.integers(1, 2**31),
)
def test_a_grown_call_of_several_tasks_reads_per_task_at_most_half_the_shared_buffers(
    timeframe: str, tasks: int, pages: int
) -> None:
    """Rows of neighbouring symbols share heap pages; the next task finds them in the buffers only
    while one task's read fits there (1,000 symbols x 30 days: 39 instead of 22 us per window)."""
    cap = _read_cap(timeframe, tasks, pages)
    n = _next_max_windows(2000, 10**6, 1.0, 600.0, tasks, cap)
    rows = n * LADDER[timeframe].max_source_bars
    assert n == 2000 or rows <= pages * _BUFFER_SHARE


def test_the_read_cap_leaves_a_single_task_and_a_large_buffer_pool_alone() -> None:
    # 128MB of buffers (16,384 pages), 5m from 1m rows: 1,638 windows, so --max-windows (2000) holds
    assert _next_max_windows(2000, 10**6, 10.0, 50.0, 500, _read_cap("5m", 500, 16_384)) == 2000
    # 1GB: calls grow up to 13,107 windows per task
    assert _next_max_windows(2000, 10**6, 10.0, 500.0, 500, _read_cap("5m", 500, 131_072)) == 13_107
    # one task: no neighbour to share pages with, the time budget alone sizes the call
    assert _read_cap("5m", 1, 16_384) == _MAX_WINDOWS_CAP
    assert _next_max_windows(2000, 100_000, 1.0, 50.0, 1, _read_cap("5m", 1, 16_384)) == _MAX_WINDOWS_CAP
