-- A project's rate limits, overriding the platform's FIELDLINE_RATE_* defaults (like a
-- ThingsBoard tenant profile). A NULL pair keeps the default.
CREATE TABLE registry.project_limits (
    project           text PRIMARY KEY REFERENCES registry.projects (slug) ON DELETE CASCADE,
    key_requests      integer CHECK (key_requests BETWEEN 1 AND 1000000),
    key_period_ms     bigint CHECK (key_period_ms BETWEEN 1000 AND 86400000),
    device_requests   integer CHECK (device_requests BETWEEN 1 AND 1000000),
    device_period_ms  bigint CHECK (device_period_ms BETWEEN 1000 AND 86400000),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((key_requests IS NULL) = (key_period_ms IS NULL)),
    CHECK ((device_requests IS NULL) = (device_period_ms IS NULL))
);
