//! device-registry: projects, API keys, devices and their tokens; the authority every other
//! service asks (over `{prefix}.rpc.auth.*`) who a credential belongs to.

mod broker;
mod consumer;
pub mod domain;
mod outbox;
mod repo;
mod routes;

pub use crate::routes::ROUTES;

use std::sync::Arc;

use actix_web::web;
use fieldline_common::{Context, Service, auth::hash_secret, ids::random_id};
use fieldline_proto::{InvalidateKind, v1::Invalidate};
use prost::Message;
use secrecy::ExposeSecret;

use tokio::sync::Notify;

use crate::{
    broker::BrokerAccounts,
    domain::{API_KEY_PREFIX, new_api_key_secret, secret_prefix, tokens::DeviceTokens},
    outbox::Messages,
    repo::Repo,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies the `registry` schema's migrations: what `start` does first, and what
/// `fieldline migrate` does for every service without starting any.
pub async fn migrate(pool: &deadpool_postgres::Pool) -> anyhow::Result<()> {
    fieldline_common::db::migrate(pool, "registry", embedded::migrations::runner()).await
}

/// Shared by the registry's handlers.
pub(crate) struct State {
    pub repo: Repo,
    pub context: Context,
    /// Wakes the outbox relay after a commit that queued bus messages.
    pub outbox_wake: Arc<Notify>,
    /// Issues device tokens (derived from `device_token_key` when set).
    pub tokens: DeviceTokens,
    /// The devices' accounts on the MQTT broker.
    pub broker: BrokerAccounts,
}

impl State {
    /// Tells every service to drop what it cached of `kind` (the change is already durable;
    /// a lost broadcast only delays it to the cache TTL).
    pub async fn broadcast_invalidation(&self, kind: InvalidateKind, project: &str, id: &str) {
        // This process answers next, so its own cache is cleared before the response rather than
        // when its subscription gets round to the broadcast; other processes follow the bus.
        self.context.auth.invalidate(kind, project, id);
        let message = Invalidate {
            project: project.to_owned(),
            id: id.to_owned(),
        };
        let subject = self.context.subjects.invalidate(kind);
        if let Err(error) = self
            .context
            .nats
            .publish(subject, message.encode_to_vec().into())
            .await
        {
            tracing::warn!(error = %error, "could not broadcast an invalidation");
        }
        let _ = self.context.nats.flush().await;
    }
}

/// Migrates the `registry` schema, bootstraps an empty registry, starts the RPC responders and
/// returns the routes.
pub async fn start(context: &Context) -> anyhow::Result<Service> {
    let pool = context.db().await?;
    migrate(&pool).await?;
    let repo = Repo::new(pool, Messages::new(context.subjects.clone()));
    bootstrap(context, &repo).await?;
    consumer::start_rpc(context, repo.clone()).await?;
    consumer::device_rpc::start(context, repo.clone()).await?;
    let outbox_wake = Arc::new(Notify::new());
    outbox::start_relay(context, repo.clone(), outbox_wake.clone());
    consumer::state::start(context, repo.clone(), outbox_wake.clone()).await?;
    let tokens = DeviceTokens::new(context.config.device_token_key.clone());
    check_token_key(&tokens, &repo).await?;
    let broker = BrokerAccounts::start(context, repo.clone())?;

    let state = web::Data::new(State {
        repo,
        context: context.clone(),
        outbox_wake,
        tokens,
        broker,
    });
    let routes = Arc::new(move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(state.clone());
        routes::projects::configure(cfg);
        routes::keys::configure(cfg);
        routes::devices::configure(cfg);
        routes::config::configure(cfg);
        routes::commands::configure(cfg);
        routes::alert_rules::configure(cfg);
        routes::limits::configure(cfg);
        routes::dead_letters::configure(cfg);
    });
    Ok(Service {
        name: "device-registry",
        routes: Some(routes),
        ready: None,
    })
}

/// Refuses a token key other than the one this registry's tokens were derived from: with
/// it, every device's broker account would get a password its device does not have.
async fn check_token_key(tokens: &DeviceTokens, repo: &Repo) -> anyhow::Result<()> {
    let Some(digest) = tokens.fingerprint("fieldline token key check") else {
        return Ok(());
    };
    let recorded = repo.token_key_digest(&digest).await?;
    anyhow::ensure!(
        recorded == digest,
        "FIELDLINE_DEVICE_TOKEN_KEY is not the key this registry's device tokens were derived from; start it with that key"
    );
    Ok(())
}

async fn bootstrap(context: &Context, repo: &Repo) -> anyhow::Result<()> {
    let configured = context
        .config
        .bootstrap_admin_key
        .as_ref()
        .map(|key| key.expose_secret().to_owned());
    if let Some(secret) = &configured {
        anyhow::ensure!(
            secret.starts_with(API_KEY_PREFIX) && secret.len() >= 20,
            "FIELDLINE_BOOTSTRAP_ADMIN_KEY must start with {API_KEY_PREFIX} and be at least 20 characters"
        );
    }
    let secret = configured.clone().unwrap_or_else(new_api_key_secret);
    let created = repo
        .bootstrap(
            &hash_secret(&secret),
            &secret_prefix(&secret),
            &random_id("key_", 20),
        )
        .await?;
    if created {
        tracing::info!(
            project = "default",
            "bootstrapped project default and the platform admin key"
        );
        if configured.is_none() {
            // Printed once to stderr, outside the structured logs (which never carry secrets);
            // where stderr is collected, take the key from there once and rotate it.
            eprintln!("\nfieldline: platform admin key (shown once, store it now): {secret}\n");
        }
    }
    Ok(())
}
