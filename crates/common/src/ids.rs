//! Identifiers that cross the API and the bus, parsed once at the edge.

use std::fmt;

use rand::{Rng, distr::Alphanumeric};
use serde::Serialize;

use crate::error::ApiError;

fn valid_token(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! token_id {
    ($name:ident, $what:literal, $reason:literal) => {
        #[doc = concat!("A ", $what, ": `[A-Za-z0-9_-]{1,64}`, safe as a subject token and topic level.")]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, ApiError> {
                if valid_token(value) {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(ApiError::bad_request(
                        $reason,
                        format!(concat!($what, " {:?} is invalid: use 1 to 64 of [A-Za-z0-9_-]"), value),
                    ))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

token_id!(DeviceId, "device id", "invalid_device_id");
token_id!(ProjectSlug, "project slug", "invalid_project");

/// `prefix` followed by `len` random alphanumerics from a CSPRNG: ids (`key_…`) and secrets
/// (`flk_…`, `fld_…`).
pub fn random_id(prefix: &str, len: usize) -> String {
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    id.extend(
        rand::rng()
            .sample_iter(Alphanumeric)
            .take(len)
            .map(char::from),
    );
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_subject_safe() {
        assert!(DeviceId::parse("esp32-01_a").is_ok());
        for bad in ["", "a.b", "a/b", "a b", "a*", "a>", "é", &"x".repeat(65)] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn random_ids_differ() {
        let a = random_id("key_", 20);
        assert!(a.starts_with("key_") && a.len() == 24);
        assert_ne!(a, random_id("key_", 20));
    }
}
