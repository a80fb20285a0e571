//! The chaos suite: bank transfers through three real `sagad` processes on a
//! PostgreSQL cluster of the test's own, with participants built on the SDK
//! and its barrier, while coordinators are killed and paused, participants
//! fail, hang and restart, and PostgreSQL restarts. Then the books are
//! checked.
//!
//! ```text
//!   callers ──StartSaga──▶ sagad ×3 ──▶ bank-a: debit / refund     (db bank_a)
//!      (any live one)        │  │  └──▶ bank-b: credit (pivot;    (db bank_b)
//!                            │  │              refuses frozen accounts)
//!                            │  └─────▶ notify (after the pivot;   (db bank_b)
//!                            │          one in five takes 0.5–4 s,
//!                            │          past the 2 s lease)
//!                            └─ db sagad            all on one private cluster
//!   chaos, a round every 2 s: SIGKILL + restart a coordinator │ SIGSTOP one
//!   past its lease, then SIGCONT │ restart a participant; PostgreSQL
//!   restarted once;
//!   handlers fail (retry), lose answers (work done, error returned) and
//!   hang past their timeout at random throughout
//! ```
//!
//! `cargo test --release --test chaos -- --nocapture` runs it for
//! `SAGA_CHAOS_SECS` seconds of load (default 30, the short form CI runs);
//! it prints one summary line.
#![allow(clippy::unwrap_used)]

#[path = "common/bin.rs"]
mod bin;
#[path = "common/certs.rs"]
mod certs;
#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::Cluster;
use saga_coordinator::proto;
use saga_sdk::barrier::Barrier;
use saga_sdk::{Participant, RetryPolicy, SagaDefinition, Step, StepError};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

const ACCOUNTS: i64 = 10;
const OPENING: i64 = 1_000;
const LEASE_MS: u64 = 2_000;
const STEP_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Notify's timeout, far past the lease: its calls are covered by the
/// background renewal.
const NOTIFY_TIMEOUT: Duration = Duration::from_millis(6_000);
/// Callers, each with one transfer in flight at a time.
const CALLERS: usize = 96;
/// Transfers started at most per second of `SAGA_CHAOS_SECS` (a bound the
/// load does not reach on this kind of machine).
const TRANSFERS_PER_SEC_MAX: u64 = 250;

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Transfer {
    from: i64,
    to: i64,
    amount: i64,
    frozen: bool,
    /// How long notify takes (most transfers: 0): such sagas are held
    /// through calls that outlive the lease, so a kill always finds some.
    slow_ms: u64,
}

/// What the participants did wrong on purpose.
#[derive(Default)]
struct Faults {
    failed: AtomicU64,
    lost: AtomicU64,
    hung: AtomicU64,
    restarts: AtomicU64,
    /// Every call that reached a handler, in arrival order: saga and the
    /// epoch of the lease it was sent under.
    arrivals: Mutex<Vec<(uuid::Uuid, u64)>>,
}

