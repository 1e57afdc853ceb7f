//! query-api: the writer (a durable JetStream consumer that stores readings, acking only
//! after commit) and the history routes.

mod domain;
mod repo;
mod routes;
mod writer;

pub use routes::ROUTES;
pub use writer::CONSUMER as WRITER_CONSUMER;

use std::sync::Arc;

use actix_web::web;
use fieldline_common::{Context, Service};

use crate::repo::Repo;

mod embedded {
    refinery::embed_migrations!("migrations");
}

pub(crate) struct State {
    pub repo: Repo,
    pub context: Context,
}

/// Migrates the `telemetry` schema, starts the writer and returns the routes.
pub async fn start(context: &Context) -> anyhow::Result<Service> {
    let pool = context.db().await?;
    fieldline_common::db::migrate(&pool, "telemetry", embedded::migrations::runner()).await?;
    let repo = Repo::new(pool);
    writer::start(context, repo.clone()).await?;

    let state = web::Data::new(State {
        repo,
        context: context.clone(),
    });
    let routes = Arc::new(move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state.clone());
        routes::configure(cfg);
    });
    Ok(Service {
        name: "query-api",
        routes: Some(routes),
        ready: None,
    })
}
