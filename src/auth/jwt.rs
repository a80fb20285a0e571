//! JSON Web Tokens (RFC 7519) signed with HS256, RS256/384/512 or
//! ES256/384, checked with `ring`.
//!
//! ```text
//!   --jwt-key FILE ──► JwtKeys ─┬─ HS256 secret (raw bytes, ≥ 32)
//!                               ├─ PEM PUBLIC KEY (RSA, EC P-256/P-384)
//!                               └─ JWKS {"keys": [...]} (RSA, EC, oct; by kid)
//!
//!   header.payload.signature
//!     1. sizes and base64url          → Malformed
//!     2. header.alg must fit the key   → Malformed (no "none", no HS/RS mixing)
//!     3. signature over header.payload → BadSignature
//!     4. exp (required), nbf, iss, aud → Expired / NotYetValid / Issuer / Audience
//!     5. sub (required), roles         → the principal
//! ```
//!
//! The algorithm is decided by the configured key, never by the token: a
//! token claiming `HS256` is not checked against an RSA public key used as
//! an HMAC secret (the classic confusion), and `alg: none` never fits.

use std::fmt;

use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use serde::Deserialize;

use super::der;

/// Longest token accepted (bytes).
pub const TOKEN_BYTES_MAX: usize = 8 * 1024;
/// Shortest HS256 secret accepted (bytes; RFC 7518 §3.2).
pub const HMAC_SECRET_BYTES_MIN: usize = 32;

const RSA_OID: &str = "1.2.840.113549.1.1.1";
const EC_OID: &str = "1.2.840.10045.2.1";
const P256_OID: &str = "1.2.840.10045.3.1.7";
const P384_OID: &str = "1.3.132.0.34";

/// Why a token was refused. Messages never include the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a well-formed JWT, or its algorithm does not fit the key.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// No configured key verifies the signature.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` has passed (or is missing).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// `aud` does not name the configured audience.
    #[error("the token's audience is not accepted")]
    Audience,
}

/// What a token must say besides being signed.
#[derive(Debug, Clone, Default)]
pub struct JwtRules {
    /// `iss` must equal this, when set.
    pub issuer: Option<String>,
    /// `aud` (a string or a list) must contain this, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (seconds).
    pub leeway_secs: u64,
}

/// The claims sagad uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the principal's name.
    pub subject: String,
    /// `roles`: role names (may be empty).
    pub roles: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

enum KeyKind {
    Hmac(ring::hmac::Key),
    /// PKCS#1 RSAPublicKey DER.
    RsaDer(Vec<u8>),
    RsaParts {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point.
    Ec(Curve, Vec<u8>),
}

struct Key {
    kid: Option<String>,
    kind: KeyKind,
}

/// The keys tokens are checked with.
pub struct JwtKeys(Vec<Key>);

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKeys({} keys)", self.0.len())
    }
}

impl JwtKeys {
    /// Keys from a `--jwt-key` file: a PEM `PUBLIC KEY` (RSA or EC), a JWKS
    /// document, or else the bytes of an HS256 secret (trailing newline
    /// dropped). Errors never quote the file.
    pub fn parse(bytes: &[u8]) -> Result<JwtKeys, String> {
        let text = std::str::from_utf8(bytes).unwrap_or("");
        if text.trim_start().starts_with("-----BEGIN") {
            let der = SubjectPublicKeyInfoDer::from_pem_slice(bytes)
                .map_err(|_| "holds no PEM PUBLIC KEY block".to_owned())?;
            return Ok(JwtKeys(vec![spki_key(der.as_ref())?]));
        }
        if text.trim_start().starts_with('{') {
            return jwks(text);
        }
        let secret = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let secret = secret.strip_suffix(b"\r").unwrap_or(secret);
        if secret.len() < HMAC_SECRET_BYTES_MIN {
            return Err(format!(
                "an HS256 secret must be at least {HMAC_SECRET_BYTES_MIN} bytes"
            ));
        }
        Ok(JwtKeys(vec![Key {
            kid: None,
            kind: KeyKind::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)),
        }]))
    }

    /// Checks `token` at `now_secs` (Unix seconds) and returns its claims.
    pub fn verify(&self, token: &str, rules: &JwtRules, now_secs: u64) -> Result<Claims, JwtError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(malformed("longer than 8 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated parts"));
        };
        let header: Header = serde_json::from_slice(&b64(h, "header")?)
            .map_err(|_| malformed("the header is not a JSON object with alg"))?;
        let sig = b64(s, "signature")?;
        let message = &token.as_bytes()[..h.len() + 1 + p.len()];
        let candidates: Vec<&Key> = self
            .0
            .iter()
            .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            .collect();
        if !candidates.iter().any(|k| k.kind.fits(&header.alg)) {
            return Err(malformed(&format!(
                "alg {:?} does not fit the configured key",
                cut(&header.alg)
            )));
        }
        if !candidates
            .iter()
            .any(|k| k.kind.verify(&header.alg, message, &sig))
        {
            return Err(JwtError::BadSignature);
        }
        let payload: Payload = serde_json::from_slice(&b64(p, "payload")?)
            .map_err(|_| malformed("the payload is not a JSON object of the expected claims"))?;
        payload.check(rules, now_secs)
    }
}

