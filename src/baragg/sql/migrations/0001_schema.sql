-- 0001: the seed's four tables, with the seed's DDL mistakes fixed (DESIGN.md section 2).
--
-- Written to converge: on an empty database it creates everything; on a database in the seed's
-- current production state (same tables, no Phase 5 columns, NOT NULL columns without defaults,
-- the old functions) it upgrades in place and loses nothing. Every statement is re-runnable, so the
-- file also applies as-is with `psql -f`.

-- ---------------------------------------------------------------------------------------------
-- core_asset_registry_all
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS core_asset_registry_all (
    canonical_symbol text PRIMARY KEY,
    provider_ticker text,
    asset_class text,
    source text,
    endpoint_key text,
    query_params jsonb,
    active boolean,
    notes text,
    test_active boolean,
    ingest_class text,
    base_timeframe text,
    is_sparse boolean,
    is_contract boolean,
    contract_root text,
    contract_expiry_utc timestamptz,
    expected_update_seconds integer,
    calc_15m boolean,
    calc_4h boolean,
    calc_1d boolean,
    created_at timestamptz,
    updated_at timestamptz
);

-- Beyond the seed: weekly bars are opt-in per asset, like the other optional timeframes.
ALTER TABLE core_asset_registry_all ADD COLUMN IF NOT EXISTS calc_1w boolean;

-- Defaults so that a registry row can be added by naming just the symbol. Existing rows keep their
-- values (SET DEFAULT touches no row).
ALTER TABLE core_asset_registry_all
    ALTER COLUMN active SET DEFAULT true,
    ALTER COLUMN test_active SET DEFAULT true,
    ALTER COLUMN base_timeframe SET DEFAULT '1m',
    ALTER COLUMN is_sparse SET DEFAULT false,
    ALTER COLUMN is_contract SET DEFAULT false,
    ALTER COLUMN calc_15m SET DEFAULT false,
    ALTER COLUMN calc_4h SET DEFAULT false,
    ALTER COLUMN calc_1d SET DEFAULT false,
    ALTER COLUMN calc_1w SET DEFAULT false,
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN updated_at SET DEFAULT now();

-- ---------------------------------------------------------------------------------------------
-- data_bars: raw 1-minute bars
-- ---------------------------------------------------------------------------------------------
-- The seed declared the primary key twice; here it is declared once, under the seed's name.
CREATE TABLE IF NOT EXISTS data_bars (
    id bigserial,
    canonical_symbol text NOT NULL,
    provider_ticker text,
    timeframe text NOT NULL,
    ts_utc timestamptz NOT NULL,
    open double precision,
    high double precision,
    low double precision,
    close double precision,
    vol double precision,
    vwap double precision,
    trade_count integer,
    is_partial boolean NOT NULL,
    source text NOT NULL,
    ingested_at timestamptz NOT NULL,
    raw jsonb NOT NULL,
    CONSTRAINT bars_pkey PRIMARY KEY (id),
    CONSTRAINT data_bars_symbol_tf_ts_unique UNIQUE (canonical_symbol, timeframe, ts_utc),
    CONSTRAINT bars_canonical_symbol_fkey FOREIGN KEY (canonical_symbol)
        REFERENCES core_asset_registry_all (canonical_symbol),
    CONSTRAINT bars_provider_ticker_required_chk CHECK (source <> 'massive_api' OR provider_ticker IS NOT NULL),
    CONSTRAINT bars_timeframe_check CHECK (timeframe = ANY (ARRAY['1m', '5m', '1h', '4h', '1d', '1w']))
);

-- The seed's NOT NULL columns had no defaults, so every writer had to spell them out.
ALTER TABLE data_bars
    ALTER COLUMN is_partial SET DEFAULT false,
    ALTER COLUMN ingested_at SET DEFAULT now(),
    ALTER COLUMN raw SET DEFAULT '{}'::jsonb;

-- ---------------------------------------------------------------------------------------------
-- derived_data_bars: aggregated bars (5m and up)
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS derived_data_bars (
    id bigserial,
    canonical_symbol text NOT NULL,
    timeframe text NOT NULL,
    ts_utc timestamptz NOT NULL,
    open double precision NOT NULL,
    high double precision NOT NULL,
    low double precision NOT NULL,
    close double precision NOT NULL,
    vol double precision,
    vwap double precision,
    trade_count integer,
    is_partial boolean NOT NULL,
    source text NOT NULL,
    ingested_at timestamptz NOT NULL,
    source_timeframe text,
    source_candles integer,
    expected_candles integer,
    quality_score integer,
    derivation_version integer,
    deleted_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    raw jsonb NOT NULL,
    CONSTRAINT derived_data_bars_pkey PRIMARY KEY (id),
    CONSTRAINT derived_canonical_symbol_fkey FOREIGN KEY (canonical_symbol)
        REFERENCES core_asset_registry_all (canonical_symbol)
);

