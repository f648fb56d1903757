//! JWT helpers for tests: sign tokens with the fixture keys in `tests/fixtures/jwt/`.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

/// The HS256 secret tests configure with `--jwt-secret`.
pub const SECRET: &str = "tidings-test-secret-0123456789abcdef";

/// A file under `tests/fixtures/jwt/`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// HS256 with [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    hs256_with(claims, SECRET)
}

/// HS256 with another secret.
pub fn hs256_with(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// RS256 with a fixture private key (`rsa-private.pem`, `other-rsa-private.pem`).
pub fn rs256(claims: &Value, key_file: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(key_file)).expect("key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(&pem).expect("rsa key"),
    )
    .expect("sign")
}

/// ES256 with `ec-private.pem`.
pub fn es256(claims: &Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture("ec-private.pem")).expect("key");
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_string);
    encode(
        &header,
        claims,
        &EncodingKey::from_ec_pem(&pem).expect("ec key"),
    )
    .expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned token: `{"alg":"none"}`, the claims, an empty signature.
pub fn alg_none(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// A token whose header says `alg` but whose signature is the HS256 one with `secret`
/// (e.g. the public key's PEM as an HMAC secret: the classic algorithm confusion).
pub fn with_header(header_json: &str, claims: &Value, secret: &[u8]) -> String {
    use hmac_sign::sign;
    let head = b64(header_json.as_bytes());
    let body = b64(claims.to_string().as_bytes());
    let sig = sign(secret, format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64(&sig))
}

mod hmac_sign {
    use sha2::{Digest, Sha256};

    /// HMAC-SHA256 (RFC 2104), to forge tokens the library would refuse to make.
    pub fn sign(key: &[u8], message: &[u8]) -> Vec<u8> {
        let mut k = if key.len() > 64 {
            Sha256::digest(key).to_vec()
        } else {
            key.to_vec()
        };
        k.resize(64, 0);
        let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
        let inner = Sha256::new()
            .chain_update(&ipad)
            .chain_update(message)
            .finalize();
        Sha256::new()
            .chain_update(&opad)
            .chain_update(inner)
            .finalize()
            .to_vec()
    }
}
