-- Repeatable: the aggregation engine's functions (DESIGN.md sections 3 and 4). Re-applied, with every
-- other file of this folder, whenever one of them changes (baragg/migrate.py); the ladder table they
-- read is created by migration 0002. A changed signature drops the old one here first.

-- ---------------------------------------------------------------------------------------------
-- Quality (DESIGN.md 3): from r = n / expected, in integers so that no float rounding decides a
-- boundary. r >= 1 -> 2; r >= 0.8 -> 1; r >= 0.6 -> 0; r >= 0.55 -> -1; below: NULL (not stored).
-- Sparse assets store any window with at least one source bar (-1 below 0.55).
-- Reproduces the seed's tables: 5m 5->2, 4->1, 3->0, <3 skip; 1h 12->2, 10-11->1, 8-9->0, 7->-1.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.agg_quality_score(p_source_candles integer, p_expected_candles integer,
                                             p_is_sparse boolean DEFAULT false)
RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = '' AS $$
    SELECT CASE
        WHEN p_source_candles >= p_expected_candles THEN 2
        WHEN 5 * p_source_candles >= 4 * p_expected_candles THEN 1
        WHEN 5 * p_source_candles >= 3 * p_expected_candles THEN 0
        WHEN 20 * p_source_candles >= 11 * p_expected_candles THEN -1
        WHEN p_is_sparse AND p_source_candles >= 1 THEN -1
    END
$$;

