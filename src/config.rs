//! `sagad`'s settings: flags with environment fallbacks. Limits carry their
//! unit in their name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::participant::{BalanceConfig, Policy};

/// Room in a gRPC message beyond its payloads (names, ids, errors,
/// timestamps, metadata).
const GRPC_ENVELOPE_BYTES: usize = 1 << 20;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The default database: a local PostgreSQL, database `sagad`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/sagad";

/// Settings of one `sagad` process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "sagad",
    version,
    about = "The saga coordinator: keeps multi-service updates consistent"
)]
pub struct Config {
    /// Log lines as text, or as one JSON object per line (the event's fields
    /// at the top level; the saga's `saga_id`, `epoch` and `trace_id` under
    /// `span`).
    #[arg(long, env = "SAGAD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this collector (for example
    /// http://127.0.0.1:4317). Off by default; the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT also
    /// turn it on, OTEL_SERVICE_NAME names the service (default sagad),
    /// OTEL_EXPORTER_OTLP_HEADERS adds headers, OTEL_BSP_* tune batching.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// PostgreSQL URL; the database is created if it does not exist and the
    /// role may create it. Or `sqlite:PATH`: one node on a SQLite file
    /// (created if missing), as `sagad dev` runs.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Delete settled sagas (COMPLETED, COMPENSATED, RESOLVED) and their
    /// history this many days after they settled; 0 keeps them for ever.
    #[arg(long, env = "SAGAD_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u32,
    /// `dev`: run with zero set-up on an embedded SQLite file.
    #[command(subcommand)]
    pub mode: Option<Mode>,
    /// Address of the gRPC API (CoordinatorService and grpc.health.v1).
    #[arg(long, env = "SAGAD_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin HTTP server (/healthz, /readyz).
    #[arg(long, env = "SAGAD_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    pub admin_addr: SocketAddr,
    /// A token for one principal, `admin`, with every role (at least 16
    /// characters). Setting it, like --auth-file or --jwt-key, makes every
    /// call and admin request need a credential.
    #[arg(long, env = "SAGAD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The admin token, read from this file (out of the process list);
    /// reloaded on SIGHUP.
    #[arg(long, env = "SAGAD_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    /// YAML file of principals: `principals: [{name, token_sha256,
    /// cert_subject, roles}]`. Reloaded on SIGHUP.
    #[arg(long, env = "SAGAD_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Key that JWTs (`authorization: Bearer <jwt>`) are checked with: an
    /// HS256 secret, an RSA or EC PEM public key, or a JWKS file. The
    /// token's `sub` is the principal, its `roles` claim the roles.
    /// Reloaded on SIGHUP.
    #[arg(long, env = "SAGAD_JWT_KEY")]
    pub jwt_key: Option<PathBuf>,
    /// JWTs must carry this `iss`.
    #[arg(long, env = "SAGAD_JWT_ISSUER", requires = "jwt_key")]
    pub jwt_issuer: Option<String>,
    /// JWTs must name this in `aud`.
    #[arg(long, env = "SAGAD_JWT_AUDIENCE", requires = "jwt_key")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on a JWT's `exp` and `nbf`.
    #[arg(long, env = "SAGAD_JWT_LEEWAY_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub jwt_leeway_secs: u64,
    /// A static participant endpoint, NAME=URL (repeatable; a name may have
    /// several URLs). Env: comma-separated.
    #[arg(long = "participant", env = "SAGAD_PARTICIPANTS", value_delimiter = ',', value_parser = parse_participant)]
    pub participants: Vec<(String, String)>,
    /// How long a saga's lease lasts unrenewed: after a coordinator dies,
    /// others take its sagas over this long after its last renewal (leases
    /// are renewed in the background every fifth of this, whatever the
    /// steps' timeouts).
    #[arg(long, env = "SAGAD_LEASE_TTL_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub lease_ttl_ms: u64,
    /// Fallback poll for due work (notifications normally wake the worker).
    #[arg(long, env = "SAGAD_POLL_INTERVAL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub poll_interval_ms: u64,
    /// Most sagas claimed by one query.
    #[arg(long, env = "SAGAD_CLAIM_BATCH_MAX", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub claim_batch_max: u32,
    /// Most sagas this process drives at once.
    #[arg(long, env = "SAGAD_SAGAS_MAX", default_value_t = 1_024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sagas_max: u64,
    /// Largest saga input or step output, in bytes.
    #[arg(long, env = "SAGAD_PAYLOAD_BYTES_MAX", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=64 << 20))]
    pub payload_bytes_max: u64,
    /// Deepest nesting of arrays and objects in a saga input or step
    /// output.
    #[arg(long, env = "SAGAD_JSON_DEPTH_MAX", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub json_depth_max: u32,
    /// How long in-flight calls may finish on shutdown before they are
    /// abandoned.
    #[arg(long, env = "SAGAD_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Longest WaitSaga timeout (longer requests are capped).
    #[arg(long, env = "SAGAD_WAIT_MAX_MS", default_value_t = 300_000)]
    pub wait_max_ms: u64,
    /// A saga not settled and without progress for this long is "stuck".
    #[arg(long, env = "SAGAD_STUCK_AFTER_MS", default_value_t = 300_000)]
    pub stuck_after_ms: u64,
    /// A saga whose current step has made this many attempts is "stuck".
    #[arg(long, env = "SAGAD_STUCK_ATTEMPTS", default_value_t = 5)]
    pub stuck_attempts: u32,
    /// Database connections of this process.
    #[arg(long, env = "SAGAD_DB_CONNECTIONS_MAX", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=1_000))]
    pub db_connections_max: u32,
    /// Connections that batch saga creations and decisions into one
    /// statement each (group commit); in addition to the pool above.
    #[arg(long, env = "SAGAD_DB_WRITE_LANES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub db_write_lanes: u32,
    /// Threads running the coordinator (0: one per CPU core).
    #[arg(long, env = "SAGAD_WORKER_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_024))]
    pub worker_threads: u32,
    /// How a participant's calls are spread over its instances,
    /// NAME=round-robin|least-outstanding (repeatable; default round-robin).
    #[arg(long = "participant-balance", env = "SAGAD_PARTICIPANT_BALANCE", value_delimiter = ',', value_parser = parse_balance)]
    pub participant_balance: Vec<(String, Policy)>,
    /// Most calls in flight from this coordinator to a participant,
    /// NAME=N (repeatable; default no cap). Calls beyond it wait.
    #[arg(long = "participant-in-flight-max", env = "SAGAD_PARTICIPANT_IN_FLIGHT_MAX", value_delimiter = ',', value_parser = parse_in_flight_max)]
    pub participant_in_flight_max: Vec<(String, usize)>,
    /// Most calls a second from this coordinator to a participant, NAME=N
    /// (repeatable; default no limit). Calls beyond it wait.
    #[arg(long = "participant-rate-per-sec", env = "SAGAD_PARTICIPANT_RATE_PER_SEC", value_delimiter = ',', value_parser = parse_rate_per_sec)]
    pub participant_rate_per_sec: Vec<(String, f64)>,
    /// Calls in a row that fail to reach a participant instance before its
    /// circuit breaker opens.
    #[arg(long, env = "SAGAD_PARTICIPANT_BREAKER_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub participant_breaker_failures: u32,
    /// How long an open breaker lets no call through before one probe.
    #[arg(long, env = "SAGAD_PARTICIPANT_BREAKER_OPEN_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub participant_breaker_open_ms: u64,
    /// How long registered participant endpoints are cached.
    #[arg(long, env = "SAGAD_DISCOVERY_CACHE_MS", default_value_t = 1_000)]
    pub discovery_cache_ms: u64,
    /// TCP connect timeout towards a participant.
    #[arg(long, env = "SAGAD_PARTICIPANT_CONNECT_TIMEOUT_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub participant_connect_timeout_ms: u64,
    /// Heartbeat TTL of a participant instance that sends none.
    #[arg(long, env = "SAGAD_HEARTBEAT_TTL_DEFAULT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub heartbeat_ttl_default_ms: u64,
    /// WaitSaga timeout when the request sets none (capped by
    /// --wait-max-ms).
    #[arg(long, env = "SAGAD_WAIT_DEFAULT_MS", default_value_t = 30_000)]
    pub wait_default_ms: u64,
    /// How often a WaitSaga caller re-reads a saga driven elsewhere when no
    /// notification arrives (notifications are a hint; this is the
    /// guarantee).
    #[arg(long, env = "SAGAD_WAIT_RECHECK_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub wait_recheck_ms: u64,
    /// Settled-saga notices buffered for WaitSaga callers; a caller that
    /// falls further behind re-reads its saga.
    #[arg(long, env = "SAGAD_WAIT_NOTICES_MAX", default_value_t = 4_096, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub wait_notices_max: u64,
    /// Rows of a saga list (ListSagas, admin page and API) when the request
    /// asks for none.
    #[arg(long, env = "SAGAD_LIST_PAGE_ROWS_DEFAULT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub list_page_rows_default: u32,
    /// Most rows of a saga list; larger requests are capped.
    #[arg(long, env = "SAGAD_LIST_PAGE_ROWS_MAX", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub list_page_rows_max: u32,
    /// A saga list page holds sagas (inputs, outputs) of at most this many
    /// bytes (the page is shorter; its token continues it). The default
    /// keeps answers under gRPC clients' usual 4 MiB receive limit.
    #[arg(long, env = "SAGAD_LIST_PAGE_BYTES_MAX", default_value_t = 3 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    pub list_page_bytes_max: u64,
    /// Most WaitSaga calls waiting at once in this process; more are
    /// answered RESOURCE_EXHAUSTED.
    #[arg(long, env = "SAGAD_WAITS_MAX", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub waits_max: u32,
    /// StartSaga and RegisterDefinition calls per second per principal
    /// (token bucket; 0: no limit); more are answered RESOURCE_EXHAUSTED
    /// with a retry delay.
    #[arg(long, env = "SAGAD_START_RATE_PER_PRINCIPAL", default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub start_rate_per_principal: u32,
    /// How many such calls a principal may make at once above the rate.
    #[arg(long, env = "SAGAD_START_BURST_PER_PRINCIPAL", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub start_burst_per_principal: u32,
    /// Largest admin HTTP request body (forms, JSON notes).
    #[arg(long, env = "SAGAD_ADMIN_BODY_BYTES_MAX", default_value_t = 64 << 10, value_parser = clap::value_parser!(u64).range(1..=16 << 20))]
    pub admin_body_bytes_max: u64,
    /// How long an admin HTTP client may take to send a request's headers
    /// (and how long an idle connection is kept).
    #[arg(long, env = "SAGAD_ADMIN_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub admin_header_timeout_ms: u64,
    /// Failed credentials (logins, bearer tokens) one address may present
    /// to the admin server per minute before it is answered 429 for the
    /// rest of that minute.
    #[arg(long, env = "SAGAD_ADMIN_AUTH_FAILURES_PER_MINUTE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub admin_auth_failures_per_minute: u32,
    /// How long a request waits for a free database connection before it is
    /// answered UNAVAILABLE.
    #[arg(long, env = "SAGAD_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub db_acquire_timeout_ms: u64,
    /// How often the database is probed (on a connection of its own). While
    /// a probe fails the API answers UNAVAILABLE at once, /readyz 503, and
    /// the worker claims nothing; with several hosts in --database-url, a
    /// failed probe looks for the writable one.
    #[arg(long, env = "SAGAD_DB_PROBE_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub db_probe_interval_ms: u64,
    /// How long one probe may take before the database counts as away.
    #[arg(long, env = "SAGAD_DB_PROBE_TIMEOUT_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub db_probe_timeout_ms: u64,
    /// Pause before the notification listener reconnects after losing the
    /// database (the worker polls meanwhile).
    #[arg(long, env = "SAGAD_DB_LISTEN_RETRY_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub db_listen_retry_ms: u64,
    /// Listen beyond loopback without the protection that is missing (TLS,
    /// authentication). Logged as a warning at every start.
    #[arg(long, env = "SAGAD_INSECURE_ALLOW_PLAINTEXT")]
    pub insecure_allow_plaintext: bool,
    /// PEM certificate chain: serve the gRPC API over TLS (and the admin
    /// server, unless --admin-tls-cert is given). Reloaded on SIGHUP.
    #[arg(long, env = "SAGAD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SAGAD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: gRPC clients must present a certificate signed
    /// by one of them (mutual TLS); others are refused at the handshake.
    #[arg(long, env = "SAGAD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM certificate chain of the admin server, if not --tls-cert's.
    #[arg(long, env = "SAGAD_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "SAGAD_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// PEM CA bundle that `https://` participant endpoints are verified
    /// against (default: the system's roots).
    #[arg(long, env = "SAGAD_PARTICIPANT_CA")]
    pub participant_ca: Option<PathBuf>,
    /// PEM certificate chain sagad presents to participants that ask for a
    /// client certificate (mutual TLS towards participants).
    #[arg(long, env = "SAGAD_PARTICIPANT_CERT", requires = "participant_key")]
    pub participant_cert: Option<PathBuf>,
    /// PEM private key of --participant-cert.
    #[arg(long, env = "SAGAD_PARTICIPANT_KEY", requires = "participant_cert")]
    pub participant_key: Option<PathBuf>,
    /// A file holding the token sagad sends to participants as
    /// `authorization: Bearer <token>` (the SDK participant's
    /// `require_token` checks it).
    #[arg(long, env = "SAGAD_PARTICIPANT_TOKEN_FILE")]
    pub participant_token_file: Option<PathBuf>,
    /// Refuse plaintext (`http://`) participant endpoints, static or
    /// registered by heartbeat.
    #[arg(long, env = "SAGAD_REQUIRE_PARTICIPANT_TLS")]
    pub require_participant_tls: bool,
    /// How long a client may take to complete the TLS handshake.
    #[arg(long, env = "SAGAD_TLS_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub tls_handshake_timeout_ms: u64,
    /// How long /readyz waits for the database to answer.
    #[arg(long, env = "SAGAD_READYZ_TIMEOUT_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub readyz_timeout_ms: u64,
}

