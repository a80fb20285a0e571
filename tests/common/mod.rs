//! Test harness: a fresh PostgreSQL database per test, coordinators on
//! 127.0.0.1:0 each in its own runtime (so a test can crash one: every task
//! stops at once, nothing is cleaned up), and scripted participants that are
//! real tonic servers.
#![allow(dead_code, clippy::unwrap_used, clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga_coordinator::config::Config;
use saga_coordinator::proto;
use saga_coordinator::proto::coordinator_service_client::CoordinatorServiceClient;
use saga_coordinator::proto::participant_service_server::{
    ParticipantService, ParticipantServiceServer,
};
use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::{oneshot, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// A gRPC client that sends a bearer token with every call (or none).
pub type Client = CoordinatorServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A client on `channel` sending `token`.
/// A client of the coordinator at `addr` (host:port, plaintext).
pub async fn client_at(addr: &str, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    client_on(channel, token)
}

/// A client of the coordinator at `addr`, if it can be reached.
pub async fn client_at_checked(addr: &str) -> Option<Client> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    Some(client_on(channel, None))
}

pub fn client_on(channel: Channel, token: Option<&str>) -> Client {
    let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()));
    CoordinatorServiceClient::with_interceptor(channel, bearer)
}

/// Where the tests find PostgreSQL: `DATABASE_URL`, else the local default.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Postgres,
    Sqlite,
}

/// A database that exists for one test and is dropped after it: a fresh
/// PostgreSQL database, or a fresh SQLite file.
pub struct TestDb {
    pub url: String,
    name: String,
    sqlite_dir: Option<std::path::PathBuf>,
}

impl TestDb {
    /// A fresh database on `store`.
    pub async fn on(store: Store) -> TestDb {
        match store {
            Store::Postgres => TestDb::new().await,
            Store::Sqlite => {
                let dir = std::env::temp_dir().join(format!("sagatest-{}", uuid::Uuid::new_v4()));
                TestDb {
                    url: format!("sqlite:{}", dir.join("sagad.db").display()),
                    name: String::new(),
                    sqlite_dir: Some(dir),
                }
            }
        }
    }

