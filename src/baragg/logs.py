"""Logs are events with fields: human-readable lines by default, JSON lines with ``--log-json``.

Library code logs with the standard ``logging`` module and passes its fields as ``extra``; the
formatter here decides how they look. The JSON form carries every extra field, so a log shipper can
index ``symbol``, ``timeframe``, ``bars_created`` and so on without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from baragg.errors import RedactingFilter

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller attached with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: _plain(v) for k, v in record_fields(record).items()})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and its passwords masked) by RedactingFilter
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


class HumanFormatter(logging.Formatter):
    """``2026-01-13 12:00:01 INFO message``: the message already reads as a sentence with its numbers."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def setup_logging(
    *, json_lines: bool = False, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route baragg's logs to ``stream`` (stderr) in the chosen format; replaces earlier handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else HumanFormatter())
    handler.addFilter(RedactingFilter())  # no password in any log line
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("baragg").setLevel(level)
