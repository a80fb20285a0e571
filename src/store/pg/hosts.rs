//! Where the database is, and whether it answers: several hosts as libpq
//! takes them, the writable one found and followed across a failover, and
//! a probe that tells the rest of `sagad` at once when the database is
//! away.
//!
//! ```text
//!   postgres://u@h1:5432,h2:5433/sagad?target_session_attrs=read-write
//!        │ Hosts::parse
//!        ▼
//!   u@h1:5432/sagad, u@h2:5433/sagad        tried in order; the first whose
//!                                             session accepts writes is used
//!   watch, every probe interval, on a connection of its own:
//!     SELECT pg_is_in_recovery()
//!       answered, a primary ─▶ up
//!       failed, or a standby ─▶ down: the API answers UNAVAILABLE at once,
//!                               /readyz 503, no claims, no renewals
//!                               ─▶ find the writable host; the pool (and the
//!                                  write lanes, which connect as it does)
//!                                  move there: pool.set_connect_options
//! ```
//!
//! HA comes from PostgreSQL (a synchronous standby promoted by Patroni, a
//! managed service, or a person): `sagad` only finds the new primary. A
//! decision acknowledged by the old primary survives only if the standby
//! had it, which `synchronous_commit = on` (or `remote_apply`) with a
//! synchronous standby guarantees.
//!
//! The probe has its own connection so that a saturated pool is not taken
//! for an absent database.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgSslMode};
use sqlx::{ConnectOptions, Connection, Row};
use tokio_util::sync::CancellationToken;

/// The hosts of a `--database-url`, one URL each, in order.
#[derive(Debug, Clone)]
pub struct Hosts {
    urls: Vec<String>,
}

/// Why a URL's hosts cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// `target_session_attrs` asks for a session `sagad` cannot write in.
    #[error("target_session_attrs={0}: sagad writes, so only read-write, primary or any")]
    SessionAttrs(String),
    /// A host's URL does not parse.
    #[error("{0}")]
    Url(#[from] sqlx::Error),
}

impl Hosts {
    /// Splits `url`'s host list (`h1:p1,h2:p2`) into one URL per host;
    /// `target_session_attrs` (read-write, primary or any: `sagad` always
    /// looks for the writable host) is taken out.
    pub fn parse(url: &str) -> Result<Hosts, HostsError> {
        let (url, attrs) = without_param(url, "target_session_attrs");
        if let Some(a) = attrs.filter(|a| !matches!(a.as_str(), "read-write" | "primary" | "any")) {
            return Err(HostsError::SessionAttrs(a));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            connect_options(&url)?;
            return Ok(Hosts { urls: vec![url] });
        };
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (user, hosts) = match authority.rfind('@') {
            Some(at) => authority.split_at(at + 1),
            None => ("", authority),
        };
        let urls: Vec<String> = hosts
            .split(',')
            .map(|h| format!("{scheme}://{user}{h}{tail}"))
            .collect();
        for u in &urls {
            connect_options(u)?;
        }
        Ok(Hosts { urls })
    }

    /// One URL per host.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The first host, in order, that answers within `timeout` with a
    /// session that accepts writes; its URL and options.
    pub async fn find_writable(&self, timeout: Duration) -> Option<(&str, PgConnectOptions)> {
        for url in &self.urls {
            let Ok(options) = connect_options(url) else {
                continue;
            };
            let probe = async {
                let mut conn = match PgConnection::connect_with(&options).await {
                    // The database is created at the first start: ask the
                    // server through its maintenance database.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                        PgConnection::connect_with(&options.clone().database("postgres")).await?
                    }
                    other => other?,
                };
                let writable = writable(&mut conn).await;
                let _ = conn.close().await;
                writable
            };
            if let Ok(Ok(true)) = tokio::time::timeout(timeout, probe).await {
                return Some((url, options));
            }
        }
        None
    }
}

/// Whether a session accepts writes: not a standby, not read-only.
async fn writable(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'",
    )
    .fetch_one(conn)
    .await?;
    row.try_get(0)
}

/// `url` without query parameter `name`, and its value.
fn without_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_owned());
                false
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_owned(), value)
    } else {
        (format!("{base}?{}", kept.join("&")), value)
    }
}

