//! The admin commands: what scripts and CI do with a platform, over its HTTP API (and, for
//! `migrate`, straight to its database). Each prints the API's `data` as JSON
//! (`--output json`) or a table, and a failure as the API's error message, exiting 1.

mod client;
mod ops;
mod output;
mod readings;
mod resources;

use std::{process::ExitCode, time::Duration};

use clap::{Args, Subcommand};

pub use self::output::Output;
use self::{
    client::{Client, Failure},
    readings::ReadingsCommand,
    resources::{AlertsCommand, DevicesCommand, KeysCommand, WebhooksCommand},
};

/// Where the platform is and how to talk to it; every API command takes these.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The platform's base URL.
    #[arg(
        long,
        env = "FIELDLINE_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// An API key of the project (its scopes decide what the commands may do).
    #[arg(long, env = "FIELDLINE_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// `table` for people, `json` (the API's `data`) for scripts.
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// Seconds to wait for an answer (an import waits this long for each request).
    #[arg(long, default_value_t = 60, global = true)]
    pub timeout: u64,
}

impl Connection {
    fn client(&self) -> client::Result<Client> {
        Client::new(
            &self.url,
            self.api_key.clone().filter(|key| !key.is_empty()),
            Duration::from_secs(self.timeout.max(1)),
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Devices: list, get, create (its token is shown once), delete, rotate-token.
    Devices {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// API keys: list, create (its secret is shown once), rotate, revoke.
    Keys {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Webhooks: list, create, delete, test, enable, recover, deliveries.
    Webhooks {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Alerts: the rules, creating one, and the alerts firing now.
    Alerts {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Readings: query (raw or aggregated), latest, export (CSV or NDJSON), import a CSV.
    Readings {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: ReadingsCommand,
    },
    /// Apply every service's database migrations and exit (FIELDLINE_DATABASE_URL), as each
    /// service does when it starts: for a deploy step that runs before the new version.
    Migrate,
    /// Exit 0 when the platform answers ready (`GET /health/ready`), 1 otherwise: for a
    /// Docker HEALTHCHECK. The URL defaults to FIELDLINE_URL, else this host's
    /// FIELDLINE_HTTP_ADDR, else http://127.0.0.1:8080.
    Healthcheck {
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

/// Runs one admin command; a failure is printed as `error: …` and exits 1.
pub async fn run(admin: Admin) -> ExitCode {
    let result = match admin {
        Admin::Devices {
            connection,
            command,
        } => command.run(&connection).await,
        Admin::Keys {
            connection,
            command,
        } => command.run(&connection).await,
        Admin::Webhooks {
            connection,
            command,
        } => command.run(&connection).await,
        Admin::Alerts {
            connection,
            command,
        } => command.run(&connection).await,
        Admin::Readings {
            connection,
            command,
        } => command.run(&connection).await,
        Admin::Migrate => ops::migrate().await,
        Admin::Healthcheck { url, timeout } => ops::healthcheck(url, timeout).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
