"""The worker sizes each catch-up call of a backlog to the time budget left (issue 15): fewer, larger
calls when there is time, never fewer windows than --max-windows (unless many tasks share the call),
never a call planned to overrun, never more than _CALL_WINDOWS_CAP windows in one call (so that the
call's bars stay in memory)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from baragg.worker import (
    _BUDGET_SHARE,
    _CALL_WINDOWS_CAP,
    _MAX_WINDOWS_CAP,
    _first_max_windows,
    _next_max_windows,
)


@given(
    floor=st.integers(1, 5000),
    windows=st.integers(0, 10**7),
    seconds=st.floats(0, 600, allow_nan=False),
    remaining=st.floats(-60, 600, allow_nan=False),
    tasks=st.integers(0, 5000),
)
def test_next_call_fits_the_budget_left_and_the_call_cap(
    floor: int, windows: int, seconds: float, remaining: float, tasks: int
) -> None:
    first = _first_max_windows(floor, tasks)
    assert 1 <= first <= floor
    assert first * max(tasks, 1) <= max(_CALL_WINDOWS_CAP, max(tasks, 1))
    n = _next_max_windows(floor, windows, seconds, remaining, tasks)
    assert first <= n <= max(first, _MAX_WINDOWS_CAP)
    if n > first:
        assert n * tasks <= _CALL_WINDOWS_CAP
        # at the last call's rate, the next call takes at most the budget share of the time left
        assert n * tasks / (windows / seconds) <= remaining * _BUDGET_SHARE * 1.000001


def test_a_backlog_with_time_left_gets_larger_calls_up_to_the_cap() -> None:
    # 10 tasks x 2,000 windows in 1 s, 50 s left: 80% of 50 s at 20,000 windows/s = 80,000 per task,
    # capped at 250,000 windows per call = 25,000 per task
    assert _next_max_windows(2000, 20_000, 1.0, 50.0, 10) == 25_000
    # 100 tasks x 2,000 windows in 10 s, 5 s left: 80% of 5 s at 20,000 windows/s = 800 per task: the floor
    assert _next_max_windows(2000, 200_000, 10.0, 5.0, 100) == 2000
    # no time left, or nothing learnt from the last call: --max-windows
    assert _next_max_windows(2000, 200_000, 10.0, 0.0, 100) == 2000
    assert _next_max_windows(2000, 0, 10.0, 50.0, 100) == 2000


def test_many_tasks_share_the_first_call() -> None:
    assert _first_max_windows(2000, 100) == 2000
    assert _first_max_windows(2000, 500) == 500  # 250,000 windows in all
    assert _first_max_windows(2000, 1_000_000) == 1
