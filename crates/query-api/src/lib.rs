//! query-api: the writer (a durable JetStream consumer that stores readings, acking only
//! after commit) and the history routes.

mod aggregate;
pub mod bulk;
mod domain;
mod export;
mod live;
mod maintenance;
mod moves;
mod reads;
mod repo;
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
use fieldline_common::{Config, Context, Service};

use crate::{reads::Reads, repo::Repo};

mod embedded {
    refinery::embed_migrations!("migrations");
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
    fieldline_common::db::migrate(&pool, "telemetry", embedded::migrations::runner()).await?;
    let reads = read_pool_sizes(
        context.config.database_pool_size,
        context.config.http_worker_count(),
    )
    .into_iter()
    .map(|size| {
        // A pool of one keeps its connection for exports and shares none.
        let shared = context
            .config
            .query_shared_connections
            .min(size.saturating_sub(1));
        Ok(Arc::new(Reads::new(
            query_pool(&context.config, size)?,
            shared,
        )))
    })
    .collect::<anyhow::Result<Vec<_>>>()?;
    let repo = Repo::new(pool, Arc::clone(&reads[0]), Arc::clone(&context.config));
    maintenance::start(context, repo.clone());
    writer::start(context, repo.clone()).await?;

    // Each HTTP worker (a thread of its own) reads through a pool of its own, mostly on the
    // few connections its one-statement reads share (see `reads`). A connection's I/O runs
    // on the thread that opened it, so a request then never waits on another thread's
    // wake-up for its rows.
    let streams = Arc::new(live::Streams::default());
    let states: Vec<web::Data<State>> = reads
        .into_iter()
        .map(|reads| {
            web::Data::new(State {
                repo: repo.with_reads(reads),
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

/// The pool of the read routes: its own connections, each with `statement_timeout`, so the
/// writer (on the process's shared pool) is never cancelled and a heavy read cannot run on.
fn query_pool(config: &Config, size: usize) -> anyhow::Result<Pool> {
    let settings = fieldline_common::db::DatabaseSettings::from_config(config)
        .map_err(|message| anyhow::anyhow!("FIELDLINE_DATABASE_URL {message}"))?;
    let manager = settings.manager(|pg_config| {
        // Custom plans always: reads are prepared once per connection and run with new
        // times each time. A generic plan prunes partitions only when it runs, and
        // PostgreSQL 15 first locks every partition it names, all of them for a range it
        // cannot see: with thousands of daily partitions, "out of shared memory". A custom
        // plan prunes by the actual range while planning and locks the survivors only.
        pg_config.options(format!(
            "-c statement_timeout={} -c plan_cache_mode=force_custom_plan",
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