/// Connection options for one host's `url`: libpq's parameters
/// (`sslmode`, `sslrootcert`, …), except that a server on this machine (a
/// loopback address or a Unix socket) named without `sslmode` is reached
/// without TLS. sqlx's default, `prefer`, would encrypt every local
/// statement for nothing: measured here, it halved throughput at 64 callers
/// (saga-bench c = 64: 1,400–1,500 against 2,550–3,150 sagas/s).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local && !url.contains("sslmode=") {
        Ok(options.ssl_mode(PgSslMode::Disable))
    } else {
        Ok(options)
    }
}

/// Whether the database answered the last probe. Shared by the API (which
/// answers UNAVAILABLE at once while it is down), `/readyz` and the worker.
#[derive(Debug)]
pub struct Health {
    up: AtomicBool,
    /// How many times the database was found away: a connection made
    /// before the last of them may be dead though it looks alive.
    generation: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: AtomicBool::new(true),
            generation: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// The database answered its last probe.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Bumped each time the database is found away.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    fn set(&self, up: bool) {
        if !up {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("the database answers again");
            } else {
                tracing::warn!("the database does not answer: refusing work until it does");
            }
        }
    }
}

/// How the probe runs.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Between probes.
    pub every: Duration,
    /// How long one probe (or one host's connection) may take.
    pub timeout: Duration,
}

/// Probes the database until `stop`; marks `health`; when the host in use
/// fails or is no longer writable and there are several, moves `pool` to
/// the writable one.
pub async fn watch(
    pool: PgPool,
    hosts: Arc<Hosts>,
    health: Arc<Health>,
    probe: Probe,
    stop: CancellationToken,
) {
    let mut conn: Option<PgConnection> = None;
    loop {
        let ok = probe_round(&mut conn, &pool, probe.timeout).await;
        if !ok && hosts.urls().len() > 1 {
            if let Some((_, options)) = hosts.find_writable(probe.timeout).await {
                let host = options.get_host().to_owned();
                let port = options.get_port();
                let moved = pool.connect_options().get_host() != host
                    || pool.connect_options().get_port() != port;
                if moved {
                    tracing::warn!(%host, port, "the writable database moved; following it");
                    pool.set_connect_options(options);
                }
            }
        }
        health.set(ok);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(probe.every) => {}
        }
    }
}

/// Whether the database answers: a probe on the probe's connection, and
/// when that fails, once more on a new one — what broke may be only that
/// connection, and a false "away" would refuse every call until the next
/// round. Leaves no connection behind after a failure.
async fn probe_round(conn: &mut Option<PgConnection>, pool: &PgPool, timeout: Duration) -> bool {
    let tries = if conn.is_some() { 2 } else { 1 };
    for _ in 0..tries {
        if tokio::time::timeout(timeout, check(conn, pool))
            .await
            .unwrap_or(false)
        {
            return true;
        }
        *conn = None;
    }
    false
}

/// One probe on the probe's own connection (made as the pool's are).
async fn check(conn: &mut Option<PgConnection>, pool: &PgPool) -> bool {
    if conn.is_none() {
        match pool.connect_options().connect().await {
            Ok(c) => *conn = Some(c),
            Err(_) => return false,
        }
    }
    match conn.as_mut() {
        Some(c) => matches!(writable(c).await, Ok(true)),
        None => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_url_per_host_keeping_user_path_and_other_parameters() {
        let h = Hosts::parse(
            "postgres://u:pw@h1:5432,h2:5433/sagad?target_session_attrs=read-write&sslmode=disable",
        )
        .unwrap();
        assert_eq!(
            h.urls(),
            [
                "postgres://u:pw@h1:5432/sagad?sslmode=disable",
                "postgres://u:pw@h2:5433/sagad?sslmode=disable"
            ]
        );
        let one = Hosts::parse("postgres://127.0.0.1/sagad").unwrap();
        assert_eq!(one.urls(), ["postgres://127.0.0.1/sagad"]);
        let no_user = Hosts::parse("postgresql://a,b:6000?target_session_attrs=primary").unwrap();
        assert_eq!(no_user.urls(), ["postgresql://a", "postgresql://b:6000"]);
    }

    #[test]
    fn a_session_sagad_cannot_write_in_is_refused() {
        let e = Hosts::parse("postgres://a,b/db?target_session_attrs=read-only").unwrap_err();
        assert!(
            e.to_string().contains("target_session_attrs=read-only"),
            "{e}"
        );
        assert!(Hosts::parse("postgres://a:notaport/db").is_err());
    }
}
