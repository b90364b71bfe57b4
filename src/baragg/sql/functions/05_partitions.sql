-- Repeatable: time partitions (DESIGN.md 11, issue 15 part 2). Applied first of the function files:
-- it may turn a new install's empty bar tables into partitioned tables, and the files after it (the
-- invalidation triggers, the security file) must then find the partitioned ones.
--
-- data_bars and derived_data_bars are partitioned BY RANGE (ts_utc), one partition per calendar month
-- (UTC), named as pg_partman 5 names monthly children: data_bars_p20250101 for January 2025, and a
-- DEFAULT partition data_bars_default that catches a row of a month with no partition yet, so that no
-- write ever fails for want of a partition. baragg creates the partitions itself (where pg_partman does
-- not manage the table: a table in partman.part_config is left to pg_partman): ahead of time
-- (baragg_partitions_maintain: `db upgrade`, the worker's registry sync), and for the months an ingest is
-- about to write (baragg_partitions_ensure). Creating a month moves that month's rows out of the default
-- partition in the same transaction.
--
-- Every function here that creates or attaches tables runs as their owner (SECURITY DEFINER): the
-- worker role may write rows but owns no table. None of them is granted beyond baragg_worker
-- (functions/90_security.sql). Months are UTC months whatever the session's TimeZone (the helpers below).

-- ---------------------------------------------------------------------------------------------
-- Names, ownership, security of one partition
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public._baragg_part_name(p_base text, p_month timestamptz)
RETURNS text LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT p_base || '_p' || pg_catalog.to_char(p_month AT TIME ZONE 'UTC', 'YYYYMMDD')
$$;

-- The UTC month p_k months after the one holding p_ts.
CREATE OR REPLACE FUNCTION public._baragg_part_month(p_ts timestamptz, p_k integer DEFAULT 0)
RETURNS timestamptz LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT (pg_catalog.date_trunc('month', p_ts AT TIME ZONE 'UTC') + pg_catalog.make_interval(months => p_k))
           AT TIME ZONE 'UTC'
$$;

-- This month and the p_ahead next ones.
CREATE OR REPLACE FUNCTION public._baragg_part_months_ahead(p_ahead integer)
RETURNS timestamptz[] LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT ARRAY(SELECT public._baragg_part_month(pg_catalog.now(), k) FROM generate_series(0, p_ahead) k)
$$;

-- Whether baragg keeps this table's partitions: partitioned, and not registered with pg_partman.
CREATE OR REPLACE FUNCTION public._baragg_part_managed(p_table text)
RETURNS boolean LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    v_partman boolean := false;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   WHERE c.oid = pg_catalog.to_regclass('public.' || pg_catalog.quote_ident(p_table))
                     AND c.relkind = 'p') THEN
        RETURN false;
    END IF;
    IF pg_catalog.to_regclass('partman.part_config') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM partman.part_config WHERE parent_table = $1)'
            INTO v_partman USING 'public.' || p_table;
    END IF;
    RETURN NOT v_partman;
END
$$;

