//! Subscriber JWTs: the verification keys and rules (`--jwt-*`, `--jwks-file`, `--jwks-url`),
//! and turning a verified token into an [`Identity`].
//!
//! Only algorithms that a configured key allows are accepted: HS256 with `--jwt-secret`,
//! RS256/ES256 with the public keys of `--jwt-public-key`, `--jwks-file` and `--jwks-url`
//! (the last a key set that [`super::jwks`] replaces while the broker runs). `alg: none` is
//! never accepted (the header does not even parse), and a token's `alg` can never make an RSA
//! public key act as an HMAC secret (keys carry their algorithm; a key is only tried for the
//! algorithm it was loaded for). `exp` is required; `nbf`, `iss` and `aud` are checked, with
//! a bounded clock skew (`--jwt-leeway`). The `tidings` claim carries the permissions, in the
//! same shape as the tokens file; the other claims stay available to filters as
//! `$CLAIMS.<name>`.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::{Identity, Permissions, Principal};

/// Longest token accepted, in bytes; verification of anything longer is not attempted.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Shortest `--jwt-secret`: HS256 with a shorter secret is open to offline guessing.
pub const MIN_SECRET_BYTES: usize = 32;

/// Largest `--jwt-leeway` (clock skew allowance).
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Most keys a JWKS file may hold (every candidate key may be tried for one token).
pub const MAX_JWKS_KEYS: usize = 64;

/// Why a JWT was refused (logged at debug level; the client sees `AUTH_FAILED` / 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a well-formed JWT (including `alg: none` and unknown algorithms).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The token's `alg` is not one a configured key allows.
    #[error("algorithm {0} is not accepted by the configured keys")]
    AlgorithmNotAllowed(String),
    /// No configured key fits the token's `alg` and `kid`.
    #[error("no configured key for this token (alg {alg}, kid {kid:?})")]
    NoKey {
        /// The token's algorithm.
        alg: String,
        /// The token's key id.
        kid: Option<String>,
    },
    /// The signature does not verify with any candidate key.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    #[error("wrong or missing issuer")]
    WrongIssuer,
    /// `aud` is missing or does not include the configured audience.
    #[error("wrong or missing audience")]
    WrongAudience,
    /// A claim is missing or has the wrong type (`exp`, `sub`, `tidings`).
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
}

/// Error in the JWT configuration, naming the flag to fix.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JwtConfigError {
    /// The flag's long name, without dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

fn config_err(flag: &'static str, message: impl Into<String>) -> JwtConfigError {
    JwtConfigError {
        flag,
        message: message.into(),
    }
}

/// The `--jwt-*` and `--jwks-*` flags, before the key files are read.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// HS256 shared secret.
    pub secret: Option<String>,
    /// PEM files of RS256 (RSA) or ES256 (EC P-256) public keys.
    pub public_keys: Vec<PathBuf>,
    /// A JWKS file (`{"keys":[…]}`) of RSA and EC P-256 public keys.
    pub jwks_file: Option<PathBuf>,
    /// An identity provider's JWKS URL (http or https), fetched and refreshed while running.
    pub jwks_url: Option<String>,
    /// Least time between two fetches of `jwks_url` caused by tokens with an unknown `kid`.
    pub jwks_min_interval: Duration,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences).
    pub audience: Option<String>,
    /// Allowed clock skew for `exp` and `nbf`.
    pub leeway: Duration,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            secret: None,
            public_keys: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_min_interval: crate::config::defaults::JWKS_MIN_INTERVAL.duration(),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        }
    }
}

impl JwtSettings {
    /// True when no key is configured (JWTs are then refused).
    pub fn is_empty(&self) -> bool {
        self.secret.is_none()
            && self.public_keys.is_empty()
            && self.jwks_file.is_none()
            && self.jwks_url.is_none()
    }

