"""Times given on the command line (--from, --to, --now): ISO 8601, UTC unless an offset is given."""

from __future__ import annotations

from datetime import UTC, datetime

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
