//! Wiring: one `sagad` process — database, worker, listener, gRPC and admin
//! servers — under one cancellation token.
//!
//! Shutdown, in order (mini-redis style): `stop` is cancelled → the claim
//! loop ends and every saga task releases its saga at its next step boundary
//! → the servers stop accepting and finish their requests → after
//! `shutdown_grace_ms`, calls still in flight are abandoned → every lease
//! this process still holds is released, so another coordinator continues
//! at once instead of waiting for expiry.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::Connection as _;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admin::{AdminConfig, AdminState};
use crate::api::{ApiConfig, CoordinatorApi};
use crate::auth::Authenticator;
use crate::config::{redact_url, Config};
use crate::domain::Defaults;
use crate::metrics::Metrics;
use crate::ops::Ops;
use crate::participant::{CallerConfig, Participants};
use crate::proto::coordinator_service_server::CoordinatorServiceServer;
pub use crate::store::pg::hosts::connect_options;
use crate::store::pg::hosts::{Health, Hosts, HostsError, Probe};
use crate::store::pg::{PgStore, CHANNEL_DUE, CHANNEL_SETTLED, MIGRATOR};
use crate::store::sqlite::{Notice, SqliteStore};
use crate::store::{Database, OwnerId, SagaStore, StuckRule};
use crate::telemetry::{Telemetry, TelemetryConfig};
use crate::tls::{Tls, TlsError, TlsListener};
use crate::worker::{Worker, WorkerConfig};

