//! What every Fieldline service shares: configuration, logs and metrics, the HTTP envelope
//! and error table, extractors, authentication against the registry, Postgres, NATS, and the
//! service runtime (one HTTP listener, health, graceful shutdown).

pub mod auth;
pub mod bus;
pub mod cache;
pub mod commands;
pub mod config;
pub mod consume;
pub mod db;
pub mod edge;
pub mod envelope;
pub mod error;
pub mod extract;
pub mod ids;
pub mod ingest;
pub mod logthrottle;
pub mod mqtt;
pub mod names;
pub mod openapi;
pub mod ratelimit;
pub mod service;
pub mod spread;
pub mod telemetry;
pub mod time;
pub mod trace;

pub use config::Config;
pub use error::{ApiError, ErrorKind};
pub use service::{Context, Service};
