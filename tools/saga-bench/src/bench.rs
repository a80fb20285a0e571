//! The benchmark behind `saga-bench` (see the README's Performance
//! section). It spawns `sagad` as a child process (so its CPU time can be
//! read from `/proc`) or targets a running one, serves trivial participants
//! in-process on 127.0.0.1, and for each client concurrency runs clients that
//! start a saga and wait for its outcome, for a fixed time. Every loop is
//! bounded in count and time; all traffic stays on 127.0.0.1.

use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use serde::Serialize;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tonic::{Request, Response, Status};

use saga_proto as proto;
use saga_proto::coordinator_service_client::CoordinatorServiceClient;
use saga_proto::participant_service_server::{ParticipantService, ParticipantServiceServer};

/// Flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "saga-bench",
    about = "Measure sagad: sagas/s, latency, commits and rows per saga"
)]
pub struct Args {
    /// A running sagad to target (its gRPC URL). Without it, saga-bench
    /// starts its own sagad on a fresh database.
    #[arg(long)]
    pub sagad: Option<String>,
    /// The admin address (host:port) of the sagad given by `--sagad`, to
    /// read its `/metrics` (participant call and write latency). Known
    /// without it when saga-bench starts its own sagad.
    #[arg(long)]
    pub sagad_admin: Option<String>,
    /// The database sagad uses (for pg_stat_database and the commit
    /// ceiling); recreated when saga-bench starts its own sagad. Or
    /// `sqlite:PATH`: sagad on a SQLite file (no database statistics then).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/saga_bench")]
    pub database_url: String,
    /// The sagad binary to start (default: next to saga-bench).
    #[arg(long)]
    pub sagad_bin: Option<std::path::PathBuf>,
    /// Start sagad with TLS (a certificate made for the run) and call it over
    /// TLS: the cost of TLS beside a plaintext run. The figures inside sagad
    /// (/metrics) are not read then: its admin server speaks TLS too.
    #[arg(long, conflicts_with = "sagad")]
    pub tls: bool,
    /// Start sagad with authentication and call it with a credential of a
    /// principal with roles client, definer and viewer: `token` (an auth
    /// file holding its SHA-256) or `jwt` (an HS256 JWT): the cost of
    /// authentication, alone or with --tls.
    #[arg(long, value_enum, conflicts_with = "sagad")]
    pub auth: Option<AuthMode>,
    /// Steps per saga.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub steps: u32,
    /// Client concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub concurrency: Vec<u32>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Fraction of sagas whose last step refuses (they compensate).
    #[arg(long, default_value_t = 0.0)]
    pub fail_fraction: f64,
    /// Where to write results.json and chart.svg.
    #[arg(long, default_value = "bench-results")]
    pub out: std::path::PathBuf,
    /// Seconds of unmeasured warm-up (concurrency 1) before the first level.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Skip the raw commit ceiling measurement.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Instead of the throughput levels: write this many sagas with 1 MiB
    /// inputs and measure sagad's memory while 8 callers list them all.
    #[arg(long, conflicts_with = "sagad")]
    pub list_memory: Option<u32>,
    /// The growth bench (PostgreSQL only): a second `sagad` on a second
    /// database (the first's name + `_grown`) into which this many settled
    /// sagas (with their history) are inserted; the admin page's reads are
    /// timed there, then the levels run on both in turn, and each level's
    /// median throughput grown is printed as a share of empty's.
    #[arg(long, default_value_t = 0, conflicts_with = "sagad")]
    pub preload_settled: u64,
    /// With `--preload-settled`: rounds of the levels, each on the empty
    /// database and then on the grown one (the host's speed drifts; rounds
    /// in turn see the same drift, and the medians are compared).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub growth_rounds: u32,
    /// Most sagas per level, whatever the duration.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_sagas: u64,
    /// Seconds to wait before reading pg_stat_database, before and after
    /// each level. PostgreSQL 15 flushes a busy backend's statistics at most
    /// once a second, and the rest only after 10 s idle; a shorter wait
    /// under-counts commits and rows.
    #[arg(long, default_value_t = 11.0)]
    pub stats_settle_secs: f64,
}