/// Start-up failures, each one line naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database cannot be reached or created.
    #[error("cannot connect to database at {url}: {source}")]
    Database {
        /// Redacted URL.
        url: String,
        /// Cause.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("applying migrations to {url} failed: {source}")]
    Migrate {
        /// Redacted URL.
        url: String,
        /// Cause.
        source: sqlx::migrate::MigrateError,
    },
    /// A listening address cannot be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Inconsistent settings.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A TLS certificate, key or CA does not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The SQLite file cannot be used (or another sagad has it).
    #[error(transparent)]
    Sqlite(#[from] crate::store::sqlite::OpenError),
}

/// Connects to the database — PostgreSQL, or a SQLite file for a
/// `sqlite:PATH` URL — creating it if it is missing, and applies the
/// migrations.
pub async fn connect(cfg: &Config) -> Result<Database, Error> {
    match cfg.sqlite_path() {
        Some(path) => Ok(Database::Sqlite(SqliteStore::open(&path).await?)),
        None => Ok(Database::Postgres(connect_postgres(cfg).await?)),
    }
}

async fn connect_postgres(cfg: &Config) -> Result<PgPool, Error> {
    let url = &cfg.database_url;
    let db_err = |source| Error::Database {
        url: redact_url(url),
        source,
    };
    let hosts = Hosts::parse(url).map_err(|e| match e {
        HostsError::Url(source) => db_err(source),
        other => Error::Config(other.to_string()),
    })?;
    let (url, options) = match hosts.urls() {
        [one] => (one.as_str(), connect_options(one).map_err(db_err)?),
        _ => {
            let timeout = Duration::from_millis(cfg.db_acquire_timeout_ms);
            hosts.find_writable(timeout).await.ok_or_else(|| {
                Error::Config(format!(
                    "none of the {} hosts of {} accepts writes",
                    hosts.urls().len(),
                    redact_url(url)
                ))
            })?
        }
    };
    if !sqlx::Postgres::database_exists(url).await.map_err(db_err)? {
        tracing::info!(url = %redact_url(url), "database does not exist; creating it");
        if let Err(e) = sqlx::Postgres::create_database(url).await {
            // Another process may have created it meanwhile.
            if !sqlx::Postgres::database_exists(url).await.map_err(db_err)? {
                return Err(db_err(e));
            }
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(cfg.db_connections_max)
        .acquire_timeout(Duration::from_millis(cfg.db_acquire_timeout_ms))
        // sqlx pings a connection before handing it out (its default). That
        // costs a round trip per query, but without it every pooled
        // connection fails one query after a database restart (the /readyz
        // test caught it). TODO-perf: ping only connections idle a while.
        .connect_with(options)
        .await
        .map_err(db_err)?;
    migrate(url).await?;
    Ok(pool)
}

/// Applies the migrations on a connection of its own that does not pass on
/// PostgreSQL's NOTICEs ("relation _sqlx_migrations already exists,
/// skipping" on every start).
async fn migrate(url: &str) -> Result<(), Error> {
    let migrate_err = |source| Error::Migrate {
        url: redact_url(url),
        source,
    };
    let db_err = |source| Error::Database {
        url: redact_url(url),
        source,
    };
    let options = connect_options(url)
        .map_err(db_err)?
        .options([("client_min_messages", "warning")]);
    let mut conn = PgConnection::connect_with(&options).await.map_err(db_err)?;
    MIGRATOR.run(&mut conn).await.map_err(migrate_err)?;
    let _ = conn.close().await;
    Ok(())
}

/// A running coordinator.
pub struct Coordinator {
    /// Where the gRPC API listens.
    pub grpc_addr: std::net::SocketAddr,
    /// Where the admin HTTP server listens.
    pub admin_addr: std::net::SocketAddr,
    /// This process's owner id.
    pub owner: OwnerId,
    tls: Vec<Arc<Tls>>,
    auth: Arc<Authenticator>,
    stop: CancellationToken,
    done: JoinHandle<()>,
}

impl Coordinator {
    /// Shuts down gracefully and waits until it is done.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }

    /// Reads the TLS certificates and keys from disk again (what SIGHUP
    /// does): new connections get them, established ones keep theirs. A
    /// file that does not load leaves that listener's configuration as it
    /// was.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        self.tls.iter().try_for_each(|t| t.reload())
    }

    /// The listeners' TLS configurations, to reload from elsewhere.
    pub fn tls(&self) -> Vec<Arc<Tls>> {
        self.tls.clone()
    }

    /// Reads the auth file and the JWT key again (what SIGHUP does). A file
    /// that does not load leaves the previous principals in force.
    pub fn reload_auth(&self) -> Result<(), String> {
        self.auth.reload()
    }

    /// The authenticator, to reload from elsewhere.
    pub fn auth(&self) -> Arc<Authenticator> {
        self.auth.clone()
    }

    /// Waits until the coordinator has stopped (after `stop` was cancelled).
    pub async fn stopped(self) {
        let _ = self.done.await;
    }
}

/// Starts every part of a coordinator on an already-migrated pool. The
/// coordinator stops when `stop` is cancelled.
pub async fn start(
    cfg: Config,
    db: Database,
    stop: CancellationToken,
) -> Result<Coordinator, Error> {
    cfg.check().map_err(Error::Config)?;
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let parts = Parts::build(&cfg, db.clone(), stop.clone())?;
    let (grpc_listener, grpc_addr) = bind("gRPC", cfg.grpc_addr).await?;
    let (admin_listener, admin_addr) = bind("admin", cfg.admin_addr).await?;

    let handshake = Duration::from_millis(cfg.tls_handshake_timeout_ms);
    let grpc_tls = cfg
        .grpc_tls()
        .map(|f| Tls::load(f, &[b"h2"], handshake))
        .transpose()?;
    let admin_tls = cfg
        .admin_tls()
        .map(|f| Tls::load(f, &[b"http/1.1"], handshake))
        .transpose()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServiceServer<CoordinatorApi>>()
        .await;
    let api = CoordinatorServiceServer::new(parts.api)
        .max_decoding_message_size(cfg.grpc_request_bytes_max())
        .max_encoding_message_size(cfg.grpc_response_bytes_max());
    let api = tonic::service::interceptor::InterceptedService::new(api, fail_fast(&parts.health));
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(api);
    let shutdown = stop.clone().cancelled_owned();
    let grpc = match &grpc_tls {
        // Accepted sockets get TCP_NODELAY only through TcpIncoming (a plain
        // listener stream leaves Nagle on: replies then wait for ACKs).
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            shutdown,
        )),
        Some(tls) => {
            let conns = tls.clone().incoming(grpc_listener, stop.clone());
            let conns =
                tokio_stream::wrappers::ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
            tokio::spawn(router.serve_with_incoming_shutdown(conns, shutdown))
        }
    };
    let admin = match &admin_tls {
        None => tokio::spawn(crate::admin::serve(
            admin_listener,
            parts.admin,
            stop.clone(),
        )),
        Some(tls) => {
            let conns = tls.clone().incoming(admin_listener, stop.clone());
            let listener = TlsListener::new(conns, admin_addr);
            tokio::spawn(crate::admin::serve(listener, parts.admin, stop.clone()))
        }
    };
    let tasks = Tasks {
        probe: probe(&cfg, &db, &parts.health, &stop)?,
        grpc,
        admin,
        listener: match db {
            Database::Postgres(pool) => tokio::spawn(listen(
                pool,
                parts.worker.clone(),
                parts.settled,
                Duration::from_millis(cfg.db_listen_retry_ms),
                stop.clone(),
            )),
            Database::Sqlite(store) => tokio::spawn(listen_local(
                store.notices(),
                parts.worker.clone(),
                parts.settled,
                stop.clone(),
            )),
        },
        claimer: tokio::spawn(parts.worker.clone().run_claim_loop()),
        renewer: tokio::spawn(parts.worker.clone().run_renewal_loop()),
        retention: (cfg.retention_days > 0).then(|| {
            tokio::spawn(crate::retention::run(
                parts.store.clone(),
                parts.worker.clone(),
                parts.metrics.clone(),
                Duration::from_secs(u64::from(cfg.retention_days) * 86_400),
                stop.clone(),
            ))
        }),
    };
    let owner = parts.worker.owner();
    let auth = parts.auth.clone();
    tracing::info!(%grpc_addr, %admin_addr, owner = %owner.0, authentication = auth.enabled(), "sagad started");
    let done = tokio::spawn(shut_down(
        tasks,
        parts.worker,
        parts.store,
        health,
        parts.abandon,
        Duration::from_millis(cfg.shutdown_grace_ms),
        stop.clone(),
    ));
    Ok(Coordinator {
        grpc_addr,
        admin_addr,
        owner,
        tls: grpc_tls.into_iter().chain(admin_tls).collect(),
        auth,
        stop,
        done,
    })
}