-- A partition (or the partitioned copy of a conversion) is reached through its parent only: nothing is
-- granted on it (Supabase's default privileges grant anon and authenticated ALL on every new table),
-- and row-level security is on with a policy nothing passes, so a direct read by anyone but the owner
-- finds nothing.
CREATE OR REPLACE FUNCTION public._baragg_part_secure(p_name text)
RETURNS void LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_roles text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r.rolname), ', ') INTO v_roles
    FROM pg_catalog.pg_roles r WHERE r.rolname IN ('anon', 'authenticated', 'baragg_worker', 'baragg_reader');
    EXECUTE format('REVOKE ALL ON TABLE public.%I FROM PUBLIC%s', p_name, COALESCE(', ' || v_roles, ''));
    EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', p_name);
    -- Said as a policy too (the linter's 0008 asks every table with row-level security for one): no row
    -- of a partition is visible or writable directly. Through the parent, only the parent's policies
    -- apply. (The partitioned copy of a conversion loses it when it becomes the table.)
    EXECUTE format('DROP POLICY IF EXISTS baragg_through_parent_only ON public.%I', p_name);
    EXECUTE format('CREATE POLICY baragg_through_parent_only ON public.%I AS RESTRICTIVE FOR ALL TO PUBLIC '
                   'USING (false) WITH CHECK (false)', p_name);
END
$$;

-- One month's partition of p_parent (named after p_base: the parent's final name, which differs
-- during a conversion), with that month's rows moved out of the default partition. The caller holds
-- the partition lock. Returns the rows moved, NULL when the partition existed.
CREATE OR REPLACE FUNCTION public._baragg_part_add(p_parent text, p_base text, p_month timestamptz)
RETURNS bigint LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_month timestamptz := public._baragg_part_month(p_month);
    v_end timestamptz := public._baragg_part_month(p_month, 1);
    v_name text := public._baragg_part_name(p_base, public._baragg_part_month(p_month));
    v_default text := p_base || '_default';
    v_moved bigint := 0;
    v_has_rows boolean := false;
BEGIN
    IF pg_catalog.to_regclass('public.' || pg_catalog.quote_ident(v_name)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Locks up front, parent first (no upgrade half-way, which is how a writer and this could deadlock).
    -- An empty month is attached under SHARE UPDATE EXCLUSIVE on the parent: readers and writers go on.
    -- Moving rows out of the default partition needs ACCESS EXCLUSIVE on the parent: a statement planned
    -- before the move (partitions as they were) but run after it would find the rows in neither place.
    IF pg_catalog.to_regclass('public.' || pg_catalog.quote_ident(v_default)) IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I WHERE ts_utc >= $1 AND ts_utc < $2)', v_default)
            INTO v_has_rows USING v_month, v_end;
        EXECUTE format('LOCK TABLE public.%I IN %s MODE', p_parent,
                       CASE WHEN v_has_rows THEN 'ACCESS EXCLUSIVE' ELSE 'SHARE UPDATE EXCLUSIVE' END);
        EXECUTE format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', v_default);
        IF NOT v_has_rows THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I WHERE ts_utc >= $1 AND ts_utc < $2)', v_default)
                INTO v_has_rows USING v_month, v_end;
            IF v_has_rows THEN  -- rows arrived meanwhile: next time, under the stronger lock
                RAISE EXCEPTION 'rows of % arrived in % meanwhile; try again', v_month, v_default
                    USING ERRCODE = 'lock_not_available';
            END IF;
        END IF;
    ELSE
        EXECUTE format('LOCK TABLE public.%I IN SHARE UPDATE EXCLUSIVE MODE', p_parent);
    END IF;
    EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING CONSTRAINTS INCLUDING STORAGE)',
                   v_name, p_parent);
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
               WHERE i.inhparent = ('public.' || pg_catalog.quote_ident(p_parent))::regclass
                 AND i.inhrelid = pg_catalog.to_regclass('public.' || pg_catalog.quote_ident(v_default))) THEN
        -- Straight from partition to partition: the parent's statement triggers do not fire (the rows
        -- do not change, so nothing is invalidated).
        EXECUTE format('WITH moved AS (DELETE FROM public.%I WHERE ts_utc >= $1 AND ts_utc < $2 RETURNING *) '
                       'INSERT INTO public.%I SELECT * FROM moved', v_default, v_name)
            USING v_month, v_end;
        GET DIAGNOSTICS v_moved = ROW_COUNT;
    END IF;
    -- ATTACH (not CREATE ... PARTITION OF): it takes SHARE UPDATE EXCLUSIVE on the parent, so readers
    -- and writers of the other months go on.
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                   p_parent, v_name, v_month, v_end);
    PERFORM public._baragg_part_secure(v_name);
    RETURN v_moved;
END
$$;

CREATE OR REPLACE FUNCTION public._baragg_part_lock(p_table text)
RETURNS void LANGUAGE sql SET search_path = '' AS $$
    SELECT pg_catalog.pg_advisory_xact_lock(1650553449, pg_catalog.hashtext(p_table))
