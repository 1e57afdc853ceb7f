-- Compressed history (issue 19): the readings of closed days move out of the daily partitions
-- into per-series blocks (crates/query-api/src/blocks.rs), written by the compression task
-- (compress.rs). docs/decisions/2026-12-06-compressed-history.md says why.

-- One block: readings of one series within one UTC day, at most 65,536 of them, in time
-- order; blocks of a series never overlap. `count` and the two times let reads pick the
-- blocks of a range, and a page the few it needs, without opening `data`.
CREATE TABLE telemetry.blocks (
    series_id   integer NOT NULL,
    first_ts    timestamptz NOT NULL,
    last_ts     timestamptz NOT NULL,
    count       integer NOT NULL CHECK (count > 0),
    data        bytea NOT NULL,
    PRIMARY KEY (series_id, first_ts),
    CHECK (first_ts <= last_ts AND last_ts < date_trunc('day', first_ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '1 day')
);
-- pco's output does not compress further: keep it out of line, uncompressed (no pglz try).
ALTER TABLE telemetry.blocks ALTER COLUMN data SET STORAGE EXTERNAL;

-- The days that hold blocks. A writer storing readings of one of these days first looks at
-- the blocks of its series, so that a redelivered reading is not stored twice.
CREATE TABLE telemetry.compressed_days (
    day         date PRIMARY KEY
);
