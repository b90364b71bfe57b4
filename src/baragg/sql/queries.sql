-- Every runtime query the Python side sends, as named blocks (loaded by baragg.sql).
-- Placeholders are psycopg's: %(name)s.

-- name: migrations_table
CREATE TABLE IF NOT EXISTS baragg_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_lock
SELECT pg_advisory_lock(hashtext('baragg.migrations'));

-- name: migrations_unlock
SELECT pg_advisory_unlock(hashtext('baragg.migrations'));

-- name: migrations_applied
SELECT version, name, checksum, applied_at FROM baragg_schema_migrations ORDER BY version;

-- name: migrations_record
INSERT INTO baragg_schema_migrations (version, name, checksum) VALUES (%(version)s, %(name)s, %(checksum)s);
