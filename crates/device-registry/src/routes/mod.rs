pub mod devices;
pub mod keys;
pub mod projects;