-- ---------------------------------------------------------------------------------------------
-- Source bars: raw 1m bars from data_bars, everything else from derived_data_bars; rows still forming
-- (is_partial) or soft-deleted are never used. Every function pins search_path (lint 0011), and
-- PostgreSQL never inlines a function that does, so the statements on the hot path (the catch-up,
-- _agg_window_bars, _agg_chain_bounds) read the source tables directly: a UNION ALL of one branch per
-- table whose one-time filter (the ladder's source_table) is false for the other table, so only one
-- table is read. The functions below are the same reads for the session code (15_sessions.sql), where
-- a call per task or per trading day costs little.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_source_bars(p_source_table text, p_symbol text, p_source_tf text,
                                            p_from timestamptz, p_to timestamptz)
RETURNS TABLE (ts_utc timestamptz, open double precision, high double precision, low double precision,
               close double precision, vol double precision, vwap double precision, trade_count integer)
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count
    FROM public.data_bars b
    WHERE p_source_table = 'data_bars'
      AND b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
      AND b.ts_utc >= p_from AND b.ts_utc < p_to
      AND NOT b.is_partial
    UNION ALL
    SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count
    FROM public.derived_data_bars b
    WHERE p_source_table = 'derived_data_bars'
      AND b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
      AND b.ts_utc >= p_from AND b.ts_utc < p_to
      AND b.deleted_at IS NULL AND NOT b.is_partial
$$;

-- The first, last and n-th (0-based) source bar time in [p_from, p_to). Each branch is a plain
-- ordered index scan that stops at the row it wants (through the UNION ALL above, PostgreSQL would
-- read every row and sort them).
CREATE OR REPLACE FUNCTION public._agg_source_ts(p_source_table text, p_symbol text, p_source_tf text,
                                          p_from timestamptz, p_to timestamptz, p_last boolean DEFAULT false,
                                          p_offset integer DEFAULT 0)
RETURNS timestamptz LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_ts timestamptz;
BEGIN
    IF p_source_table = 'data_bars' THEN
        IF p_last THEN
            SELECT b.ts_utc INTO v_ts FROM public.data_bars b
            WHERE b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
              AND b.ts_utc >= p_from AND b.ts_utc < p_to AND NOT b.is_partial
            ORDER BY b.ts_utc DESC OFFSET p_offset LIMIT 1;
        ELSE
            SELECT b.ts_utc INTO v_ts FROM public.data_bars b
            WHERE b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
              AND b.ts_utc >= p_from AND b.ts_utc < p_to AND NOT b.is_partial
            ORDER BY b.ts_utc OFFSET p_offset LIMIT 1;
        END IF;
    ELSIF p_last THEN
        SELECT b.ts_utc INTO v_ts FROM public.derived_data_bars b
        WHERE b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
          AND b.ts_utc >= p_from AND b.ts_utc < p_to AND b.deleted_at IS NULL AND NOT b.is_partial
        ORDER BY b.ts_utc DESC OFFSET p_offset LIMIT 1;
    ELSE
        SELECT b.ts_utc INTO v_ts FROM public.derived_data_bars b
        WHERE b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
          AND b.ts_utc >= p_from AND b.ts_utc < p_to AND b.deleted_at IS NULL AND NOT b.is_partial
        ORDER BY b.ts_utc OFFSET p_offset LIMIT 1;
    END IF;
    RETURN v_ts;
END
$$;

-- The same lookups as a set-returning SQL function (for the session code; the catch-up writes them
-- out). Each branch is an ordered index scan that stops at its row; the branches not chosen by
-- p_source_table / p_last are one-time filters that never run. Returns one row (the time) or none.
CREATE OR REPLACE FUNCTION public._agg_source_edge(p_source_table text, p_symbol text, p_source_tf text,
                                            p_from timestamptz, p_to timestamptz, p_last boolean DEFAULT false,
                                            p_offset integer DEFAULT 0)
RETURNS TABLE (ts_utc timestamptz) LANGUAGE sql STABLE SET search_path = '' AS $$
    (SELECT b.ts_utc FROM public.data_bars b
     WHERE p_source_table = 'data_bars' AND NOT p_last
       AND b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
       AND b.ts_utc >= p_from AND b.ts_utc < p_to AND NOT b.is_partial
     ORDER BY b.ts_utc OFFSET p_offset LIMIT 1)
    UNION ALL
    (SELECT b.ts_utc FROM public.data_bars b
     WHERE p_source_table = 'data_bars' AND p_last
       AND b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
       AND b.ts_utc >= p_from AND b.ts_utc < p_to AND NOT b.is_partial
     ORDER BY b.ts_utc DESC OFFSET p_offset LIMIT 1)
    UNION ALL
    (SELECT b.ts_utc FROM public.derived_data_bars b
     WHERE p_source_table = 'derived_data_bars' AND NOT p_last
       AND b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
       AND b.ts_utc >= p_from AND b.ts_utc < p_to AND b.deleted_at IS NULL AND NOT b.is_partial
     ORDER BY b.ts_utc OFFSET p_offset LIMIT 1)
    UNION ALL
    (SELECT b.ts_utc FROM public.derived_data_bars b
     WHERE p_source_table = 'derived_data_bars' AND p_last
       AND b.canonical_symbol = p_symbol AND b.timeframe = p_source_tf
       AND b.ts_utc >= p_from AND b.ts_utc < p_to AND b.deleted_at IS NULL AND NOT b.is_partial
     ORDER BY b.ts_utc DESC OFFSET p_offset LIMIT 1)
$$;

-- ---------------------------------------------------------------------------------------------
-- The aggregation core, shared by the catch-up, the single-window functions and recomputation:
-- one bar per non-empty bucket of p_to_tf in [p_from, p_to) for one symbol (DESIGN.md 3), with
-- its quality (NULL: not to be stored). Called once per task per catch-up call (and per window by
-- the recomputations), never per bar; its quality is agg_quality_score written out, since a function
-- call per bar would cost more than the bar.
-- open/close are first/last by time; vwap is volume-weighted over the rows that have both vwap
-- and vol, NULL if there are none or their volume sums to 0. close is the last element of the same
-- ascending array_agg as open (its length is count(*)): with one order for both, the rows sorted by
-- time feed both aggregates without a sort per window (a DESC order for close sorted each window
-- again: 12% of the catch-up's read at 1,000 symbols, bench/README.md).
-- ---------------------------------------------------------------------------------------------
-- p_is_sparse: the asset's flag when the caller has it already (the catch-up joins the registry once
-- per task); NULL looks it up, once per bar.
DROP FUNCTION IF EXISTS public._agg_window_bars(text, text, timestamptz, timestamptz);
CREATE OR REPLACE FUNCTION public._agg_window_bars(p_to_tf text, p_symbol text, p_from timestamptz,
                                            p_to timestamptz, p_is_sparse boolean DEFAULT NULL)
RETURNS TABLE (ts_utc timestamptz, open double precision, high double precision, low double precision,
               close double precision, vol double precision, vwap double precision, trade_count integer,
               source_candles integer, expected_candles integer, quality_score integer)
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT date_bin(tf.bucket_interval, s.ts_utc, tf.bucket_origin),
           (array_agg(s.open ORDER BY s.ts_utc))[1],
           max(s.high),
           min(s.low),
           (array_agg(s.close ORDER BY s.ts_utc))[count(*)],
           sum(s.vol),
           sum(s.vwap * s.vol) / NULLIF(sum(s.vol) FILTER (WHERE s.vwap IS NOT NULL), 0),
           sum(s.trade_count)::integer,
           count(*)::integer,
           tf.expected_source_bars,
           CASE  -- agg_quality_score(count(*), expected, is_sparse)
               WHEN count(*) >= tf.expected_source_bars THEN 2
               WHEN 5 * count(*) >= 4 * tf.expected_source_bars THEN 1
               WHEN 5 * count(*) >= 3 * tf.expected_source_bars THEN 0
               WHEN 20 * count(*) >= 11 * tf.expected_source_bars THEN -1
               WHEN sp.is_sparse AND count(*) >= 1 THEN -1
           END
    FROM public.agg_timeframes tf
    CROSS JOIN (SELECT COALESCE(p_is_sparse, (SELECT r.is_sparse FROM public.core_asset_registry_all r
                                              WHERE r.canonical_symbol = p_symbol), false) AS is_sparse) sp
    CROSS JOIN LATERAL (
        SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count
        FROM public.data_bars b
        WHERE tf.source_table = 'data_bars'
          AND b.canonical_symbol = p_symbol AND b.timeframe = tf.source_timeframe
          AND b.ts_utc >= p_from AND b.ts_utc < p_to
          AND NOT b.is_partial
        UNION ALL
        SELECT b.ts_utc, b.open, b.high, b.low, b.close, b.vol, b.vwap, b.trade_count
        FROM public.derived_data_bars b
        WHERE tf.source_table = 'derived_data_bars'
          AND b.canonical_symbol = p_symbol AND b.timeframe = tf.source_timeframe
          AND b.ts_utc >= p_from AND b.ts_utc < p_to
          AND b.deleted_at IS NULL AND NOT b.is_partial
    ) s
    WHERE tf.timeframe = p_to_tf
    GROUP BY 1, tf.expected_source_bars, sp.is_sparse
$$;

-- ---------------------------------------------------------------------------------------------
-- _upsert_derived_bar: the seed's one-row upsert (seed C.1: name, parameters, result keys).
-- The set-based functions below write many rows with the same ON CONFLICT clause.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._upsert_derived_bar(
    p_symbol text, p_tf text, p_ts timestamptz,
    p_open double precision, p_high double precision, p_low double precision, p_close double precision,
    p_vol double precision, p_vwap double precision, p_trade_count integer,
    p_source text, p_source_tf text, p_source_candles integer, p_expected_candles integer,
    p_quality_score integer, p_derivation_version integer, p_raw jsonb)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    -- RETURNING xmax cannot tell an insert from an update on a partitioned table: a bar whose id was
    -- drawn after this (monotonic sequence) is new.
    v_id_floor bigint := pg_catalog.nextval('public.derived_data_bars_id_seq'::regclass);
    v_inserted boolean;
BEGIN
    INSERT INTO public.derived_data_bars AS d (
        canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
        is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
        quality_score, derivation_version, raw, deleted_at)
    VALUES (
        p_symbol, p_tf, p_ts, p_open, p_high, p_low, p_close, p_vol, p_vwap, p_trade_count,
        false, COALESCE(p_source, 'agg'), now(), p_source_tf, p_source_candles, p_expected_candles,
        p_quality_score, p_derivation_version, COALESCE(p_raw, '{}'::jsonb), NULL)
    ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
    DO UPDATE SET
        open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
        vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
        is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
        source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
        expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
        derivation_version = excluded.derivation_version, raw = excluded.raw, updated_at = excluded.ingested_at  -- (= now(); Citus: no function here)
    WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial, d.source,
           d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score, d.derivation_version)
          IS DISTINCT FROM
          (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
           excluded.trade_count, false, excluded.source, excluded.source_timeframe, excluded.source_candles,
           excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
    RETURNING (d.id > v_id_floor) INTO v_inserted;
    -- inserted: a new bar; changed: a new bar or new values (an equal bar is not rewritten).
    RETURN jsonb_build_object('success', true, 'inserted', COALESCE(v_inserted, false),
                              'changed', v_inserted IS NOT NULL);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- A task's settings: its data_agg_state row, or the defaults when there is none (delay 0,
-- agg_start the column's default, '-infinity': from the first source row), so the functions also
-- work for ad-hoc calls from psql.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_task_settings(p_symbol text, p_to_tf text,
    OUT delay_seconds integer, OUT agg_start_utc timestamptz, OUT is_sparse boolean)
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT COALESCE((SELECT s.aggregation_delay_seconds FROM public.data_agg_state s
                     WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf), 0),
           COALESCE((SELECT s.agg_start_utc FROM public.data_agg_state s
                     WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf),
                    timestamptz '-infinity'),
           COALESCE((SELECT r.is_sparse FROM public.core_asset_registry_all r
                     WHERE r.canonical_symbol = p_symbol), false)
$$;

CREATE OR REPLACE FUNCTION public._agg_ladder(p_to_tf text) RETURNS public.agg_timeframes
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v public.agg_timeframes;
BEGIN
    SELECT * INTO v FROM public.agg_timeframes WHERE timeframe = p_to_tf;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown timeframe %: expected one of %', p_to_tf,
            (SELECT string_agg(timeframe, ', ' ORDER BY duration_rank) FROM public.agg_timeframes)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN v;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_chain_first_ts: the earliest row at or after p_from anywhere down p_tf's chain: its source
-- timeframe's bars, their source's, ... down to the 1m bars. A bootstrap looks at all of them (rule 3
-- waits for the whole chain): a 1h task bootstrapped while its 5m bars are not built yet (a backfill
-- that runs 1h before 5m, a new symbol's first round) must start at the 1m data that will become
-- them, not at now (which put the whole history behind its cursor, to come back as "late data").
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._agg_chain_first_ts(p_symbol text, p_tf text, p_from timestamptz)
RETURNS timestamptz LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_tf);
    v_first timestamptz;
BEGIN
    FOR i IN 1..20 LOOP  -- bounded: the ladder is a few levels deep
        v_first := LEAST(v_first, public._agg_source_ts(v_tf.source_table, p_symbol, v_tf.source_timeframe,
                                                        p_from, 'infinity'));
        EXIT WHEN v_tf.source_table = 'data_bars';
        v_tf := public._agg_ladder(v_tf.source_timeframe);
    END LOOP;
    RETURN v_first;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_bootstrap_cursor (seed C.2): the first window to process for a task without a cursor: the
-- bucket containing max(agg_start_utc, earliest bar at or after agg_start_utc anywhere down its
-- chain: _agg_chain_first_ts); with no such data, the bucket containing now (DESIGN.md 4). That window is not final yet, so
-- nothing is built early, and the rows that arrive for it are ordinary future work. (The next
-- boundary after now, as before, put the current window behind the cursor: its rows became "late
-- data" and the open window was built at once, then rewritten as each row arrived.) Reads only
-- the source timeframe's table (the seed's UNION ALL of both tables is gone).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.agg_bootstrap_cursor(p_symbol text, p_to_tf text,
                                                p_now_utc timestamptz DEFAULT now())
RETURNS timestamptz LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_agg_start timestamptz := (public._agg_task_settings(p_symbol, p_to_tf)).agg_start_utc;
    v_first timestamptz;
    v_session text := COALESCE((SELECT r.session FROM public.core_asset_registry_all r WHERE r.canonical_symbol = p_symbol),
                               '24x7');
BEGIN
    -- Symbols on a trading session, and 1mo, start at a window of their session (15_sessions.sql).
    IF v_session <> '24x7' OR v_tf.window_kind = 'month' THEN
        RETURN public._agg_session_bootstrap(p_symbol, p_to_tf, v_session, v_agg_start, COALESCE(p_now_utc, now()));
    END IF;
    v_first := public._agg_chain_first_ts(p_symbol, p_to_tf, v_agg_start);
    IF v_first IS NULL THEN
        RETURN date_bin(v_tf.bucket_interval, COALESCE(p_now_utc, now()), v_tf.bucket_origin);
    END IF;
    RETURN date_bin(v_tf.bucket_interval, v_first, v_tf.bucket_origin);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- One window of any timeframe, and the seed's two window functions (seed C.3, C.4) on top of it.
-- Result keys as the seed's: success, stored, source_count, quality_score, reason (when not stored).
-- The window must be exactly one bucket of the timeframe.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.aggregate_window(p_symbol text, p_to_tf text, p_from_utc timestamptz,
                                            p_to_utc timestamptz, p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_bar record;
    v_session text := public._agg_session_of(p_symbol, p_to_tf);
BEGIN
    -- A symbol on a trading session, or 1mo: one of its session's windows (15_sessions.sql).
    IF v_session IS NOT NULL THEN
        RETURN public._agg_session_aggregate_window(p_symbol, p_to_tf, v_session, p_from_utc, p_to_utc,
                                             p_derivation_version);
    END IF;
    IF p_from_utc IS NULL OR p_to_utc IS NULL
       OR date_bin(v_tf.bucket_interval, p_from_utc, v_tf.bucket_origin) <> p_from_utc
       OR p_to_utc <> p_from_utc + v_tf.bucket_interval THEN
        RAISE EXCEPTION 'window [%, %) is not one % bucket', p_from_utc, p_to_utc, p_to_tf
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_bar FROM public._agg_window_bars(p_to_tf, p_symbol, p_from_utc, p_to_utc);
    IF NOT FOUND THEN
        RETURN jsonb_build_object('success', true, 'stored', false, 'source_count', 0,
                                  'quality_score', NULL, 'reason', 'no_source_bars');
    END IF;
    IF v_bar.quality_score IS NULL THEN
        RETURN jsonb_build_object('success', true, 'stored', false, 'source_count', v_bar.source_candles,
                                  'quality_score', NULL, 'reason', 'insufficient_source_bars');
    END IF;
    PERFORM public._upsert_derived_bar(p_symbol, p_to_tf, v_bar.ts_utc, v_bar.open, v_bar.high, v_bar.low,
        v_bar.close, v_bar.vol, v_bar.vwap, v_bar.trade_count, 'agg', v_tf.source_timeframe,
        v_bar.source_candles, v_bar.expected_candles, v_bar.quality_score, p_derivation_version, '{}');
    RETURN jsonb_build_object('success', true, 'stored', true, 'source_count', v_bar.source_candles,
                              'quality_score', v_bar.quality_score);
END
$$;

CREATE OR REPLACE FUNCTION public.aggregate_1m_to_5m_window(p_symbol text, p_from_utc timestamptz,
                                                     p_to_utc timestamptz, p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE sql SET search_path = '' AS $$
    SELECT public.aggregate_window(p_symbol, '5m', p_from_utc, p_to_utc, p_derivation_version)
$$;

CREATE OR REPLACE FUNCTION public.aggregate_5m_to_1h_window(p_symbol text, p_from_utc timestamptz,
                                                     p_to_utc timestamptz, p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE sql SET search_path = '' AS $$
    SELECT public.aggregate_window(p_symbol, '1h', p_from_utc, p_to_utc, p_derivation_version)
$$;

-- ---------------------------------------------------------------------------------------------
-- _agg_chain_bounds: rule 3 (DESIGN.md 4) for many tasks of one timeframe, one bound per task.
--
--   _agg_chain_bounds(p_to_tf text, p_symbols text[]) RETURNS TABLE (canonical_symbol text, bound timestamptz)
--
-- A window [ws, we) of p_to_tf waits while ANY task below it in the chain (its source task, that
-- task's source task, ... down to the 5m task built from the 1m rows) has unprocessed input before
-- we: for such a task L with cursor c_L, a row of L's own source in [c_L, we), or a logged window
-- of L (agg_invalidations) starting before we. Per level that is one moment r_L = min(first row of
-- L's source at or after c_L, L's earliest logged window): the window waits iff r_L < we (a row
-- r_L >= c_L before we implies c_L < we). So a window is allowed iff we <= bound = min over the
-- chain of r_L (+infinity when nothing waits). A level without a task row makes nothing wait
-- (e.g. a 1h task whose 5m task is not configured yet); a NULL cursor has processed nothing (r_L =
-- its first source row); a disabled task still holds the tasks above it back (the rule as written).
-- The ladder is at most four levels deep below 1w (1d, 1h, 5m), so this is at most two index
-- probes per level and task (the first source row, the first logged window). Called once per
-- statement by the catch-up and the re-aggregation, so it needs no inlining.
CREATE OR REPLACE FUNCTION public._agg_chain_bounds(p_to_tf text, p_symbols text[])
RETURNS TABLE (canonical_symbol text, bound timestamptz)
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
#variable_conflict use_column
DECLARE
    v_tfs text[];
    v_tables text[];
    v_sources text[];
BEGIN
    -- The chain below p_to_tf: every timeframe on the ladder that p_to_tf is built from.
    WITH RECURSIVE chain AS (
        SELECT t.timeframe, t.source_table, t.source_timeframe, 1 AS depth
        FROM public.agg_timeframes t
        WHERE t.timeframe = (SELECT x.source_timeframe FROM public.agg_timeframes x WHERE x.timeframe = p_to_tf)
        UNION ALL
        SELECT t.timeframe, t.source_table, t.source_timeframe, c.depth + 1
        FROM chain c
        JOIN public.agg_timeframes t ON t.timeframe = c.source_timeframe
        WHERE c.depth < 16
    )
    SELECT array_agg(c.timeframe ORDER BY c.depth), array_agg(c.source_table ORDER BY c.depth),
           array_agg(c.source_timeframe ORDER BY c.depth)
    INTO v_tfs, v_tables, v_sources
    FROM chain c;

    IF v_tfs IS NULL THEN  -- built from the raw 1m bars (5m): no task below
        RETURN QUERY SELECT u.sym, timestamptz 'infinity' FROM unnest(p_symbols) AS u(sym);
        RETURN;
    END IF;
    IF public._agg_on_citus() THEN  -- Citus: symbol by symbol (50_citus.sql)
        RETURN QUERY SELECT * FROM public._agg_chain_bounds_citus(p_symbols, v_tfs, v_tables, v_sources);
        RETURN;
    END IF;
    RETURN QUERY
    SELECT u.sym, COALESCE(min(lv.r), timestamptz 'infinity')
    FROM unnest(p_symbols) AS u(sym)
    LEFT JOIN LATERAL (
        SELECT LEAST(COALESCE(e.ts_utc, timestamptz 'infinity'),
                     COALESCE(lg.ws, timestamptz 'infinity')) AS r
        FROM unnest(v_tfs, v_tables, v_sources) AS c(tf, stab, stf)
        JOIN public.data_agg_state s ON s.canonical_symbol = u.sym AND s.timeframe = c.tf
        LEFT JOIN LATERAL (  -- the first row of the level's source at or after its cursor
            (SELECT b.ts_utc FROM public.data_bars b
             WHERE c.stab = 'data_bars' AND b.canonical_symbol = u.sym AND b.timeframe = c.stf
               AND b.ts_utc >= COALESCE(s.last_agg_bar_ts_utc, timestamptz '-infinity') AND NOT b.is_partial
             ORDER BY b.ts_utc LIMIT 1)
            UNION ALL
            (SELECT b.ts_utc FROM public.derived_data_bars b
             WHERE c.stab = 'derived_data_bars' AND b.canonical_symbol = u.sym AND b.timeframe = c.stf
               AND b.ts_utc >= COALESCE(s.last_agg_bar_ts_utc, timestamptz '-infinity')
               AND b.deleted_at IS NULL AND NOT b.is_partial
             ORDER BY b.ts_utc LIMIT 1)
        ) e ON true
        LEFT JOIN LATERAL (
            SELECT min(i.window_start) AS ws FROM public.agg_invalidations i
            WHERE i.canonical_symbol = u.sym AND i.timeframe = c.tf
        ) lg ON true
    ) lv ON true
    GROUP BY u.sym;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_catchup_tasks: catch up many tasks of one timeframe in ONE statement (DESIGN.md 4).
--
--   agg_catchup_tasks(p_to_tf text, p_symbols text[], p_cursors timestamptz[],
--                     p_max_windows integer DEFAULT 100, p_now_utc timestamptz DEFAULT NULL,
--                     p_derivation_version integer DEFAULT 1, p_ignore_confirmation boolean DEFAULT false)
--   RETURNS TABLE (canonical_symbol text, result jsonb)     -- one row per symbol, in input order
--
-- p_cursors[i] is symbol i's cursor (start of the next window to process); NULL bootstraps it with
-- agg_bootstrap_cursor. `result` has catchup_aggregation_range's keys. p_max_windows bounds the
-- non-empty windows handled per symbol (NULL: no bound). Bars are written; data_agg_state is not
-- (the caller stores each cursor in the same transaction).
--
-- How one task is planned (equivalent to the window-by-window rules, tests/reference_model.py):
--   s0    = max(cursor, first bucket start >= agg_start_utc)          -- rule 1
--   limit = min(now - delay, W): windows [ws, we) with we <= limit are allowed   -- rules 2, 3
--           W (derived sources only) = _agg_chain_bounds: the first unprocessed input of any task
--           below this one in the chain (a source row at or after its cursor, or a logged window).
--   next  = first window start >= s0 that is not allowed = max(s0, date_bin(limit))
--   The non-empty allowed windows from s0 are aggregated and written (the first p_max_windows);
--   the empty ones between them are gaps (later data exists), passed over for free (rules 4-6).
--   cursor = end of the p_max_windows-th non-empty window if the bound was reached (continue),
--            else min(next, bucket after the last source row): the first window that is not final,
--            or the frontier (an empty window with no later data).
--
-- Plans: every read here is a per-symbol index range (probes, the window bars), which is the right
-- plan at any size; but a level's source bars were often written moments before (the 5m bars a 1h
-- catch-up reads, in the same run), when the table's statistics still say "empty", and then the
-- planner picked bitmap scans and sorts of whole histories per task (1h of 100 symbols x 2 weeks:
-- 23.6 s instead of 1.75 s). The function therefore turns seq and bitmap scans off for its own
-- statements (and the functions it calls), so its plans do not depend on when autovacuum last ran.
--
-- Counts (result keys): bars_created = bars inserted; bars_rewritten = stored bars whose values
-- changed; bars_unchanged = windows recomputed equal to the stored bar (nothing is written, not even
-- updated_at); bars_withdrawn = active bars soft-deleted because their window, passed over by this
-- call, now has no storable bar (only where a cursor was moved back over stored bars, e.g.
-- `backfill --from`). bars_quality_poor counts created and rewritten bars with quality <= 0.
CREATE OR REPLACE FUNCTION public.agg_catchup_tasks(p_to_tf text, p_symbols text[], p_cursors timestamptz[],
                                             p_max_windows integer DEFAULT 100,
                                             p_now_utc timestamptz DEFAULT NULL,
                                             p_derivation_version integer DEFAULT 1,
                                             p_ignore_confirmation boolean DEFAULT false)
RETURNS TABLE (canonical_symbol text, result jsonb)
-- work_mem: the call's bars (the materialized `handled`, and the insert trigger's transition table) stay
-- in memory up to 64MB (about 250,000 windows): spilled, they cost 15% per bar at 100 symbols x 2 weeks.
-- (Capping calls at that size instead cost more than the spill: 215 s vs 155 s at 1,000 x 30 days.)
-- plan_cache_mode: planned for each call's arguments. After five calls in one session PL/pgSQL may
-- switch to a generic plan, which reads the tasks in another order: rows of neighbouring symbols that
-- share a heap page are then no longer read one after the other, and a 1M-window call at 1,000 x 30
-- days took 40-43 s instead of 22-25 s (24x the buffer misses). A long-running worker calls this
-- thousands of times; planning costs milliseconds.
LANGUAGE plpgsql SET search_path = '' SET enable_seqscan = off SET enable_bitmapscan = off
SET work_mem = '64MB' SET plan_cache_mode = 'force_custom_plan' AS $$
#variable_conflict use_column
DECLARE
    -- RETURNING xmax cannot tell an insert from an update on a partitioned table: a bar whose id was
    -- drawn after this (monotonic sequence) is new.
    v_id_floor bigint := pg_catalog.nextval('public.derived_data_bars_id_seq'::regclass);
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_iv interval := v_tf.bucket_interval;
    v_origin timestamptz := v_tf.bucket_origin;
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_derived boolean := v_tf.source_table = 'derived_data_bars';
    v_read bigint := p_max_windows::bigint * v_tf.max_source_bars + 1;
BEGIN
    IF p_max_windows IS NOT NULL AND p_max_windows < 1 THEN
        RAISE EXCEPTION 'p_max_windows must be at least 1 (or NULL for no bound), got %', p_max_windows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(p_symbols) IS DISTINCT FROM cardinality(p_cursors) THEN
        RAISE EXCEPTION 'p_symbols and p_cursors differ in length (% vs %)',
            cardinality(p_symbols), cardinality(p_cursors) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT count(DISTINCT x) FROM unnest(p_symbols) x) <> cardinality(p_symbols) THEN
        RAISE EXCEPTION 'p_symbols must be distinct and not NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Citus (`baragg db distribute`): symbol by symbol, each statement on one shard (50_citus.sql;
    -- symbols on a trading session and 1mo included).
    IF public._agg_on_citus() THEN
        RETURN QUERY SELECT * FROM public._agg_catchup_citus(p_to_tf, p_symbols, p_cursors, p_max_windows, p_now_utc,
                                                            p_derivation_version, p_ignore_confirmation);
        RETURN;
    END IF;
    -- Symbols on a trading session, and 1mo, are cut by their session's days (15_sessions.sql).
    IF cardinality(p_symbols) > 0 AND public._agg_needs_sessions(p_to_tf, p_symbols) THEN
        RETURN QUERY SELECT * FROM public._agg_catchup_split(p_to_tf, p_symbols, p_cursors, p_max_windows, p_now_utc,
                                                      p_derivation_version, p_ignore_confirmation);
        RETURN;
    END IF;

    RETURN QUERY
    WITH input AS (
        -- The task's settings, as _agg_task_settings gives them (defaults without a task row), by a
        -- join: one index probe per task instead of a function call.
        SELECT u.sym, u.ord, u.cur,
               COALESCE(st.aggregation_delay_seconds, 0) AS delay_seconds,
               COALESCE(st.agg_start_utc, timestamptz '-infinity') AS agg_start_utc,
               COALESCE(r.is_sparse, false) AS is_sparse
        FROM unnest(p_symbols, p_cursors) WITH ORDINALITY AS u(sym, cur, ord)
        LEFT JOIN public.data_agg_state st ON st.canonical_symbol = u.sym AND st.timeframe = p_to_tf
        LEFT JOIN public.core_asset_registry_all r ON r.canonical_symbol = u.sym
    ),
    started AS MATERIALIZED (
        -- Materialized: s0 is read by several CTEs below, and inlined each would evaluate the
        -- bootstrap (a chain of index probes) again.
        SELECT i.sym, i.ord, i.delay_seconds, i.agg_start_utc, i.is_sparse,
               GREATEST(
                   date_bin(v_iv, COALESCE(i.cur, public.agg_bootstrap_cursor(i.sym, p_to_tf, v_now)), v_origin),
                   CASE WHEN date_bin(v_iv, i.agg_start_utc, v_origin) = i.agg_start_utc
                        THEN i.agg_start_utc
                        ELSE date_bin(v_iv, i.agg_start_utc, v_origin) + v_iv END) AS s0
        FROM input i
    ),
    chain AS (
        -- Rule 3, recursive down the chain (DESIGN.md 4): one bound per task. Not called for 5m.
        SELECT b.canonical_symbol AS sym, b.bound
        FROM public._agg_chain_bounds(p_to_tf, p_symbols) b
        WHERE v_derived
    ),
    limited AS (
        SELECT s.*,
               LEAST(CASE WHEN p_ignore_confirmation THEN timestamptz 'infinity'
                          ELSE v_now - make_interval(secs => s.delay_seconds) END,
                     COALESCE(w.bound, timestamptz 'infinity')) AS lim
        FROM started s
        LEFT JOIN chain w ON w.sym = s.sym
    ),
    planned AS (
        SELECT l.*,
               CASE WHEN l.lim = timestamptz 'infinity' THEN timestamptz 'infinity'
                    ELSE GREATEST(l.s0, date_bin(v_iv, l.lim, v_origin)) END AS nxt,
               -- Stored bars at or after s0 (a cursor moved back over them: backfill --from): only
               -- then can a window passed over need a withdrawal. One index probe, taken before this
               -- task's bars are written, so a fresh catch-up never scans the rows it inserts.
               EXISTS (SELECT 1 FROM public.derived_data_bars d
                       WHERE d.canonical_symbol = l.sym AND d.timeframe = p_to_tf AND d.ts_utc >= l.s0
                         AND d.deleted_at IS NULL) AS recheck
        FROM limited l
    ),
    bounded AS (
        SELECT p.*, le.ts_utc AS last_source_ts
        FROM planned p
        LEFT JOIN LATERAL (  -- the last source row at or after s0
            (SELECT b.ts_utc FROM public.data_bars b
             WHERE v_tf.source_table = 'data_bars' AND b.canonical_symbol = p.sym
               AND b.timeframe = v_tf.source_timeframe AND b.ts_utc >= p.s0 AND NOT b.is_partial
             ORDER BY b.ts_utc DESC LIMIT 1)
            UNION ALL
            (SELECT b.ts_utc FROM public.derived_data_bars b
             WHERE v_tf.source_table = 'derived_data_bars' AND b.canonical_symbol = p.sym
               AND b.timeframe = v_tf.source_timeframe AND b.ts_utc >= p.s0
               AND b.deleted_at IS NULL AND NOT b.is_partial
             ORDER BY b.ts_utc DESC LIMIT 1)
        ) le ON true
    ),
    handled AS MATERIALIZED (
        -- Per task, its first p_max_windows windows in [s0, nxt), in time order. With a bound, only
        -- the first v_read = p_max_windows * max_source_bars + 1 source rows are read (an ordered
        -- index scan that stops there): a window holds at most max_source_bars rows, so the windows
        -- before the last one read (which may be cut) are at least p_max_windows complete windows,
        -- and the LIMIT takes the first p_max_windows of them. Every row is read once.
        -- The aggregation is _agg_window_bars written out (a function call per task costs its
        -- tuplestore and plan; this plans once with the rest).
        -- Symbol by symbol in name order, whatever order the caller passed: a feed writes each
        -- minute's rows for all symbols together, so neighbouring symbols share heap pages, and read
        -- one after the other they find them in shared buffers (1,000 x 30 days, a 500-task call:
        -- 23 s in name order, 45 s shuffled, with 25x the buffer misses).
        SELECT b.sym, b.recheck, w.*
        FROM (SELECT * FROM bounded ORDER BY sym) b
        CROSS JOIN LATERAL (
                SELECT date_bin(v_iv, s.ts_utc, v_origin) AS ts_utc,
                       (array_agg(s.open ORDER BY s.ts_utc))[1] AS open,
                       max(s.high) AS high,
                       min(s.low) AS low,
                       (array_agg(s.close ORDER BY s.ts_utc))[count(*)] AS close,
                       sum(s.vol) AS vol,
                       sum(s.vwap * s.vol) / NULLIF(sum(s.vol) FILTER (WHERE s.vwap IS NOT NULL), 0) AS vwap,
                       sum(s.trade_count)::integer AS trade_count,
                       count(*)::integer AS source_candles,
                       v_tf.expected_source_bars AS expected_candles,
                       CASE  -- agg_quality_score(count(*), expected, is_sparse)
                           WHEN count(*) >= v_tf.expected_source_bars THEN 2
                           WHEN 5 * count(*) >= 4 * v_tf.expected_source_bars THEN 1
                           WHEN 5 * count(*) >= 3 * v_tf.expected_source_bars THEN 0
                           WHEN 20 * count(*) >= 11 * v_tf.expected_source_bars THEN -1
                           WHEN b.is_sparse AND count(*) >= 1 THEN -1
                       END AS quality_score
                FROM (
                    (SELECT x.ts_utc, x.open, x.high, x.low, x.close, x.vol, x.vwap, x.trade_count
                     FROM public.data_bars x
                     WHERE v_tf.source_table = 'data_bars'
                       AND x.canonical_symbol = b.sym AND x.timeframe = v_tf.source_timeframe
                       AND x.ts_utc >= b.s0 AND x.ts_utc < b.nxt AND NOT x.is_partial
                     ORDER BY x.ts_utc LIMIT v_read)
                    UNION ALL
                    (SELECT x.ts_utc, x.open, x.high, x.low, x.close, x.vol, x.vwap, x.trade_count
                     FROM public.derived_data_bars x
                     WHERE v_tf.source_table = 'derived_data_bars'
                       AND x.canonical_symbol = b.sym AND x.timeframe = v_tf.source_timeframe
                       AND x.ts_utc >= b.s0 AND x.ts_utc < b.nxt
                       AND x.deleted_at IS NULL AND NOT x.is_partial
                     ORDER BY x.ts_utc LIMIT v_read)
                ) s
                GROUP BY 1
                ORDER BY 1 LIMIT p_max_windows  -- the groups come in time order: no sort; NULL: all
        ) w
        WHERE b.nxt > b.s0
    ),
    written_new AS (
        -- A task with no stored bar at or after s0 (recheck false: every backfill and every catch-up
        -- at the frontier) cannot conflict: a plain INSERT, without ON CONFLICT's speculative
        -- insertion per row (measured +15-35% per bar). Only this task's lease holder writes its
        -- bars, under the task row's lock.
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT h.sym, p_to_tf, h.ts_utc, h.open, h.high, h.low, h.close, h.vol, h.vwap, h.trade_count,
               false, 'agg', now(), v_tf.source_timeframe, h.source_candles, h.expected_candles,
               h.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM handled h
        WHERE h.quality_score IS NOT NULL AND NOT h.recheck
        -- no RETURNING: every row handed over is inserted, so handled_counts counts them
    ),
    written_upd AS (
        -- A cursor moved back over stored bars: upsert. A recomputed window equal to its stored bar
        -- writes nothing (no new row version, updated_at kept): it is counted as unchanged, and fires
        -- no invalidation of the levels above.
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT h.sym, p_to_tf, h.ts_utc, h.open, h.high, h.low, h.close, h.vol, h.vwap, h.trade_count,
               false, 'agg', now(), v_tf.source_timeframe, h.source_candles, h.expected_candles,
               h.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM handled h
        WHERE h.quality_score IS NOT NULL AND h.recheck
        ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
        DO UPDATE SET
            open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
            is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
            source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
            expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
            derivation_version = excluded.derivation_version, raw = excluded.raw, updated_at = now()
        WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial,
               d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score,
               d.derivation_version)
              IS DISTINCT FROM
              (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
               excluded.trade_count, false, excluded.source_timeframe, excluded.source_candles,
               excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
        RETURNING d.canonical_symbol, d.quality_score, (d.id > v_id_floor) AS inserted
    ),
    handled_counts AS (
        SELECT h.sym, count(*) AS n_handled, max(h.ts_utc) AS last_ws,
               count(*) FILTER (WHERE h.quality_score IS NULL) AS n_skipped,
               count(*) FILTER (WHERE h.quality_score IS NOT NULL AND NOT h.recheck) AS n_inserted,
               count(*) FILTER (WHERE h.quality_score <= 0 AND NOT h.recheck) AS n_inserted_poor
        FROM handled h GROUP BY h.sym
    ),
    written_counts AS (
        SELECT w.canonical_symbol AS sym, count(*) FILTER (WHERE w.inserted) AS n_created,
               count(*) FILTER (WHERE NOT w.inserted) AS n_rewritten,
               count(*) FILTER (WHERE w.quality_score <= 0) AS n_poor
        FROM written_upd w GROUP BY w.canonical_symbol
    ),
    outcome AS (
        SELECT b.sym, b.ord, b.s0, b.agg_start_utc, b.recheck,
               COALESCE(hc.n_handled, 0) AS n_handled, COALESCE(hc.n_skipped, 0) AS n_skipped,
               COALESCE(hc.n_inserted, 0) + COALESCE(wc.n_created, 0) AS n_created,
               COALESCE(wc.n_rewritten, 0) AS n_rewritten,
               COALESCE(hc.n_inserted_poor, 0) + COALESCE(wc.n_poor, 0) AS n_poor,
               CASE WHEN hc.n_handled >= p_max_windows THEN hc.last_ws + v_iv
                    ELSE LEAST(b.nxt, CASE WHEN b.last_source_ts IS NULL THEN b.s0
                                           ELSE GREATEST(b.s0, date_bin(v_iv, b.last_source_ts, v_origin)
                                                               + v_iv) END)
               END AS new_cursor,
               COALESCE(hc.n_handled >= p_max_windows, false) AS more
        FROM bounded b
        LEFT JOIN handled_counts hc ON hc.sym = b.sym
        LEFT JOIN written_counts wc ON wc.sym = b.sym
    ),
    withdrawn AS (
        -- Stored bars in the windows this call passed over that no longer have a storable bar (a
        -- gap now, or too few source rows): soft-deleted, as the re-aggregation does. Only a cursor
        -- moved back over stored bars finds any (recheck). (This statement's snapshot does not see
        -- the rows `written` inserts.)
        UPDATE public.derived_data_bars d
        SET deleted_at = now(), updated_at = now()
        FROM outcome o
        WHERE o.recheck AND d.canonical_symbol = o.sym AND d.timeframe = p_to_tf
          AND d.ts_utc >= o.s0 AND d.ts_utc < o.new_cursor AND d.deleted_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM handled h
                          WHERE h.sym = o.sym AND h.ts_utc = d.ts_utc AND h.quality_score IS NOT NULL)
        RETURNING d.canonical_symbol
    ),
    withdrawn_counts AS (
        SELECT w.canonical_symbol AS sym, count(*) AS n_withdrawn FROM withdrawn w GROUP BY 1
    )
    SELECT o.sym, jsonb_build_object(
               'success', true,
               'windows_processed', o.n_handled,
               'cursor_advanced_to', o.new_cursor,
               'bars_created', o.n_created,
               'bars_rewritten', o.n_rewritten,
               'bars_unchanged', o.n_handled - o.n_skipped - o.n_created - o.n_rewritten,
               'bars_withdrawn', COALESCE(wd.n_withdrawn, 0),
               'bars_quality_poor', o.n_poor,
               'bars_skipped', o.n_skipped,
               'gaps_skipped', round(extract(epoch FROM o.new_cursor - o.s0)
                                     / extract(epoch FROM v_iv))::bigint - o.n_handled,
               'continue', o.more,
               'agg_start_enforced', o.agg_start_utc)
    FROM outcome o
    LEFT JOIN withdrawn_counts wd ON wd.sym = o.sym
    ORDER BY o.ord;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- catchup_aggregation_range (seed C.5): one task, through agg_catchup_tasks (one implementation),
