pub mod query;
pub mod readings;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    readings::configure(cfg);
    query::configure(cfg);
}
