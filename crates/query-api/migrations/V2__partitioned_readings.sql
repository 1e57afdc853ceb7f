-- Readings at scale (issue 5): one integer per series instead of three strings per row, daily
-- range partitions on time, per-series statistics and latest values in the dictionary row,
-- and hourly and daily rollups. docs/decisions/2026-11-22-readings-partitions.md says why.

ALTER TABLE telemetry.readings RENAME TO readings_v1;
ALTER TABLE telemetry.readings_v1 RENAME CONSTRAINT readings_pkey TO readings_v1_pkey;
ALTER TABLE telemetry.readings_v1 RENAME CONSTRAINT readings_check TO readings_v1_check;
ALTER TABLE telemetry.latest RENAME TO latest_v1;

-- The dictionary: one row per (project, device, metric), and the one-lookup answer to "latest"
-- and "/metrics" (first and last time, count), kept current by the writer in the transaction
-- that stores the readings. Updates change no indexed column, so they stay HOT (fillfactor).
CREATE TABLE telemetry.series (
    series_id   integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project     text NOT NULL,
    device_id   text NOT NULL,
    metric      text NOT NULL,
    count       bigint NOT NULL DEFAULT 0,
    first_ts    timestamptz,
    last_ts     timestamptz,
    last_num    double precision,
    last_bool   boolean,
    last_text   text,
    UNIQUE (project, device_id, metric)
) WITH (fillfactor = 70);

-- Narrow rows: 4-byte series id, time, one value. The primary key is the natural key (a
-- redelivered batch inserts nothing) and, in this order, the index every read uses: one
-- series, a time range, in time order. It carries the numeric value (INCLUDE), so numeric
-- aggregates are index-only scans: a series' rows are spread over as many heap pages as
-- readings (they arrive interleaved with every other series), but sit together in the index.
CREATE TABLE telemetry.readings (
    series_id   integer NOT NULL,
    ts          timestamptz NOT NULL,
    value_num   double precision,
    value_bool  boolean,
    value_text  text,
    PRIMARY KEY (series_id, ts) INCLUDE (value_num),
    CHECK (num_nonnulls(value_num, value_bool, value_text) = 1)
) PARTITION BY RANGE (ts);

-- Rollups: per series and UTC hour (day), everything an aggregate needs to be combined again:
-- count of readings, and over the numeric ones count, sum, min, max, first and last (with
-- their times, so partial buckets merge exactly).
CREATE TABLE telemetry.rollup_1h (
    series_id   integer NOT NULL,
    bucket      timestamptz NOT NULL,
    count       bigint NOT NULL,
    num_count   bigint NOT NULL,
    sum         double precision,
    min         double precision,
    max         double precision,
    first_ts    timestamptz,
    first_num   double precision,
    last_ts     timestamptz,
    last_num    double precision,
    PRIMARY KEY (series_id, bucket)
);
CREATE TABLE telemetry.rollup_1d (LIKE telemetry.rollup_1h INCLUDING ALL);

-- Per-project retention, overriding the service's defaults (FIELDLINE_READINGS_RETENTION,
-- FIELDLINE_ROLLUPS_RETENTION). NULL means "the default"; 'infinity' is not an interval, so
-- "keep forever" for one project is a very long interval ('1000 years').
CREATE TABLE telemetry.retention (
    project     text PRIMARY KEY,
    readings    interval CHECK (readings > interval '0'),
    rollups     interval CHECK (rollups > interval '0')
);

-- Epoch microseconds as float8 (exact below 2^53 µs, year 2255): the sort key that lets
-- min(ARRAY[epoch_us(ts), value])[2] pick the first value of a group without sorting it.
CREATE FUNCTION telemetry.epoch_us(ts timestamptz) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (extract(epoch FROM ts) * 1000000)::double precision;

-- Creates the daily partition holding `day` (UTC) unless it exists. Safe when several
-- writers or maintenance tasks call it at once: the advisory lock serializes creators.
CREATE FUNCTION telemetry.ensure_readings_partition(day date) RETURNS boolean
    LANGUAGE plpgsql AS $$