fn malformed(why: &str) -> JwtError {
    JwtError::Malformed(why.to_owned())
}

fn cut(s: &str) -> String {
    s.chars().take(16).collect()
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| malformed(&format!("the {what} is not base64url")))
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    nbf: Option<f64>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    roles: Vec<String>,
}

impl Payload {
    fn check(self, rules: &JwtRules, now_secs: u64) -> Result<Claims, JwtError> {
        let now = now_secs as f64;
        let leeway = rules.leeway_secs as f64;
        match self.exp {
            Some(exp) if exp + leeway > now => {}
            _ => return Err(JwtError::Expired),
        }
        if self.nbf.is_some_and(|nbf| nbf - leeway > now) {
            return Err(JwtError::NotYetValid);
        }
        if let Some(want) = &rules.issuer {
            if self.iss.as_ref() != Some(want) {
                return Err(JwtError::Issuer);
            }
        }
        if let Some(want) = &rules.audience {
            let ok = match &self.aud {
                Some(Audience::One(a)) => a == want,
                Some(Audience::Many(list)) => list.contains(want),
                None => false,
            };
            if !ok {
                return Err(JwtError::Audience);
            }
        }
        let subject = self
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| malformed("sub is missing"))?;
        Ok(Claims {
            subject,
            roles: self.roles,
        })
    }
}

impl KeyKind {
    fn fits(&self, alg: &str) -> bool {
        matches!(
            (self, alg),
            (KeyKind::Hmac(_), "HS256")
                | (
                    KeyKind::RsaDer(_) | KeyKind::RsaParts { .. },
                    "RS256" | "RS384" | "RS512"
                )
                | (KeyKind::Ec(Curve::P256, _), "ES256")
                | (KeyKind::Ec(Curve::P384, _), "ES384")
        )
    }