    /// Reads the key files and builds the verifier; `None` when no key is configured.
    pub fn build(&self) -> Result<Option<JwtVerifier>, JwtConfigError> {
        if self.leeway > MAX_LEEWAY {
            return Err(config_err(
                "jwt-leeway",
                format!("must be at most {} seconds", MAX_LEEWAY.as_secs()),
            ));
        }
        if self.is_empty() {
            if self.issuer.is_some() || self.audience.is_some() {
                let flag = if self.issuer.is_some() {
                    "jwt-issuer"
                } else {
                    "jwt-audience"
                };
                return Err(config_err(
                    flag,
                    "needs a JWT key (--jwt-secret, --jwt-public-key, --jwks-file or --jwks-url)",
                ));
            }
            return Ok(None);
        }
        let hmac = match &self.secret {
            None => None,
            Some(s) if s.len() < MIN_SECRET_BYTES => {
                return Err(config_err(
                    "jwt-secret",
                    format!("must be at least {MIN_SECRET_BYTES} bytes"),
                ))
            }
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
        };
        let mut keys = Vec::new();
        for path in &self.public_keys {
            let pem = std::fs::read(path).map_err(|e| {
                config_err(
                    "jwt-public-key",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            keys.push(
                pem_key(&pem).map_err(|m| {
                    config_err("jwt-public-key", format!("{}: {m}", path.display()))
                })?,
            );
        }
        if let Some(path) = &self.jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                config_err("jwks-file", format!("cannot read {}: {e}", path.display()))
            })?;
            keys.extend(
                jwks_keys(&text)
                    .map_err(|m| config_err("jwks-file", format!("{}: {m}", path.display())))?,
            );
        }
        let remote = match &self.jwks_url {
            None => None,
            Some(url) => Some(Arc::new(RemoteKeys::new(
                super::jwks::parse_url(url).map_err(|m| config_err("jwks-url", m))?,
                self.jwks_min_interval,
            ))),
        };
        Ok(Some(JwtVerifier {
            hmac,
            keys,
            remote,
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            leeway: self.leeway.as_secs(),
        }))
    }
}

/// One public verification key, bound to the one algorithm it was loaded for.
#[derive(Clone)]
pub(super) struct PublicKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// An RSA key (RS256) or an EC P-256 key (ES256) from a PEM file.
fn pem_key(pem: &[u8]) -> Result<PublicKey, String> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(PublicKey {
            kid: None,
            alg: Algorithm::RS256,
            key,
        });
    }
    match DecodingKey::from_ec_pem(pem) {
        Ok(key) => Ok(PublicKey {
            kid: None,
            alg: Algorithm::ES256,
            key,
        }),
        Err(_) => Err("not a PEM RSA or EC P-256 public key".into()),
    }
}