/// The parts of a coordinator, wired but not yet serving.
struct Parts {
    store: Arc<dyn SagaStore>,
    metrics: Arc<Metrics>,
    worker: Arc<Worker>,
    api: CoordinatorApi,
    admin: Arc<AdminState>,
    auth: Arc<Authenticator>,
    settled: broadcast::Sender<Uuid>,
    abandon: CancellationToken,
    /// What the database probe last found.
    health: Arc<Health>,
}

impl Parts {
    fn build(cfg: &Config, db: Database, stop: CancellationToken) -> Result<Parts, Error> {
        let auth = Arc::new(Authenticator::new(cfg.auth()).map_err(Error::Config)?);
        let health = Arc::new(Health::default());
        let (store, metrics): (Arc<dyn SagaStore>, Metrics) = match &db {
            Database::Postgres(pool) => {
                let pg = PgStore::with_write_lanes(pool.clone(), cfg.db_write_lanes as usize)
                    .with_health(health.clone());
                let metrics = Metrics::with_db_writes(pg.db_writes());
                (Arc::new(pg), metrics)
            }
            Database::Sqlite(s) => (Arc::new(s.clone()), Metrics::default()),
        };
        let metrics = Arc::new(metrics);
        let participants = Participants::new(
            CallerConfig {
                statics: cfg.static_participants(),
                discovery_cache: Duration::from_millis(cfg.discovery_cache_ms),
                connect_timeout: Duration::from_millis(cfg.participant_connect_timeout_ms),
                json: cfg.json_limits(),
                tls: participant_tls(cfg)?,
                require_tls: cfg.require_participant_tls,
                token: participant_token(cfg)?,
                balance: cfg.balance(),
            },
            store.clone(),
        )
        .map_err(Error::Config)?;
        let participants = Arc::new(participants);
        let abandon = CancellationToken::new();
        let worker = Worker::new(
            store.clone(),
            participants.clone(),
            OwnerId(Uuid::new_v4()),
            WorkerConfig {
                lease_ttl: cfg.lease_ttl(),
                claim_batch_max: cfg.claim_batch_max,
                sagas_max: usize::try_from(cfg.sagas_max).unwrap_or(usize::MAX),
                poll_interval: Duration::from_millis(cfg.poll_interval_ms),
                spans: Telemetry::start(&TelemetryConfig::resolve(cfg.otlp_endpoint.as_deref()))
                    .map_err(Error::Config)?
                    .map(Arc::new),
            },
            stop.clone(),
            abandon.clone(),
            metrics.clone(),
        );
        let ops = Ops::new(store.clone(), worker.clone(), metrics.clone());
        let stuck = StuckRule {
            idle_for: Duration::from_millis(cfg.stuck_after_ms),
            attempts_min: cfg.stuck_attempts,
        };
        let admin = AdminState::new(
            ops.clone(),
            db,
            participants,
            metrics.clone(),
            auth.clone(),
            admin_config(cfg, stuck),
        );
        let notices = usize::try_from(cfg.wait_notices_max).unwrap_or(usize::MAX);
        let (settled, _) = broadcast::channel(notices);
        let api = CoordinatorApi::new(
            ops,
            metrics.clone(),
            settled.clone(),
            stop,
            auth.clone(),
            api_config(cfg, stuck),
        );
        Ok(Parts {
            store,
            metrics,
            worker,
            api,
            admin,
            auth,
            settled,
            abandon,
            health,
        })
    }
}