/// One level's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Level {
    /// Client concurrency.
    pub concurrency: u32,
    /// Sagas finished.
    pub sagas: u64,
    /// Of which compensated.
    pub compensated: u64,
    /// Errors (any failed call or unexpected state).
    pub errors: u64,
    /// The first of them.
    pub first_error: Option<String>,
    /// Seconds measured.
    pub seconds: f64,
    /// Finished sagas per second.
    pub sagas_per_sec: f64,
    /// End-to-end latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// p90.
    pub p90_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// max.
    pub max_ms: f64,
    /// Median `StartSaga` latency (durably started), milliseconds.
    pub start_p50_ms: f64,
    /// PostgreSQL commits per saga (xact_commit delta / sagas); none on
    /// SQLite.
    pub commits_per_saga: Option<f64>,
    /// Rows inserted + updated + deleted per saga (PostgreSQL).
    pub rows_per_saga: Option<f64>,
    /// sagad CPU seconds per 1,000 sagas (when saga-bench started it).
    pub sagad_cpu_s_per_1000: Option<f64>,
    /// CPU seconds of the local PostgreSQL server (every process) per
    /// 1,000 sagas, when it runs on this machine and /proc shows it.
    pub postgres_cpu_s_per_1000: Option<f64>,
    /// Single-row INSERT commits/s at this concurrency, same database.
    pub ceiling_commits_per_sec: Option<f64>,
    /// sagas/s × commits/saga as a fraction of the ceiling.
    pub ceiling_fraction: Option<f64>,
    /// Mean participant call as sagad timed it, milliseconds (from its
    /// `/metrics`, when saga-bench can read them).
    pub step_call_mean_ms: Option<f64>,
    /// Mean round trip of one write statement, commit included, ms.
    pub db_write_mean_ms: Option<f64>,
    /// Saga starts and decisions written per saga.
    pub db_writes_per_saga: Option<f64>,
    /// Write statements (commits) those took per saga.
    pub db_statements_per_saga: Option<f64>,
}

/// The figures saga-bench reads from sagad's `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct Scrape {
    calls: f64,
    call_secs: f64,
    writes: f64,
    statements: f64,
    write_secs: f64,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let metric = name.split('{').next().unwrap_or(name);
            match metric {
                "sagad_step_duration_seconds_count" => s.calls += v,
                "sagad_step_duration_seconds_sum" => s.call_secs += v,
                "sagad_db_write_requests_total" => s.writes += v,
                "sagad_db_write_statements_total" => s.statements += v,
                "sagad_db_write_duration_seconds_sum" => s.write_secs += v,
                _ => {}
            }
        }
        s
    }

    /// What happened between `before` and `self`.
    fn since(self, before: Scrape) -> Scrape {
        Scrape {
            calls: self.calls - before.calls,
            call_secs: self.call_secs - before.call_secs,
            writes: self.writes - before.writes,
            statements: self.statements - before.statements,
            write_secs: self.write_secs - before.write_secs,
        }
    }
}

/// How `--auth` authenticates the benchmark's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// A bearer token whose SHA-256 is in sagad's auth file.
    Token,
    /// A JWT signed with an HS256 secret given to sagad as --jwt-key.
    Jwt,
}

/// GET `/metrics` from an admin address (HTTP/1.0, loopback), with the
/// run's credential if it has one.
async fn scrape(admin: &str, bearer: Option<&str>) -> Option<Scrape> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = bearer
        .map(|b| format!("Authorization: {b}\r\n"))
        .unwrap_or_default();
    let read = async {
        let mut conn = tokio::net::TcpStream::connect(admin).await.ok()?;
        conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n{auth}\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await.ok()?;
        let (head, text) = body.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1) == Some("200")).then(|| Scrape::parse(text))
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// Trivial participant: every action succeeds with a small output, except
/// the last step of sagas whose input says `"fail": true`.
#[derive(Clone)]
struct Bench {
    last_step: String,
}

#[tonic::async_trait]
impl ParticipantService for Bench {
    async fn invoke(
        &self,
        r: Request<proto::InvokeRequest>,
    ) -> Result<Response<proto::InvokeResponse>, Status> {
        let r = r.into_inner();
        let fail = r.phase == proto::Phase::Action as i32
            && r.step == self.last_step
            && r.input_json.contains("\"fail\":true");
        let (outcome, output) = if fail {
            (proto::Outcome::Failed, String::new())
        } else {
            (
                proto::Outcome::Succeeded,
                format!("{{\"step\":\"{}\",\"attempt\":{}}}", r.step, r.attempt),
            )
        };
        Ok(Response::new(proto::InvokeResponse {
            outcome: outcome as i32,
            output_json: output,
            error: String::new(),
        }))
    }
}

