//! Who is calling, and what they may do.
//!
//! Both edges — the gRPC API and the admin HTTP server — hand this module
//! the `authorization` header and, under mutual TLS, the client
//! certificate's subject; it answers with a [`Principal`] or an
//! [`AuthError`], and each edge maps that error to its status once. This
//! module knows nothing of tonic or axum.
//!
//! ```text
//!   authorization: Bearer T ──┬─ sha256(T) in the auth file ─────┐
//!                             ├─ --admin-token (principal admin) ─┤
//!                             └─ a JWT checked with --jwt-key ────┼─► Principal { name, roles }
//!   client certificate ───────── cert_subject in the auth file ──┘          │
//!                                                                          ▼
//!   nothing configured ─► "anonymous" with every role (loopback only)   may(Need)?
//! ```
//!
//! Roles: `viewer` reads; `client` starts sagas and reads the ones it
//! started; `definer` registers definitions (and reads them); `operator`
//! retries, aborts and resolves (and reads); `participant:<name>` heartbeats
//! for that participant only; `admin` does everything. The files are read
//! at start and again on [`Authenticator::reload`] (SIGHUP); a file that
//! does not load leaves the previous principals in force.

pub mod der;
pub mod file;
pub mod jwt;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use self::jwt::{JwtKeys, JwtRules};

/// The metadata key (gRPC) and header (HTTP) that names who performs an
/// operator action, on behalf of the principal; recorded with the action.
pub const ACTOR_HEADER: &str = "x-saga-actor";

/// Longest actor or principal name kept (characters).
pub const ACTOR_CHARS_MAX: usize = 64;

/// A role (see the module documentation for what each allows).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Reads of definitions, sagas and events; every admin read.
    Viewer,
    /// StartSaga, and reads of the sagas it started.
    Client,
    /// RegisterDefinition (and definition reads).
    Definer,
    /// Retry, abort, resolve (and every read).
    Operator,
    /// Heartbeat for this participant name only.
    Participant(String),
    /// Everything.
    Admin,
}

