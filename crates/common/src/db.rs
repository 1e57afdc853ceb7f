//! PostgreSQL: one pool per process, per-service schemas and migrations.

use std::{str::FromStr, time::Duration};

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;

use crate::config::Config;

/// Builds the pool and checks one connection, so a wrong URL fails at start, clearly.
pub async fn connect(config: &Config) -> anyhow::Result<Pool> {
    let pg_config = tokio_postgres::Config::from_str(config.database_url.expose_secret())
        .context("FIELDLINE_DATABASE_URL is not a valid PostgreSQL URL")?;
    let manager = Manager::from_config(
        pg_config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.database_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the postgres pool")?;
    let client = pool
        .get()
        .await
        .context("connecting to PostgreSQL (FIELDLINE_DATABASE_URL)")?;
    client
        .simple_query("SELECT 1")
        .await
        .context("PostgreSQL did not answer")?;
    Ok(pool)
}

/// Creates `schema` and applies the service's embedded migrations to it, recording them in
/// `{schema}.refinery_schema_history`. An advisory lock makes concurrent starts (two
/// replicas) apply each migration once.
pub async fn migrate(pool: &Pool, schema: &str, runner: refinery::Runner) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("connecting to PostgreSQL for migrations")?;
    let lock_key = format!("fieldline-migrate-{schema}");
    client
        .execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key])
        .await
        .context("taking the migration lock")?;
    let result = async {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        let mut runner = runner;
        runner.set_migration_table_name(format!("{schema}.refinery_schema_history"));
        let pg: &mut tokio_postgres::Client = &mut client;
        runner
            .run_async(pg)
            .await
            .with_context(|| format!("migrating schema {schema}"))?;
        anyhow::Ok(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
        .await
        .context("releasing the migration lock")?;
    result
}