    pub async fn new() -> TestDb {
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("tests need PostgreSQL: cannot connect to {admin} ({e}); set DATABASE_URL to a server where the role may create databases")
        });
        let name = format!("sagatest_{}", uuid::Uuid::new_v4().simple());
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
        TestDb {
            url: format!("{base}/{name}"),
            name,
            sqlite_dir: None,
        }
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url).await.unwrap()
    }

    /// Ends every session of this database from outside, as a PostgreSQL
    /// restart does; with `refuse_new`, new connections are refused until
    /// [`TestDb::accept_connections`].
    pub async fn terminate_sessions(&self, refuse_new: bool) {
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        if refuse_new {
            let sql = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false", self.name);
            admin.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
        }
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(&self.name)
            .execute(&mut admin)
            .await
            .unwrap();
    }

    /// Lets connections in again after `terminate_sessions(true)`.
    pub async fn accept_connections(&self) {
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        let sql = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true", self.name);
        admin.execute(sqlx::AssertSqlSafe(sql)).await.unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(dir) = &self.sqlite_dir {
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
        let (admin, name) = (admin_url(), self.name.clone());
        // Drop runs outside async; use a small runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = PgConnection::connect(&admin).await {
                    let _ = c
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

enum Command {
    Shutdown(oneshot::Sender<()>),
    Crash,
}

/// A coordinator running in its own runtime on its own thread.
pub struct TestCoordinator {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub owner: uuid::Uuid,
    /// The admin token it was started with; [`TestCoordinator::client`]
    /// sends it.
    pub token: Option<String>,
    cmd: Option<std::sync::mpsc::Sender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What `server::start` refuses `cfg` with (it must refuse it).
pub async fn start_error(cfg: Config) -> String {
    let pool = saga_coordinator::server::connect(&cfg).await.unwrap();
    saga_coordinator::server::start(cfg, pool, Default::default())
        .await
        .err()
        .expect("start refuses this configuration")
        .to_string()
}

/// Test defaults: fast polls and a short lease, ports chosen by the OS.
pub fn test_config(db: &TestDb) -> Config {
    let mut cfg = Config::with_database(&db.url);
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    cfg.poll_interval_ms = 200;
    cfg.lease_ttl_ms = 2_000;
    cfg.shutdown_grace_ms = 2_000;
    cfg.discovery_cache_ms = 0;
    cfg
}

/// A scripted participant `svc` and a test configuration that calls it.
pub async fn with_svc(db: &TestDb) -> (Scripted, Config) {
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(db);
    cfg.participants = vec![("svc".into(), url)];
    (svc, cfg)
}

/// Logs from the coordinators, when `RUST_LOG` is set (e.g. `RUST_LOG=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl TestCoordinator {
    pub async fn start(cfg: Config) -> TestCoordinator {
        init_logs();
        let token = cfg.admin_token.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<Command>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let coordinator = rt.block_on(async {
                let pool = saga_coordinator::server::connect(&cfg).await.unwrap();
                saga_coordinator::server::start(cfg, pool, stop.clone())
                    .await
                    .unwrap()
            });
            let _ = ready_tx.send((
                coordinator.grpc_addr,
                coordinator.admin_addr,
                coordinator.owner.0,
            ));
            // Park this thread (not the runtime) until told what to do.
            match cmd_rx.recv() {
                Ok(Command::Shutdown(done)) => {
                    rt.block_on(coordinator.shutdown());
                    let _ = done.send(());
                }
                Ok(Command::Crash) | Err(_) => {
                    drop(coordinator);
                    // Every task is dropped at its next await, none runs
                    // its cleanup (no lease released); waiting until they
                    // are gone frees what they held, as a dead process's
                    // file locks are freed (a SQLite store's lock).
                    rt.shutdown_timeout(Duration::from_secs(10));
                }
            }
        });
        let (addr, admin, owner) = ready_rx.await.expect("coordinator failed to start");
        TestCoordinator {
            addr,
            admin,
            owner,
            token,
            cmd: Some(cmd_tx),
            thread: Some(thread),
        }
    }

    /// A client sending the admin token, if the coordinator has one.
    pub async fn client(&self) -> Client {
        self.client_with(self.token.as_deref()).await
    }

    /// A client sending `token` (`authorization: Bearer`), or nothing.
    pub async fn client_with(&self, token: Option<&str>) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        client_on(channel, token)
    }

    /// Graceful shutdown (as on SIGTERM).
    pub async fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if let Some(cmd) = self.cmd.take() {
            let _ = cmd.send(Command::Shutdown(tx));
            let _ = rx.await;
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// Stops every task at once: no lease released, nothing cleaned up.
    pub async fn crash(mut self) {
        if let Some(cmd) = self.cmd.take() {
            let _ = cmd.send(Command::Crash);
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(cmd) = self.cmd.take() {
            let _ = cmd.send(Command::Crash);
        }
    }
}

/// What a scripted handler answers.
#[derive(Clone, Debug)]
pub enum Reply {
    /// OUTCOME_SUCCEEDED with this output (JSON text, "" = null).
    Succeed(String),
    /// OUTCOME_FAILED.
    Fail(String),
    /// OUTCOME_RETRY.
    Retry(String),
    /// A gRPC error status.
    Status(Code),
    /// Never answers.
    Hang,
    /// Waits until the gate opens, then succeeds with this output.
    Block(watch::Receiver<bool>, String),
    /// Echoes what the handler received, as output.
    Echo,
}

/// One call a participant received.
#[derive(Clone, Debug)]
pub struct Call {
    pub req: proto::InvokeRequest,
    pub at: Instant,
    /// The `traceparent` the call carried.
    pub traceparent: Option<String>,
}

#[derive(Default)]
struct State {
    scripts: HashMap<String, VecDeque<Reply>>,
    calls: Vec<Call>,
    /// Effects applied, by idempotency key (a barrier: once per key).
    effects: HashMap<String, u32>,
    /// How many times an effect was attempted per key (to prove dedupe).
    effect_attempts: HashMap<String, u32>,
}

/// A participant whose every handler follows a script; unscripted calls
/// echo their request.
#[derive(Clone, Default)]
pub struct Scripted {
    state: Arc<Mutex<State>>,
    calls_changed: Arc<tokio::sync::Notify>,
}

impl Scripted {
    /// Queues replies for `handler` (after them: Echo).
    pub fn script(&self, handler: &str, replies: Vec<Reply>) {
        self.state
            .lock()
            .unwrap()
            .scripts
            .entry(handler.into())
            .or_default()
            .extend(replies);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn calls_to(&self, handler: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.req.handler == handler)
            .collect()
    }

    /// Handlers in call order.
    pub fn handlers(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.req.handler).collect()
    }

    /// Effects applied per idempotency key.
    pub fn effects(&self) -> HashMap<String, u32> {
        self.state.lock().unwrap().effects.clone()
    }

    /// Waits until `handler` has been called `n` times (or panics after 20 s).
    pub async fn wait_calls(&self, handler: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.calls_changed.notified();
            if self.calls_to(handler).len() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "{handler} was called {} times, expected {n}",
                    self.calls_to(handler).len()
                );
            }
        }
    }

    pub async fn serve(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        self.serve_on(listener);
        format!("http://{addr}")
    }

    /// Serves on `listener` (an address chosen by the test).
    pub fn serve_on(self, listener: tokio::net::TcpListener) {
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ParticipantServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
}