pub(crate) struct Sagad {
    child: Option<std::process::Child>,
    /// The child's name as /proc shows it (at most 15 bytes), which guards
    /// against reading another process that reused its PID.
    comm: String,
    url: String,
    /// Its admin address, for `/metrics`.
    admin: Option<String>,
    /// With `--tls`: the CA that signed its certificate, and where the
    /// files are (removed on drop).
    tls: Option<(String, std::path::PathBuf)>,
    /// With `--auth`: the `authorization` value every call sends, and
    /// where the auth files are (removed on drop).
    auth: Option<(String, std::path::PathBuf)>,
}

impl Drop for Sagad {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // Ours, by PID.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        for (_, dir) in self.tls.iter().chain(&self.auth) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Sagad {
    /// utime + stime of the child, seconds.
    fn cpu_secs(&self) -> Option<f64> {
        let (comm, ticks) = proc_cpu_ticks(self.child.as_ref()?.id(), false)?;
        (comm == self.comm).then_some(ticks / 100.0)
    }
}

/// A process's name and CPU ticks from /proc/PID/stat (USER_HZ is 100 on
/// Linux): utime + stime, plus its reaped children's when `children`.
fn proc_cpu_ticks(pid: u32, children: bool) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let n = if children { 4 } else { 2 };
    Some((comm, f.iter().take(n).sum()))
}

/// CPU seconds of every local `postgres` process so far, including exited
/// backends (reaped by the postmaster, so counted in its children's time).
/// `None` where /proc does not show them (another machine or user).
fn postgres_cpu_secs() -> Option<f64> {
    let mut ticks = 0.0;
    let mut seen = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some((comm, t)) = proc_cpu_ticks(pid, true) {
            if comm == "postgres" {
                ticks += t;
                seen = true;
            }
        }
    }
    seen.then_some(ticks / 100.0)
}

async fn start_sagad(
    args: &Args,
    database_url: &str,
    participant_url: &str,
) -> anyhow::Result<Sagad> {
    if let Some(url) = &args.sagad {
        return Ok(Sagad {
            child: None,
            comm: String::new(),
            url: url.clone(),
            admin: args.sagad_admin.clone(),
            tls: None,
            auth: None,
        });
    }
    match sqlite_file(database_url) {
        Some(file) => {
            for suffix in ["", "-wal", "-shm"] {
                let mut f = file.clone().into_os_string();
                f.push(suffix);
                let _ = std::fs::remove_file(f);
            }
        }
        None => {
            if sqlx::Postgres::database_exists(database_url).await? {
                sqlx::Postgres::drop_database(database_url).await?;
            }
        }
    }
    let bin = match &args.sagad_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("sagad"),
    };
    let tls = if args.tls { Some(certificate()?) } else { None };
    let mut command = std::process::Command::new(&bin);
    command.args([
        "--database-url",
        database_url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    if let Some((_, dir)) = &tls {
        command
            .arg("--tls-cert")
            .arg(dir.join("cert.pem"))
            .arg("--tls-key")
            .arg(dir.join("key.pem"));
    }
    let auth = match args.auth {
        Some(mode) => Some(credentials(mode, &mut command)?),
        None => None,
    };
    let mut child = command
        .args(["--participant", &format!("bench={participant_url}")])
        .env("RUST_LOG", "warn,saga_coordinator::server=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("sagad started") {
                let _ = tx.send(line);
            } else if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("sagad: {line}");
            }
        }
    });
    let comm = bin
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(15).collect())
        .unwrap_or_default();
    let mut sagad = Sagad {
        child: Some(child),
        comm,
        url: String::new(),
        admin: None,
        tls,
        auth,
    };
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .context("sagad did not start")?;
    // `key=value` of sagad's start line.
    let field = |key: &str| {
        line.split(&format!("{key}="))
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
    };
    let addr = field("grpc_addr").ok_or_else(|| anyhow!("no grpc_addr in {line:?}"))?;
    if sagad.tls.is_some() {
        sagad.url = format!("https://{addr}");
    } else {
        sagad.url = format!("http://{addr}");
        sagad.admin = field("admin_addr").map(str::to_owned);
    }
    Ok(sagad)
}

