"""Times given on the command line (--from, --to, --now): ISO 8601, UTC unless an offset is given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from baragg.errors import InvalidInput


def parse_time(text: str | None, flag: str) -> datetime | None:
    """An aware UTC datetime, or None when ``text`` is None; a bad value is a usage error naming ``flag``."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{flag}: cannot parse {text!r} as an ISO-8601 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# A time this far ahead of the machine's clock is taken as a typo or a test clock left in a script,
# not as clock skew between hosts.
FUTURE_SLACK = timedelta(minutes=1)


def refuse_future(moment: datetime | None, flag: str, *, force: bool = False, why: str) -> None:
    """Refuse a time after the real clock (exit 2) unless ``force``: a future --now or --from is
    written into live scheduling (windows treated as final before they close, tasks parked until
    then). ``why`` says what it would do."""
    if moment is None or force:
        return
    real = datetime.now(UTC)
    if moment > real + FUTURE_SLACK:
        raise InvalidInput(
            f"{flag} {moment:%Y-%m-%d %H:%M} UTC is in the future (the clock says {real:%Y-%m-%d %H:%M} UTC): "
            f"{why}; add --force if you mean it"
        )