impl Faults {
    /// A call arrives; before the work: maybe refuse for now, maybe hang
    /// past the timeout.
    async fn before(&self, ctx: &saga_sdk::StepContext) -> Result<(), StepError> {
        self.arrivals
            .lock()
            .unwrap()
            .push((ctx.saga_id, ctx.lease_epoch));
        match rand::random_range(0..100) {
            0..=4 => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(StepError::retry_later("chaos: not now"))
            }
            5..=6 => {
                self.hung.fetch_add(1, Ordering::Relaxed);
                let left = ctx
                    .deadline
                    .and_then(|d| d.duration_since(std::time::SystemTime::now()).ok())
                    .unwrap_or(STEP_TIMEOUT);
                tokio::time::sleep(left + Duration::from_millis(500)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After the work committed: maybe lose the answer.
    fn after(&self) -> Result<(), StepError> {
        if rand::random_range(0..100) < 3 {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return Err(StepError::unknown("chaos: answer lost"));
        }
        Ok(())
    }
}

/// Who a ledger row is for: saga, step, phase.
type Entry = (String, String, &'static str);

fn entry(ctx: &saga_sdk::StepContext) -> Entry {
    let phase = if ctx.phase == saga_sdk::Phase::Action {
        "action"
    } else {
        "compensation"
    };
    (ctx.saga_id.to_string(), ctx.step.clone(), phase)
}

/// Moves `delta` on `account` and books it, in the barrier's transaction.
async fn ledger(
    c: &mut sqlx::PgConnection,
    e: Entry,
    account: i64,
    delta: i64,
) -> Result<(), StepError> {
    sqlx::query("UPDATE accounts SET balance = balance + $2 WHERE id = $1")
        .bind(account)
        .bind(delta)
        .execute(&mut *c)
        .await?;
    book(c, e, delta).await
}

/// Books an entry (notify's: no account moves, so notifies do not queue on
/// one account's row lock).
async fn book(
    c: &mut sqlx::PgConnection,
    (saga, step, phase): Entry,
    delta: i64,
) -> Result<(), StepError> {
    sqlx::query("INSERT INTO ledger (saga, step, phase, amount) VALUES ($1, $2, $3, $4)")
        .bind(saga)
        .bind(step)
        .bind(phase)
        .bind(delta)
        .execute(&mut *c)
        .await?;
    Ok(())
}

fn bank_a(b: Barrier, f: Arc<Faults>) -> Participant {
    let (b2, f2) = (b.clone(), f.clone());
    Participant::builder("bank-a")
        .action("debit", move |ctx, t: Transfer| {
            let (b, f) = (b.clone(), f.clone());
            async move {
                f.before(&ctx).await?;
                {
                    let e = entry(&ctx);
                    b.action(&ctx, move |c| Box::pin(ledger(c, e, t.from, -t.amount)))
                        .await?;
                }
                f.after()
            }
        })
        .compensation(
            "refund",
            move |ctx, t: Transfer, _: Option<serde_json::Value>| {
                let (b, f) = (b2.clone(), f2.clone());
                async move {
                    f.before(&ctx).await?;
                    {
                        let e = entry(&ctx);
                        b.compensation(&ctx, move |c| Box::pin(ledger(c, e, t.from, t.amount)))
                            .await?;
                    }
                    f.after()
                }
            },
        )
        .build()
}

fn bank_b(b: Barrier, f: Arc<Faults>) -> Participant {
    let (b2, f2) = (b.clone(), f.clone());
    Participant::builder("bank-b")
        .action("credit", move |ctx, t: Transfer| {
            let (b, f) = (b.clone(), f.clone());
            async move {
                f.before(&ctx).await?;
                {
                    // Refused inside the barrier: recorded, so every
                    // attempt of this credit gets the same answer.
                    let e = entry(&ctx);
                    b.action(&ctx, move |c| {
                        Box::pin(async move {
                            if t.frozen {
                                return Err(StepError::refuse("account frozen"));
                            }
                            ledger(c, e, t.to, t.amount).await
                        })
                    })
                    .await?;
                }
                f.after()
            }
        })
        .action("notify", move |ctx, t: Transfer| {
            let (b, f) = (b2.clone(), f2.clone());
            async move {
                f.before(&ctx).await?;
                tokio::time::sleep(Duration::from_millis(t.slow_ms)).await;
                {
                    let e = entry(&ctx);
                    b.action(&ctx, move |c| Box::pin(book(c, e, 0))).await?;
                }
                f.after()
            }
        })
        .build()
}

/// A participant served on a fixed address, restartable.
struct Served {
    addr: std::net::SocketAddr,
    make: Box<dyn Fn() -> Participant + Send + Sync>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Served {
    async fn start(make: Box<dyn Fn() -> Participant + Send + Sync>) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut s = Served {
            addr: listener.local_addr().unwrap(),
            make,
            stop: None,
            task: None,
        };
        s.serve(listener);
        s
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let p = (self.make)();
        self.task = Some(tokio::spawn(p.serve(listener, async {
            let _ = rx.await;
        })));
        self.stop = Some(tx);
    }

    /// Stops serving (calls in flight are cut off) and serves again.
    async fn restart(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        self.stop = None;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

/// One `sagad` process.
struct Coord {
    child: Child,
    grpc: String,
    admin: String,
    owner: String,
}

fn spawn_coord(db_url: &str, parts: &[(&str, std::net::SocketAddr)]) -> Coord {
    let mut args = vec![
        "--database-url".to_owned(),
        db_url.to_owned(),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--admin-addr".into(),
        "127.0.0.1:0".into(),
        "--lease-ttl-ms".into(),
        LEASE_MS.to_string(),
        "--poll-interval-ms".into(),
        "200".into(),
    ];
    for (name, addr) in parts {
        args.push("--participant".into());
        args.push(format!("{name}=http://{addr}"));
    }
    let mut cmd = bin::sagad();
    cmd.env("RUST_LOG", "warn,saga_coordinator::server=info")
        .args(&args);
    let (child, _, started, rest) = bin::spawn_cmd_started(&mut cmd);
    // Keep reading its log so that it never blocks on a full pipe.
    std::thread::spawn(move || while rest.recv().is_ok() {});
    Coord {
        child,
        grpc: bin::log_field(&started, "grpc_addr"),
        admin: bin::log_field(&started, "admin_addr"),
        owner: bin::log_field(&started, "owner"),
    }
}

impl Drop for Coord {
    /// A test that fails leaves no `sagad` behind (paused ones included).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn definition() -> SagaDefinition {
    let retry =
        |n| RetryPolicy::exponential(n, Duration::from_millis(50), Duration::from_millis(500));
    SagaDefinition::builder("transfer")
        .step(
            Step::new("debit", "bank-a")
                .action("debit")
                .compensation("refund")
                .idempotent()
                .timeout(STEP_TIMEOUT)
                .retry(retry(30))
                .compensation_retry(retry(1_000)),
        )
        .step(
            Step::new("credit", "bank-b")
                .action("credit")
                .idempotent()
                .timeout(STEP_TIMEOUT)
                .retry(retry(30)),
        )
        .step(
            Step::new("notify", "bank-b")
                .action("notify")
                .idempotent()
                .timeout(NOTIFY_TIMEOUT)
                .retry(retry(1_000)),
        )
        .build()
        .unwrap()
}

async fn bank_db(pg: &Cluster, name: &str) -> PgPool {
    let admin = PgPool::connect(&pg.url("postgres")).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&pg.url(name))
        .await
        .unwrap();
    for ddl in [
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)",
        "CREATE TABLE ledger (seq bigserial PRIMARY KEY, saga text, step text, phase text, amount bigint)",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    sqlx::query("INSERT INTO accounts SELECT g, $1 FROM generate_series(0, $2) g")
        .bind(OPENING)
        .bind(ACCOUNTS)
        .execute(&pool)
        .await
        .unwrap();
    Barrier::new(pool.clone()).create_table().await.unwrap();
    pool
}

/// What the chaos did.
#[derive(Default, Debug)]
struct Done {
    kills: u64,
    pauses: u64,
    db_restarts: u64,
    takeovers_ms: Vec<u64>,
}

/// Builds a participant over its barrier.
type MakeParticipant = fn(Barrier, Arc<Faults>) -> Participant;

/// The participants, each on its own address, restartable.
type Parts = Vec<(&'static str, Served)>;

async fn participants(a_db: &PgPool, b_db: &PgPool, faults: &Arc<Faults>) -> Parts {
    let mut parts = Vec::new();
    let makers: [(&'static str, PgPool, MakeParticipant); 2] = [
        ("bank-a", a_db.clone(), bank_a),
        ("bank-b", b_db.clone(), bank_b),
    ];
    for (name, db, make) in makers {
        let f = faults.clone();
        let served =
            Served::start(Box::new(move || make(Barrier::new(db.clone()), f.clone()))).await;
        parts.push((name, served));
    }
    parts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos() {
    let secs: u64 = std::env::var("SAGA_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let pg = Cluster::primary("max_connections = 300");
    let (a_db, b_db) = (bank_db(&pg, "bank_a").await, bank_db(&pg, "bank_b").await);
    let faults = Arc::new(Faults::default());
    let mut parts = participants(&a_db, &b_db, &faults).await;
    let addrs: Vec<(&'static str, std::net::SocketAddr)> =
        parts.iter().map(|(n, s)| (*n, s.addr)).collect();
    let db_url = pg.url("sagad");
    let coords: Arc<Mutex<Vec<Coord>>> = Arc::new(Mutex::new(
        (0..3).map(|_| spawn_coord(&db_url, &addrs)).collect(),
    ));
    let first = coords.lock().unwrap()[0].grpc.clone();
    let client = saga_sdk::Client::connect(format!("http://{first}"))
        .await
        .unwrap();
    client.register(&definition()).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let budget = (started.clone(), secs * TRANSFERS_PER_SEC_MAX);
            tokio::spawn(caller(coords.clone(), stop.clone(), budget))
        })
        .collect();
    let sagad_pool = PgPool::connect(&db_url).await.unwrap();
    let world = World {
        pg: &pg,
        db_url: &db_url,
        addrs: &addrs,
        coords: &coords,
        sagad: &sagad_pool,
    };
    let done = world.faults(secs, &mut parts, &faults).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for c in callers {
        acked.extend(c.await.unwrap());
    }
    let mut report = check(&sagad_pool, &a_db, &b_db, &acked).await;
    report
        .violations
        .extend(overlaps(&faults.arrivals.lock().unwrap()));
    let (summary, max) = summary(&report, &done, &faults);
    let details = details(&report);
    println!("{summary}\n{details}");
    // Kept where `scripts/test` prints it after the run (test output is
    // captured), so that a passing run's suspensions are explained too.
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-summary.txt"),
        format!("{summary}\n{details}"),
    );
    assert!(
        report.violations.is_empty(),
        "{} violations, the first: {:#?}",
        report.violations.len(),
        &report.violations[..report.violations.len().min(20)]
    );
    assert!(report.sagas > 50, "too little load to mean anything");
    let lease = LEASE_MS + 200 + 2_000;
    assert!(
        max <= lease,
        "a takeover took {max} ms, more than the lease plus a poll and a margin ({lease} ms)"
    );
}

/// What the faults act on.
struct World<'a> {
    pg: &'a Cluster,
    db_url: &'a str,
    addrs: &'a [(&'static str, std::net::SocketAddr)],
    coords: &'a Arc<Mutex<Vec<Coord>>>,
    sagad: &'a PgPool,
}

/// How long one round of faults lasts at least.
const ROUND: Duration = Duration::from_secs(2);

impl World<'_> {
    /// `secs / 2` rounds of at least 2 s each: a coordinator SIGKILLed and
    /// restarted, one paused past its lease, a participant restarted, in
    /// turn; PostgreSQL restarted once, a quarter of the way in. The
    /// schedule is counted in rounds, not read off the clock, so a slow
    /// machine gets every fault too, only later; no round blocks the
    /// runtime that serves the participants.
    async fn faults(&self, secs: u64, parts: &mut Parts, faults: &Faults) -> Done {
        let mut done = Done::default();
        let rounds = (secs / 2).max(4);
        let mut takeovers = Vec::new();
        for round in 1..=rounds {
            let tick = tokio::time::Instant::now();
            if round == (rounds / 4).max(1) {
                tokio::task::block_in_place(|| {
                    self.pg.stop("fast");
                    self.pg.start();
                });
                done.db_restarts += 1;
            } else {
                match round % 3 {
                    0 => takeovers.push(self.kill_one(&mut done).await),
                    1 => self.pause_one(&mut done).await,
                    _ => {
                        let i = rand::random_range(0..parts.len());
                        parts[i].1.restart().await;
                        faults.restarts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep_until(tick + ROUND).await;
        }
        for t in takeovers {
            done.takeovers_ms.extend(t.await.unwrap());
        }
        done
    }

    /// SIGSTOPs a coordinator past its lease, then SIGCONTs it.
    async fn pause_one(&self, done: &mut Done) {
        let c = pick(self.coords);
        signal(&self.coords.lock().unwrap()[c].child, "-STOP");
        tokio::time::sleep(Duration::from_millis(LEASE_MS + 1_000)).await;
        signal(&self.coords.lock().unwrap()[c].child, "-CONT");
        done.pauses += 1;
    }

    /// SIGKILLs one coordinator and restarts it; the task returned measures
    /// how long its sagas waited for another (their epoch moving on), from
    /// the kill, whatever the restart takes.
    async fn kill_one(&self, done: &mut Done) -> tokio::task::JoinHandle<Vec<u64>> {
        let c = pick(self.coords);
        let owner = self.coords.lock().unwrap()[c].owner.clone();
        {
            let mut all = self.coords.lock().unwrap();
            let _ = all[c].child.kill();
            let _ = all[c].child.wait();
        }
        let killed = Instant::now();
        done.kills += 1;
        let held: HashMap<String, i64> = sqlx::query(
            "SELECT saga_id::text AS id, lease_epoch FROM sagas
             WHERE owner = $1::uuid AND state IN ('RUNNING', 'COMPENSATING')",
        )
        .bind(&owner)
        .fetch_all(self.sagad)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get("id"), r.get("lease_epoch")))
                .collect()
        })
        .unwrap_or_default();
        let waiting = tokio::spawn(takeovers(self.sagad.clone(), held, killed));
        let (url, addrs) = (self.db_url.to_owned(), self.addrs.to_vec());
        let fresh = tokio::task::spawn_blocking(move || spawn_coord(&url, &addrs))
            .await
            .unwrap();
        self.coords.lock().unwrap()[c] = fresh;
        waiting
    }
}

/// Waits (up to 30 s) for each saga of `held` to move past its epoch; the
/// milliseconds from `killed` each took.
async fn takeovers(pool: PgPool, mut waiting: HashMap<String, i64>, killed: Instant) -> Vec<u64> {
    let mut took = Vec::new();
    while !waiting.is_empty() && killed.elapsed() < Duration::from_secs(30) {
        let ids: Vec<String> = waiting.keys().cloned().collect();
        if let Ok(rows) = sqlx::query(
            "SELECT saga_id::text AS id, lease_epoch FROM sagas WHERE saga_id::text = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&pool)
        .await
        {
            for r in rows {
                let (id, epoch): (String, i64) = (r.get("id"), r.get("lease_epoch"));
                if waiting.get(&id).is_some_and(|e| epoch > *e) {
                    waiting.remove(&id);
                    took.push(killed.elapsed().as_millis() as u64);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    took
}

/// The one summary line, and the longest takeover (ms).
fn summary(report: &Report, done: &Done, faults: &Faults) -> (String, u64) {
    let mut t = done.takeovers_ms.clone();
    t.sort_unstable();
    let p50 = t.get(t.len() / 2).copied().unwrap_or(0);
    let max = t.last().copied().unwrap_or(0);
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (failed, lost, hung, restarts) = (
        n(&faults.failed),
        n(&faults.lost),
        n(&faults.hung),
        n(&faults.restarts),
    );
    let line = format!(
        "chaos: {} sagas ({} completed, {} compensated, {} suspended), kills {}, pauses {}, \
         participant faults {} (failed {failed}, answers lost {lost}, hung {hung}, restarts {restarts}), \
         db restarts {}, takeover p50 {p50} ms max {max} ms ({} sagas), violations {}",
        report.sagas,
        report.completed,
        report.compensated,
        report.suspended.len(),
        done.kills,
        done.pauses,
        failed + lost + hung + restarts,
        done.db_restarts,
        t.len(),
        report.violations.len(),
    );
    (line, max)
}

/// Up to 20 violations, then up to 20 suspended sagas with their reasons,
/// a line each (violations first: a failing run's output is cut short).
fn details(report: &Report) -> String {
    let mut out = String::new();
    for v in report.violations.iter().take(20) {
        out.push_str(&format!("  violation: {v}\n"));
    }
    for s in report.suspended.iter().take(20) {
        out.push_str(&format!("  suspended: {s}\n"));
    }
    if report.suspended.len() > 20 {
        out.push_str(&format!(
            "  … and {} more suspended\n",
            report.suspended.len() - 20
        ));
    }
    out
}

/// No saga driven by two coordinators at once: once a call of a newer
/// lease arrived, none of an older one may.
fn overlaps(arrivals: &[(uuid::Uuid, u64)]) -> Vec<String> {
    let mut newest: HashMap<uuid::Uuid, u64> = HashMap::new();
    let mut v = Vec::new();
    for (saga, epoch) in arrivals {
        let n = newest.entry(*saga).or_default();
        if *epoch < *n {
            v.push(format!(
                "saga {saga}: a call of lease epoch {epoch} arrived after one of epoch {n}"
            ));
        }
        *n = (*n).max(*epoch);
    }
    v
}

fn pick(coords: &Arc<Mutex<Vec<Coord>>>) -> usize {
    rand::random_range(0..coords.lock().unwrap().len())
}

/// One caller: starts a transfer through any live coordinator, waits for
/// it to settle, starts the next, until `stop` or the shared budget is
/// spent. Closed loops keep at most [`CALLERS`] transfers in flight, so the
/// load is the same on a slow machine as on a fast one (an open loop there
/// piles up a backlog whose calls all time out). Returns the ids of the
/// acknowledged starts.
async fn caller(
    coords: Arc<Mutex<Vec<Coord>>>,
    stop: Arc<AtomicBool>,
    (n, max): (Arc<AtomicU64>, u64),
) -> Vec<String> {
    let mut acked = Vec::new();
    let mut to = Clients {
        coords,
        open: HashMap::new(),
    };
    while !stop.load(Ordering::Relaxed) && n.fetch_add(1, Ordering::Relaxed) < max {
        let id = uuid::Uuid::new_v4().to_string();
        if start_transfer(&mut to, &id).await {
            acked.push(id.clone());
            settle(&mut to, &id).await;
        }
    }
    acked
}

/// A caller's connections to the coordinators, reopened after a failure.
struct Clients {
    coords: Arc<Mutex<Vec<Coord>>>,
    open: HashMap<String, common::Client>,
}

impl Clients {
    /// Calls `f` on any live coordinator, within `limit`; `None` if the
    /// call failed (that connection is then dropped) or took too long.
    async fn call<T, F, Fut>(&mut self, limit: Duration, f: F) -> Option<T>
    where
        F: FnOnce(common::Client) -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let addr = {
            let all = self.coords.lock().unwrap();
            all[rand::random_range(0..all.len())].grpc.clone()
        };
        let client = match self.open.get(&addr) {
            Some(c) => c.clone(),
            None => {
                let c = tokio::time::timeout(limit, common::client_at_checked(&addr))
                    .await
                    .ok()??;
                self.open.insert(addr.clone(), c.clone());
                c
            }
        };
        let out = tokio::time::timeout(limit, f(client)).await.ok().flatten();
        if out.is_none() {
            self.open.remove(&addr);
        }
        out
    }
}

/// Starts one random transfer under `id`; a start that fails is retried
/// under the same id (starts are idempotent by id), 20 times at most.
async fn start_transfer(to: &mut Clients, id: &str) -> bool {
    let t = Transfer {
        from: rand::random_range(0..ACCOUNTS),
        to: rand::random_range(0..ACCOUNTS),
        amount: rand::random_range(1..50),
        frozen: rand::random_range(0..10) == 0,
        slow_ms: if rand::random_range(0..5) == 0 {
            rand::random_range(500..4_000)
        } else {
            0
        },
    };
    for _ in 0..20 {
        let req = proto::StartSagaRequest {
            definition: "transfer".into(),
            saga_id: id.to_owned(),
            input_json: serde_json::to_string(&t).unwrap(),
            ..Default::default()
        };
        let started = to
            .call(Duration::from_secs(5), |mut c| async move {
                c.start_saga(req).await.ok()
            })
            .await;
        if started.is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits (WaitSaga, through any live coordinator) until the saga settles
/// or is suspended, 60 s at most; a coordinator killed under the wait is
/// replaced by another.
async fn settle(to: &mut Clients, id: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    let in_flight = [proto::SagaState::Running, proto::SagaState::Compensating];
    while Instant::now() < until {
        let req = proto::WaitSagaRequest {
            saga_id: id.to_owned(),
            timeout: Some(common::ms(5_000)),
        };
        let waited = to
            .call(Duration::from_secs(10), |mut c| async move {
                c.wait_saga(req).await.ok()?.into_inner().saga
            })
            .await;
        match waited {
            Some(saga) if !in_flight.iter().any(|s| *s as i32 == saga.state) => return,
            Some(_) => {}
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What the books say.
struct Report {
    sagas: usize,
    completed: usize,
    compensated: usize,
    suspended: Vec<String>,
    violations: Vec<String>,
}

/// Waits until no saga is in flight, then checks every invariant.
async fn check(sagad: &PgPool, a: &PgPool, b: &PgPool, acked: &[String]) -> Report {
    let until = Instant::now() + Duration::from_secs(180);
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sagas WHERE state IN ('RUNNING', 'COMPENSATING')",
        )
        .fetch_one(sagad)
        .await
        .unwrap();
        if busy == 0 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut v = Vec::new();
    let rows = sqlx::query("SELECT saga_id::text AS id, state FROM sagas")
        .fetch_all(sagad)
        .await
        .unwrap();
    let states: HashMap<String, String> =
        rows.iter().map(|r| (r.get("id"), r.get("state"))).collect();
    for id in acked {
        if !states.contains_key(id) {
            v.push(format!("acknowledged saga {id} is missing"));
        }
    }
    let count = |s: &str| states.values().filter(|x| *x == s).count();
    for (id, s) in &states {
        if !matches!(s.as_str(), "COMPLETED" | "COMPENSATED" | "SUSPENDED") {
            v.push(format!("saga {id} ended {s}"));
        }
    }
    ledgers(a, b, &states, &mut v).await;
    let suspended = books(sagad, a, b, &states, &mut v).await;
    history(sagad, &mut v).await;
    Report {
        sagas: states.len(),
        completed: count("COMPLETED"),
        compensated: count("COMPENSATED"),
        suspended,
        violations: v,
    }
}

/// Money conserved: each bank's balances moved exactly as its ledger says
/// (they are written in one transaction), and every saga that ended moved
/// nothing in sum across both banks — only a suspended one may hold money
/// (debited, not yet credited or refunded). No (saga, step, phase) applied
/// twice; no action after its compensation.
async fn ledgers(a: &PgPool, b: &PgPool, states: &HashMap<String, String>, v: &mut Vec<String>) {
    let mut moved: HashMap<String, i64> = HashMap::new();
    for (name, p) in [("bank_a", a), ("bank_b", b)] {
        let balances: i64 = sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts")
            .fetch_one(p)
            .await
            .unwrap();
        let per_saga: Vec<(String, i64)> =
            sqlx::query_as("SELECT saga, sum(amount)::bigint FROM ledger GROUP BY saga")
                .fetch_all(p)
                .await
                .unwrap();
        let booked: i64 = per_saga.iter().map(|(_, m)| m).sum();
        if balances - (ACCOUNTS + 1) * OPENING != booked {
            v.push(format!(
                "{name}: balances moved by {} but the ledger books {booked}",
                balances - (ACCOUNTS + 1) * OPENING
            ));
        }
        for (saga, m) in per_saga {
            *moved.entry(saga).or_default() += m;
        }
    }
    for (saga, m) in moved {
        let state = states.get(&saga).map_or("unknown", String::as_str);
        if m != 0 && state != "SUSPENDED" {
            v.push(format!(
                "money not conserved: saga {saga}, {state}, moved {m}"
            ));
        }
    }
    // No key applied twice; no action after its compensation.
    for (name, p) in [("bank_a", a), ("bank_b", b)] {
        let twice: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT saga, step, phase FROM ledger GROUP BY 1, 2, 3 HAVING count(*) > 1",
        )
        .fetch_all(p)
        .await
        .unwrap();
        for t in twice {
            v.push(format!("{name}: {t:?} applied twice"));
        }
        let late: Vec<(String,)> = sqlx::query_as(
            "SELECT a.saga FROM ledger a JOIN ledger c ON a.saga = c.saga AND a.step = c.step
             WHERE a.phase = 'action' AND c.phase = 'compensation' AND a.seq > c.seq",
        )
        .fetch_all(p)
        .await
        .unwrap();
        for (saga,) in late {
            v.push(format!(
                "{name}: saga {saga}'s action after its compensation"
            ));
        }
    }
}

/// Each saga's books agree with how it ended; the suspended, with their
/// reasons.
async fn books(
    sagad: &PgPool,
    a: &PgPool,
    b: &PgPool,
    states: &HashMap<String, String>,
    v: &mut Vec<String>,
) -> Vec<String> {
    let effects = |p: &PgPool| {
        let p = p.clone();
        async move {
            let rows: Vec<(String, String, String)> =
                sqlx::query_as("SELECT saga, step, phase FROM ledger")
                    .fetch_all(&p)
                    .await
                    .unwrap();
            rows
        }
    };
    let mut seen: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (saga, step, phase) in effects(a).await.into_iter().chain(effects(b).await) {
        seen.entry(saga).or_default().push((step, phase));
    }
    let has = |id: &str, step: &str, phase: &str| {
        seen.get(id)
            .is_some_and(|e| e.iter().any(|(s, p)| s == step && p == phase))
    };
    let mut suspended = Vec::new();
    for (id, s) in states {
        let (debit, refund, credit) = (
            has(id, "debit", "action"),
            has(id, "debit", "compensation"),
            has(id, "credit", "action"),
        );
        match s.as_str() {
            "COMPLETED" if !(debit && credit && !refund && has(id, "notify", "action")) => {
                v.push(format!("completed saga {id} has books {:?}", seen.get(id)))
            }
            "COMPENSATED" if credit || debit != refund => v.push(format!(
                "compensated saga {id} has books {:?}",
                seen.get(id)
            )),
            "SUSPENDED" => {
                let reason: Option<String> = sqlx::query_scalar(
                    "SELECT detail::text FROM saga_events WHERE saga_id = $1::uuid ORDER BY seq DESC LIMIT 1",
                )
                .bind(id)
                .fetch_optional(sagad)
                .await
                .unwrap();
                match reason {
                    Some(r) if !r.is_empty() => suspended.push(format!("{id}: {r}")),
                    _ => v.push(format!("saga {id} suspended without a reason")),
                }
            }
            _ => {}
        }
    }
    suspended
}

/// Each history numbered from 1 without gaps and opened by `started`.
async fn history(sagad: &PgPool, v: &mut Vec<String>) {
    let history: Vec<(String, i64, i64, String)> = sqlx::query_as(
        "SELECT saga_id::text, count(*), max(seq)::bigint, min(kind) FILTER (WHERE seq = 1) FROM saga_events GROUP BY 1",
    )
    .fetch_all(sagad)
    .await
    .unwrap();
    for (id, n, max, first) in history {
        if n != max || first != "started" {
            v.push(format!(
                "saga {id}: history of {n} entries up to {max}, opened by {first}"
            ));
        }
    }
}

/// A coordinator paused (SIGSTOP) past its lease while its call is in
/// flight: another takes the saga over and finishes it; when the paused one
/// resumes and gets its answer, its write is refused (fenced on the epoch)
/// and the saga stays as the other left it.
#[tokio::test]
async fn a_paused_coordinators_writes_are_refused_after_it_resumes() {
    use common::{Reply, Scripted, TestDb};
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let svc_url = svc.clone().serve().await;
    let svc_addr: std::net::SocketAddr = svc_url.trim_start_matches("http://").parse().unwrap();
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    svc.script(
        "a.do",
        vec![
            Reply::Block(gate_rx, r#""stale""#.into()),
            Reply::Succeed(r#""fresh""#.into()),
        ],
    );
    let spawn = || spawn_coord(&db.url, &[("svc", svc_addr)]);
    let a = spawn();
    let mut ca = common::client_at(&a.grpc, None).await;
    let mut slow = common::step("a", "svc", true, true);
    slow.timeout = Some(common::ms(60_000));
    common::register(&mut ca, common::definition("one", vec![slow])).await;
    let saga = common::start(&mut ca, "one", "{}").await;
    svc.wait_calls("a.do", 1).await;
    signal(&a.child, "-STOP");
    let b = spawn();
    let mut cb = common::client_at(&b.grpc, None).await;
    let done = common::wait(&mut cb, &saga.saga_id).await;
    assert_eq!(common::state(&done), proto::SagaState::Completed);
    let history = common::events(&mut cb, &saga.saga_id).await;

    gate.send(true).unwrap();
    signal(&a.child, "-CONT");
    let admin: std::net::SocketAddr = a.admin.parse().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let m = common::http(admin, "GET", "/metrics", &[], "").await.body;
        if m.contains("sagad_leases_lost_total 1") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the resumed coordinator's write was not refused:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = common::wait(&mut cb, &saga.saga_id).await;
    assert_eq!(
        after.steps[0].output_json, r#""fresh""#,
        "the stale answer was fenced out"
    );
    assert_eq!(
        common::events(&mut cb, &saga.saga_id).await.len(),
        history.len()
    );
    drop((a, b));
}
