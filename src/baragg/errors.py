"""Errors the CLI turns into one readable line and an exit code (DESIGN.md section 9), and the two
filters every line baragg prints goes through: passwords masked, control characters escaped."""

from __future__ import annotations

import logging
import re
import traceback
from urllib.parse import unquote


class BaraggError(Exception):
    """A runtime failure the user should read about: exit code 1."""

    exit_code = 1


class InvalidInput(BaraggError):
    """Bad usage or bad input data: exit code 2, nothing written."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------
# Passwords: never printed (errors, logs, tracebacks)
# ---------------------------------------------------------------------------------------------
MASK = "****"
# scheme://user:PASSWORD@host (also a mangled URI such as "postgresql:/u:pw@h" that libpq rejects)
_URI_PASSWORD = re.compile(r"(?P<user>(?:^|[/\s\"'=])[^\s/:@\"']*:)(?P<password>[^\s@/\"']+)(?=@)")
# key=value conninfo: password=secret, password = 'se cret'
_KV_PASSWORD = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|[^\s'\"]+)", re.IGNORECASE
)
_MIN_LITERAL = 4  # a shorter secret is not replaced wherever it occurs (it would garble the text)
_secrets: set[str] = set()


def register_secrets_from(conninfo: str | None) -> None:
    """Remember the passwords in a database URL or conninfo string, so that ``redact`` masks them
    wherever they appear, even in a message that quotes only a fragment of the URL."""
    if not conninfo:
        return
    for pattern in (_URI_PASSWORD, _KV_PASSWORD):
        for match in pattern.finditer(conninfo):
            password = match.group("password")
            for form in (password, password.strip("'"), unquote(password)):
                if len(form) >= _MIN_LITERAL:
                    _secrets.add(form)


def redact(text: str) -> str:
    """``text`` with every password masked: in URIs, in ``password=`` pairs, and known ones anywhere."""
    text = _URI_PASSWORD.sub(lambda m: m.group("user") + MASK, text)
    text = _KV_PASSWORD.sub(lambda m: m.group("key") + MASK, text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message and traceback with passwords masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        return True


# ---------------------------------------------------------------------------------------------
# Values in messages: one line, no control characters, bounded length
# ---------------------------------------------------------------------------------------------
# C0 and C1 controls, DEL, and the Unicode format characters that reorder or hide text (bidi).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in "\t\n\r":
        return repr(char)[1:-1]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x00``, ``\\n``), so it stays one harmless line."""
    return _CONTROL.sub(_escape, text)


def shown(value: object, limit: int = 40) -> str:
    """A value from the user's data as it may appear in a message: escaped, at most ``limit``
    characters (then ``…`` and the full length)."""
    text = printable(str(value))
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(str(value)):,} characters)"