/// Writes the auth file (`token`) or the JWT key (`jwt`) for a principal
/// `saga-bench` with roles client, definer and viewer, adds the flag to
/// `command`, and returns the `authorization` value and the directory.
fn credentials(
    mode: AuthMode,
    command: &mut std::process::Command,
) -> anyhow::Result<(String, std::path::PathBuf)> {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("saga-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret: [u8; 32] = rand_bytes()?;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let roles = ["client", "definer", "viewer"];
    let bearer = match mode {
        AuthMode::Token => {
            let token = b64(&secret);
            let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            let file = dir.join("auth.yaml");
            std::fs::write(
                &file,
                format!("principals:\n  - {{name: saga-bench, token_sha256: {hex}, roles: {roles:?}}}\n"),
            )?;
            command.arg("--auth-file").arg(file);
            token
        }
        AuthMode::Jwt => {
            let file = dir.join("jwt.key");
            std::fs::write(&file, b64(&secret))?;
            command.arg("--jwt-key").arg(file);
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + 24 * 3_600;
            let claims = serde_json::json!({"sub": "saga-bench", "roles": roles, "exp": exp});
            let msg = format!(
                "{}.{}",
                b64(br#"{"alg":"HS256","typ":"JWT"}"#),
                b64(claims.to_string().as_bytes())
            );
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b64(&secret).as_bytes());
            format!(
                "{msg}.{}",
                b64(ring::hmac::sign(&key, msg.as_bytes()).as_ref())
            )
        }
    };
    Ok((format!("Bearer {bearer}"), dir))
}

fn rand_bytes() -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
        .map_err(|_| anyhow!("no system randomness"))?;
    Ok(out)
}

/// A gRPC client sending the run's credential (if any) with every call.
pub(crate) type Client = CoordinatorServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Adds `authorization` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

impl Sagad {
    /// The PID of the sagad saga-bench started, if it did.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    fn bearer(&self) -> Option<&str> {
        self.auth.as_ref().map(|(b, _)| b.as_str())
    }

    pub(crate) fn client(&self, channel: tonic::transport::Channel) -> anyhow::Result<Client> {
        let value = self.bearer().map(str::parse).transpose()?;
        Ok(CoordinatorServiceClient::with_interceptor(
            channel,
            Bearer(value),
        ))
    }
}

/// A CA and a certificate it signed for 127.0.0.1, written to a fresh
/// directory as cert.pem and key.pem; returns the CA's PEM and the directory.
fn certificate() -> anyhow::Result<(String, std::path::PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "saga-bench CA");
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?
        .signed_by(&key, &issuer)?;
    let dir = std::env::temp_dir().join(format!("saga-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok((ca_pem, dir))
}

/// The SQLite file of a `sqlite:PATH` URL.
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    Some(rest.strip_prefix("//").unwrap_or(rest).into())
}

#[derive(Debug, Clone, Copy, Default)]
struct PgStats {
    commits: i64,
    rows: i64,
}

async fn pg_stats(pool: Option<&PgPool>) -> anyhow::Result<Option<PgStats>> {
    let Some(pool) = pool else { return Ok(None) };
    let r = sqlx::query(
        "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted AS rows
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    Ok(Some(PgStats {
        commits: r.try_get("xact_commit")?,
        rows: r.try_get("rows")?,
    }))
}

/// pg_stat_database once the backends' pending statistics are flushed
/// (see [`Args::stats_settle_secs`]).
async fn settled_stats(pool: Option<&PgPool>, settle_secs: f64) -> anyhow::Result<Option<PgStats>> {
    tokio::time::sleep(Duration::from_secs_f64(settle_secs.max(0.0))).await;
    pg_stats(pool).await
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.fail_fraction) {
        bail!("--fail-fraction must be within 0..=1");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let participant_url = format!("http://{}", listener.local_addr()?);
    let last_step = format!("s{}", args.steps - 1);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ParticipantServiceServer::new(Bench { last_step }))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    let main = Setup::new(&args, &args.database_url, &participant_url).await?;
    let version = main.version(&args).await?;
    println!(
        "saga-bench: {} steps, levels {:?}, {}s each, fail fraction {}; {}, {}; {version}",
        args.steps,
        args.concurrency,
        args.duration_secs,
        args.fail_fraction,
        if args.tls { "TLS" } else { "plaintext" },
        match args.auth {
            Some(AuthMode::Token) => "auth-file token",
            Some(AuthMode::Jwt) => "HS256 JWT",
            None => "no authentication",
        },
    );
    if let Some(n) = args.list_memory {
        let Some(pool) = &main.pool else {
            bail!("--list-memory needs PostgreSQL (it reads the inputs' sizes there)");
        };
        let channel = main.channel.clone();
        return crate::list_memory::run(&main.sagad, pool, channel, &main.name, args.steps, n)
            .await;
    }
    if args.preload_settled > 0 {
        return crate::growth::run(&args, main, &participant_url, &version).await;
    }
    let phase = main.phase(&args);
    let admin_ms = phase.admin_reads("").await?;
    let levels = phase.levels().await?;
    print_levels(&levels);
    write_report(&args, &version, &admin_ms, &[], &levels)?;
    errors(&levels)
}

