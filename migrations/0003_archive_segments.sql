-- A stream's archive becomes a run of segments (crates/mageflow-store/src/segment.rs): each
-- compaction adds rows for the events it moves, of about 8 MiB uncompressed each, instead of
-- rewriting one ever-growing row. A stream's segments cover its seqs densely from 1; its live
-- rows in mageflow_events continue after the last one. A stream's version is
-- GREATEST(max live seq, max last_seq).
--
-- Snapshots move to a table of their own: one per stream, whatever its number of segments.

CREATE TABLE mageflow_snapshot (
    stream   uuid        NOT NULL,
    -- Opaque bytes given by the caller of compact (the engine: a snapshot of the final state).
    snapshot bytea       NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mageflow_snapshot_pkey PRIMARY KEY (stream)
);

INSERT INTO mageflow_snapshot (stream, snapshot, taken_at)
    SELECT stream, snapshot, compacted_at FROM mageflow_archive WHERE snapshot IS NOT NULL;

ALTER TABLE mageflow_archive DROP COLUMN snapshot;
ALTER TABLE mageflow_archive DROP CONSTRAINT mageflow_archive_first_seq;
ALTER TABLE mageflow_archive DROP CONSTRAINT mageflow_archive_pkey;
ALTER TABLE mageflow_archive ADD CONSTRAINT mageflow_archive_pkey PRIMARY KEY (stream, first_seq);
ALTER TABLE mageflow_archive ADD CONSTRAINT mageflow_archive_first_seq CHECK (first_seq >= 1);