$$;

-- ---------------------------------------------------------------------------------------------
-- baragg_partitions_ensure: the partitions of the given months (ingest calls it before it writes)
-- ---------------------------------------------------------------------------------------------
-- Cheap when they exist (a catalog look-up per month, no lock). Returns the partitions created.
CREATE OR REPLACE FUNCTION public.baragg_partitions_ensure(p_table text, p_months timestamptz[])
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_missing timestamptz[];
    v_month timestamptz;
    v_created integer := 0;
BEGIN
    IF p_table IS NULL OR p_table NOT IN ('data_bars', 'derived_data_bars') THEN
        RAISE EXCEPTION 'baragg_partitions_ensure: % is not a bar table', p_table;
    END IF;
    IF NOT public._baragg_part_managed(p_table) THEN
        RETURN 0;
    END IF;
    SELECT pg_catalog.array_agg(DISTINCT m.month ORDER BY m.month) INTO v_missing
    FROM (SELECT public._baragg_part_month(u.ts) AS month FROM unnest(p_months) u(ts)
          WHERE u.ts IS NOT NULL AND pg_catalog.isfinite(u.ts)) m
    WHERE pg_catalog.to_regclass('public.' || pg_catalog.quote_ident(public._baragg_part_name(p_table, m.month))) IS NULL;
    IF v_missing IS NULL THEN
        RETURN 0;
    END IF;
    -- Housekeeping gives way, but not to autovacuum: it waits for a lock one second longer than
    -- deadlock_timeout. PostgreSQL cancels an autovacuum that blocks a lock request only once the
    -- request has waited deadlock_timeout (at the former 500 ms the autovacuum of a default partition made
    -- attaches fail, and an ingest's rows of those months went to the default partition). Against
    -- any other holder it fails after that and the caller retries later; a row of a month without a
    -- partition meanwhile goes to the default partition.
    PERFORM pg_catalog.set_config('lock_timeout',
        (EXTRACT(epoch FROM pg_catalog.current_setting('deadlock_timeout')::interval) * 1000 + 1000)::bigint
            || 'ms', true);
    PERFORM public._baragg_part_lock(p_table);
    FOREACH v_month IN ARRAY v_missing LOOP
        IF public._baragg_part_add(p_table, p_table, v_month) IS NOT NULL THEN
            v_created := v_created + 1;
        END IF;
    END LOOP;
    RETURN v_created;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- baragg_partitions_maintain: this month and p_ahead months ahead, and every month found in a default
-- partition (its rows move out). `db upgrade` and the worker's registry sync call it.
-- ---------------------------------------------------------------------------------------------
DROP FUNCTION IF EXISTS public.baragg_partitions_maintain(integer);
CREATE OR REPLACE FUNCTION public.baragg_partitions_maintain(p_ahead integer DEFAULT 2, p_table text DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_table text;
    v_months timestamptz[];
    v_default_months timestamptz[];
    v_created integer := 0;
BEGIN
    IF p_ahead IS NULL OR p_ahead < 0 OR p_ahead > 24 THEN
        RAISE EXCEPTION 'baragg_partitions_maintain: months ahead must be 0 to 24, not %', p_ahead;
    END IF;
    FOREACH v_table IN ARRAY ARRAY['data_bars', 'derived_data_bars'] LOOP
        CONTINUE WHEN p_table IS NOT NULL AND v_table <> p_table;
        CONTINUE WHEN NOT public._baragg_part_managed(v_table);
        v_months := public._baragg_part_months_ahead(p_ahead);
        IF pg_catalog.to_regclass('public.' || pg_catalog.quote_ident(v_table || '_default')) IS NOT NULL THEN
            EXECUTE format('SELECT array_agg(DISTINCT public._baragg_part_month(ts_utc)) FROM public.%I',
                           v_table || '_default') INTO v_default_months;
            v_months := v_months || COALESCE(v_default_months, '{}');
        END IF;
        v_created := v_created + public.baragg_partitions_ensure(v_table, v_months);
    END LOOP;
    RETURN v_created;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The conversion of an unpartitioned table (`baragg db partition`, DESIGN.md 11)
-- ---------------------------------------------------------------------------------------------
-- 1. setup (one transaction): a partitioned copy <table>_partitioned with the same columns, defaults,
--    checks, indexes and foreign keys, its default partition and one partition per month that holds rows
--    (and the months ahead); statement triggers on the table log the key of every row written from now
--    on (baragg_partition_log); a progress row.
-- 2. copy, in batches of keys (one transaction each, the last key committed with the batch), while
--    writers go on: data_bars by its primary key (symbol, timeframe, time), derived_data_bars by id.
-- 3. replay the log: the logged keys are deleted from the copy and copied again from the table as it is
--    now. Invariant: the copy equals the table except at logged keys; so a snapshot that skips logged
--    keys compares them exactly (verify), and after the last replay under the lock they are equal.
-- 4. swap (one short transaction under ACCESS EXCLUSIVE on the table): replay what is left, rename the
--    table to <table>_unpartitioned (kept, its triggers dropped) and the copy to <table>, indexes to
--    their old names, the id sequence to the new table; the caller re-applies the function files in the
--    same transaction (triggers, grants, row-level security on the new table).
-- Kill -9 at any point leaves either the state before a step or after it: every step is one transaction.

CREATE OR REPLACE FUNCTION public._baragg_part_capture()
RETURNS trigger LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO public.baragg_partition_log (table_name, canonical_symbol, timeframe, ts_utc, id)
        SELECT TG_TABLE_NAME, n.canonical_symbol, n.timeframe, n.ts_utc, n.id FROM new_rows n;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO public.baragg_partition_log (table_name, canonical_symbol, timeframe, ts_utc, id)
        SELECT TG_TABLE_NAME, o.canonical_symbol, o.timeframe, o.ts_utc, o.id FROM old_rows o;
    END IF;
    RETURN NULL;
END
$$;

-- The partitioned copy of p_table, named p_table || '_partitioned', with its partitions.
CREATE OR REPLACE FUNCTION public._baragg_part_clone(p_table text, p_months timestamptz[])
RETURNS void LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_new text := p_table || '_partitioned';
    v_fk record;
    v_month timestamptz;
BEGIN
    EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING ALL) PARTITION BY RANGE (ts_utc)',
                   v_new, p_table);
    FOR v_fk IN
        SELECT c.conname, pg_catalog.pg_get_constraintdef(c.oid) AS def
        FROM pg_catalog.pg_constraint c
        WHERE c.conrelid = ('public.' || pg_catalog.quote_ident(p_table))::regclass AND c.contype = 'f'
        ORDER BY c.conname
    LOOP
        EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I %s', v_new, v_fk.conname, v_fk.def);
    END LOOP;
    PERFORM public._baragg_part_secure(v_new);
    EXECUTE format('CREATE TABLE public.%I PARTITION OF public.%I DEFAULT', p_table || '_default', v_new);
    PERFORM public._baragg_part_secure(p_table || '_default');
    FOREACH v_month IN ARRAY ARRAY(
        SELECT DISTINCT public._baragg_part_month(m) FROM unnest(p_months) m
        WHERE m IS NOT NULL AND pg_catalog.isfinite(m) ORDER BY 1)
    LOOP
        PERFORM public._baragg_part_add(v_new, p_table, v_month);
    END LOOP;
