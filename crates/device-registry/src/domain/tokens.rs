//! Device tokens. With `device_token_key` set, a token is derived from the key and a random
//! seed that the registry keeps beside the token's hash: the registry can then give a broker
//! that lost its state every device's password again, while its database alone (seeds and
//! hashes) reveals no token. Without the key, tokens are random and cannot be derived again.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::{DEVICE_TOKEN_PREFIX, new_device_token};

type HmacSha256 = Hmac<Sha256>;

/// Random bytes per seed: 128 bits, so seeds never repeat.
const SEED_LEN: usize = 16;
/// Domain separation: a token and a fingerprint are never the same HMAC.
const TOKEN_CONTEXT: &[u8] = b"fieldline device token v1\0";
const FINGERPRINT_CONTEXT: &[u8] = b"fieldline broker fingerprint v1\0";

/// A new token and, when it was derived, the seed to keep.
pub struct IssuedToken {
    pub token: String,
    pub seed: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct DeviceTokens {
    key: Option<SecretString>,
}

impl DeviceTokens {
    pub fn new(key: Option<SecretString>) -> Self {
        Self { key }
    }

    /// A new token: derived from a fresh seed when there is a key, random otherwise.
    pub fn issue(&self) -> IssuedToken {
        if self.key.is_none() {
            return IssuedToken {
                token: new_device_token(),
                seed: None,
            };
        }
        let seed: [u8; SEED_LEN] = rand::random();
        let token = self.derive(&seed).unwrap_or_else(new_device_token);
        IssuedToken {
            token,
            seed: Some(seed.to_vec()),
        }
    }

    /// The token of `seed`; `None` without a key.
    pub fn derive(&self, seed: &[u8]) -> Option<String> {
        let digest = self.mac(TOKEN_CONTEXT, seed)?;
        Some(format!(
            "{DEVICE_TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(digest)
        ))
    }

    /// A short keyed digest of a broker password, stored on the broker's account so the
    /// registry can tell a stale password without reading it back (the broker never shows
    /// one). `None` without a key.
    pub fn fingerprint(&self, password: &str) -> Option<String> {
        let digest = self.mac(FINGERPRINT_CONTEXT, password.as_bytes())?;
        Some(hex::encode(&digest[..8]))
    }

    fn mac(&self, context: &[u8], message: &[u8]) -> Option<[u8; 32]> {
        let key = self.key.as_ref()?;
        let mut mac = HmacSha256::new_from_slice(key.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(context);
        mac.update(message);
        Some(mac.finalize().into_bytes().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str) -> DeviceTokens {
        DeviceTokens::new(Some(SecretString::from(key)))
    }

    #[test]
    fn a_token_is_derived_again_from_its_seed_and_the_key_only() {
        let tokens = keyed("k".repeat(32).as_str());
        let issued = tokens.issue();
        let seed = issued.seed.clone().unwrap();
        assert!(issued.token.starts_with(DEVICE_TOKEN_PREFIX));
        assert_eq!(tokens.derive(&seed).unwrap(), issued.token);
        assert_ne!(keyed(&"x".repeat(32)).derive(&seed).unwrap(), issued.token);
        assert_ne!(tokens.issue().token, issued.token);
        assert_ne!(
            tokens.fingerprint(&issued.token),
            tokens.fingerprint("other")
        );
    }

    #[test]
    fn without_a_key_tokens_are_random_and_not_derivable() {
        let tokens = DeviceTokens::new(None);
        let issued = tokens.issue();
        assert!(issued.seed.is_none());
        assert!(issued.token.starts_with(DEVICE_TOKEN_PREFIX));
        assert!(tokens.derive(b"seed").is_none());
    }
}
