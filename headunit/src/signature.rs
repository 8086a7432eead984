//! The webhook signature: HMAC-SHA256 over `"{timestamp}.{body}"`, sent as
//! `x-voltcast-signature: v1=<hex>` beside `x-voltcast-timestamp: <unix seconds>`.
//!
//! Why the timestamp is inside the MAC: a receiver that checks it against its clock
//! refuses a captured request replayed later, and one that remembers the signatures it
//! saw within that window refuses it sooner. The version prefix lets the scheme change
//! without breaking receivers that check only `v1`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

pub const SIGNATURE_HEADER: &str = "x-voltcast-signature";
pub const TIMESTAMP_HEADER: &str = "x-voltcast-timestamp";
/// The alert id: a receiver that saw it already answers "duplicate" and keeps one copy.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing header {0}")]
    Missing(&'static str),
    #[error("malformed header {0}")]
    Malformed(&'static str),
    #[error(
        "timestamp is {age_seconds} s away from the receiver's clock (tolerance {tolerance_seconds} s)"
    )]
    Stale {
        age_seconds: i64,
        tolerance_seconds: i64,
    },
    #[error("signature does not match the body and timestamp")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The signature header's value for `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks a request's timestamp and signature headers against its body at `now`; returns
/// the signature in its canonical form (`v1=` and lower-case hex), the key a replay check
/// must use: the header itself varies (`x,v1=...`, upper-case hex) for the same MAC.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_seconds: i64,
) -> Result<String, SignatureError> {
    let timestamp = timestamp.ok_or(SignatureError::Missing(TIMESTAMP_HEADER))?;
    let signature = signature.ok_or(SignatureError::Missing(SIGNATURE_HEADER))?;
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed(TIMESTAMP_HEADER))?;
    let age_seconds = now - ts;
    if age_seconds.abs() > tolerance_seconds {
        return Err(SignatureError::Stale {
            age_seconds,
            tolerance_seconds,
        });
    }
    let given = signature
        .split(',')
        .find_map(|part| part.trim().strip_prefix("v1="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Malformed(SIGNATURE_HEADER))?;
    // Constant-time comparison: no timing oracle on the MAC.
    mac(secret, ts, body)
        .verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)?;
    Ok(format!("v1={}", hex::encode(&given)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_request_verifies_and_tampering_does_not() {
        let body = br#"{"alert_id":"a1"}"#;
        let sig = sign(b"s3cret", 1_000, body);
        assert_eq!(
            verify(b"s3cret", Some("1000"), Some(&sig), body, 1_010, 300),
            Ok(sig.clone())
        );
        assert_eq!(
            verify(b"other", Some("1000"), Some(&sig), body, 1_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"s3cret", Some("1000"), Some(&sig), b"{}", 1_010, 300),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is under the MAC: moving it forward breaks the signature.
        assert_eq!(
            verify(b"s3cret", Some("1005"), Some(&sig), body, 1_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify(b"s3cret", Some("1000"), Some(&sig), body, 2_000, 300),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            verify(b"s3cret", None, Some(&sig), body, 1_000, 300),
            Err(SignatureError::Missing(TIMESTAMP_HEADER))
        );
        assert_eq!(
            verify(b"s3cret", Some("x"), Some(&sig), body, 1_000, 300),
            Err(SignatureError::Malformed(TIMESTAMP_HEADER))
        );
    }
}