impl Role {
    /// Parses `viewer`, `client`, `definer`, `operator`, `admin` or
    /// `participant:<name>`.
    pub fn parse(s: &str) -> Result<Role, String> {
        Ok(match s {
            "viewer" => Role::Viewer,
            "client" => Role::Client,
            "definer" => Role::Definer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            _ => match s.strip_prefix("participant:") {
                Some(name) => {
                    crate::domain::check_name("participant", name, false)
                        .map_err(|e| format!("participant role: {e}"))?;
                    Role::Participant(name.to_owned())
                }
                None => {
                    return Err(format!(
                        "{:?} is not a role (viewer, client, definer, operator, participant:<name>, admin)",
                        s.chars().take(40).collect::<String>()
                    ))
                }
            },
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Viewer => f.write_str("viewer"),
            Role::Client => f.write_str("client"),
            Role::Definer => f.write_str("definer"),
            Role::Operator => f.write_str("operator"),
            Role::Participant(p) => write!(f, "participant:{p}"),
            Role::Admin => f.write_str("admin"),
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Reads of definitions.
    ReadDefinitions,
    /// Reads of any saga, and listings.
    ReadSagas,
    /// Reads of one saga, started by this principal (if known).
    ReadSaga(Option<&'a str>),
    /// StartSaga.
    Start,
    /// RegisterDefinition.
    Define,
    /// Retry, abort, resolve.
    Operate,
    /// Heartbeat as this participant.
    Heartbeat(&'a str),
}

impl Need<'_> {
    /// The role that grants it, as the refusal names it.
    fn role_text(&self) -> String {
        match self {
            Need::ReadDefinitions | Need::ReadSagas => "viewer".into(),
            Need::ReadSaga(_) => "viewer (a client reads only the sagas it started)".into(),
            Need::Start => "client".into(),
            Need::Define => "definer".into(),
            Need::Operate => "operator".into(),
            Need::Heartbeat(p) => format!("participant:{p}"),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its name (recorded with what it does).
    pub name: String,
    /// What it may do.
    pub roles: Vec<Role>,
    /// No authentication is configured: everyone is this principal.
    pub anonymous: bool,
}

impl Principal {
    /// A named principal.
    pub fn named(name: String, roles: Vec<Role>) -> Principal {
        Principal {
            name,
            roles,
            anonymous: false,
        }
    }

    fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            roles: vec![Role::Admin],
            anonymous: true,
        }
    }

    fn has(&self, role: &Role) -> bool {
        self.roles.contains(role)
    }

    /// Whether it may do what `need` names.
    pub fn may(&self, need: Need<'_>) -> bool {
        if self.has(&Role::Admin) {
            return true;
        }
        let reader = self.has(&Role::Viewer) || self.has(&Role::Operator);
        match need {
            Need::ReadDefinitions => reader || self.has(&Role::Definer),
            Need::ReadSagas => reader,
            Need::ReadSaga(by) => {
                reader || (self.has(&Role::Client) && by.is_some_and(|b| b == self.name))
            }
            Need::Start => self.has(&Role::Client),
            Need::Define => self.has(&Role::Definer),
            Need::Operate => self.has(&Role::Operator),
            Need::Heartbeat(p) => self
                .roles
                .iter()
                .any(|r| matches!(r, Role::Participant(name) if name == p)),
        }
    }

    /// [`Principal::may`] as a result naming the missing role.
    pub fn require(&self, need: Need<'_>) -> Result<(), AuthError> {
        if self.may(need) {
            Ok(())
        } else {
            Err(AuthError::Denied {
                principal: self.name.clone(),
                role: need.role_text(),
            })
        }
    }

    /// A client that may read only what it started.
    pub fn reads_own_only(&self) -> bool {
        !self.may(Need::ReadSagas) && self.has(&Role::Client)
    }

    /// The name stored with what it does (none when anonymous).
    pub fn audit_name(&self) -> Option<&str> {
        (!self.anonymous).then_some(self.name.as_str())
    }

    /// Who an operator action is recorded as: the principal, then the
    /// person it names in [`ACTOR_HEADER`] (or a login name), marked as
    /// claimed since nothing checks it: `ops (claimed: carol)`. Anonymous
    /// callers are recorded by that name, or `fallback`.
    pub fn actor(&self, named: Option<&str>, fallback: &str) -> String {
        let named = named.and_then(clean_name);
        match (self.anonymous, named) {
            (true, n) => n.unwrap_or_else(|| fallback.to_owned()),
            (false, Some(n)) if n != self.name => format!("{} (claimed: {n})", self.name),
            (false, _) => self.name.clone(),
        }
    }
}

/// Why a request's credentials were refused. Messages never carry a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential (401 / UNAUTHENTICATED).
    #[error("this call needs a credential: send authorization: Bearer <token>")]
    Missing,
    /// A credential that is not accepted (401 / UNAUTHENTICATED).
    #[error("the credential is not accepted: {0}")]
    Invalid(String),
    /// A known principal without the role (403 / PERMISSION_DENIED).
    #[error("{principal} may not do this: it needs role {role}")]
    Denied {
        /// Who asked.
        principal: String,
        /// The role that would allow it.
        role: String,
    },
}

/// Where principals come from.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// `--auth-file`.
    pub auth_file: Option<PathBuf>,
    /// `--jwt-key`.
    pub jwt_key: Option<PathBuf>,
    /// `--jwt-issuer`, `--jwt-audience`, `--jwt-leeway-secs`.
    pub jwt: JwtRules,
    /// `--admin-token`: one principal `admin` with role `admin`.
    pub admin_token: Option<String>,
    /// `--admin-token-file`: the same, read from a file.
    pub admin_token_file: Option<PathBuf>,
}

impl AuthConfig {
    /// Whether any source of principals is configured.
    pub fn enabled(&self) -> bool {
        self.auth_file.is_some()
            || self.jwt_key.is_some()
            || self.admin_token.is_some()
            || self.admin_token_file.is_some()
    }
}

#[derive(Default)]
struct Keys {
    by_token: HashMap<[u8; 32], Arc<Principal>>,
    by_subject: HashMap<String, Arc<Principal>>,
    jwt: Option<JwtKeys>,
}

/// Checks credentials against the configured principals.
pub struct Authenticator {
    cfg: AuthConfig,
    keys: RwLock<Arc<Keys>>,
    anonymous: Arc<Principal>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.cfg.enabled())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the configured files. Errors name the file and what is wrong.
    pub fn new(cfg: AuthConfig) -> Result<Authenticator, String> {
        let keys = load(&cfg)?;
        Ok(Authenticator {
            cfg,
            keys: RwLock::new(Arc::new(keys)),
            anonymous: Arc::new(Principal::anonymous()),
        })
    }

    /// Nobody is authenticated: every caller is anonymous with every role.
    pub fn open() -> Authenticator {
        Authenticator {
            cfg: AuthConfig::default(),
            keys: RwLock::new(Arc::new(Keys::default())),
            anonymous: Arc::new(Principal::anonymous()),
        }
    }

    /// Whether callers must authenticate.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled()
    }