/// A failed run when any level had errors.
pub(crate) fn errors(levels: &[Level]) -> anyhow::Result<()> {
    let errors: u64 = levels.iter().map(|l| l.errors).sum();
    if errors > 0 {
        bail!("{errors} errors");
    }
    Ok(())
}

/// One `sagad` on its database, reached over one channel, with the bench
/// definition registered.
pub(crate) struct Setup {
    sagad: Sagad,
    pub(crate) pool: Option<PgPool>,
    channel: tonic::transport::Channel,
    pub(crate) name: String,
}

impl Setup {
    pub(crate) async fn new(
        args: &Args,
        database_url: &str,
        participant_url: &str,
    ) -> anyhow::Result<Setup> {
        let sagad = start_sagad(args, database_url, participant_url).await?;
        let max_c = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
        let pool = match sqlite_file(database_url) {
            Some(_) => None,
            None => Some(
                PgPoolOptions::new()
                    .max_connections(max_c + 2)
                    .connect(database_url)
                    .await?,
            ),
        };
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(sagad.url.clone())?.tcp_nodelay(true);
        if let Some((ca, _)) = &sagad.tls {
            endpoint = endpoint.tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )?;
        }
        let channel = endpoint.connect().await?;
        let mut client = sagad.client(channel.clone())?;
        if args.sagad.is_some() {
            client
                .heartbeat(proto::HeartbeatRequest {
                    participant: "bench".into(),
                    instance_id: format!("saga-bench-{}", std::process::id()),
                    endpoint: participant_url.to_owned(),
                    ttl: Some(prost_types::Duration {
                        seconds: 3_600,
                        nanos: 0,
                    }),
                    weight: 0,
                })
                .await?;
        }
        let name = format!("bench-{}", args.steps);
        client
            .register_definition(proto::RegisterDefinitionRequest {
                definition: Some(definition(&name, args.steps)),
            })
            .await?;
        Ok(Setup {
            sagad,
            pool,
            channel,
            name,
        })
    }

    /// The database's version and durability settings, for the header.
    async fn version(&self, args: &Args) -> anyhow::Result<String> {
        Ok(match &self.pool {
            Some(pool) => {
                let v: String = sqlx::query_scalar("SELECT current_setting('server_version') || ', fsync=' || current_setting('fsync') || ', synchronous_commit=' || current_setting('synchronous_commit')")
                    .fetch_one(pool)
                    .await?;
                format!("PostgreSQL {v}")
            }
            None => format!("SQLite {} (WAL, synchronous=FULL)", args.database_url),
        })
    }

    pub(crate) fn phase<'a>(&'a self, args: &'a Args) -> Phase<'a> {
        Phase {
            args,
            sagad: &self.sagad,
            pool: self.pool.as_ref(),
            channel: self.channel.clone(),
            name: &self.name,
        }
    }
}

/// `steps` steps on the in-process participant, every one idempotent.
fn definition(name: &str, steps: u32) -> proto::SagaDefinition {
    let steps = (0..steps)
        .map(|i| proto::StepDefinition {
            name: format!("s{i}"),
            participant: "bench".into(),
            action: format!("s{i}.do"),
            compensation: format!("s{i}.undo"),
            idempotent: true,
            ..Default::default()
        })
        .collect();
    proto::SagaDefinition {
        name: name.to_owned(),
        steps,
        ..Default::default()
    }
}

/// What every phase of one run shares: its `sagad`, database and
/// definition.
pub(crate) struct Phase<'a> {
    args: &'a Args,
    sagad: &'a Sagad,
    pool: Option<&'a PgPool>,
    channel: tonic::transport::Channel,
    name: &'a str,
}