DECLARE
    name text := 'readings_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass('telemetry.' || name) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('fieldline-telemetry-partitions'));
    IF to_regclass('telemetry.' || name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE telemetry.%I PARTITION OF telemetry.readings FOR VALUES FROM (%L) TO (%L)',
        name,
        (day::timestamp AT TIME ZONE 'UTC'),
        ((day + 1)::timestamp AT TIME ZONE 'UTC'));
    RETURN true;
END
$$;

-- Recomputes the rollups of `ids` for the UTC days of [from_ts, to_ts) from raw readings
-- (bulk loads and this migration; the writer maintains them incrementally). `IN (SELECT
-- unnest(ids))` rather than `= ANY(ids)`: a hash join, not a scan of the array per row.
CREATE FUNCTION telemetry.rebuild_rollups(ids integer[], from_ts timestamptz, to_ts timestamptz)
    RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    lo timestamptz := date_bin('1 day', from_ts, timestamptz '1970-01-01 00:00:00+00');
    hi timestamptz := date_bin('1 day', to_ts, timestamptz '1970-01-01 00:00:00+00') + interval '1 day';
    table_name text;
    width interval;
BEGIN
    FOR table_name, width IN VALUES ('rollup_1h', interval '1 hour'), ('rollup_1d', interval '1 day') LOOP
        EXECUTE format('DELETE FROM telemetry.%I WHERE series_id IN (SELECT unnest($1)) AND bucket >= $2 AND bucket < $3', table_name)
            USING ids, lo, hi;
        EXECUTE format(
            'INSERT INTO telemetry.%I
             SELECT series_id, date_bin($4, ts, timestamptz ''1970-01-01 00:00:00+00''),
                    count(*), count(value_num), sum(value_num), min(value_num), max(value_num),
                    min(ts) FILTER (WHERE value_num IS NOT NULL),
                    (min(ARRAY[telemetry.epoch_us(ts), value_num]) FILTER (WHERE value_num IS NOT NULL))[2],
                    max(ts) FILTER (WHERE value_num IS NOT NULL),
                    (max(ARRAY[telemetry.epoch_us(ts), value_num]) FILTER (WHERE value_num IS NOT NULL))[2]
             FROM telemetry.readings
             WHERE series_id IN (SELECT unnest($1)) AND ts >= $2 AND ts < $3
             GROUP BY 1, 2', table_name)
            USING ids, lo, hi, width;
    END LOOP;
END
$$;

-- Recomputes count, first and last time and the latest value of `ids` from raw readings.
CREATE FUNCTION telemetry.rebuild_series_stats(ids integer[]) RETURNS void
    LANGUAGE sql AS $$
    UPDATE telemetry.series s
       SET count = agg.n, first_ts = agg.first_ts, last_ts = agg.last_ts,
           last_num = newest.value_num, last_bool = newest.value_bool, last_text = newest.value_text
      FROM (SELECT series_id, count(*) AS n, min(ts) AS first_ts, max(ts) AS last_ts
              FROM telemetry.readings WHERE series_id IN (SELECT unnest(ids)) GROUP BY series_id) agg
      JOIN LATERAL (SELECT value_num, value_bool, value_text FROM telemetry.readings r
                     WHERE r.series_id = agg.series_id ORDER BY ts DESC LIMIT 1) newest ON true
     WHERE s.series_id = agg.series_id;
$$;

-- Existing rows (development databases only: no production data exists yet).
INSERT INTO telemetry.series (project, device_id, metric)
SELECT DISTINCT project, device_id, metric FROM telemetry.readings_v1;

SELECT telemetry.ensure_readings_partition(day)
FROM (SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS day FROM telemetry.readings_v1) days;

INSERT INTO telemetry.readings (series_id, ts, value_num, value_bool, value_text)
SELECT s.series_id, r.ts, r.value_num, r.value_bool, r.value_text
FROM telemetry.readings_v1 r
JOIN telemetry.series s USING (project, device_id, metric);

SELECT telemetry.rebuild_series_stats(array_agg(series_id)) FROM telemetry.series;
SELECT telemetry.rebuild_rollups(array_agg(series_id), min(first_ts), max(last_ts) + interval '1 microsecond')
FROM telemetry.series WHERE first_ts IS NOT NULL HAVING count(*) > 0;

DROP TABLE telemetry.readings_v1;
DROP TABLE telemetry.latest_v1;
