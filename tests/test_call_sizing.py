"""The worker sizes each catch-up call of a backlog to the time budget left (issue 15): fewer, larger
calls when there is time, never fewer windows than --max-windows, never a call planned to overrun."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from baragg.worker import _BUDGET_SHARE, _MAX_WINDOWS_CAP, _next_max_windows


@given(
    floor=st.integers(1, 5000),
    windows=st.integers(0, 10**7),
    seconds=st.floats(0, 600, allow_nan=False),
    remaining=st.floats(-60, 600, allow_nan=False),
    tasks=st.integers(0, 5000),
)
def test_next_call_fits_the_budget_left_and_never_drops_below_max_windows(
    floor: int, windows: int, seconds: float, remaining: float, tasks: int
) -> None:
    n = _next_max_windows(floor, windows, seconds, remaining, tasks)
    assert floor <= n <= max(floor, _MAX_WINDOWS_CAP)
    if n > floor:
        # at the last call's rate, the next call takes at most the budget share of the time left
        assert n * tasks / (windows / seconds) <= remaining * _BUDGET_SHARE * 1.000001


def test_a_backlog_with_time_left_gets_larger_calls() -> None:
    # 100 tasks x 2,000 windows in 10 s, 50 s left: 80% of 50 s at 20,000 windows/s = 8,000 per task
    assert _next_max_windows(2000, 200_000, 10.0, 50.0, 100) == 8000
    # no time left, or nothing learnt from the last call: --max-windows
    assert _next_max_windows(2000, 200_000, 10.0, 0.0, 100) == 2000
    assert _next_max_windows(2000, 0, 10.0, 50.0, 100) == 2000