fn admin_config(cfg: &Config, stuck: StuckRule) -> AdminConfig {
    AdminConfig {
        stuck,
        page_rows_default: cfg.list_page_rows_default,
        page_rows_max: cfg.list_page_rows_max,
        readyz_timeout: Duration::from_millis(cfg.readyz_timeout_ms),
        page_bytes_max: usize::try_from(cfg.list_page_bytes_max).unwrap_or(usize::MAX),
        body_bytes_max: usize::try_from(cfg.admin_body_bytes_max).unwrap_or(usize::MAX),
        header_timeout: Duration::from_millis(cfg.admin_header_timeout_ms),
        auth_failures_per_minute: cfg.admin_auth_failures_per_minute,
    }
}

fn api_config(cfg: &Config, stuck: StuckRule) -> ApiConfig {
    ApiConfig {
        json: cfg.json_limits(),
        defaults: Defaults::default(),
        wait_default: Duration::from_millis(cfg.wait_default_ms.min(cfg.wait_max_ms)),
        wait_max: Duration::from_millis(cfg.wait_max_ms),
        wait_recheck: Duration::from_millis(cfg.wait_recheck_ms),
        page_rows_default: cfg.list_page_rows_default,
        page_rows_max: cfg.list_page_rows_max,
        page_bytes_max: usize::try_from(cfg.list_page_bytes_max).unwrap_or(usize::MAX),
        waits_max: cfg.waits_max as usize,
        start_rate_per_principal: cfg.start_rate_per_principal,
        start_burst_per_principal: cfg.start_burst_per_principal,
        stuck,
        heartbeat_ttl_default: Duration::from_millis(cfg.heartbeat_ttl_default_ms),
        require_participant_tls: cfg.require_participant_tls,
    }
}

/// Reads `--participant-token-file`; the error names the file, never the
/// token.
fn participant_token(
    cfg: &Config,
) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, Error> {
    let Some(path) = &cfg.participant_token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    crate::participant::bearer(&text)
        .map(Some)
        .map_err(|why| Error::Config(format!("{}: {why}", path.display())))
}

