//! Types that parse request bodies.

pub mod csv_readings;
