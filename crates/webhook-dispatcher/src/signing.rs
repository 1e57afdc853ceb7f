//! The two signatures every delivery carries.
//!
//! - Standard Webhooks: `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
//!   keyed with the base64-decoded part after `whsec_` (or the UTF-8 bytes of a secret in
//!   another form). During a rotation both secrets sign, space-separated.
//! - `X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body>`, keyed with the secret's UTF-8
//!   bytes exactly as registered. During a rotation it carries the new secret's signature and
//!   `X-Webhook-Signature-Previous` the old one's.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable_key());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

#[cold]
fn unreachable_key() -> HmacSha256 {
    std::process::abort()
}

/// The HMAC key Standard Webhooks uses for `secret`.
pub fn standard_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|encoded| STANDARD.decode(encoded).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// `v1,<base64>` for one secret.
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    let mac = hmac(
        &standard_key(secret),
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    );
    format!("v1,{}", STANDARD.encode(mac))
}

/// `sha256=<hex>` of the body, keyed with the secret as registered.
pub fn body_signature(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac(secret.as_bytes(), &[body])))
}

/// A new `whsec_…` secret: 32 random bytes, base64.
pub fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(bytes))
}

/// The signature headers of one attempt.
pub fn headers(
    secret: &str,
    previous: Option<&str>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let mut standard = standard_signature(secret, id, timestamp, body);
    if let Some(previous) = previous {
        standard.push(' ');
        standard.push_str(&standard_signature(previous, id, timestamp, body));
    }
    let mut headers = vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", standard),
        ("X-Webhook-Signature", body_signature(secret, body)),
    ];
    if let Some(previous) = previous {
        headers.push((
            "X-Webhook-Signature-Previous",
            body_signature(previous, body),
        ));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (its reference test vector).
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signature =
            standard_signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn body_signature_is_hex_hmac_of_the_body() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231-style vector.
        assert_eq!(
            body_signature("key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn rotation_signs_with_both() {
        let headers = headers("new", Some("old"), "evt_1", 1, b"{}");
        let standard = &headers
            .iter()
            .find(|(name, _)| *name == "webhook-signature")
            .unwrap()
            .1;
        assert_eq!(standard.split(' ').count(), 2);
        assert!(
            headers
                .iter()
                .any(|(name, _)| *name == "X-Webhook-Signature-Previous")
        );
    }
}