    fn verify(&self, alg: &str, message: &[u8], sig: &[u8]) -> bool {
        if !self.fits(alg) {
            return false;
        }
        let rsa = match alg {
            "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
            "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
            _ => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        match self {
            KeyKind::Hmac(k) => ring::hmac::verify(k, message, sig).is_ok(),
            KeyKind::RsaDer(der) => UnparsedPublicKey::new(rsa, der)
                .verify(message, sig)
                .is_ok(),
            KeyKind::RsaParts { n, e } => RsaPublicKeyComponents { n, e }
                .verify(rsa, message, sig)
                .is_ok(),
            KeyKind::Ec(Curve::P256, point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            KeyKind::Ec(Curve::P384, point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
        }
    }
}

fn spki_key(der: &[u8]) -> Result<Key, String> {
    let info = der::spki(der).map_err(|e| format!("the PUBLIC KEY is not readable: {e}"))?;
    let kind = match (info.algorithm.as_str(), info.parameter.as_deref()) {
        (RSA_OID, _) => KeyKind::RsaDer(info.key.to_vec()),
        (EC_OID, Some(P256_OID)) => KeyKind::Ec(Curve::P256, info.key.to_vec()),
        (EC_OID, Some(P384_OID)) => KeyKind::Ec(Curve::P384, info.key.to_vec()),
        (alg, param) => {
            return Err(format!(
                "the PUBLIC KEY is {alg} ({}); RSA, EC P-256 or EC P-384 are supported",
                param.unwrap_or("no parameter")
            ))
        }
    };
    Ok(Key { kid: None, kind })
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

fn jwks(text: &str) -> Result<JwtKeys, String> {
    let set: Jwks =
        serde_json::from_str(text).map_err(|e| format!("is not a JWKS document: {e}"))?;
    let keys = set
        .keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| jwk(k).map_err(|e| format!("keys[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("the JWKS document holds no keys".into());
    }
    Ok(JwtKeys(keys))
}

fn jwk(k: Jwk) -> Result<Key, String> {
    let field = |v: Option<String>, name: &str| -> Result<Vec<u8>, String> {
        let v = v.ok_or_else(|| format!("{name} is missing"))?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v.trim_end_matches('='))
            .map_err(|_| format!("{name} is not base64url"))
    };
    let kind = match (k.kty.as_str(), k.crv.as_deref()) {
        ("RSA", _) => KeyKind::RsaParts {
            n: field(k.n, "n")?,
            e: field(k.e, "e")?,
        },
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let mut point = vec![4u8];
            point.extend(field(k.x, "x")?);
            point.extend(field(k.y, "y")?);
            let curve = if crv == "P-256" {
                Curve::P256
            } else {
                Curve::P384
            };
            KeyKind::Ec(curve, point)
        }
        ("oct", _) => {
            let secret = field(k.k, "k")?;
            if secret.len() < HMAC_SECRET_BYTES_MIN {
                return Err(format!(
                    "an HS256 secret must be at least {HMAC_SECRET_BYTES_MIN} bytes"
                ));
            }
            KeyKind::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
        }
        (kty, crv) => {
            return Err(format!(
                "kty {:?} (crv {:?}) is not supported",
                cut(kty),
                crv.map(cut)
            ))
        }
    };
    Ok(Key { kid: k.kid, kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn enc(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn hs256(header: &str, claims: &serde_json::Value) -> String {
        let msg = format!(
            "{}.{}",
            enc(header.as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
        let tag = ring::hmac::sign(&key, msg.as_bytes());
        format!("{msg}.{}", enc(tag.as_ref()))
    }

    fn claims(exp: u64) -> serde_json::Value {
        serde_json::json!({"sub": "ci", "exp": exp, "roles": ["client"], "iss": "idp", "aud": ["sagad", "x"]})
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn hs256_tokens_are_checked() {
        let keys = JwtKeys::parse(SECRET).expect("secret");
        let rules = JwtRules {
            issuer: Some("idp".into()),
            audience: Some("sagad".into()),
            leeway_secs: 0,
        };
        let good = hs256(r#"{"alg":"HS256","typ":"JWT"}"#, &claims(NOW + 60));
        assert_eq!(
            keys.verify(&good, &rules, NOW),
            Ok(Claims {
                subject: "ci".into(),
                roles: vec!["client".into()]
            })
        );
        assert_eq!(keys.verify(&good, &rules, NOW + 61), Err(JwtError::Expired));
        let wrong_iss = JwtRules {
            issuer: Some("other".into()),
            ..rules.clone()
        };
        assert_eq!(keys.verify(&good, &wrong_iss, NOW), Err(JwtError::Issuer));
        let wrong_aud = JwtRules {
            audience: Some("other".into()),
            ..rules.clone()
        };
        assert_eq!(keys.verify(&good, &wrong_aud, NOW), Err(JwtError::Audience));
        let mut c = claims(NOW + 60);
        c["nbf"] = serde_json::json!(NOW + 30);
        let early = hs256(r#"{"alg":"HS256"}"#, &c);
        assert_eq!(keys.verify(&early, &rules, NOW), Err(JwtError::NotYetValid));
        let no_exp = hs256(r#"{"alg":"HS256"}"#, &serde_json::json!({"sub": "ci"}));
        assert_eq!(
            keys.verify(&no_exp, &JwtRules::default(), NOW),
            Err(JwtError::Expired)
        );
        // A flipped payload byte breaks the signature.
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = enc(claims(NOW + 6_000).to_string().as_bytes());
        assert_eq!(
            keys.verify(&parts.join("."), &rules, NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn algorithms_the_key_does_not_fit_are_refused() {
        let keys = JwtKeys::parse(SECRET).expect("secret");
        let none = format!(
            "{}.{}.",
            enc(br#"{"alg":"none"}"#),
            enc(claims(NOW + 60).to_string().as_bytes())
        );
        assert!(matches!(
            keys.verify(&none, &JwtRules::default(), NOW),
            Err(JwtError::Malformed(_))
        ));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            &"x".repeat(TOKEN_BYTES_MAX + 1),
        ] {
            assert!(
                matches!(
                    keys.verify(bad, &JwtRules::default(), NOW),
                    Err(JwtError::Malformed(_))
                ),
                "{bad:.20}"
            );
        }
        assert!(JwtKeys::parse(b"short").is_err());
    }

    #[test]
    fn es256_with_a_pem_key_and_a_jwks() {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let sign = |header: &str| {
            let msg = format!(
                "{}.{}",
                enc(header.as_bytes()),
                enc(claims(NOW + 60).to_string().as_bytes())
            );
            let sig = pair.sign(&rng, msg.as_bytes()).expect("sign");
            format!("{msg}.{}", enc(sig.as_ref()))
        };
        let rc = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("rcgen key");
        let keys = JwtKeys::parse(rc.public_key_pem().as_bytes()).expect("pem");
        let token = sign(r#"{"alg":"ES256"}"#);
        assert_eq!(
            keys.verify(&token, &JwtRules::default(), NOW)
                .map(|c| c.subject),
            Ok("ci".into())
        );
        // HS256 "signed" with the public key as a secret: refused.
        assert!(matches!(
            keys.verify(
                &hs256(r#"{"alg":"HS256"}"#, &claims(NOW + 60)),
                &JwtRules::default(),
                NOW
            ),
            Err(JwtError::Malformed(_))
        ));
        let point = pair.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "kid": "h", "k": enc(SECRET)},
            {"kty": "EC", "kid": "e1", "crv": "P-256", "x": enc(&point[1..33]), "y": enc(&point[33..])},
        ]});
        let set = JwtKeys::parse(jwks.to_string().as_bytes()).expect("jwks");
        let with_kid = sign(r#"{"alg":"ES256","kid":"e1"}"#);
        assert!(set.verify(&with_kid, &JwtRules::default(), NOW).is_ok());
        let other_kid = sign(r#"{"alg":"ES256","kid":"h"}"#);
        assert!(set.verify(&other_kid, &JwtRules::default(), NOW).is_err());
        let hs = hs256(r#"{"alg":"HS256","kid":"h"}"#, &claims(NOW + 60));
        assert!(set.verify(&hs, &JwtRules::default(), NOW).is_ok());
    }

    /// RS256 with a key made by the openssl command line (ring cannot make
    /// RSA keys): the PEM public key, and the same key as a JWKS entry.
    #[test]
    fn rs256_with_a_pem_key_and_a_jwks() {
        use ring::signature::{RsaKeyPair, RsaPublicKeyComponents, RSA_PKCS1_SHA256};
        use rustls::pki_types::PrivatePkcs8KeyDer;
        let dir = std::env::temp_dir().join(format!("sagad-rsa-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (key, public) = (dir.join("key.pem"), dir.join("pub.pem"));
        let openssl = |args: &[&std::ffi::OsStr]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("the openssl command line");
            assert!(ok.success());
        };
        openssl(&[
            "genpkey".as_ref(),
            "-algorithm".as_ref(),
            "RSA".as_ref(),
            "-pkeyopt".as_ref(),
            "rsa_keygen_bits:2048".as_ref(),
            "-out".as_ref(),
            key.as_os_str(),
        ]);
        openssl(&[
            "pkey".as_ref(),
            "-in".as_ref(),
            key.as_os_str(),
            "-pubout".as_ref(),
            "-out".as_ref(),
            public.as_os_str(),
        ]);
        let der = PrivatePkcs8KeyDer::from_pem_file(&key).expect("pkcs8");
        let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("rsa key");
        let rng = SystemRandom::new();
        let sign = |header: &str| {
            let msg = format!(
                "{}.{}",
                enc(header.as_bytes()),
                enc(claims(NOW + 60).to_string().as_bytes())
            );
            let mut sig = vec![0u8; pair.public().modulus_len()];
            pair.sign(&RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig)
                .expect("sign");
            format!("{msg}.{}", enc(&sig))
        };
        let token = sign(r#"{"alg":"RS256"}"#);
        let keys = JwtKeys::parse(&std::fs::read(&public).expect("pub")).expect("pem");
        assert_eq!(
            keys.verify(&token, &JwtRules::default(), NOW)
                .map(|c| c.subject),
            Ok("ci".into())
        );
        let mut forged: Vec<String> = token.split('.').map(str::to_owned).collect();
        forged[2] = enc(&[7u8; 256]);
        assert_eq!(
            keys.verify(&forged.join("."), &JwtRules::default(), NOW),
            Err(JwtError::BadSignature)
        );
        let parts = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "r1", "n": enc(&parts.n), "e": enc(&parts.e)}]});
        let set = JwtKeys::parse(jwks.to_string().as_bytes()).expect("jwks");
        assert!(set
            .verify(
                &sign(r#"{"alg":"RS256","kid":"r1"}"#),
                &JwtRules::default(),
                NOW
            )
            .is_ok());
        std::fs::remove_dir_all(dir).ok();
    }
}