/// Reads the TLS files towards participants; an unreadable file is named.
fn participant_tls(cfg: &Config) -> Result<tonic::transport::ClientTlsConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &std::path::Path, why: &str| Error::Config(format!("{}: {why}", p.display()));
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| bad(p, &e.to_string()));
    let certs = |p: &std::path::Path| {
        let pem = read(p)?;
        match CertificateDer::pem_slice_iter(&pem).next() {
            Some(Ok(_)) => Ok(pem),
            _ => Err(bad(p, "no PEM certificate in it")),
        }
    };
    let ca = cfg.participant_ca.as_deref().map(certs).transpose()?;
    let identity = match (&cfg.participant_cert, &cfg.participant_key) {
        (Some(c), Some(k)) => {
            let key = read(k)?;
            // Not the parser's message: it could quote key material.
            PrivateKeyDer::from_pem_slice(&key)
                .map_err(|_| bad(k, "no readable PEM private key in it"))?;
            Some((certs(c)?, key))
        }
        _ => None,
    };
    Ok(crate::participant::client_tls(
        ca.as_deref(),
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    ))
}

/// Binds `addr`; returns the listener and the address it got (port 0 is
/// resolved).
async fn bind(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<(TcpListener, std::net::SocketAddr), Error> {
    let err = |source| Error::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// The tasks of a running coordinator.
struct Tasks {
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: JoinHandle<()>,
    listener: JoinHandle<()>,
    probe: Option<JoinHandle<()>>,
    claimer: JoinHandle<()>,
    renewer: JoinHandle<()>,
    retention: Option<JoinHandle<()>>,
}

/// The database probe (PostgreSQL; a SQLite file is never away).
fn probe(
    cfg: &Config,
    db: &Database,
    health: &Arc<Health>,
    stop: &CancellationToken,
) -> Result<Option<JoinHandle<()>>, Error> {
    let Database::Postgres(pool) = db else {
        return Ok(None);
    };
    let hosts = Hosts::parse(&cfg.database_url).map_err(|e| Error::Config(e.to_string()))?;
    let probe = Probe {
        every: Duration::from_millis(cfg.db_probe_interval_ms),
        timeout: Duration::from_millis(cfg.db_probe_timeout_ms),
    };
    Ok(Some(tokio::spawn(crate::store::pg::hosts::watch(
        pool.clone(),
        Arc::new(hosts),
        health.clone(),
        probe,
        stop.clone(),
    ))))
}

/// Answers every API call `UNAVAILABLE` at once while the database probe
/// finds the database away, rather than after a wait for a connection.
fn fail_fast(
    health: &Arc<Health>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let health = health.clone();
    move |r| {
        if health.is_up() {
            Ok(r)
        } else {
            Err(crate::api::status::unavailable_db())
        }
    }
}

/// Waits for `stop`, then shuts down in the order the module comment gives.
async fn shut_down(
    tasks: Tasks,
    worker: Arc<Worker>,
    store: Arc<dyn SagaStore>,
    health: tonic_health::server::HealthReporter,
    abandon: CancellationToken,
    grace: Duration,
    stop: CancellationToken,
) {
    stop.cancelled().await;
    tracing::info!("shutting down: no new work; finishing calls in flight");
    health
        .set_not_serving::<CoordinatorServiceServer<CoordinatorApi>>()
        .await;
    let _ = tasks.claimer.await;
    if let Some(retention) = tasks.retention {
        let _ = retention.await;
    }
    worker.tasks().close();
    if tokio::time::timeout(grace, worker.tasks().wait())
        .await
        .is_err()
    {
        // Abandoned calls end at their next await; give them as long again.
        abandon.cancel();
        let _ = tokio::time::timeout(grace, worker.tasks().wait()).await;
    }
    tasks.renewer.abort();
    match store.lease_release_all(worker.owner()).await {
        Ok(n) if n > 0 => tracing::info!(released = n, "released leases"),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "releasing leases failed; they will expire"),
    }
    if let Some(spans) = worker.spans().cloned() {
        // Flushing waits on the exporter's thread: not on a runtime thread.
        let _ = tokio::task::spawn_blocking(move || spans.shutdown()).await;
    }
    let _ = tokio::time::timeout(grace, tasks.grpc).await;
    let _ = tokio::time::timeout(grace, tasks.admin).await;
    let _ = tasks.listener.await;
    if let Some(probe) = tasks.probe {
        let _ = probe.await;
    }
    tracing::info!("sagad stopped");
}

/// Forwards notifications: settled sagas to `WaitSaga` callers, due work to
/// the claim loop. After every (re)connect it tells both to re-check, since
/// notifications sent while disconnected are lost.
async fn listen(
    pool: PgPool,
    worker: Arc<Worker>,
    settled: broadcast::Sender<Uuid>,
    retry: Duration,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "notification listener cannot connect; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        if let Err(error) = listener.listen_all([CHANNEL_SETTLED, CHANNEL_DUE]).await {
            tracing::warn!(%error, "LISTEN failed; polling meanwhile");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => continue,
            }
        }
        let _ = settled.send(Uuid::nil());
        worker.wake();
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match n {
                Ok(Some(n)) if n.channel() == CHANNEL_DUE => worker.wake(),
                Ok(Some(n)) => {
                    // One id, or several separated by commas (batched writes).
                    for id in n.payload().split(',') {
                        if let Ok(id) = Uuid::parse_str(id) {
                            let _ = settled.send(id);
                        }
                    }
                }
                Ok(None) => {
                    // The connection dropped and will be re-established.
                    let _ = settled.send(Uuid::nil());
                    worker.wake();
                }
                Err(error) => {
                    tracing::warn!(%error, "notification listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Forwards the SQLite store's notices as `listen` does PostgreSQL's: one
/// node, so the notices come from this process's own writes.
async fn listen_local(
    mut notices: broadcast::Receiver<Notice>,
    worker: Arc<Worker>,
    settled: broadcast::Sender<Uuid>,
    stop: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            _ = stop.cancelled() => return,
            n = notices.recv() => n,
        };
        match notice {
            Ok(Notice::Settled(id)) => {
                let _ = settled.send(id);
            }
            Ok(Notice::Due) => worker.wake(),
            // Fell behind: everyone re-reads.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let _ = settled.send(Uuid::nil());
                worker.wake();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Runs a coordinator until SIGTERM or Ctrl-C.
pub async fn run(cfg: Config) -> Result<(), Error> {
    // Refuse bad settings and unreadable auth files before touching the
    // database.
    cfg.check().map_err(Error::Config)?;
    Authenticator::new(cfg.auth()).map_err(Error::Config)?;
    let db = connect(&cfg).await?;
    if let Database::Sqlite(store) = &db {
        tracing::info!(file = %store.path().display(), "on SQLite: a single node (run several coordinators on PostgreSQL)");
    }
    let stop = CancellationToken::new();
    let coordinator = start(cfg, db, stop.clone()).await?;
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(
        coordinator.tls(),
        coordinator.auth(),
        stop.clone(),
    ));
    shutdown_signal().await;
    stop.cancel();
    coordinator.stopped().await;
    Ok(())
}

/// Reloads the TLS certificates and the principals on every SIGHUP, until
/// `stop`.
#[cfg(unix)]
async fn reload_on_sighup(tls: Vec<Arc<Tls>>, auth: Arc<Authenticator>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: TLS certificates will not reload");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        for t in &tls {
            let cert = t.files().cert.display().to_string();
            match t.reload() {
                Ok(()) => tracing::info!(%cert, "reloaded TLS certificates"),
                Err(error) => {
                    tracing::error!(%error, "TLS certificates not reloaded; the previous ones stay")
                }
            }
        }
        if auth.enabled() {
            match auth.reload() {
                Ok(()) => tracing::info!("reloaded the auth file and JWT key"),
                Err(error) => {
                    tracing::error!(%error, "principals not reloaded; the previous ones stay")
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgSslMode;

    use super::connect_options;

    fn mode(url: &str) -> PgSslMode {
        connect_options(url)
            .map(|o| o.get_ssl_mode())
            .unwrap_or(PgSslMode::VerifyFull)
    }

    #[test]
    fn local_servers_are_reached_without_tls_unless_the_url_says_so() {
        for local in [
            "postgres://u@127.0.0.1:5432/d",
            "postgres://u@localhost/d",
            "postgres://u@[::1]:5432/d",
        ] {
            assert!(matches!(mode(local), PgSslMode::Disable), "{local}");
        }
        assert!(matches!(
            mode("postgres://u@db.example.com/d"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/d?sslmode=require"),
            PgSslMode::Require
        ));
    }
}
