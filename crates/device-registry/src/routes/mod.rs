pub mod alert_rules;
pub mod commands;
pub mod config;
pub mod devices;
pub mod keys;
pub mod projects;
