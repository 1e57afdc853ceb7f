//! webhook-dispatcher: third parties register webhooks and receive signed events
//! (`device.data`, `device.alert`, `device.status`, `config.update`) with durable retries,
//! auto-disable by time spent failing, delivery logs, replay and retention.

mod dispatcher;
mod domain;
mod fanout;
mod repo;
mod retention;
mod routes;
mod shape;
pub mod signing;
mod ssrf;

use std::sync::Arc;

use actix_web::web;
use fieldline_common::{Context, Service};

use crate::{dispatcher::Dispatcher, fanout::Targets, repo::Repo};
pub use crate::{
    fanout::{DATA_CONSUMER, EVENTS_CONSUMER},
    routes::ROUTES,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies the `webhooks` schema's migrations: what `start` does first, and what
/// `fieldline migrate` does for every service without starting any.
pub async fn migrate(pool: &deadpool_postgres::Pool) -> anyhow::Result<()> {
    fieldline_common::db::migrate(pool, "webhooks", embedded::migrations::runner()).await
}

pub(crate) struct State {
    pub repo: Repo,
    pub context: Context,
    pub dispatcher: Arc<Dispatcher>,
}

impl State {
    /// A webhook of `project` changed: drop cached webhook sets here and, over the bus, in
    /// every other dispatcher.
    pub async fn changed(&self, project: &str, webhook_id: &str) {
        self.dispatcher.broadcast_change(project, webhook_id).await;
    }
}

/// Migrates the `webhooks` schema, starts fan-out and the delivery loop, returns the routes.
pub async fn start(context: &Context) -> anyhow::Result<Service> {
    let pool = context.db().await?;
    migrate(&pool).await?;
    let repo = Repo::new(pool);
    let targets = Targets::new(repo.clone(), context.config.auth_cache_ttl);
    let dispatcher = Dispatcher::new(context, repo.clone(), targets.clone())?;
    targets.listen(context).await?;
    fanout::start(context, repo.clone(), targets.clone(), dispatcher.clone()).await?;
    context.tasks.spawn(dispatcher.clone().run());
    context.tasks.spawn(dispatcher.clone().record());
    context
        .tasks
        .spawn(report_queue_depth(context.clone(), repo.clone()));
    context
        .tasks
        .spawn(retention::run(context.clone(), repo.clone()));

    let state = web::Data::new(State {
        repo,
        context: context.clone(),
        dispatcher,
    });
    let routes = Arc::new(move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state.clone());
        routes::configure(cfg);
    });
    Ok(Service {
        name: "webhook-dispatcher",
        routes: Some(routes),
        ready: None,
    })
}

/// `fieldline_webhook_queue_depth` (deliveries waiting) and `fieldline_webhooks_disabled`,
/// every 5 s; each instance reports the same, as both are counted in the database.
async fn report_queue_depth(context: Context, repo: Repo) {
    // From 0, so that the first failed delivery is an increase an alert sees.
    for result in ["succeeded", "failed"] {
        metrics::counter!("fieldline_webhook_deliveries_total", "result" => result).increment(0);
    }
    loop {
        if let Ok(depth) = repo.pending_count().await {
            metrics::gauge!("fieldline_webhook_queue_depth").set(depth as f64);
        }
        if let Ok(disabled) = repo.disabled_count().await {
            metrics::gauge!("fieldline_webhooks_disabled").set(disabled as f64);
        }
        tokio::select! {
            _ = context.shutdown.cancelled() => break,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}
