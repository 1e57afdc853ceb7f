-- Readings: narrow rows, one value column filled per row. The primary key is the natural key
-- (device, time, metric): redelivered batches insert nothing twice (ON CONFLICT DO NOTHING),
-- and its order serves the history query (one device, a time range, all or some metrics).
CREATE TABLE telemetry.readings (
    project     text NOT NULL,
    device_id   text NOT NULL,
    ts          timestamptz NOT NULL,
    metric      text NOT NULL,
    value_num   double precision,
    value_bool  boolean,
    value_text  text,
    PRIMARY KEY (project, device_id, ts, metric),
    CHECK (num_nonnulls(value_num, value_bool, value_text) = 1)
);

-- The newest value of each metric of each device, maintained by the writer, so that
-- /readings/latest is one index lookup whatever the history's size.
CREATE TABLE telemetry.latest (
    project     text NOT NULL,
    device_id   text NOT NULL,
    metric      text NOT NULL,
    ts          timestamptz NOT NULL,
    value_num   double precision,
    value_bool  boolean,
    value_text  text,
    PRIMARY KEY (project, device_id, metric)
);
