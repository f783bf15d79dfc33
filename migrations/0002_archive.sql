-- Cold storage of the PostgreSQL event log (crates/mageflow-store-pg, `PgLog::compact`).
-- Append-only like every migration: change the schema with a new numbered file.
--
-- One row per compacted stream: its oldest events, moved out of mageflow_events in one
-- transaction, as one compressed segment. Archived seqs are dense from 1 (first_seq is always
-- 1); the stream's live rows in mageflow_events, if any, continue at last_seq + 1. A stream's
-- version is GREATEST(max live seq, last_seq).

CREATE TABLE mageflow_archive (
    stream        uuid        NOT NULL,
    -- The archived events are seqs first_seq..=last_seq of the stream (first_seq = 1).
    first_seq     bigint      NOT NULL,
    last_seq      bigint      NOT NULL,
    -- Number of archived events (= last_seq - first_seq + 1).
    events        bigint      NOT NULL,
    -- Size of the segment before compression.
    raw_bytes     bigint      NOT NULL,
    -- zstd over the concatenation, in seq order, of every archived event as a 4-byte
    -- little-endian length followed by the event as mageflow_core::codec::encode writes it
    -- (the very bytes its mageflow_events row held).
    segment       bytea       NOT NULL,
    -- CRC-32 (IEEE) of segment (the compressed bytes), as a signed 32-bit integer.
    crc32         integer     NOT NULL,
    -- Opaque bytes given by the caller of compact (the engine: a snapshot of the final state).
    snapshot      bytea       NULL,
    -- Highest global position among the archived events. A committer of another process that
    -- catches up on the commits it missed (positions (a, b]) reads stream versions from the
    -- live rows in that range AND from archive rows whose last_position is in it, since those
    -- live rows may have been compacted away in the meantime.
    last_position bigint      NOT NULL,
    compacted_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mageflow_archive_pkey PRIMARY KEY (stream),
    CONSTRAINT mageflow_archive_first_seq CHECK (first_seq = 1),
    CONSTRAINT mageflow_archive_seqs CHECK (last_seq >= first_seq AND events = last_seq - first_seq + 1),
    CONSTRAINT mageflow_archive_last_position_positive CHECK (last_position >= 1)
);

CREATE INDEX mageflow_archive_last_position ON mageflow_archive (last_position);
