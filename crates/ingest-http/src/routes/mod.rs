//! The routes of ingest-http.

mod backfill;
mod device;
mod ingest;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    ingest::configure(cfg);
    device::configure(cfg);
    backfill::configure(cfg);
}