END
$$;

-- Rename the copy into place (the caller holds ACCESS EXCLUSIVE on p_table). The old table becomes
-- p_table || '_unpartitioned', without triggers and without any grant.
CREATE OR REPLACE FUNCTION public._baragg_part_rename(p_table text)
RETURNS void LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_old regclass := ('public.' || pg_catalog.quote_ident(p_table))::regclass;
    v_new regclass := ('public.' || pg_catalog.quote_ident(p_table || '_partitioned'))::regclass;
    v_seq text := pg_catalog.pg_get_serial_sequence('public.' || pg_catalog.quote_ident(p_table), 'id');
    v_index record;
    v_trigger name;
    v_readers text;
BEGIN
    -- Each index of the old table lends its name to the copy's index of the same definition.
    FOR v_index IN
        SELECT o.relname AS old_name, n.relname AS new_name
        FROM pg_catalog.pg_index oi JOIN pg_catalog.pg_class o ON o.oid = oi.indexrelid
        JOIN pg_catalog.pg_index ni ON ni.indrelid = v_new
        JOIN pg_catalog.pg_class n ON n.oid = ni.indexrelid
        WHERE oi.indrelid = v_old AND oi.indisunique = ni.indisunique AND oi.indisprimary = ni.indisprimary
          AND pg_catalog.regexp_replace(pg_catalog.pg_get_indexdef(oi.indexrelid), '^.* USING ', '')
            = pg_catalog.regexp_replace(pg_catalog.pg_get_indexdef(ni.indexrelid), '^.* USING ', '')
    LOOP
        EXECUTE format('ALTER INDEX public.%I RENAME TO %I', v_index.old_name,
                       left(v_index.old_name, 48) || '_unpartitioned');
        EXECUTE format('ALTER INDEX public.%I RENAME TO %I', v_index.new_name, v_index.old_name);
    END LOOP;
    FOR v_trigger IN SELECT t.tgname FROM pg_catalog.pg_trigger t WHERE t.tgrelid = v_old AND NOT t.tgisinternal LOOP
        EXECUTE format('DROP TRIGGER %I ON public.%I', v_trigger, p_table);
    END LOOP;
    -- The roles `baragg db grant-read` gave the table (90_security.sql keeps the policy's roles).
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_ident(r.rolname), ', ') INTO v_readers
    FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_roles r ON r.oid = ANY (p.polroles)
    WHERE p.polrelid = v_old AND p.polname = 'baragg_reader_select';
    IF v_readers IS NOT NULL THEN
        EXECUTE format('CREATE POLICY baragg_reader_select ON public.%I AS PERMISSIVE FOR SELECT TO %s USING (true)',
                       p_table || '_partitioned', v_readers);
    END IF;
    EXECUTE format('DROP POLICY IF EXISTS baragg_through_parent_only ON public.%I', p_table || '_partitioned');
    EXECUTE format('ALTER TABLE public.%I RENAME TO %I', p_table, p_table || '_unpartitioned');
    EXECUTE format('ALTER TABLE public.%I RENAME TO %I', p_table || '_partitioned', p_table);
    IF v_seq IS NOT NULL THEN
        EXECUTE format('ALTER SEQUENCE %s OWNED BY public.%I.id', v_seq, p_table);
    END IF;
    PERFORM public._baragg_part_secure(p_table || '_unpartitioned');
