-- What a binary COPY of the pg_append benchmark's rows costs on this machine, by index.
--
--   psql -h 127.0.0.1 -U postgres test -f docs/bench/copy_calibration.sql
--
-- 300 000 rows shaped like mageflow_events (200-byte payloads, 1 000 streams interleaved as the
-- benchmark's appenders write them), copied by psql's \copy in binary into four tables: no
-- index, the primary key on position only, the real table's indexes (position primary key and
-- UNIQUE (stream, seq)), and the same again with the rows sorted by stream. Divide 300 000 by
-- each `Time:` for rows/s. Works in a schema of its own (mageflow_copy_calibration), dropped at
-- the end; the binary file goes to /tmp.

\set ON_ERROR_STOP on
DROP SCHEMA IF EXISTS mageflow_copy_calibration CASCADE;
CREATE SCHEMA mageflow_copy_calibration;
SET search_path TO mageflow_copy_calibration;

CREATE TABLE source AS
SELECT g::bigint AS position,
       ('be4c0000-0000-0000-0000-' || lpad(to_hex(g % 1000), 12, '0'))::uuid AS stream,
       (g / 1000 + 1)::bigint AS seq,
       convert_to(repeat('x', 200), 'UTF8') AS payload,
       0::integer AS crc32
FROM generate_series(1, 300000) AS g;
\copy source TO '/tmp/mageflow_copy_calibration.bin' WITH (FORMAT binary)
\copy (SELECT * FROM source ORDER BY stream, seq) TO '/tmp/mageflow_copy_calibration_sorted.bin' WITH (FORMAT binary)

CREATE TABLE no_index (position bigint NOT NULL, stream uuid NOT NULL, seq bigint NOT NULL,
    payload bytea NOT NULL, crc32 integer NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE position_only (LIKE no_index INCLUDING ALL, PRIMARY KEY (position));
CREATE TABLE as_the_log (LIKE no_index INCLUDING ALL, PRIMARY KEY (position),
    UNIQUE (stream, seq), CHECK (position >= 1), CHECK (seq >= 1));
CREATE TABLE as_the_log_sorted (LIKE as_the_log INCLUDING ALL);
CHECKPOINT;

\timing on
\echo no index
\copy no_index (position, stream, seq, payload, crc32) FROM '/tmp/mageflow_copy_calibration.bin' WITH (FORMAT binary)
\echo primary key (position) only
\copy position_only (position, stream, seq, payload, crc32) FROM '/tmp/mageflow_copy_calibration.bin' WITH (FORMAT binary)
\echo primary key (position) and UNIQUE (stream, seq), as mageflow_events
\copy as_the_log (position, stream, seq, payload, crc32) FROM '/tmp/mageflow_copy_calibration.bin' WITH (FORMAT binary)
\echo the same, rows sorted by stream
\copy as_the_log_sorted (position, stream, seq, payload, crc32) FROM '/tmp/mageflow_copy_calibration_sorted.bin' WITH (FORMAT binary)
\timing off

DROP SCHEMA mageflow_copy_calibration CASCADE;
\! rm -f /tmp/mageflow_copy_calibration.bin /tmp/mageflow_copy_calibration_sorted.bin