impl Phase<'_> {
    /// The warm-up, then each level, then the commit ceilings.
    pub(crate) async fn levels(&self) -> anyhow::Result<Vec<Level>> {
        let args = self.args;
        if args.warmup_secs > 0.0 {
            let warm = Args {
                duration_secs: args.warmup_secs,
                stats_settle_secs: 0.0,
                ..args.clone()
            };
            let skip = pg_stats(self.pool).await?;
            self.level(&warm, 1, skip).await?;
        }
        // Each level's settled "after" is the next one's "before".
        let mut stats = settled_stats(self.pool, args.stats_settle_secs).await?;
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            let (level, after) = self.level(args, c.max(1), stats).await?;
            levels.push(level);
            stats = after;
        }
        // The ceilings run after every saga level: statistics of idle
        // backends reach pg_stat_database late, and the ceiling's inserts
        // must not leak into a saga level's figures.
        if let (false, Some(pool)) = (args.no_ceiling, self.pool) {
            for level in levels.iter_mut() {
                let secs = args.duration_secs.min(5.0);
                let t = commit_ceiling(pool, level.concurrency, secs).await?;
                level.ceiling_commits_per_sec = Some(t);
                level.ceiling_fraction = level
                    .commits_per_saga
                    .map(|commits| level.sagas_per_sec * commits / t);
            }
        }
        Ok(levels)
    }

    async fn level(
        &self,
        args: &Args,
        c: u32,
        before: Option<PgStats>,
    ) -> anyhow::Result<(Level, Option<PgStats>)> {
        run_level(
            args,
            self.sagad,
            self.pool,
            self.channel.clone(),
            self.name,
            c,
            before,
        )
        .await
    }

    /// Times the admin page's reads, when `sagad`'s admin address is known;
    /// `when` labels the printed lines.
    pub(crate) async fn admin_reads(&self, when: &str) -> anyhow::Result<Vec<(String, f64, f64)>> {
        let Some(admin) = self.sagad.admin.as_deref() else {
            return Ok(Vec::new());
        };
        let admin_ms = crate::growth::admin_latency(admin, self.sagad.bearer()).await?;
        for (path, p50, max) in &admin_ms {
            println!(
                "admin GET {path}{when}: p50 {p50:.1} ms, max {max:.1} ms ({} requests)",
                crate::growth::ADMIN_SAMPLES
            );
        }
        Ok(admin_ms)
    }
}

pub(crate) fn print_levels(levels: &[Level]) {
    for level in levels {
        println!(
            "c={:<3} {:>8.1} sagas/s  p50 {:>6.2} ms  p90 {:>6.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  start p50 {:.2} ms  {} commits/saga  {} rows/saga  cpu sagad {} postgres {}  ceiling {}  errors {}",
            level.concurrency,
            level.sagas_per_sec,
            level.p50_ms,
            level.p90_ms,
            level.p99_ms,
            level.max_ms,
            level.start_p50_ms,
            level.commits_per_saga.map(|c| format!("{c:.2}")).unwrap_or_else(|| "n/a".into()),
            level.rows_per_saga.map(|r| format!("{r:.1}")).unwrap_or_else(|| "n/a".into()),
            level.sagad_cpu_s_per_1000.map(|c| format!("{c:.2} s/1000")).unwrap_or_else(|| "n/a".into()),
            level.postgres_cpu_s_per_1000.map(|c| format!("{c:.2} s/1000")).unwrap_or_else(|| "n/a".into()),
            match (level.ceiling_commits_per_sec, level.ceiling_fraction) {
                (Some(t), Some(f)) => format!("{t:.0} commits/s ({:.0}% used)", f * 100.0),
                _ => "n/a".into(),
            },
            level.errors,
        );
        if let Some(e) = &level.first_error {
            println!("       first error: {e}");
        }
        if let (Some(call), Some(write), Some(w), Some(st)) = (
            level.step_call_mean_ms,
            level.db_write_mean_ms,
            level.db_writes_per_saga,
            level.db_statements_per_saga,
        ) {
            println!(
                "       inside sagad: participant call {call:.2} ms mean; write statement {write:.2} ms mean \
                 (commit included); {w:.2} writes/saga in {st:.2} statements/saga"
            );
        }
    }
}

