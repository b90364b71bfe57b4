"""Every runtime query lives in queries.sql as a named block; this module loads them.

A block starts with a line ``-- name: some_name`` and runs to the next such line. Keeping SQL in
.sql files keeps the Python readable as orchestration and the SQL readable as SQL.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse_named_blocks(text: str) -> dict[str, str]:
    """Split a file of ``-- name: x`` blocks into a dict; a duplicate name is an error."""
    blocks: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = match.group(1)
        if name in blocks:
            raise ValueError(f"duplicate query name {name!r} in queries.sql")
        blocks[name] = text[match.end() : end].strip().rstrip(";")
    return blocks


@cache
def queries() -> dict[str, str]:
    text = resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    return parse_named_blocks(text)


def query(name: str) -> str:
    """The SQL text of one named query from queries.sql."""
    return queries()[name]
