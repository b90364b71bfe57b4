-- The seed's aggregation design (spec sections C.3-C.5, E.3, F.2, F.3), written out for the benchmark
-- only, in its own schema so that it can sit beside baragg's functions and write into the same
-- derived_data_bars. NOT part of baragg.
--
--   * one function call per window: select the window's source rows, aggregate them, then upsert the
--     one bar through _upsert_derived_bar (the seed's one-row upsert, kept by baragg with its signature);
--   * catchup_aggregation_range loops window by window, at most p_max_windows (100) per call, and
--     stops at the first window without source rows ("frontier", seed F.2) -- so a weekend stops it;
--   * Phase 5's agg_start_utc floor; the confirmation delay (stop at a window not yet final);
--   * the worker calls it once per task per run, ten tasks per run, every five minutes (seed E.3, F.3).
--
-- Quality uses baragg's agg_quality_score, which reproduces the seed's 5m and 1h tables.

CREATE SCHEMA IF NOT EXISTS seed_design;

CREATE OR REPLACE FUNCTION seed_design.aggregate_window(p_symbol text, p_to_tf text, p_src_tf text,
    p_expected integer, p_from_utc timestamptz, p_to_utc timestamptz, p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v record;
    v_quality integer;
BEGIN
    IF p_src_tf = '1m' THEN
        WITH src AS (
            SELECT ts_utc, open, high, low, close, vol, vwap, trade_count
            FROM data_bars
            WHERE canonical_symbol = p_symbol AND timeframe = '1m'
              AND ts_utc >= p_from_utc AND ts_utc < p_to_utc
        )
        SELECT count(*)::int AS n,
               (SELECT s.open FROM src s ORDER BY s.ts_utc LIMIT 1) AS open,
               max(high) AS high, min(low) AS low,
               (SELECT s.close FROM src s ORDER BY s.ts_utc DESC LIMIT 1) AS close,
               sum(vol) AS vol,
               sum(vwap * vol) / NULLIF(sum(vol) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
               sum(trade_count)::int AS trade_count
        INTO v FROM src;
    ELSE
        WITH src AS (
            SELECT ts_utc, open, high, low, close, vol, vwap, trade_count
            FROM derived_data_bars
            WHERE canonical_symbol = p_symbol AND timeframe = p_src_tf AND deleted_at IS NULL
              AND ts_utc >= p_from_utc AND ts_utc < p_to_utc
        )
        SELECT count(*)::int AS n,
               (SELECT s.open FROM src s ORDER BY s.ts_utc LIMIT 1) AS open,
               max(high) AS high, min(low) AS low,
               (SELECT s.close FROM src s ORDER BY s.ts_utc DESC LIMIT 1) AS close,
               sum(vol) AS vol,
               sum(vwap * vol) / NULLIF(sum(vol) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
               sum(trade_count)::int AS trade_count
        INTO v FROM src;
    END IF;
    IF v.n = 0 THEN
        RETURN jsonb_build_object('success', true, 'stored', false, 'source_count', 0, 'reason', 'no_source_bars');
    END IF;
    v_quality := agg_quality_score(v.n, p_expected);
    IF v_quality IS NULL THEN
        RETURN jsonb_build_object('success', true, 'stored', false, 'source_count', v.n,
                                  'reason', 'insufficient_source_bars');
    END IF;
    PERFORM _upsert_derived_bar(p_symbol, p_to_tf, p_from_utc, v.open, v.high, v.low, v.close, v.vol, v.vwap,
                                v.trade_count, 'agg', p_src_tf, v.n, p_expected, v_quality,
                                p_derivation_version, '{}'::jsonb);
    RETURN jsonb_build_object('success', true, 'stored', true, 'source_count', v.n, 'quality_score', v_quality);
END
$$;

CREATE OR REPLACE FUNCTION seed_design.catchup_aggregation_range(p_symbol text, p_to_tf text,
    p_start_cursor_utc timestamptz, p_max_windows integer DEFAULT 100, p_now_utc timestamptz DEFAULT NULL,
    p_derivation_version integer DEFAULT 1)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_interval_min integer;
    v_delay_sec integer;
    v_src_tf text;
    v_agg_start timestamptz;
    v_expected integer;
    v_now timestamptz := COALESCE(p_now_utc, now());
    v_cursor timestamptz := p_start_cursor_utc;
    v_ws timestamptz;
    v_we timestamptz;
    v_res jsonb;
    v_processed integer := 0;
    v_created integer := 0;
    v_poor integer := 0;
    v_skipped integer := 0;
BEGIN
    IF p_start_cursor_utc IS NULL THEN
        RAISE EXCEPTION 'catchup_aggregation_range: start cursor is NULL';
    END IF;
    SELECT s.run_interval_minutes, s.aggregation_delay_seconds, s.source_timeframe, s.agg_start_utc
    INTO v_interval_min, v_delay_sec, v_src_tf, v_agg_start
    FROM data_agg_state s WHERE s.canonical_symbol = p_symbol AND s.timeframe = p_to_tf;
    SELECT t.expected_source_bars INTO v_expected FROM agg_timeframes t WHERE t.timeframe = p_to_tf;
    IF v_agg_start IS NOT NULL THEN
        v_cursor := GREATEST(v_cursor, v_agg_start);
    END IF;
    WHILE v_processed < p_max_windows LOOP
        v_ws := v_cursor;
        v_we := v_ws + make_interval(mins => v_interval_min);
        EXIT WHEN v_now < v_we + make_interval(secs => COALESCE(v_delay_sec, 0));
        v_res := seed_design.aggregate_window(p_symbol, p_to_tf, v_src_tf, v_expected, v_ws, v_we,
                                              p_derivation_version);
        -- Stop at frontier (source_count = 0): a weekend or an outage stops the task here for good.
        EXIT WHEN COALESCE((v_res->>'source_count')::int, 0) = 0;
        IF (v_res->>'stored')::boolean THEN
            v_created := v_created + 1;
            IF (v_res->>'quality_score')::int <= 0 THEN
                v_poor := v_poor + 1;
            END IF;
        ELSE
            v_skipped := v_skipped + 1;
        END IF;
        v_cursor := v_we;
        v_processed := v_processed + 1;
    END LOOP;
    RETURN jsonb_build_object('success', true, 'windows_processed', v_processed,
        'cursor_advanced_to', v_cursor, 'bars_created', v_created, 'bars_quality_poor', v_poor,
        'bars_skipped', v_skipped, 'continue', v_processed >= p_max_windows, 'agg_start_enforced', v_agg_start);
END
$$;