/// `results.json` and `chart.svg` in `--out`.
pub(crate) fn write_report(
    args: &Args,
    version: &str,
    admin_ms: &[(String, f64, f64)],
    empty: &[Level],
    levels: &[Level],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let report = serde_json::json!({
        "steps": args.steps,
        "fail_fraction": args.fail_fraction,
        "duration_secs": args.duration_secs,
        "tls": args.tls,
        "auth": args.auth.map(|m| format!("{m:?}").to_lowercase()),
        "postgres": version,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "preloaded_settled_sagas": args.preload_settled,
        "admin_ms": admin_ms
            .iter()
            .map(|(path, p50, max)| serde_json::json!({"path": path, "p50": p50, "max": max}))
            .collect::<Vec<_>>(),
        "empty_levels": empty,
        "levels": levels,
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("chart.svg"), chart(levels, args.steps))?;
    println!(
        "wrote {} and {}",
        args.out.join("results.json").display(),
        args.out.join("chart.svg").display()
    );
    Ok(())
}

async fn run_level(
    args: &Args,
    sagad: &Sagad,
    pool: Option<&PgPool>,
    channel: tonic::transport::Channel,
    name: &str,
    c: u32,
    before: Option<PgStats>,
) -> anyhow::Result<(Level, Option<PgStats>)> {
    let cpu_before = sagad.cpu_secs();
    let pg_cpu_before = postgres_cpu_secs();
    let scrape_before = match sagad.admin.as_deref() {
        Some(a) => scrape(a, sagad.bearer()).await,
        None => None,
    };
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.duration_secs);
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let budget = Arc::new(AtomicU64::new(args.max_sagas));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = Vec::new();
    for i in 0..c {
        let mut client = sagad.client(channel.clone())?;
        let (name, done, errors, budget) = (
            name.to_owned(),
            done.clone(),
            errors.clone(),
            budget.clone(),
        );
        let fail_fraction = args.fail_fraction;
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut start_lat = Vec::new();
            let mut compensated = 0u64;
            let mut n = 0u64;
            while Instant::now() < until
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_ok()
            {
                // Deterministic spread of failing sagas.
                let fail = fail_fraction > 0.0
                    && ((n * 7_919 + u64::from(i) * 104_729) % 1_000) as f64 / 1_000.0
                        < fail_fraction;
                n += 1;
                let t = Instant::now();
                let input = format!("{{\"client\":{i},\"n\":{n},\"fail\":{fail}}}");
                let outcome = async {
                    let s = client
                        .start_saga(proto::StartSagaRequest {
                            definition: name.clone(),
                            input_json: input,
                            ..Default::default()
                        })
                        .await?
                        .into_inner()
                        .saga
                        .ok_or_else(|| Status::internal("no saga"))?;
                    start_lat.push(t.elapsed().as_secs_f64() * 1_000.0);
                    let w = client
                        .wait_saga(proto::WaitSagaRequest {
                            saga_id: s.saga_id,
                            timeout: Some(prost_types::Duration {
                                seconds: 30,
                                nanos: 0,
                            }),
                        })
                        .await?
                        .into_inner()
                        .saga
                        .ok_or_else(|| Status::internal("no saga"))?;
                    Ok::<i32, Status>(w.state)
                }
                .await;
                let want = if fail {
                    proto::SagaState::Compensated
                } else {
                    proto::SagaState::Completed
                } as i32;
                match outcome {
                    Ok(s) if s == want => {
                        lat.push(t.elapsed().as_secs_f64() * 1_000.0);
                        compensated += u64::from(fail);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut first = first_error.lock().unwrap_or_else(|p| p.into_inner());
                        if first.is_none() {
                            *first = Some(match other {
                                Ok(s) => format!("a saga ended in state {s}, not {want}"),
                                Err(e) => format!("{:?}: {}", e.code(), e.message()),
                            });
                        }
                    }
                }
            }
            (lat, start_lat, compensated)
        }));
    }
    let progress = {
        let (done, errors) = (done.clone(), errors.clone());
        tokio::spawn(async move {
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "  [c={c}] {secs:>5.1}s {n:>8} sagas {:>8.1}/s errors {}",
                    n as f64 / secs,
                    errors.load(Ordering::Relaxed)
                );
            }
        })
    };
    let mut lat = Vec::new();
    let mut start_lat = Vec::new();
    let mut compensated = 0;
    for t in tasks {
        let (l, sl, comp) = t.await?;
        lat.extend(l);
        start_lat.extend(sl);
        compensated += comp;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    let cpu = match (cpu_before, sagad.cpu_secs()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let pg_cpu = match (pg_cpu_before, postgres_cpu_secs()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let scraped = match (sagad.admin.as_deref(), scrape_before) {
        (Some(a), Some(before)) => scrape(a, sagad.bearer())
            .await
            .map(|after| after.since(before)),
        _ => None,
    };
    let after = settled_stats(pool, args.stats_settle_secs).await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let sagas = lat.len() as u64;
    let per = |x: i64| {
        if sagas == 0 {
            0.0
        } else {
            x as f64 / sagas as f64
        }
    };
    // Our own two stats reads are commits too.
    let commits_per_saga = before
        .zip(after)
        .map(|(b, a)| per(a.commits - b.commits - 2));
    let sagas_per_sec = sagas as f64 / seconds;
    let level = Level {
        concurrency: c,
        sagas,
        compensated,
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.lock().unwrap_or_else(|p| p.into_inner()).take(),
        seconds,
        sagas_per_sec,
        p50_ms: percentile(&lat, 50.0),
        start_p50_ms: {
            start_lat.sort_by(|a, b| a.total_cmp(b));
            percentile(&start_lat, 50.0)
        },
        p90_ms: percentile(&lat, 90.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
        commits_per_saga,
        rows_per_saga: before.zip(after).map(|(b, a)| per(a.rows - b.rows)),
        sagad_cpu_s_per_1000: cpu
            .filter(|_| sagas > 0)
            .map(|c| c * 1_000.0 / sagas as f64),
        postgres_cpu_s_per_1000: pg_cpu
            .filter(|_| sagas > 0)
            .map(|c| c * 1_000.0 / sagas as f64),
        ceiling_commits_per_sec: None,
        ceiling_fraction: None,
        step_call_mean_ms: scraped
            .filter(|m| m.calls > 0.0)
            .map(|m| m.call_secs * 1_000.0 / m.calls),
        db_write_mean_ms: scraped
            .filter(|m| m.statements > 0.0)
            .map(|m| m.write_secs * 1_000.0 / m.statements),
        db_writes_per_saga: scraped
            .filter(|_| sagas > 0)
            .map(|m| m.writes / sagas as f64),
        db_statements_per_saga: scraped
            .filter(|_| sagas > 0)
            .map(|m| m.statements / sagas as f64),
    };
    Ok((level, after))
}

/// Single-row INSERT transactions per second at concurrency `c`.
async fn commit_ceiling(pool: &PgPool, c: u32, secs: f64) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_ceiling (id bigserial PRIMARY KEY, v int NOT NULL)",
    )
    .execute(pool)
    .await?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..c {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until && n < 10_000_000 {
                sqlx::query("INSERT INTO bench_ceiling (v) VALUES ($1)")
                    .bind(i as i32)
                    .execute(&pool)
                    .await?;
                n += 1;
            }
            Ok::<u64, sqlx::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let tps = total as f64 / started.elapsed().as_secs_f64();
    sqlx::query("TRUNCATE bench_ceiling").execute(pool).await?;
    Ok(tps)
}

/// Two panels side by side: sagas/s and p99 latency against concurrency.
fn chart(levels: &[Level], steps: u32) -> String {
    let (w, h, pad) = (360.0, 240.0, 48.0);
    let panel = |x0: f64, title: &str, values: Vec<f64>, unit: &str, color: &str| {
        let max = values.iter().copied().fold(0.0f64, f64::max).max(1e-9) * 1.15;
        let n = values.len().max(1) as f64;
        let bw = (w - 2.0 * pad) / n;
        let mut s = format!(
            "<text x='{}' y='20' font-size='14' font-weight='bold'>{title}</text>\
             <line x1='{}' y1='{}' x2='{}' y2='{}' stroke='#333'/>",
            x0 + pad,
            x0 + pad,
            h - pad,
            x0 + w - pad,
            h - pad
        );
        for (i, v) in values.iter().enumerate() {
            let bh = (h - 2.0 * pad) * v / max;
            let x = x0 + pad + i as f64 * bw + bw * 0.15;
            s += &format!(
                "<rect x='{x:.1}' y='{:.1}' width='{:.1}' height='{bh:.1}' fill='{color}'/>\
                 <text x='{:.1}' y='{:.1}' font-size='11' text-anchor='middle'>{v:.1}{unit}</text>\
                 <text x='{:.1}' y='{:.1}' font-size='11' text-anchor='middle'>c={}</text>",
                h - pad - bh,
                bw * 0.7,
                x + bw * 0.35,
                h - pad - bh - 4.0,
                x + bw * 0.35,
                h - pad + 14.0,
                levels.get(i).map(|l| l.concurrency).unwrap_or(0)
            );
        }
        s
    };
    let tput: Vec<f64> = levels.iter().map(|l| l.sagas_per_sec).collect();
    let p99: Vec<f64> = levels.iter().map(|l| l.p99_ms).collect();
    format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{h}' font-family='sans-serif'>\
         <rect width='100%' height='100%' fill='white'/>{}{}\
         <text x='{}' y='{}' font-size='11' fill='#555'>{steps}-step sagas; client concurrency on the x axis</text></svg>",
        2.0 * w,
        panel(0.0, "completed sagas/s", tput, "", "#2f6fb0"),
        panel(w, "p99 latency (ms)", p99, "", "#c0602a"),
        pad,
        h - 8.0
    )
}