    /// Reads the files again; on an error the previous principals stay.
    pub fn reload(&self) -> Result<(), String> {
        let keys = load(&self.cfg)?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(())
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The principal behind an `authorization` header value and, under
    /// mutual TLS, the client certificate's subject. A header wins over the
    /// certificate.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        cert_subject: Option<&str>,
    ) -> Result<Arc<Principal>, AuthError> {
        if !self.enabled() {
            return Ok(self.anonymous.clone());
        }
        let keys = self.keys();
        if let Some(value) = authorization {
            let token = bearer(value).ok_or_else(|| {
                AuthError::Invalid("use the Bearer scheme: authorization: Bearer <token>".into())
            })?;
            return self.token(&keys, token);
        }
        if let Some(subject) = cert_subject {
            if let Some(p) = keys.by_subject.get(&file::normalise_subject(subject)) {
                return Ok(p.clone());
            }
            tracing::debug!(
                subject,
                "client certificate subject is not in the auth file"
            );
        }
        Err(AuthError::Missing)
    }

    fn token(&self, keys: &Keys, token: &str) -> Result<Arc<Principal>, AuthError> {
        let digest = sha256(token.as_bytes());
        if let Some(p) = keys.by_token.get(&digest) {
            return Ok(p.clone());
        }
        let Some(jwt) = keys
            .jwt
            .as_ref()
            .filter(|_| token.matches('.').count() == 2)
        else {
            return Err(AuthError::Invalid("unknown token".into()));
        };
        let claims = jwt
            .verify(token, &self.cfg.jwt, unix_now_secs())
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let name = clean_name(&claims.subject)
            .ok_or_else(|| AuthError::Invalid("the token's sub is not a usable name".into()))?;
        let roles = claims
            .roles
            .iter()
            .filter_map(|r| Role::parse(r).ok())
            .collect();
        Ok(Arc::new(Principal::named(name, roles)))
    }
}

fn load(cfg: &AuthConfig) -> Result<Keys, String> {
    let mut keys = Keys::default();
    if let Some(path) = &cfg.auth_file {
        let text = read_private(path)?;
        let p = file::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        keys.by_token = p.by_token;
        keys.by_subject = p.by_subject;
    }
    let from_file = match &cfg.admin_token_file {
        Some(path) => {
            let token = read_private(path)?.trim().to_owned();
            if token.len() < 16 {
                return Err(format!(
                    "{}: the admin token must be at least 16 characters",
                    path.display()
                ));
            }
            Some(token)
        }
        None => None,
    };
    if let Some(token) = cfg.admin_token.as_ref().or(from_file.as_ref()) {
        let admin = Arc::new(Principal::named("admin".into(), vec![Role::Admin]));
        keys.by_token.insert(sha256(token.as_bytes()), admin);
    }
    if let Some(path) = &cfg.jwt_key {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("{}: cannot read: {}", path.display(), e.kind()))?;
        warn_if_shared(path);
        keys.jwt = Some(JwtKeys::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    Ok(keys)
}

fn read_private(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {}", path.display(), e.kind()))?;
    warn_if_shared(path);
    Ok(text)
}

/// Logs a warning when a secret-bearing file is readable by other users.
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                file = %path.display(),
                "is readable by every user on this machine; chmod o-r it"
            );
        }
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compares secrets in time independent of where they differ.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A name as kept: control characters dropped, at most
/// [`ACTOR_CHARS_MAX`] characters, trimmed; `None` when nothing is left.
pub fn clean_name(raw: &str) -> Option<String> {
    let name: String = raw
        .chars()
        .filter(|c| !c.is_control())
        .take(ACTOR_CHARS_MAX)
        .collect();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests;
