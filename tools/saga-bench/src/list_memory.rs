//! `--list-memory N`: what listing large sagas costs `sagad` in memory.
//! N sagas with 1 MiB inputs are written straight into its database, then
//! 8 callers page through all of them at once (`ListSagas`, 500 rows asked
//! per page); `sagad`'s resident memory is sampled from /proc meanwhile.
//! The byte budget of a page (`--list-page-bytes-max`) is what keeps this
//! bounded; this prints the figures, it asserts nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use saga_proto as proto;
use sqlx::PgPool;

use crate::bench::Sagad;

/// Callers paging at once.
const CALLERS: usize = 8;
/// Bytes of each saga's input.
const INPUT_BYTES: i32 = 1 << 20;

/// Resident and peak resident memory of `pid` (KiB), from /proc.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Writes `sagas` completed sagas with [`INPUT_BYTES`] inputs.
async fn write_sagas(
    pool: &PgPool,
    definition: &str,
    steps: u32,
    sagas: u32,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO sagas (saga_id, definition, version, state, input, steps)
         SELECT gen_random_uuid(), $1, 1, 'COMPLETED', '\"' || repeat('x', $2 - 2) || '\"',
                (SELECT jsonb_agg('{\"state\": \"SUCCEEDED\"}'::jsonb) FROM generate_series(1, $3))
         FROM generate_series(1, $4)",
    )
    .bind(definition)
    .bind(INPUT_BYTES)
    .bind(steps as i32)
    .bind(sagas as i32)
    .execute(pool)
    .await
    .context("writing the sagas")?;
    Ok(())
}

/// Pages through every saga; the pages, the sagas and the largest answer.
async fn page_through(mut client: crate::bench::Client) -> anyhow::Result<(u32, usize, usize)> {
    let (mut token, mut pages, mut seen, mut biggest) = (String::new(), 0u32, 0usize, 0usize);
    loop {
        let page = client
            .list_sagas(proto::ListSagasRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        pages += 1;
        seen += page.sagas.len();
        biggest = biggest.max(prost::Message::encoded_len(&page));
        if page.next_page_token.is_empty() || pages > 100_000 {
            return Ok((pages, seen, biggest));
        }
        token = page.next_page_token;
    }
}

/// Runs the measurement (see the module documentation).
pub(crate) async fn run(
    sagad: &Sagad,
    pool: &PgPool,
    channel: tonic::transport::Channel,
    definition: &str,
    steps: u32,
    sagas: u32,
) -> anyhow::Result<()> {
    let pid = sagad.pid().ok_or_else(|| {
        anyhow!("--list-memory measures the sagad saga-bench starts (not --sagad)")
    })?;
    let started = Instant::now();
    write_sagas(pool, definition, steps, sagas).await?;
    println!(
        "list-memory: {sagas} sagas with {} KiB inputs written in {:.1} s; {CALLERS} callers page through all of them",
        INPUT_BYTES / 1024,
        started.elapsed().as_secs_f64()
    );
    let (before, _) = rss_kib(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/status"))?;
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while done.load(Ordering::Relaxed) == 0 {
                if let Some((now, _)) = rss_kib(pid) {
                    peak.fetch_max(now, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let t0 = Instant::now();
    let callers = (0..CALLERS)
        .map(|_| Ok(tokio::spawn(page_through(sagad.client(channel.clone())?))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut results = Vec::new();
    for c in callers {
        results.push(c.await?);
    }
    done.store(1, Ordering::Relaxed);
    let _ = sampler.await;
    let (_, hwm) = rss_kib(pid).unwrap_or((0, 0));
    // A coordinator without a byte budget may fail the calls (an answer
    // over its encoder's limit); the memory it took is the figure then.
    match results.iter().find_map(|r| r.as_ref().ok()) {
        Some((pages, seen, biggest)) => println!(
            "list-memory: each caller read {seen} sagas in {pages} pages (largest answer {:.1} MiB) in {:.1} s",
            *biggest as f64 / (1 << 20) as f64,
            t0.elapsed().as_secs_f64()
        ),
        None => println!(
            "list-memory: every caller failed after {:.1} s: {}",
            t0.elapsed().as_secs_f64(),
            results
                .iter()
                .find_map(|r| r.as_ref().err())
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
                .chars()
                .take(160)
                .collect::<String>()
        ),
    }
    println!(
        "list-memory: sagad resident memory {:.0} MiB before, {:.0} MiB at the sampled peak; high-water mark since start {:.0} MiB",
        before as f64 / 1024.0,
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    Ok(())
}