fn ok(
    outcome: proto::Outcome,
    output: String,
    error: String,
) -> Result<Response<proto::InvokeResponse>, Status> {
    Ok(Response::new(proto::InvokeResponse {
        outcome: outcome as i32,
        output_json: output,
        error,
    }))
}

#[tonic::async_trait]
impl ParticipantService for Scripted {
    async fn invoke(
        &self,
        request: Request<proto::InvokeRequest>,
    ) -> Result<Response<proto::InvokeResponse>, Status> {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned());
        let req = request.into_inner();
        let reply = {
            let mut st = self.state.lock().unwrap();
            st.calls.push(Call {
                req: req.clone(),
                at: Instant::now(),
                traceparent,
            });
            st.scripts
                .get_mut(&req.handler)
                .and_then(|q| q.pop_front())
                .unwrap_or(Reply::Echo)
        };
        self.calls_changed.notify_waiters();
        let succeed = |output: String| {
            let mut st = self.state.lock().unwrap();
            *st.effect_attempts
                .entry(req.idempotency_key.clone())
                .or_default() += 1;
            st.effects.entry(req.idempotency_key.clone()).or_insert(1);
            ok(proto::Outcome::Succeeded, output, String::new())
        };
        match reply {
            Reply::Succeed(out) => succeed(out),
            Reply::Echo => succeed(
                serde_json::json!({
                    "handler": req.handler,
                    "input": serde_json::from_str::<serde_json::Value>(&req.input_json).unwrap_or_default(),
                    "outputs": req.outputs_json,
                    "action_output": req.action_output_json,
                })
                .to_string(),
            ),
            Reply::Fail(e) => ok(proto::Outcome::Failed, String::new(), e),
            Reply::Retry(e) => ok(proto::Outcome::Retry, String::new(), e),
            Reply::Status(code) => Err(Status::new(code, "scripted status")),
            Reply::Hang => std::future::pending().await,
            Reply::Block(mut gate, out) => {
                let _ = gate.wait_for(|open| *open).await;
                succeed(out)
            }
        }
    }
}

/// A step definition with fast test retry policies.
pub fn step(
    name: &str,
    participant: &str,
    compensation: bool,
    idempotent: bool,
) -> proto::StepDefinition {
    let fast = proto::RetryPolicy {
        max_attempts: 3,
        initial_backoff: Some(prost_types::Duration {
            seconds: 0,
            nanos: 10_000_000,
        }),
        multiplier: 2.0,
        max_backoff: Some(prost_types::Duration {
            seconds: 0,
            nanos: 40_000_000,
        }),
    };
    proto::StepDefinition {
        name: name.into(),
        participant: participant.into(),
        action: format!("{name}.do"),
        compensation: if compensation {
            format!("{name}.undo")
        } else {
            String::new()
        },
        idempotent,
        timeout: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        retry: Some(fast),
        compensation_retry: Some(fast),
    }
}

pub fn definition(name: &str, steps: Vec<proto::StepDefinition>) -> proto::SagaDefinition {
    proto::SagaDefinition {
        name: name.into(),
        steps,
        ..Default::default()
    }
}

pub fn ms(n: u64) -> prost_types::Duration {
    let d = Duration::from_millis(n);
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub async fn register(c: &mut Client, def: proto::SagaDefinition) -> proto::SagaDefinition {
    c.register_definition(proto::RegisterDefinitionRequest {
        definition: Some(def),
    })
    .await
    .unwrap()
    .into_inner()
    .definition
    .unwrap()
}

pub async fn start(c: &mut Client, def: &str, input: &str) -> proto::Saga {
    c.start_saga(proto::StartSagaRequest {
        definition: def.into(),
        input_json: input.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .saga
    .unwrap()
}

/// Waits (server side, WaitSaga) until the saga settles; panics after 30 s.
pub async fn wait(c: &mut Client, id: &str) -> proto::Saga {
    let saga = c
        .wait_saga(proto::WaitSagaRequest {
            saga_id: id.into(),
            timeout: Some(ms(30_000)),
        })
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap();
    assert!(
        [3, 4, 5, 6].contains(&saga.state),
        "saga did not settle in 30 s: {saga:#?}"
    );
    saga
}

pub async fn events(c: &mut Client, id: &str) -> Vec<proto::SagaEvent> {
    c.get_saga_events(proto::GetSagaEventsRequest { saga_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .events
}

pub fn kinds(events: &[proto::SagaEvent]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

pub fn state(s: &proto::Saga) -> proto::SagaState {
    proto::SagaState::try_from(s.state).unwrap()
}

pub fn step_states(s: &proto::Saga) -> Vec<proto::StepState> {
    s.steps
        .iter()
        .map(|st| proto::StepState::try_from(st.state).unwrap())
        .collect()
}

/// A response from [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    http_on(s, addr, method, path, headers, body).await
}

/// One HTTP/1.1 request over `s` (plain TCP or TLS).
pub async fn http_on<S>(
    mut s: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