END
$$;

CREATE OR REPLACE FUNCTION public._baragg_part_setup(p_table text)
RETURNS void LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_months timestamptz[];
BEGIN
    IF p_table IS NULL OR p_table NOT IN ('data_bars', 'derived_data_bars') THEN
        RAISE EXCEPTION 'not a bar table: %', p_table;
    END IF;
    -- The writers wait for this lock and then see the triggers: every row written after this commits
    -- is logged; every row written before is in the copy's snapshots.
    EXECUTE format('LOCK TABLE public.%I IN SHARE ROW EXCLUSIVE MODE', p_table);
    EXECUTE format('SELECT array_agg(DISTINCT public._baragg_part_month(ts_utc)) FROM public.%I', p_table)
        INTO v_months;
    v_months := COALESCE(v_months, '{}') || public._baragg_part_months_ahead(2);
    PERFORM public._baragg_part_clone(p_table, v_months);
    EXECUTE format('CREATE TRIGGER baragg_partition_capture_insert AFTER INSERT ON public.%I '
                   'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION public._baragg_part_capture()',
                   p_table);
    EXECUTE format('CREATE TRIGGER baragg_partition_capture_update AFTER UPDATE ON public.%I '
                   'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION public._baragg_part_capture()', p_table);
    EXECUTE format('CREATE TRIGGER baragg_partition_capture_delete AFTER DELETE ON public.%I '
                   'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION public._baragg_part_capture()',
                   p_table);
    DELETE FROM public.baragg_partition_log WHERE table_name = p_table;
    INSERT INTO public.baragg_partition_progress AS p (table_name, phase)
    VALUES (p_table, 'copying')
    ON CONFLICT (table_name) DO UPDATE SET phase = 'copying', last_symbol = NULL, last_timeframe = NULL,
        last_ts_utc = NULL, last_id = NULL, rows_copied = 0, rows_replayed = 0, started_at = pg_catalog.now(),
        finished_at = NULL;