ALTER TABLE derived_data_bars
    ALTER COLUMN is_partial SET DEFAULT false,
    ALTER COLUMN source SET DEFAULT 'agg',
    ALTER COLUMN ingested_at SET DEFAULT now(),
    ALTER COLUMN created_at SET DEFAULT now(),
    ALTER COLUMN updated_at SET DEFAULT now(),
    ALTER COLUMN raw SET DEFAULT '{}'::jsonb;

-- The seed wrote "UNIQUE (...) WHERE deleted_at IS NULL", which a constraint cannot carry: it is a
-- partial unique index. ON CONFLICT (canonical_symbol, timeframe, ts_utc) WHERE deleted_at IS NULL
-- infers it, and soft-deleted rows may repeat a key.
CREATE UNIQUE INDEX IF NOT EXISTS derived_unique_symbol_tf_ts
    ON derived_data_bars (canonical_symbol, timeframe, ts_utc)
    WHERE deleted_at IS NULL;

-- The seed also had an index on (canonical_symbol, timeframe, ts_utc DESC). It duplicates the
-- partial unique index above, which PostgreSQL scans backwards just as well (latest-bar lookups,
-- "ORDER BY ts_utc DESC LIMIT n"), and every index costs each derived-bar write. Dropped.
DROP INDEX IF EXISTS derived_data_bars_symbol_tf_ts_desc_idx;

-- ---------------------------------------------------------------------------------------------
-- data_agg_state: one row per task (symbol x timeframe)
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS data_agg_state (
    canonical_symbol text NOT NULL,
    timeframe text NOT NULL,
    run_interval_minutes integer,
    aggregation_delay_seconds integer,
    source_timeframe text,
    is_mandatory boolean NOT NULL DEFAULT false,
    last_agg_bar_ts_utc timestamptz,
    last_attempted_at_utc timestamptz,
    last_successful_at_utc timestamptz,
    last_error text,
    status text NOT NULL DEFAULT 'idle',
    hard_fail_streak integer NOT NULL DEFAULT 0,
    total_runs bigint NOT NULL DEFAULT 0,
    total_bars_created bigint NOT NULL DEFAULT 0,
    total_bars_quality_poor bigint NOT NULL DEFAULT 0,
    next_run_at timestamptz,
    running_started_at_utc timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (canonical_symbol, timeframe)
);

-- Phase 5 columns, with the seed's defaults.
ALTER TABLE data_agg_state
    ADD COLUMN IF NOT EXISTS agg_start_utc timestamptz NOT NULL DEFAULT '2025-07-01 00:00:00+00',
    ADD COLUMN IF NOT EXISTS enabled boolean NOT NULL DEFAULT true,
    ADD COLUMN IF NOT EXISTS task_priority integer NOT NULL DEFAULT 100;

-- ---------------------------------------------------------------------------------------------
-- The seed's functions are replaced by later migrations, some with new optional parameters (which
-- would otherwise leave the old signature behind as a second overload). Drop them by the seed's
-- signatures so that an upgraded database holds exactly what a fresh one does.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION IF EXISTS _upsert_derived_bar(text, text, timestamptz, double precision, double precision,
    double precision, double precision, double precision, double precision, integer, text, text, integer,
    integer, integer, integer, jsonb);
DROP FUNCTION IF EXISTS agg_bootstrap_cursor(text, text, timestamptz);
DROP FUNCTION IF EXISTS aggregate_1m_to_5m_window(text, timestamptz, timestamptz, integer);
DROP FUNCTION IF EXISTS aggregate_5m_to_1h_window(text, timestamptz, timestamptz, integer);
DROP FUNCTION IF EXISTS catchup_aggregation_range(text, text, timestamptz, integer, timestamptz, integer, boolean);
DROP FUNCTION IF EXISTS agg_get_due_tasks(text, integer);
DROP FUNCTION IF EXISTS agg_start(text, text, timestamptz);
DROP FUNCTION IF EXISTS agg_finish(text, text, boolean, timestamptz, jsonb, text, text);
DROP FUNCTION IF EXISTS sync_agg_state_from_registry(text);