/// The keys of a JWKS document: RSA keys for RS256 and EC P-256 keys for ES256.
pub(super) fn jwks_keys(text: &str) -> Result<Vec<PublicKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    if set.keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    if set.keys.len() > MAX_JWKS_KEYS {
        return Err(format!("more than {MAX_JWKS_KEYS} keys"));
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let declared = jwk.common.key_algorithm;
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => {
                return Err(format!(
                    "key {i}: only RSA (RS256) and EC P-256 (ES256) keys are supported"
                ))
            }
        };
        let declared_ok = match declared {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(_) => false,
        };
        if !declared_ok {
            return Err(format!(
                "key {i}: \"alg\" must be RS256 for RSA keys or ES256 for EC P-256 keys"
            ));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
        keys.push(PublicKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    Ok(keys)
}

/// The key set of `--jwks-url`: empty until the first fetch succeeds, then the last good set
/// (a failed fetch never empties it). Only [`super::jwks::JwksFetcher`] replaces it.
pub struct RemoteKeys {
    /// Where the set comes from.
    pub(super) url: hyper::Uri,
    /// Least time between two fetches caused by an unknown `kid`.
    pub(super) min_interval: Duration,
    /// The current set. A leaf lock: held only to clone or swap the `Arc`.
    keys: RwLock<Arc<Vec<PublicKey>>>,
}

impl RemoteKeys {
    fn new(url: hyper::Uri, min_interval: Duration) -> Self {
        RemoteKeys {
            url,
            min_interval,
            keys: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// The URL the keys are fetched from.
    pub fn url(&self) -> &hyper::Uri {
        &self.url
    }

    fn snapshot(&self) -> Arc<Vec<PublicKey>> {
        self.keys.read().clone()
    }

    /// Replaces the set; returns how many keys it now holds.
    pub(super) fn replace(&self, keys: Vec<PublicKey>) -> usize {
        let n = keys.len();
        *self.keys.write() = Arc::new(keys);
        n
    }

    /// True when the current set has a key with this `kid`.
    pub(super) fn has_kid(&self, kid: &str) -> bool {
        self.keys
            .read()
            .iter()
            .any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Verifies subscriber JWTs against the configured keys and rules.
#[derive(Clone)]
pub struct JwtVerifier {
    hmac: Option<DecodingKey>,
    keys: Vec<PublicKey>,
    /// `--jwks-url`'s keys, shared with the fetcher that refreshes them.
    remote: Option<Arc<RemoteKeys>>,
    issuer: Option<String>,
    audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    leeway: u64,
}

impl std::fmt::Debug for JwtVerifier {
    // Keys are not printed: the HMAC secret is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.hmac.is_some())
            .field("public_keys", &self.keys.len())
            .field("jwks_url", &self.remote.as_ref().map(|r| r.url.to_string()))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// True when `token` has the shape of a compact JWS: three base64url parts, the first two
/// non-empty. (An empty signature is let through so that `alg: none` tokens are refused, and
/// counted, by the JWT check rather than as unknown tokens.)
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = 0;
    for part in token.split('.') {
        parts += 1;
        if (part.is_empty() && parts < 3)
            || !part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
    }
    parts == 3
}

impl JwtVerifier {
    /// The `--jwks-url` key set, when one is configured.
    pub fn remote_keys(&self) -> Option<&Arc<RemoteKeys>> {
        self.remote.as_ref()
    }

    /// The `kid` of `token` when a `--jwks-url` is configured and its current set has no key
    /// of that id: a token a refresh of the set might make verifiable.
    pub fn unknown_remote_kid(&self, token: &str) -> Option<String> {
        let remote = self.remote.as_ref()?;
        if token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return None;
        }
        let kid = header.kid?;
        (!remote.has_kid(&kid)).then_some(kid)
    }

    /// Verifies `token` and returns who it names, with its permissions and expiry.
    pub fn verify(&self, token: &str) -> Result<Identity, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
        let alg = header.alg;
        let remote = self.remote.as_ref().map(|r| r.snapshot());
        let candidates: Vec<&DecodingKey> = match alg {
            Algorithm::HS256 => match &self.hmac {
                Some(key) => vec![key],
                None => return Err(JwtError::AlgorithmNotAllowed(format!("{alg:?}"))),
            },
            Algorithm::RS256 | Algorithm::ES256 => {
                // A JWKS URL may serve keys of either algorithm tomorrow: both stay allowed.
                if remote.is_none() && !self.keys.iter().any(|k| k.alg == alg) {
                    return Err(JwtError::AlgorithmNotAllowed(format!("{alg:?}")));
                }
                // A `kid` selects the JWKS key of that id; keys without an id (PEM files)
                // are candidates for every token of their algorithm.
                self.keys
                    .iter()
                    .chain(remote.iter().flat_map(|r| r.iter()))
                    .filter(|k| k.alg == alg)
                    .filter(|k| match (&header.kid, &k.kid) {
                        (Some(wanted), Some(kid)) => wanted == kid,
                        _ => true,
                    })
                    .map(|k| &k.key)
                    .collect()
            }
            other => return Err(JwtError::AlgorithmNotAllowed(format!("{other:?}"))),
        };
        if candidates.is_empty() {
            return Err(JwtError::NoKey {
                alg: format!("{alg:?}"),
                kid: header.kid,
            });
        }
        let validation = self.validation(alg);
        let mut last = JwtError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => {
                    last = map_error(e.kind());
                    // Only a signature mismatch means "try the next key"; anything else was
                    // found after the signature verified.
                    if last != JwtError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        v
    }

    fn identity(&self, claims: Map<String, Value>) -> Result<Identity, JwtError> {
        let sub = match claims.get("sub") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(JwtError::InvalidClaims("\"sub\" is not a string".into())),
        };
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| JwtError::InvalidClaims("\"exp\" is not a number of seconds".into()))?;
        // Without a `tidings` claim the token authenticates but grants no collection.
        let permissions = match claims.get("tidings") {
            None | Some(Value::Null) => Permissions::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| JwtError::InvalidClaims(format!("\"tidings\": {e}")))?,
        };
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp.saturating_add(self.leeway)))
            .unwrap_or_else(far_future);
        Ok(Identity {
            principal: Arc::new(Principal {
                sub,
                permissions,
                claims: Some(Arc::new(claims)),
            }),
            expires_at: Some(expires_at),
        })
    }
}

/// A time no token outlives (for `exp` values past what `SystemTime` can hold).
fn far_future() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 4)
}

