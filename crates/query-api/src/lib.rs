//! query-api: the writer (a durable JetStream consumer that stores readings, acking only
//! after commit) and the history routes.

mod aggregate;
pub mod blocks;
mod blockwrite;
pub mod bulk;
pub mod compress;
mod domain;
pub mod export;
mod live;
pub mod maintenance;
mod moves;
mod reads;
mod replicas;
mod repo;
pub use repo::ascending_page_sql;
mod retention;
mod routes;
mod writer;

pub use repo::MAX_DAYS_PER_TRANSACTION;
pub use routes::ROUTES;
pub use writer::CONSUMER as WRITER_CONSUMER;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use actix_web::web;
use anyhow::Context as _;
use deadpool_postgres::{Pool, Runtime};
use fieldline_common::{Config, Context, Service, db::DatabaseSettings};

use crate::{
    reads::Reads,
    replicas::{Replica, Targets},
    repo::Repo,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies the `telemetry` schema's migrations: what `start` does first, and what
/// `fieldline migrate` does for every service without starting any.
pub async fn migrate(pool: &deadpool_postgres::Pool) -> anyhow::Result<()> {
    fieldline_common::db::migrate(pool, "telemetry", embedded::migrations::runner()).await
}

pub(crate) struct State {
    pub repo: Repo,
    pub context: Context,
    /// Live streams open on this process (shared by every HTTP worker).
    pub streams: Arc<live::Streams>,
}

/// Migrates the `telemetry` schema, starts the writer and returns the routes.
pub async fn start(context: &Context) -> anyhow::Result<Service> {
    let pool = context.db().await?;
    migrate(&pool).await?;
    let config = &context.config;
    let primary = DatabaseSettings::from_config(config)
        .map_err(|message| anyhow::anyhow!("FIELDLINE_DATABASE_URL {message}"))?;
    let replicas = config
        .database_read_urls()
        .iter()
        .map(|url| {
            let settings = DatabaseSettings::from_url(url, config)
                .map_err(|message| anyhow::anyhow!("FIELDLINE_DATABASE_READ_URL {message}"))?;
            let replica = Arc::new(Replica::new(settings.hosts()));
            tracing::info!(replica = %settings.shown(), "history reads may go to this replica");
            Ok((settings, replica))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Each HTTP worker (a thread of its own) reads through pools of its own, mostly on the
    // few connections its one-statement reads share (see `reads`): one for the primary and
    // one for each replica, each replica given the same connections as the primary's reads.
    let targets = read_pool_sizes(config.database_pool_size, config.http_worker_count())
        .into_iter()
        .map(|size| {
            // A pool of one keeps its connection for exports and shares none.
            let shared = config.query_shared_connections.min(size.saturating_sub(1));
            let reads = |settings: &DatabaseSettings| {
                anyhow::Ok(Arc::new(Reads::new(
                    query_pool(config, settings, size)?,
                    shared,
                )))
            };
            let on_replicas = replicas
                .iter()
                .map(|(settings, replica)| Ok((reads(settings)?, Arc::clone(replica))))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Arc::new(Targets::new(reads(&primary)?, on_replicas)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let probes = replicas
        .iter()
        .map(|(settings, replica)| Ok((Arc::clone(replica), replicas::probe_pool(settings)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    replicas::start_probe(context, pool.clone(), probes);
    let repo = Repo::new(pool, Arc::clone(&targets[0]), Arc::clone(&context.config));
    maintenance::start(context, repo.clone());
    writer::start(context, repo.clone()).await?;

    // A connection's I/O runs on the thread that opened it, so a request then never waits on
    // another thread's wake-up for its rows.
    let streams = Arc::new(live::Streams::default());
    let states: Vec<web::Data<State>> = targets
        .into_iter()
        .map(|targets| {
            web::Data::new(State {
                repo: repo.with_targets(targets),
                context: context.clone(),
                streams: Arc::clone(&streams),
            })
        })
        .collect();
    let next = AtomicUsize::new(0);
    let routes = Arc::new(move |cfg: &mut web::ServiceConfig| {
        let worker = next.fetch_add(1, Ordering::Relaxed);
        cfg.app_data(states[worker % states.len()].clone());
        routes::configure(cfg);
    });
    Ok(Service {
        name: "query-api",
        routes: Some(routes),
        ready: None,
    })
}

/// Fewest connections in one read pool: an export holds one for as long as its client
/// reads, and the worker's other requests need the rest.
const MIN_READ_POOL: usize = 4;

/// The sizes of the read pools: `total` connections split among one pool per HTTP worker,
/// or among fewer pools (shared by workers in turn) when each would get under
/// [`MIN_READ_POOL`]. The sizes add up to `total`.
fn read_pool_sizes(total: usize, workers: usize) -> Vec<usize> {
    let pools = (total / MIN_READ_POOL).clamp(1, workers.max(1));
    (0..pools)
        .map(|index| total / pools + usize::from(index < total % pools))
        .collect()
}

/// How the read connections plan (`plan_cache_mode`): a custom plan for every run, see
/// [`query_pool`]. The bench's SQL limits plan the same way.
pub const READ_PLAN_CACHE_MODE: &str = "force_custom_plan";

/// A pool of the read routes (on the primary or a replica): its own connections, each with
/// `statement_timeout`, so the writer (on the process's shared pool) is never cancelled and a
/// heavy read cannot run on.
fn query_pool(config: &Config, settings: &DatabaseSettings, size: usize) -> anyhow::Result<Pool> {
    let manager = settings.manager(|pg_config| {
        // Custom plans always: reads are prepared once per connection and run with new
        // times each time. A generic plan prunes partitions only when it runs, and
        // PostgreSQL 15 first locks every partition it names, all of them for a range it
        // cannot see: with thousands of daily partitions, "out of shared memory". A custom
        // plan prunes by the actual range while planning and locks the survivors only.
        pg_config.options(format!(
            "-c statement_timeout={} -c plan_cache_mode={READ_PLAN_CACHE_MODE}",
            config.query_statement_timeout.as_millis().max(1)
        ));
    })?;
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the query pool")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_pools_add_up_to_the_configured_size() {
        assert_eq!(read_pool_sizes(16, 2), vec![8, 8]);
        assert_eq!(read_pool_sizes(16, 3), vec![6, 5, 5]);
        // 32 workers share 4 pools of 4 rather than hold 1 connection each.
        assert_eq!(read_pool_sizes(16, 32), vec![4, 4, 4, 4]);
        assert_eq!(read_pool_sizes(2, 8), vec![2]);
        assert_eq!(read_pool_sizes(1, 1), vec![1]);
    }
}
