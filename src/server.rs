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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::Connection as _;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admin::{AdminConfig, AdminState};
use crate::api::{ApiConfig, CoordinatorApi};
use crate::config::{redact_url, Config};
use crate::domain::Defaults;
use crate::metrics::Metrics;
use crate::ops::Ops;
use crate::participant::{CallerConfig, Participants};
use crate::proto::coordinator_service_server::CoordinatorServiceServer;
use crate::store::pg::{PgStore, CHANNEL_DUE, CHANNEL_SETTLED, MIGRATOR};
use crate::store::{OwnerId, SagaStore, StuckRule};
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
}

/// Connects to the database, creating it if it is missing, and applies the
/// migrations.
pub async fn connect(cfg: &Config) -> Result<PgPool, Error> {
    let url = &cfg.database_url;
    let db_err = |source| Error::Database {
        url: redact_url(url),
        source,
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
        .connect(url)
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
    let options = url
        .parse::<PgConnectOptions>()
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
    stop: CancellationToken,
    done: JoinHandle<()>,
}

impl Coordinator {
    /// Shuts down gracefully and waits until it is done.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
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
    pool: PgPool,
    stop: CancellationToken,
) -> Result<Coordinator, Error> {
    cfg.check().map_err(Error::Config)?;
    let parts = Parts::build(&cfg, pool.clone(), stop.clone())?;
    let (grpc_listener, grpc_addr) = bind("gRPC", cfg.grpc_addr).await?;
    let (admin_listener, admin_addr) = bind("admin", cfg.admin_addr).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CoordinatorServiceServer<CoordinatorApi>>()
        .await;
    let api = CoordinatorServiceServer::new(parts.api)
        .max_decoding_message_size(cfg.grpc_request_bytes_max())
        .max_encoding_message_size(cfg.grpc_response_bytes_max());
    let grpc = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(api)
        // Accepted sockets get TCP_NODELAY only through TcpIncoming (a
        // plain listener stream leaves Nagle on: replies then wait for ACKs).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );
    let tasks = Tasks {
        grpc: tokio::spawn(grpc),
        admin: tokio::spawn(crate::admin::serve(
            admin_listener,
            parts.admin,
            stop.clone(),
        )),
        listener: tokio::spawn(listen(
            pool,
            parts.worker.clone(),
            parts.settled,
            Duration::from_millis(cfg.db_listen_retry_ms),
            stop.clone(),
        )),
        claimer: tokio::spawn(parts.worker.clone().run_claim_loop()),
    };
    let owner = parts.worker.owner();
    tracing::info!(%grpc_addr, %admin_addr, owner = %owner.0, "sagad started");
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
        stop,
        done,
    })
}

/// The parts of a coordinator, wired but not yet serving.
struct Parts {
    store: Arc<dyn SagaStore>,
    worker: Arc<Worker>,
    api: CoordinatorApi,
    admin: Arc<AdminState>,
    settled: broadcast::Sender<Uuid>,
    abandon: CancellationToken,
}

impl Parts {
    fn build(cfg: &Config, pool: PgPool, stop: CancellationToken) -> Result<Parts, Error> {
        let pg = PgStore::with_write_lanes(pool.clone(), cfg.db_write_lanes as usize);
        let metrics = Arc::new(Metrics::with_db_writes(pg.db_writes()));
        let store: Arc<dyn SagaStore> = Arc::new(pg);
        let participants = Participants::new(
            CallerConfig {
                statics: cfg.static_participants(),
                discovery_cache: Duration::from_millis(cfg.discovery_cache_ms),
                connect_timeout: Duration::from_millis(cfg.participant_connect_timeout_ms),
                payload_bytes_max: cfg.payload_bytes(),
            },
            store.clone(),
        )
        .map_err(Error::Config)?;
        let abandon = CancellationToken::new();
        let worker = Worker::new(
            store.clone(),
            Arc::new(participants),
            OwnerId(Uuid::new_v4()),
            WorkerConfig {
                lease_ttl: cfg.lease_ttl(),
                claim_batch_max: cfg.claim_batch_max,
                sagas_max: usize::try_from(cfg.sagas_max).unwrap_or(usize::MAX),
                poll_interval: Duration::from_millis(cfg.poll_interval_ms),
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
            pool,
            metrics.clone(),
            AdminConfig {
                token: cfg.admin_token.clone(),
                stuck,
                page_rows_default: cfg.list_page_rows_default,
                page_rows_max: cfg.list_page_rows_max,
                readyz_timeout: Duration::from_millis(cfg.readyz_timeout_ms),
            },
        );
        let notices = usize::try_from(cfg.wait_notices_max).unwrap_or(usize::MAX);
        let (settled, _) = broadcast::channel(notices);
        let api = CoordinatorApi::new(ops, metrics, settled.clone(), stop, api_config(cfg, stuck));
        Ok(Parts {
            store,
            worker,
            api,
            admin,
            settled,
            abandon,
        })
    }
}

fn api_config(cfg: &Config, stuck: StuckRule) -> ApiConfig {
    ApiConfig {
        payload_bytes_max: cfg.payload_bytes(),
        defaults: Defaults::default(),
        wait_default: Duration::from_millis(cfg.wait_default_ms.min(cfg.wait_max_ms)),
        wait_max: Duration::from_millis(cfg.wait_max_ms),
        wait_recheck: Duration::from_millis(cfg.wait_recheck_ms),
        page_rows_default: cfg.list_page_rows_default,
        page_rows_max: cfg.list_page_rows_max,
        stuck,
        heartbeat_ttl_default: Duration::from_millis(cfg.heartbeat_ttl_default_ms),
        admin_token: cfg.admin_token.clone(),
    }
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
    claimer: JoinHandle<()>,
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
    worker.tasks().close();
    if tokio::time::timeout(grace, worker.tasks().wait())
        .await
        .is_err()
    {
        // Abandoned calls end at their next await; give them as long again.
        abandon.cancel();
        let _ = tokio::time::timeout(grace, worker.tasks().wait()).await;
    }
    match store.lease_release_all(worker.owner()).await {
        Ok(n) if n > 0 => tracing::info!(released = n, "released leases"),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "releasing leases failed; they will expire"),
    }
    let _ = tokio::time::timeout(grace, tasks.grpc).await;
    let _ = tokio::time::timeout(grace, tasks.admin).await;
    let _ = tasks.listener.await;
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

/// Runs a coordinator until SIGTERM or Ctrl-C.
pub async fn run(cfg: Config) -> Result<(), Error> {
    let pool = connect(&cfg).await?;
    let stop = CancellationToken::new();
    let coordinator = start(cfg, pool, stop.clone()).await?;
    shutdown_signal().await;
    stop.cancel();
    coordinator.stopped().await;
    Ok(())
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
