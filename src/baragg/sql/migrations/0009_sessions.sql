-- 0009: trading sessions (DESIGN.md section 3b) and the monthly level.
-- Tables and data only; the functions are the repeatable file functions/15_sessions.sql.
--
-- A session says when a symbol's market trades: an IANA time zone (daylight saving followed), the daily
-- open and close in that zone, the weekdays of its trading dates, and optionally an exchange calendar
-- (holidays, early closes) from the exchange_calendars package. Its trading days are materialised in
-- agg_session_days (open and close instants in UTC per trading date) by baragg's Python side
-- (baragg/sessions.py), over the range the data needs, extended as data arrives; the engine joins them.
--
-- Every symbol has one (core_asset_registry_all.session, default '24x7': UTC days, every day, which is
-- exactly what baragg did before sessions existed). Adding the column changes no bar.
--
-- Re-runnable as a whole (IF NOT EXISTS, ON CONFLICT), so it also applies with psql -f.

-- ---------------------------------------------------------------------------------------------
-- Sessions
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS agg_sessions (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    -- IANA time zone name (checked by baragg against the zone database it generates days with).
    tz text NOT NULL,
    -- Daily open and close in the session's zone. close = open: a market that trades around the clock
    -- (24 hours, or 23/25 on a daylight-saving day). A trading day is labelled by the date it ends on:
    -- with close <= open (and close not 00:00) the session of date D opens on D - 1 (fx: Sunday 17:00
    -- New York opens Monday's session); close 00:00 means midnight at the end of D.
    open_time time NOT NULL,
    close_time time NOT NULL,
    -- ISO weekdays (1 = Monday ... 7 = Sunday) of the trading dates.
    weekdays smallint[] NOT NULL CHECK (cardinality(weekdays) BETWEEN 1 AND 7 AND weekdays <@ '{1,2,3,4,5,6,7}'),
    -- An exchange_calendars code (e.g. XNYS): its days, holidays and early closes replace the rule.
    calendar text,
    builtin boolean NOT NULL DEFAULT false,
    -- The trading dates materialised in agg_session_days: inside [days_from, days_to] a date without a
    -- row is a day without a session (weekend, holiday); outside, nothing is known yet.
    days_from date,
    days_to date,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agg_sessions_days_range_chk CHECK (days_from IS NULL OR days_to >= days_from)
);

INSERT INTO agg_sessions (name, tz, open_time, close_time, weekdays, calendar, builtin)
VALUES
    -- The seed's days: UTC midnight to midnight, every day (weeks still expect 5 trading days).
    ('24x7', 'UTC', '00:00', '00:00', '{1,2,3,4,5,6,7}', NULL, true),
    -- FX: 17:00 New York to 17:00 New York, Sunday open to Friday close; a day is labelled by the date
    -- it ends on (Sunday 17:00 opens Monday's session).
    ('fx', 'America/New_York', '17:00', '17:00', '{1,2,3,4,5}', NULL, true)
ON CONFLICT (name) DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- Trading days: one row per session and trading date
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS agg_session_days (
    session text NOT NULL REFERENCES agg_sessions (name) ON UPDATE CASCADE ON DELETE CASCADE,
    trading_date date NOT NULL,
    open_utc timestamptz NOT NULL,
    close_utc timestamptz NOT NULL,
    -- The trading week (ISO week of the trading dates) and calendar month the day belongs to: the
    -- first session's open, the last session's close and the number of trading days that a weekly or
    -- monthly bar expects. NULL while the week or month is not wholly inside [days_from, days_to].
    week_open timestamptz,
    week_close timestamptz,
    week_days smallint,
    month_open timestamptz,
    month_close timestamptz,
    month_days smallint,
    PRIMARY KEY (session, trading_date),
    -- Sessions never overlap and last at most 48 hours: the engine finds the day around an instant
    -- by looking back at most that far.
    CONSTRAINT agg_session_days_span_chk CHECK (close_utc > open_utc AND close_utc <= open_utc + interval '48 hours')
);

-- The engine looks days up by time.
CREATE UNIQUE INDEX IF NOT EXISTS agg_session_days_open_idx ON agg_session_days (session, open_utc);

-- ---------------------------------------------------------------------------------------------
-- The symbol's session
-- ---------------------------------------------------------------------------------------------
ALTER TABLE core_asset_registry_all ADD COLUMN IF NOT EXISTS session text NOT NULL DEFAULT '24x7';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'core_asset_registry_all_session_fkey') THEN
        ALTER TABLE core_asset_registry_all
            ADD CONSTRAINT core_asset_registry_all_session_fkey FOREIGN KEY (session)
            REFERENCES agg_sessions (name) ON UPDATE CASCADE;
    END IF;
END $$;

-- The engine asks "is any of these symbols off 24x7?" on every catch-up: with every symbol on 24x7
-- this index is empty and the answer costs nothing.
CREATE INDEX IF NOT EXISTS core_asset_registry_all_session_idx
    ON core_asset_registry_all (canonical_symbol) WHERE session <> '24x7';

-- An index on exactly the columns of each foreign key to agg_sessions (Supabase's linter, DESIGN.md 10b):
-- both tables are small, so the cost is nil, and changing or dropping a session finds its rows at once.
CREATE INDEX IF NOT EXISTS core_asset_registry_all_session_fk_idx ON core_asset_registry_all (session);
CREATE INDEX IF NOT EXISTS agg_session_days_session_idx ON agg_session_days (session);

-- Monthly bars are opt-in per asset, like the other optional timeframes.
ALTER TABLE core_asset_registry_all ADD COLUMN IF NOT EXISTS calc_1mo boolean;
ALTER TABLE core_asset_registry_all ALTER COLUMN calc_1mo SET DEFAULT false;

-- ---------------------------------------------------------------------------------------------
-- The ladder: how each level's windows are cut, and the monthly level
-- ---------------------------------------------------------------------------------------------
-- window_kind: 'interval' (open + k * bucket_interval, the last clipped at the close), 'session' (one
-- trading session), 'week' (the sessions of one trading week), 'month' (of one calendar month of
-- trading dates). For the 24x7 session 'interval', 'session' and 'week' reduce to the date_bin
-- buckets of migration 0002, which the engine keeps using for 24x7 symbols.
ALTER TABLE agg_timeframes ADD COLUMN IF NOT EXISTS window_kind text NOT NULL DEFAULT 'interval';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'agg_timeframes_window_kind_chk') THEN
        ALTER TABLE agg_timeframes ADD CONSTRAINT agg_timeframes_window_kind_chk
            CHECK (window_kind IN ('interval', 'session', 'week', 'month'));
    END IF;
END $$;
UPDATE agg_timeframes SET window_kind = 'session' WHERE timeframe = '1d' AND window_kind <> 'session';
UPDATE agg_timeframes SET window_kind = 'week' WHERE timeframe = '1w' AND window_kind <> 'week';

-- 1mo: bucket_interval is the longest month (31 days, in hours), an upper bound of a window's span;
-- months are never cut by date_bin: every symbol's months come from its session's trading days.
-- expected_source_bars is nominal (21): a month expects the trading days it has.
INSERT INTO agg_timeframes AS t (timeframe, bucket_interval, source_timeframe, source_table,
                                  expected_source_bars, max_source_bars, bucket_origin, duration_rank,
                                  window_kind)
VALUES ('1mo', interval '744 hours', '1d', 'derived_data_bars', 21, 31, '1970-01-01 00:00:00+00', 7, 'month')
ON CONFLICT (timeframe) DO UPDATE SET
    bucket_interval = excluded.bucket_interval,
    source_timeframe = excluded.source_timeframe,
    source_table = excluded.source_table,
    expected_source_bars = excluded.expected_source_bars,
    max_source_bars = excluded.max_source_bars,
    bucket_origin = excluded.bucket_origin,
    duration_rank = excluded.duration_rank,
    window_kind = excluded.window_kind;
