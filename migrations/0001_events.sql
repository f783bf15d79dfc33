-- The PostgreSQL event log (crates/mageflow-store-pg). Append-only: change the schema with a new
-- numbered file, never by editing this one (sqlx checks every applied file's checksum).
--
-- One row per event. Only the log's committer writes these tables, always inside a transaction
-- that first locks the single row of mageflow_head: positions are assigned under that lock, so
-- they are dense and commit in order, whatever the number of writing processes.

CREATE TABLE mageflow_events (
    -- Global position: 1-based, dense, in commit order.
    position    bigint      NOT NULL,
    -- The stream (one root workflow) and the event's sequence number in it (1-based, dense).
    stream      uuid        NOT NULL,
    seq         bigint      NOT NULL,
    -- The event, as mageflow_core::codec::encode writes it (versioned MessagePack).
    payload     bytea       NOT NULL,
    -- CRC-32 (IEEE) of payload, as a signed 32-bit integer. Data-page checksums are off by
    -- default in PostgreSQL; this lets every read detect a silently altered payload.
    crc32       integer     NOT NULL,
    -- When the committing transaction started (informational; event time is inside payload).
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mageflow_events_pkey PRIMARY KEY (position),
    -- Optimistic concurrency's last line of defence: a stream never has two events with one seq.
    CONSTRAINT mageflow_events_stream_seq UNIQUE (stream, seq),
    CONSTRAINT mageflow_events_position_positive CHECK (position >= 1),
    CONSTRAINT mageflow_events_seq_positive CHECK (seq >= 1)
);

-- The last committed position. Exactly one row; committers lock it (SELECT ... FOR UPDATE) for
-- the whole of their transaction and set it to the group's last position before COMMIT.
CREATE TABLE mageflow_head (
    id       boolean NOT NULL DEFAULT true,
    position bigint  NOT NULL,
    CONSTRAINT mageflow_head_pkey PRIMARY KEY (id),
    CONSTRAINT mageflow_head_single_row CHECK (id),
    CONSTRAINT mageflow_head_position_non_negative CHECK (position >= 0)
);

INSERT INTO mageflow_head (id, position) VALUES (true, 0);
