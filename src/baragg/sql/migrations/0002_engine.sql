-- 0002: the aggregation engine (DESIGN.md sections 3 and 4).
-- Tables and data only; the functions (and triggers) are the repeatable file functions/10_engine.sql.
--
-- The timeframe ladder lives in one table that every function reads (and baragg/timeframes.py
-- mirrors, checked by a test). All intervals are written in hours/minutes, never days, so that
-- `ts + bucket_interval` is the same absolute span in every session TimeZone ('1 day' would be
-- 23 or 25 hours across a daylight-saving change).

-- ---------------------------------------------------------------------------------------------
-- The ladder
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS agg_timeframes (
    timeframe text PRIMARY KEY,
    bucket_interval interval NOT NULL,
    source_timeframe text NOT NULL,
    -- 'data_bars' (raw 1m bars) for 5m, 'derived_data_bars' for the rest.
    source_table text NOT NULL CHECK (source_table IN ('data_bars', 'derived_data_bars')),
    -- The denominator of the quality ratio (DESIGN.md 3): 5 for 1w, trading days.
    expected_source_bars integer NOT NULL CHECK (expected_source_bars > 0),
    -- How many source bars fit in one window (bucket_interval / source interval): 7 for 1w.
    max_source_bars integer NOT NULL CHECK (max_source_bars >= expected_source_bars),
    -- Buckets are date_bin(bucket_interval, ts, bucket_origin): the epoch, except Monday for 1w.
    bucket_origin timestamptz NOT NULL,
    -- Order by duration (5m < 15m < 1h < 4h < 1d < 1w); text order would put '1h' before '5m'.
    duration_rank integer NOT NULL UNIQUE
);

INSERT INTO agg_timeframes AS t (timeframe, bucket_interval, source_timeframe, source_table,
                                  expected_source_bars, max_source_bars, bucket_origin, duration_rank)
VALUES
    ('5m',  interval '5 minutes',  '1m',  'data_bars',         5,  5, '1970-01-01 00:00:00+00', 1),
    ('15m', interval '15 minutes', '5m',  'derived_data_bars', 3,  3, '1970-01-01 00:00:00+00', 2),
    ('1h',  interval '1 hour',     '5m',  'derived_data_bars', 12, 12, '1970-01-01 00:00:00+00', 3),
    ('4h',  interval '4 hours',    '1h',  'derived_data_bars', 4,  4, '1970-01-01 00:00:00+00', 4),
    ('1d',  interval '24 hours',   '1h',  'derived_data_bars', 24, 24, '1970-01-01 00:00:00+00', 5),
    -- 1970-01-05 was a Monday (the epoch was a Thursday).
    ('1w',  interval '168 hours',  '1d',  'derived_data_bars', 5,  7, '1970-01-05 00:00:00+00', 6)
ON CONFLICT (timeframe) DO UPDATE SET
    bucket_interval = excluded.bucket_interval,
    source_timeframe = excluded.source_timeframe,
    source_table = excluded.source_table,
    expected_source_bars = excluded.expected_source_bars,
    max_source_bars = excluded.max_source_bars,
    bucket_origin = excluded.bucket_origin,
    duration_rank = excluded.duration_rank;