END
$$;

-- One batch of the copy; returns the rows copied (0: the copy has reached the end of the table).
CREATE OR REPLACE FUNCTION public._baragg_part_copy(p_table text, p_rows integer)
RETURNS bigint LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_p public.baragg_partition_progress;
    v_n bigint;
    v_sym text;
    v_tf text;
    v_ts timestamptz;
    v_id bigint;
BEGIN
    SELECT * INTO v_p FROM public.baragg_partition_progress WHERE table_name = p_table FOR UPDATE;
    IF NOT FOUND OR v_p.phase <> 'copying' THEN
        RETURN 0;
    END IF;
    IF p_table = 'data_bars' THEN
        SELECT k.canonical_symbol, k.timeframe, k.ts_utc, k.n INTO v_sym, v_tf, v_ts, v_n
        FROM (SELECT d.canonical_symbol, d.timeframe, d.ts_utc, count(*) OVER () AS n
              FROM (SELECT d.canonical_symbol, d.timeframe, d.ts_utc FROM public.data_bars d
                    WHERE (d.canonical_symbol, d.timeframe, d.ts_utc)
                          > (COALESCE(v_p.last_symbol, ''), COALESCE(v_p.last_timeframe, ''),
                             COALESCE(v_p.last_ts_utc, '-infinity'))
                    ORDER BY d.canonical_symbol, d.timeframe, d.ts_utc LIMIT p_rows) d) k
        ORDER BY k.canonical_symbol DESC, k.timeframe DESC, k.ts_utc DESC LIMIT 1;
        IF v_n IS NULL THEN
            RETURN 0;
        END IF;
        INSERT INTO public.data_bars_partitioned
        SELECT d.* FROM public.data_bars d
        WHERE (d.canonical_symbol, d.timeframe, d.ts_utc)
                > (COALESCE(v_p.last_symbol, ''), COALESCE(v_p.last_timeframe, ''), COALESCE(v_p.last_ts_utc, '-infinity'))
          AND (d.canonical_symbol, d.timeframe, d.ts_utc) <= (v_sym, v_tf, v_ts)
        ON CONFLICT DO NOTHING;
        UPDATE public.baragg_partition_progress
        SET last_symbol = v_sym, last_timeframe = v_tf, last_ts_utc = v_ts, rows_copied = rows_copied + v_n
        WHERE table_name = p_table;
    ELSE
        SELECT count(*), max(k.id) INTO v_n, v_id
        FROM (SELECT d.id FROM public.derived_data_bars d WHERE d.id > COALESCE(v_p.last_id, -1)
              ORDER BY d.id LIMIT p_rows) k;
        IF v_n = 0 THEN
            RETURN 0;
        END IF;
        -- A live bar of the same natural key and another id in the copy is stale (the table cannot hold
        -- two live bars of one key), and its change is logged: it goes, the replay writes it back.
        DELETE FROM public.derived_data_bars_partitioned n
        USING public.derived_data_bars d
        WHERE d.id > COALESCE(v_p.last_id, -1) AND d.id <= v_id AND d.deleted_at IS NULL
          AND n.canonical_symbol = d.canonical_symbol AND n.timeframe = d.timeframe AND n.ts_utc = d.ts_utc
          AND n.deleted_at IS NULL AND n.id <> d.id;
        INSERT INTO public.derived_data_bars_partitioned
        SELECT d.* FROM public.derived_data_bars d WHERE d.id > COALESCE(v_p.last_id, -1) AND d.id <= v_id
        ON CONFLICT DO NOTHING;
        UPDATE public.baragg_partition_progress SET last_id = v_id, rows_copied = rows_copied + v_n
        WHERE table_name = p_table;
    END IF;
    RETURN v_n;