-- for callers that drive the RPC loop themselves (the seed's worker: agg_start -> this -> agg_finish,
-- each its own transaction).
--   * Late data first (DESIGN.md 5): the task's logged windows that are final are re-aggregated in
--     this transaction (agg_reaggregate_tasks), so this caller never leaves a stale bar behind;
--     their counts are in the result's "reaggregated" object and already added to data_agg_state
--     (do not add them to agg_finish's p_stats).
--   * The task row is locked first (FOR NO KEY UPDATE, as the worker does), so a source row written
--     meanwhile is either seen by this call or logged against the cursor it stores (below).
--   * When the task is claimed (status running, i.e. after agg_start), the new cursor is stored with
--     the bars, in this transaction, if it moved forward: a row arriving between this call and
--     agg_finish then lies behind the stored cursor and is logged, instead of being passed over by
--     a cursor that agg_finish stores later. agg_finish stores the same cursor again. An idle task
--     (an ad-hoc call from psql) is not touched: the caller stores cursor_advanced_to.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.catchup_aggregation_range(p_symbol text, p_to_tf text,
                                                     p_start_cursor_utc timestamptz,
                                                     p_max_windows integer DEFAULT 100,
                                                     p_now_utc timestamptz DEFAULT NULL,
                                                     p_derivation_version integer DEFAULT 1,
                                                     p_ignore_confirmation boolean DEFAULT false)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_result jsonb;
    v_late jsonb;
    v_running boolean;
    v_stored timestamptz;
    v_cursor timestamptz;
BEGIN
    IF p_start_cursor_utc IS NULL THEN
        RAISE EXCEPTION 'catchup_aggregation_range: start cursor is NULL for % %; call agg_bootstrap_cursor first',
            p_symbol, p_to_tf USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT s.status = 'running', s.last_agg_bar_ts_utc INTO v_running, v_stored
    FROM public.data_agg_state s
    WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf
    FOR NO KEY UPDATE;
    SELECT t.result INTO v_late
    FROM public.agg_reaggregate_tasks(p_to_tf, ARRAY[p_symbol], p_derivation_version, p_now_utc) t;
    SELECT t.result INTO v_result
    FROM public.agg_catchup_tasks(p_to_tf, ARRAY[p_symbol], ARRAY[p_start_cursor_utc], p_max_windows, p_now_utc,
                           p_derivation_version, p_ignore_confirmation) t;
    v_cursor := (v_result->>'cursor_advanced_to')::timestamptz;
    IF v_running AND v_cursor > COALESCE(v_stored, timestamptz '-infinity') THEN
        UPDATE public.data_agg_state s
        SET last_agg_bar_ts_utc = v_cursor,
            last_run_stats = COALESCE(s.last_run_stats, '{}'::jsonb) || jsonb_build_object('cursor_moved', true),
            updated_at = now()
        WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf;
    END IF;
    RETURN v_result || jsonb_build_object('reaggregated', v_late);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- agg_recompute_windows: rebuild the listed windows of one task from the current source bars
-- (late or corrected data, DESIGN.md 5). Each window is upserted if its quality allows, otherwise
-- its active bar (if any) is soft-deleted (deleted_at = now()), never hard-deleted. Same
-- aggregation core (_agg_window_bars) and the same ON CONFLICT as the catch-up. Does not look at
-- cursors, finality or agg_start: the caller decides which windows are due.
-- A recomputation equal to the stored bar writes nothing (as in the catch-up).
-- Result: success, windows, bars_written (inserted or changed), bars_created (inserted),
-- bars_rewritten (changed), bars_unchanged, bars_deleted (soft-deleted), bars_quality_poor (of the
-- written ones).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.agg_recompute_windows(p_symbol text, p_to_tf text, p_window_starts timestamptz[],
                                                 p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    -- RETURNING xmax cannot tell an insert from an update on a partitioned table: a bar whose id was
    -- drawn after this (monotonic sequence) is new.
    v_id_floor bigint := pg_catalog.nextval('public.derived_data_bars_id_seq'::regclass);
    v_tf public.agg_timeframes := public._agg_ladder(p_to_tf);
    v_result jsonb;
    v_session text := public._agg_session_of(p_symbol, p_to_tf);
BEGIN
    -- A symbol on a trading session, or 1mo: its session's windows (15_sessions.sql).
    IF v_session IS NOT NULL THEN
        RETURN public._agg_session_recompute_windows(p_symbol, p_to_tf, v_session, p_window_starts, p_derivation_version);
    END IF;
    WITH wanted AS (
        SELECT DISTINCT date_bin(v_tf.bucket_interval, w.ws, v_tf.bucket_origin) AS ws
        FROM unnest(p_window_starts) AS w(ws)
        WHERE w.ws IS NOT NULL
    ),
    fresh AS (
        SELECT b.*
        FROM wanted x
        CROSS JOIN LATERAL public._agg_window_bars(p_to_tf, p_symbol, x.ws, x.ws + v_tf.bucket_interval) b
        WHERE b.quality_score IS NOT NULL
    ),
    written AS (
        INSERT INTO public.derived_data_bars AS d (
            canonical_symbol, timeframe, ts_utc, open, high, low, close, vol, vwap, trade_count,
            is_partial, source, ingested_at, source_timeframe, source_candles, expected_candles,
            quality_score, derivation_version, raw, deleted_at)
        SELECT p_symbol, p_to_tf, f.ts_utc, f.open, f.high, f.low, f.close, f.vol, f.vwap, f.trade_count,
               false, 'agg', now(), v_tf.source_timeframe, f.source_candles, f.expected_candles,
               f.quality_score, p_derivation_version, '{}'::jsonb, NULL
        FROM fresh f
        ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
        DO UPDATE SET
            open = excluded.open, high = excluded.high, low = excluded.low, close = excluded.close,
            vol = excluded.vol, vwap = excluded.vwap, trade_count = excluded.trade_count,
            is_partial = false, source = excluded.source, ingested_at = excluded.ingested_at,
            source_timeframe = excluded.source_timeframe, source_candles = excluded.source_candles,
            expected_candles = excluded.expected_candles, quality_score = excluded.quality_score,
            derivation_version = excluded.derivation_version, raw = excluded.raw, updated_at = excluded.ingested_at  -- (= now(); Citus: no function here)
        WHERE (d.open, d.high, d.low, d.close, d.vol, d.vwap, d.trade_count, d.is_partial,
               d.source_timeframe, d.source_candles, d.expected_candles, d.quality_score,
               d.derivation_version)
              IS DISTINCT FROM
              (excluded.open, excluded.high, excluded.low, excluded.close, excluded.vol, excluded.vwap,
               excluded.trade_count, false, excluded.source_timeframe, excluded.source_candles,
               excluded.expected_candles, excluded.quality_score, excluded.derivation_version)
        RETURNING d.quality_score, (d.id > v_id_floor) AS inserted
    ),
    removed AS (
        UPDATE public.derived_data_bars d
        SET deleted_at = now(), updated_at = now()
        FROM wanted x
        WHERE d.canonical_symbol = p_symbol AND d.timeframe = p_to_tf AND d.ts_utc = x.ws
          AND d.deleted_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM fresh f WHERE f.ts_utc = x.ws)
        RETURNING d.ts_utc
    )
    SELECT jsonb_build_object(
               'success', true,
               'windows', (SELECT count(*) FROM wanted),
               'bars_written', (SELECT count(*) FROM written),
               'bars_created', (SELECT count(*) FROM written w WHERE w.inserted),
               'bars_rewritten', (SELECT count(*) FROM written w WHERE NOT w.inserted),
               'bars_unchanged', (SELECT count(*) FROM fresh) - (SELECT count(*) FROM written),
               'bars_deleted', (SELECT count(*) FROM removed),
               'bars_quality_poor', (SELECT count(*) FROM written w WHERE w.quality_score <= 0))
    INTO v_result;
    RETURN v_result;
END
$$;
