-- 0006: who holds a lease, down to the database session (issue 14: a PostgreSQL restart during a run
-- left the task `running` for its whole lease).
-- Tables only; the functions that use the columns are in functions/20_scheduling.sql.
--
-- Each baragg worker connection holds a session-level advisory lock, pg_advisory_lock(1650553447, key)
-- with a random key, for as long as the connection lives; a claim records that key (and the backend
-- pid, for the operator) with the lease. A session-level advisory lock dies with its session: when
-- the worker process is killed, its connection is cut, or the server restarts. A claim then takes
-- over a running task whose lease_session no longer holds its lock at once, instead of waiting for
-- lease_expires_at, and records why in last_rescue. Rows claimed without a lock (the seed's
-- agg_start callers, or a worker behind a transaction pooler) have no lease_session and wait for the
-- lease as before.
--
-- Re-runnable (ADD COLUMN IF NOT EXISTS), so it also applies with psql -f.

ALTER TABLE data_agg_state
    ADD COLUMN IF NOT EXISTS lease_session integer,
    ADD COLUMN IF NOT EXISTS lease_backend_pid integer;

COMMENT ON COLUMN data_agg_state.lease_session IS
    'key of the advisory lock (classid 1650553447) held by the session of the lease owner; NULL: none';
COMMENT ON COLUMN data_agg_state.lease_backend_pid IS
    'pg_backend_pid() of the session that claimed the task (for pg_stat_activity); informational';