END
$$;

-- One batch of the log replayed; returns the log entries handled (0: the log is empty).
CREATE OR REPLACE FUNCTION public._baragg_part_replay(p_table text, p_rows integer)
RETURNS bigint LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_seqs bigint[];
    v_syms text[];
    v_tfs text[];
    v_tss timestamptz[];
    v_ids bigint[];
BEGIN
    PERFORM 1 FROM public.baragg_partition_progress WHERE table_name = p_table AND phase = 'copying' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- The keys are read once: an entry committed later (even with a lower seq) stays for the next batch.
    SELECT pg_catalog.array_agg(l.seq), pg_catalog.array_agg(l.canonical_symbol), pg_catalog.array_agg(l.timeframe),
           pg_catalog.array_agg(l.ts_utc), pg_catalog.array_agg(l.id)
    INTO v_seqs, v_syms, v_tfs, v_tss, v_ids
    FROM (SELECT * FROM public.baragg_partition_log WHERE table_name = p_table ORDER BY seq LIMIT p_rows) l;
    IF v_seqs IS NULL THEN
        RETURN 0;
    END IF;
    IF p_table = 'data_bars' THEN
        DELETE FROM public.data_bars_partitioned n
        USING (SELECT DISTINCT * FROM unnest(v_syms, v_tfs, v_tss) AS k(sym, tf, ts)) k
        WHERE n.canonical_symbol = k.sym AND n.timeframe = k.tf AND n.ts_utc = k.ts;
        INSERT INTO public.data_bars_partitioned
        SELECT d.* FROM public.data_bars d
        JOIN (SELECT DISTINCT * FROM unnest(v_syms, v_tfs, v_tss) AS k(sym, tf, ts)) k
          ON d.canonical_symbol = k.sym AND d.timeframe = k.tf AND d.ts_utc = k.ts;
    ELSE
        DELETE FROM public.derived_data_bars_partitioned n
        USING (SELECT DISTINCT * FROM unnest(v_ids, v_tss) AS k(id, ts)) k
        WHERE n.id = k.id AND n.ts_utc = k.ts;
        DELETE FROM public.derived_data_bars_partitioned n
        USING public.derived_data_bars d
        WHERE d.id = ANY (v_ids) AND d.deleted_at IS NULL
          AND n.canonical_symbol = d.canonical_symbol AND n.timeframe = d.timeframe AND n.ts_utc = d.ts_utc
          AND n.deleted_at IS NULL AND n.id <> d.id;
        INSERT INTO public.derived_data_bars_partitioned
        SELECT d.* FROM public.derived_data_bars d WHERE d.id = ANY (v_ids);
    END IF;
    DELETE FROM public.baragg_partition_log WHERE seq = ANY (v_seqs);
    UPDATE public.baragg_partition_progress SET rows_replayed = rows_replayed + pg_catalog.cardinality(v_seqs)
    WHERE table_name = p_table;
    RETURN pg_catalog.cardinality(v_seqs);
END
$$;

-- Rows and an order-free hash of both tables, leaving out the logged keys (which the next replay copies
-- again). Run it in a REPEATABLE READ transaction: one snapshot for both tables and the log.
CREATE OR REPLACE FUNCTION public._baragg_part_compare(p_table text)
RETURNS TABLE (old_rows bigint, new_rows bigint, old_hash numeric, new_hash numeric, logged bigint)
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_which text;
    v_rel text;
    v_rows bigint;
    v_hash numeric;