fn parse_participant(s: &str) -> Result<(String, String), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=URL, e.g. payments=http://127.0.0.1:7001"))?;
    crate::domain::check_name("participant", name, false).map_err(|e| e.to_string())?;
    crate::participant::check_endpoint(url).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((name.to_owned(), url.to_owned()))
}

/// `NAME=VALUE` for a per-participant setting.
fn named<T>(
    s: &str,
    what: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<(String, T), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME={what}"))?;
    crate::domain::check_name("participant", name, false).map_err(|e| e.to_string())?;
    let value = parse(value).ok_or_else(|| format!("{s:?}: expected NAME={what}"))?;
    Ok((name.to_owned(), value))
}

fn parse_balance(s: &str) -> Result<(String, Policy), String> {
    named(s, "round-robin|least-outstanding", Policy::parse)
}

fn parse_in_flight_max(s: &str) -> Result<(String, usize), String> {
    named(s, "N (1 to 1,000,000)", |v| {
        v.parse().ok().filter(|n| (1..=1_000_000).contains(n))
    })
}

fn parse_rate_per_sec(s: &str) -> Result<(String, f64), String> {
    named(s, "N calls a second (0.001 to 1,000,000)", |v| {
        v.parse()
            .ok()
            .filter(|n: &f64| (0.001..=1_000_000.0).contains(n))
    })
}

