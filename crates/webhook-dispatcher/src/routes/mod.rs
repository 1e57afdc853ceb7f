pub mod deliveries;
pub mod edgesense;
pub mod webhooks;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    webhooks::configure(cfg);
    deliveries::configure(cfg);
    edgesense::configure(cfg);
}