BEGIN
    SELECT count(*) INTO logged FROM public.baragg_partition_log l WHERE l.table_name = p_table;
    FOREACH v_which IN ARRAY ARRAY['old', 'new'] LOOP
        v_rel := CASE v_which WHEN 'old' THEN p_table ELSE p_table || '_partitioned' END;
        IF p_table = 'data_bars' THEN
            EXECUTE format('SELECT count(*), COALESCE(sum(pg_catalog.hashtextextended(d::text, 0)), 0) FROM public.%I d '
                           'WHERE NOT EXISTS (SELECT 1 FROM public.baragg_partition_log l WHERE l.table_name = $1 '
                           'AND l.canonical_symbol = d.canonical_symbol AND l.timeframe = d.timeframe AND l.ts_utc = d.ts_utc)',
                           v_rel) INTO v_rows, v_hash USING p_table;
        ELSE
            EXECUTE format('SELECT count(*), COALESCE(sum(pg_catalog.hashtextextended(d::text, 0)), 0) FROM public.%I d '
                           'WHERE NOT EXISTS (SELECT 1 FROM public.baragg_partition_log l WHERE l.table_name = $1 '
                           'AND l.id = d.id)', v_rel) INTO v_rows, v_hash USING p_table;
        END IF;
        IF v_which = 'old' THEN
            old_rows := v_rows; old_hash := v_hash;
        ELSE
            new_rows := v_rows; new_hash := v_hash;
        END IF;
    END LOOP;
    RETURN NEXT;
END
$$;

-- The swap; the caller re-applies the function files in the same transaction. Returns the log entries
-- replayed under the lock.
CREATE OR REPLACE FUNCTION public._baragg_part_swap(p_table text)
RETURNS bigint LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_total bigint := 0;
    v_n bigint;
    i integer;
BEGIN
    EXECUTE format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', p_table);
    -- Bounded: under the lock nothing is logged any more, so the log only shrinks.
    FOR i IN 1 .. 1000000 LOOP
        v_n := public._baragg_part_replay(p_table, 50000);
        EXIT WHEN v_n = 0;
        v_total := v_total + v_n;
    END LOOP;
    PERFORM public._baragg_part_rename(p_table);
    UPDATE public.baragg_partition_progress SET phase = 'done', finished_at = pg_catalog.now()
    WHERE table_name = p_table;
    RETURN v_total;
END
$$;

-- A new install (or any database whose two bar tables are still empty and plain) gets partitioned tables
-- here, except on Citus; a table with rows stays as it is until `baragg db partition`.
CREATE OR REPLACE FUNCTION public._baragg_part_new_install()
RETURNS boolean LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_table text;
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = 'public.data_bars'::regclass) <> 'r'
       OR (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = 'public.derived_data_bars'::regclass) <> 'r'
       OR EXISTS (SELECT 1 FROM public.data_bars) OR EXISTS (SELECT 1 FROM public.derived_data_bars)
       OR EXISTS (SELECT 1 FROM public.baragg_partition_progress)
       -- On a Citus coordinator the bar tables stay plain, to be distributed (`baragg db distribute`):
       -- distributing the partitioned tables is not supported yet (docs/decisions.md).
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_extension e WHERE e.extname = 'citus') THEN
        RETURN false;
    END IF;
    FOREACH v_table IN ARRAY ARRAY['data_bars', 'derived_data_bars'] LOOP
        EXECUTE format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', v_table);
        -- This month and the next two, as baragg_partitions_maintain() keeps them (so that the files
        -- applied with psql give what `db upgrade` gives).
        PERFORM public._baragg_part_clone(v_table, public._baragg_part_months_ahead(2));
        PERFORM public._baragg_part_rename(v_table);
        EXECUTE format('DROP TABLE public.%I', v_table || '_unpartitioned');
    END LOOP;
    RETURN true;
END
$$;

SELECT public._baragg_part_new_install();
