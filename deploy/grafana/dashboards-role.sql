-- fieldline_dashboards: the role Grafana's PostgreSQL datasource logs in as. It reads the
-- readings (schema telemetry) and the devices' presence columns (registry.devices), and
-- nothing else: not keys, tokens, device configs, metadata or webhook secrets. Read-only,
-- with a statement timeout, so that a dashboard cannot write or hold the database for long
-- (docs/decisions/2026-12-05-dashboards-and-alerts.md).
--
-- Idempotent; run it as the user that owns Fieldline's schemas, after the services have
-- started once (they create the schemas), and again after an upgrade:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 [-v password=...] -f deploy/grafana/dashboards-role.sql
-- deploy/local/provision.sh runs it for `make run`, the compose `dashboards-role` service
-- for `docker compose --profile observability`, and tests/e2e/dashboards.rs in its test.

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fieldline_dashboards') AS create_role \gset
\if :create_role
CREATE ROLE fieldline_dashboards LOGIN;
\endif
\if :{?password}
ALTER ROLE fieldline_dashboards PASSWORD :'password';
\endif
ALTER ROLE fieldline_dashboards SET default_transaction_read_only = on;
ALTER ROLE fieldline_dashboards SET statement_timeout = '30s';

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO fieldline_dashboards', current_database());
    IF to_regnamespace('telemetry') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA telemetry TO fieldline_dashboards;
        GRANT SELECT ON ALL TABLES IN SCHEMA telemetry TO fieldline_dashboards;
        -- Tables a later migration adds, when the same user runs it.
        ALTER DEFAULT PRIVILEGES IN SCHEMA telemetry GRANT SELECT ON TABLES TO fieldline_dashboards;
    ELSE
        RAISE NOTICE 'fieldline_dashboards: no telemetry schema yet; run this script again (make provision) once query-api has started';
    END IF;
    IF to_regclass('registry.devices') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA registry TO fieldline_dashboards;
        GRANT SELECT (project, id, name, device_type, device_group, status, last_seen,
                      status_changed_at, created_at)
            ON registry.devices TO fieldline_dashboards;
    ELSE
        RAISE NOTICE 'fieldline_dashboards: no registry.devices yet; run this script again (make provision) once device-registry has started';
    END IF;
END
$$;