fn map_error(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => JwtError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => {
            JwtError::InvalidClaims(format!("\"{c}\" is missing"))
        }
        ErrorKind::InvalidClaimFormat(c) => {
            JwtError::InvalidClaims(format!("\"{c}\" is malformed"))
        }
        ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed("for this key".into()),
        other => JwtError::Malformed(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn verifier(issuer: Option<&str>, audience: Option<&str>) -> JwtVerifier {
        JwtSettings {
            secret: Some(SECRET.into()),
            issuer: issuer.map(Into::into),
            audience: audience.map(Into::into),
            ..JwtSettings::default()
        }
        .build()
        .unwrap()
        .unwrap()
    }

    #[test]
    fn shape() {
        assert!(looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a..c"));
        assert!(looks_like_jwt("a.b."));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a.b=.c"));
        assert!(!looks_like_jwt("s3cret"));
    }

    #[test]
    fn valid_token_gives_permissions_and_claims() {
        let v = verifier(None, None);
        let t = hs(json!({"sub":"alice","exp":now()+60,"tenant":"t1",
            "tidings":{"orders":{"filter":{"tenant":{"_eq":"$CLAIMS.tenant"}}}}}));
        let id = v.verify(&t).unwrap();
        assert_eq!(id.principal.sub.as_deref(), Some("alice"));
        assert!(id.principal.permissions.for_collection("orders").is_some());
        assert!(id.principal.permissions.for_collection("other").is_none());
        assert_eq!(id.principal.claims.as_ref().unwrap()["tenant"], "t1");
        assert!(id.expires_at.unwrap() > SystemTime::now());
    }

    #[test]
    fn refusals() {
        let v = verifier(Some("me"), Some("tidings"));
        let ok = json!({"exp":now()+60,"iss":"me","aud":"tidings"});
        assert!(v.verify(&hs(ok.clone())).is_ok());
        let mut c = ok.clone();
        c["exp"] = json!(now() - 100);
        assert_eq!(v.verify(&hs(c)).unwrap_err(), JwtError::Expired);
        let mut c = ok.clone();
        c["nbf"] = json!(now() + 100);
        assert_eq!(v.verify(&hs(c)).unwrap_err(), JwtError::NotYetValid);
        let mut c = ok.clone();
        c["iss"] = json!("other");
        assert_eq!(v.verify(&hs(c)).unwrap_err(), JwtError::WrongIssuer);
        let mut c = ok.clone();
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(v.verify(&hs(c)).unwrap_err(), JwtError::WrongIssuer);
        let mut c = ok.clone();
        c["aud"] = json!(["x", "y"]);
        assert_eq!(v.verify(&hs(c)).unwrap_err(), JwtError::WrongAudience);
        let mut c = ok.clone();
        c.as_object_mut().unwrap().remove("exp");
        assert!(matches!(
            v.verify(&hs(c)).unwrap_err(),
            JwtError::InvalidClaims(_)
        ));
        let mut c = ok.clone();
        c["tidings"] = json!({"orders":{"events":["read"]}});
        assert!(matches!(
            v.verify(&hs(c)).unwrap_err(),
            JwtError::InvalidClaims(_)
        ));
        let mut c = ok.clone();
        c["sub"] = json!(5);
        assert!(matches!(
            v.verify(&hs(c)).unwrap_err(),
            JwtError::InvalidClaims(_)
        ));
        // Signed with another secret.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &ok,
            &EncodingKey::from_secret(b"another secret, also 32 bytes long!!"),
        )
        .unwrap();
        assert_eq!(v.verify(&forged).unwrap_err(), JwtError::BadSignature);
        // alg none: header {"alg":"none","typ":"JWT"}, no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            t_payload(&hs(ok.clone()))
        );
        assert!(matches!(
            v.verify(&none).unwrap_err(),
            JwtError::Malformed(_)
        ));
        // HS384 is not configured.
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &ok,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(matches!(
            v.verify(&hs384).unwrap_err(),
            JwtError::AlgorithmNotAllowed(_)
        ));
        assert!(matches!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err(),
            JwtError::Malformed(_)
        ));
    }

    fn t_payload(token: &str) -> String {
        token.split('.').nth(1).unwrap().to_string()
    }

    #[test]
    fn leeway_allows_bounded_skew() {
        let mut s = JwtSettings {
            secret: Some(SECRET.into()),
            leeway: Duration::from_secs(30),
            ..JwtSettings::default()
        };
        let v = s.build().unwrap().unwrap();
        assert!(v.verify(&hs(json!({"exp": now() - 10}))).is_ok());
        assert_eq!(
            v.verify(&hs(json!({"exp": now() - 100}))).unwrap_err(),
            JwtError::Expired
        );
        s.leeway = Duration::from_secs(301);
        assert_eq!(s.build().unwrap_err().flag, "jwt-leeway");
    }

    #[test]
    fn config_errors_name_the_flag() {
        let short = JwtSettings {
            secret: Some("short".into()),
            ..JwtSettings::default()
        };
        assert_eq!(short.build().unwrap_err().flag, "jwt-secret");
        let iss_only = JwtSettings {
            issuer: Some("x".into()),
            ..JwtSettings::default()
        };
        assert_eq!(iss_only.build().unwrap_err().flag, "jwt-issuer");
        let missing = JwtSettings {
            public_keys: vec!["/nonexistent.pem".into()],
            ..JwtSettings::default()
        };
        assert_eq!(missing.build().unwrap_err().flag, "jwt-public-key");
        assert!(JwtSettings::default().build().unwrap().is_none());
        assert!(jwks_keys(r#"{"keys":[]}"#).is_err());
        assert!(jwks_keys(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#).is_err());
    }
}
