"""baragg: incremental OHLCV bar aggregation inside PostgreSQL."""

__version__ = "0.1.0"