/// How `sagad` runs, beside its flags.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Mode {
    /// Run the whole coordinator — gRPC API, worker, admin page, /metrics —
    /// on an embedded SQLite file: nothing to install, one node (use
    /// PostgreSQL to run several coordinators). Flags go before `dev`.
    Dev {
        /// Where the SQLite file (`sagad.db`) lives; created if missing.
        #[arg(long, env = "SAGAD_DATA_DIR", default_value = ".sagad")]
        data_dir: PathBuf,
    },
}

impl Config {
    /// The SQLite file to run on, if not PostgreSQL: `sagad dev`'s, or a
    /// `sqlite:PATH` database URL's.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        if let Some(Mode::Dev { data_dir }) = &self.mode {
            return Some(data_dir.join("sagad.db"));
        }
        let rest = self.database_url.strip_prefix("sqlite:")?;
        Some(PathBuf::from(rest.strip_prefix("//").unwrap_or(rest)))
    }

    /// A configuration with every default and the given database, for
    /// embedding and tests (no flags or environment read).
    pub fn with_database(database_url: &str) -> Config {
        let mut c = Config::parse_from(["sagad"]);
        c.database_url = database_url.to_owned();
        c
    }

    /// Static endpoints grouped by participant.
    pub fn static_participants(&self) -> HashMap<String, Vec<String>> {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for (name, url) in &self.participants {
            m.entry(name.clone()).or_default().push(url.clone());
        }
        m
    }

    /// Balancing and back-pressure towards participants.
    pub fn balance(&self) -> BalanceConfig {
        BalanceConfig {
            policies: self.participant_balance.iter().cloned().collect(),
            in_flight_max: self.participant_in_flight_max.iter().cloned().collect(),
            rate_per_sec: self.participant_rate_per_sec.iter().cloned().collect(),
            breaker_failures: self.participant_breaker_failures,
            breaker_open: Duration::from_millis(self.participant_breaker_open_ms),
        }
    }

    /// `lease_ttl_ms` as a duration.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// How large and deep inputs and outputs may be.
    pub fn json_limits(&self) -> crate::domain::JsonLimits {
        crate::domain::JsonLimits {
            bytes_max: self.payload_bytes(),
            depth_max: self.json_depth_max as usize,
        }
    }

    /// `payload_bytes_max` in memory terms.
    pub fn payload_bytes(&self) -> usize {
        usize::try_from(self.payload_bytes_max).unwrap_or(usize::MAX)
    }

    /// Largest gRPC request accepted: one payload (a saga input) and room
    /// for the rest of the message (a definition, metadata).
    pub fn grpc_request_bytes_max(&self) -> usize {
        self.payload_bytes().saturating_add(GRPC_ENVELOPE_BYTES)
    }

    /// Largest gRPC answer sent: a whole saga — its input and one output
    /// per step, each at most `payload_bytes_max` — and room for the rest.
    /// A larger answer fails with RESOURCE_EXHAUSTED instead of growing
    /// without bound.
    pub fn grpc_response_bytes_max(&self) -> usize {
        self.payload_bytes()
            .saturating_mul(crate::domain::STEPS_MAX + 1)
            .saturating_add(GRPC_ENVELOPE_BYTES)
    }

    /// The gRPC API's TLS files, if it serves TLS.
    pub fn grpc_tls(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// The admin server's TLS files, if it serves TLS: its own, else the
    /// gRPC API's certificate (browsers are not asked for a client
    /// certificate).
    pub fn admin_tls(&self) -> Option<crate::tls::TlsFiles> {
        let (cert, key) = match (&self.admin_tls_cert, &self.admin_tls_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (self.tls_cert.clone()?, self.tls_key.clone()?),
        };
        Some(crate::tls::TlsFiles {
            cert,
            key,
            client_ca: None,
        })
    }

    /// Where principals come from.
    pub fn auth(&self) -> crate::auth::AuthConfig {
        crate::auth::AuthConfig {
            auth_file: self.auth_file.clone(),
            jwt_key: self.jwt_key.clone(),
            jwt: crate::auth::jwt::JwtRules {
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
                leeway_secs: self.jwt_leeway_secs,
            },
            admin_token: self.admin_token.clone(),
            admin_token_file: self.admin_token_file.clone(),
        }
    }

    /// What is exposed beyond loopback without protection, one line each:
    /// a listener there needs TLS and authentication.
    fn exposures(&self) -> Vec<(&'static str, SocketAddr, &'static str)> {
        let mut out = Vec::new();
        let auth = self.auth().enabled();
        let listeners = [
            ("--grpc-addr", self.grpc_addr, self.grpc_tls().is_some()),
            ("--admin-addr", self.admin_addr, self.admin_tls().is_some()),
        ];
        for (flag, addr, tls) in listeners {
            if addr.ip().is_loopback() {
                continue;
            }
            match (tls, auth) {
                (true, true) => {}
                (false, true) => out.push((flag, addr, "there is no TLS (set --tls-cert/--tls-key, or --admin-tls-cert for the admin server): credentials and every saga's data would cross the network in plaintext")),
                (true, false) => out.push((flag, addr, "there is no authentication (set --auth-file, --jwt-key or --admin-token): anyone who reaches it could start sagas, register definitions, act as an operator and pose as a participant")),
                (false, false) => out.push((flag, addr, "there is neither TLS (--tls-cert/--tls-key) nor authentication (--auth-file, --jwt-key or --admin-token)")),
            }
        }
        out
    }

    /// What an operator must hear at every start: what is served beyond
    /// loopback without protection (`--insecure-allow-plaintext`).
    pub fn warnings(&self) -> Vec<String> {
        self.exposures()
            .into_iter()
            .map(|(flag, addr, why)| {
                format!("{flag} {addr} is beyond loopback and {why} (--insecure-allow-plaintext)")
            })
            .collect()
    }

    /// Settings that cannot be checked one flag at a time. Nothing listens
    /// beyond loopback without TLS and authentication unless told so
    /// explicitly (`--insecure-allow-plaintext`).
    pub fn check(&self) -> Result<(), String> {
        if let Some(path) = self.sqlite_path() {
            let name = path.to_string_lossy();
            if name.is_empty() || name.starts_with(':') || name.contains("mode=memory") {
                return Err(format!(
                    "--database-url sqlite:{name}: name a file (an in-memory database would \
                     lose every saga at exit)"
                ));
            }
        }
        if !self.insecure_allow_plaintext {
            if let Some((flag, addr, why)) = self.exposures().into_iter().next() {
                return Err(format!(
                    "{flag} {addr} is not a loopback address, and {why}. Listen on 127.0.0.1, \
                     or pass --insecure-allow-plaintext to accept that"
                ));
            }
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err("--admin-token must be at least 16 characters".into());
        }
        if self.list_page_rows_default > self.list_page_rows_max {
            return Err(format!(
                "--list-page-rows-default {} is above --list-page-rows-max {}",
                self.list_page_rows_default, self.list_page_rows_max
            ));
        }
        Ok(())
    }
}

/// The URL with any password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn parses_participants() {
        let c = Config::try_parse_from([
            "sagad",
            "--participant",
            "pay=http://127.0.0.1:7001",
            "--participant",
            "pay=http://127.0.0.1:7002",
        ]);
        let c = c.expect("valid flags");
        assert_eq!(c.static_participants()["pay"].len(), 2);
        assert!(Config::try_parse_from(["sagad", "--participant", "pay"]).is_err());
        assert!(Config::try_parse_from(["sagad", "--participant", "pay=ftp://x"]).is_err());
    }
}
