"""Housekeeping of derived_data_bars.

The seed's production database holds 1m rows for some symbols (DXY) in derived_data_bars, where only
derived timeframes belong. ``legacy_derived`` soft-deletes them (``deleted_at = now()``): nothing is
hard-deleted, so the rows stay inspectable.
"""

from __future__ import annotations

from baragg.db import Database
from baragg.sql import query


def legacy_derived(db: Database, *, timeframe: str = "1m", dry_run: bool = False) -> dict[str, int]:
    """Soft-delete active rows of ``timeframe`` in derived_data_bars; per-symbol counts."""
    with db.connect() as conn:
        name = "cleanup_legacy_derived_count" if dry_run else "cleanup_legacy_derived"
        counts = {symbol: int(n) for symbol, n in conn.execute(query(name), {"timeframe": timeframe})}
        conn.commit()
    return counts
