//! The growth bench: a database that already holds many settled sagas
//! (`--preload-settled N`) against an empty one, in the same run, and how
//! long the admin page's queries take on the grown one (list, counts, the
//! page itself).
//!
//! ```text
//!   sagad ── saga_bench          (empty)          ┐ round 1, 2, 3: levels on
//!   sagad ── saga_bench_grown    (N settled)      ┘ each in turn (empty first
//!                                                   in odd rounds, grown in even)
//!   growth: c=64 grown median / empty median
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::PgPool;

use crate::bench::{print_levels, write_report, Args, Level, Setup};

/// Runs the growth bench: `empty` is the run's first `sagad`, on a fresh
/// database; a second one gets the preload.
pub async fn run(
    args: &Args,
    empty: Setup,
    participant_url: &str,
    version: &str,
) -> anyhow::Result<()> {
    if empty.pool.is_none() {
        bail!("--preload-settled needs PostgreSQL");
    }
    let grown_url = sibling_url(&args.database_url, "_grown")?;
    let grown = Setup::new(args, &grown_url, participant_url).await?;
    let Some(pool) = &grown.pool else {
        bail!("--preload-settled needs PostgreSQL");
    };
    preload(pool, &grown.name, args.steps, args.preload_settled).await?;
    let admin_ms = grown.phase(args).admin_reads(" (grown, idle)").await?;
    let (mut all_empty, mut all_grown) = (Vec::new(), Vec::new());
    for round in 1..=args.growth_rounds {
        // Empty first in odd rounds, grown first in even ones: whatever
        // going first or second does is shared out.
        let first_grown = round % 2 == 0;
        for grown_now in [first_grown, !first_grown] {
            let (label, setup, all) = if grown_now {
                ("grown", &grown, &mut all_grown)
            } else {
                ("empty", &empty, &mut all_empty)
            };
            println!("saga-bench: round {round}, {label} database");
            let levels = setup.phase(args).levels().await?;
            print_levels(&levels);
            all.extend(levels);
        }
    }
    // Again with the last minutes' load to count for the activity chart.
    grown
        .phase(args)
        .admin_reads(" (grown, after the load)")
        .await?;
    for &c in &args.concurrency {
        let (e, g) = (median_rate(&all_empty, c), median_rate(&all_grown, c));
        println!(
            "growth: c={c} median {g:.1} sagas/s with {} settled sagas against {e:.1} empty \
             ({} rounds): {:.1} % of empty",
            args.preload_settled,
            args.growth_rounds,
            100.0 * g / e.max(f64::MIN_POSITIVE),
        );
    }
    write_report(args, version, &admin_ms, &all_empty, &all_grown)?;
    crate::bench::errors(&all_empty)?;
    crate::bench::errors(&all_grown)
}

/// The median sagas/s of the levels at concurrency `c`.
fn median_rate(levels: &[Level], c: u32) -> f64 {
    let mut rates: Vec<f64> = levels
        .iter()
        .filter(|l| l.concurrency == c.max(1))
        .map(|l| l.sagas_per_sec)
        .collect();
    rates.sort_by(f64::total_cmp);
    match rates.len() {
        0 => 0.0,
        n if n % 2 == 1 => rates[n / 2],
        n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
    }
}

/// `url` with `suffix` added to its database name.
fn sibling_url(url: &str, suffix: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some((head, db)) = base.rsplit_once('/') else {
        bail!("--database-url names no database (postgres://HOST/NAME)");
    };
    if db.is_empty() || head.ends_with('/') {
        bail!("--database-url names no database (postgres://HOST/NAME)");
    }
    Ok(match query {
        Some(q) => format!("{head}/{db}{suffix}?{q}"),
        None => format!("{head}/{db}{suffix}"),
    })
}

/// Rows inserted per statement.
const CHUNK_ROWS: u64 = 100_000;
/// Requests per admin path; the median and the worst are reported.
pub const ADMIN_SAMPLES: usize = 20;

/// Inserts `n` settled sagas of `definition` (99% COMPLETED, 1%
/// COMPENSATED, settled over the last 29 days, inside the default
/// retention) with their two history entries each, then vacuums,
/// analyses and checkpoints.
pub async fn preload(pool: &PgPool, definition: &str, steps: u32, n: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let step = r#"{"state":"SUCCEEDED","attempts":1,"output":"{\"ok\":true}"}"#;
    let steps_json = format!("[{}]", vec![step; steps as usize].join(","));
    let mut done = 0;
    while done < n {
        let rows = CHUNK_ROWS.min(n - done);
        sqlx::query(
            "WITH s AS (
                INSERT INTO sagas (saga_id, definition, version, state, input, steps, created_at,
                                   updated_at, lease_epoch, event_seq)
                SELECT gen_random_uuid(), $1, 1,
                       CASE WHEN i % 100 = 0 THEN 'COMPENSATED' ELSE 'COMPLETED' END,
                       '{\"order\":1}', $2::jsonb,
                       now() - (i % 2505600) * interval '1 second' - interval '1 minute',
                       now() - (i % 2505600) * interval '1 second',
                       1, 2
                FROM generate_series($3::bigint, $4::bigint) AS i
                RETURNING saga_id, created_at, updated_at, state
             )
             INSERT INTO saga_events (saga_id, seq, at, kind)
             SELECT saga_id, 1, created_at, 'started' FROM s
             UNION ALL
             SELECT saga_id, 2, updated_at, lower(state) FROM s",
        )
        .bind(definition)
        .bind(&steps_json)
        .bind((done + 1) as i64)
        .bind((done + rows) as i64)
        .execute(pool)
        .await
        .context("preloading settled sagas")?;
        done += rows;
    }
    // As autovacuum would have done to a month of history: statistics, and
    // the visibility map and hint bits (without them the first read of
    // each row after a bulk load writes, which is no steady state).
    sqlx::raw_sql("VACUUM ANALYZE sagas").execute(pool).await?;
    sqlx::raw_sql("VACUUM ANALYZE saga_events")
        .execute(pool)
        .await?;
    // And written out: a month-old database has no load's worth of dirty
    // pages left, while a checkpoint the preload's WAL started would
    // otherwise spread its writes over the levels that follow.
    sqlx::raw_sql("CHECKPOINT")
        .execute(pool)
        .await
        .context("CHECKPOINT after the preload (needs a superuser or pg_checkpoint)")?;
    println!(
        "saga-bench: preloaded {n} settled sagas in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Median and worst time of the admin page's reads, in ms, by path.
pub async fn admin_latency(
    admin: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let mut out = Vec::new();
    for path in ["/api/sagas", "/api/stats", "/"] {
        let mut ms = Vec::with_capacity(ADMIN_SAMPLES);
        for _ in 0..ADMIN_SAMPLES {
            let t = Instant::now();
            let status = get(admin, path, bearer).await?;
            if status != "200" {
                bail!("GET {path}: {status}");
            }
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        out.push((path.to_owned(), ms[ms.len() / 2], ms[ms.len() - 1]));
    }
    Ok(out)
}

/// GET `path` (HTTP/1.0, loopback); the status code.
async fn get(admin: &str, path: &str, bearer: Option<&str>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = bearer
        .map(|b| format!("Authorization: {b}\r\n"))
        .unwrap_or_default();
    let read = async {
        let mut conn = tokio::net::TcpStream::connect(admin).await?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n{auth}\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        conn.read_to_end(&mut body).await?;
        let head = String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
        anyhow::Ok(head.split_whitespace().nth(1).unwrap_or("?").to_owned())
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .context("admin request timed out")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grown_database_is_named_after_the_first() {
        let url = |u| sibling_url(u, "_grown").expect("a database name");
        assert_eq!(
            url("postgres://postgres@127.0.0.1:5432/saga_bench"),
            "postgres://postgres@127.0.0.1:5432/saga_bench_grown"
        );
        assert_eq!(
            url("postgres://h1:5432,h2:5433/b?target_session_attrs=read-write"),
            "postgres://h1:5432,h2:5433/b_grown?target_session_attrs=read-write"
        );
        let e = sibling_url("postgres://u:secret@127.0.0.1:5432/", "_grown")
            .expect_err("no database name");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(sibling_url("postgres://127.0.0.1:5432", "_grown").is_err());
    }

    #[test]
    fn the_median_rate_is_taken_per_concurrency() {
        let level = |c, r| Level {
            concurrency: c,
            sagas_per_sec: r,
            ..Level::default()
        };
        let levels = [
            level(64, 3.0),
            level(1, 9.0),
            level(64, 1.0),
            level(64, 2.0),
        ];
        assert_eq!(median_rate(&levels, 64), 2.0);
        assert_eq!(median_rate(&levels, 1), 9.0);
        assert_eq!(median_rate(&levels[..2], 64), 3.0);
        assert_eq!(median_rate(&levels, 16), 0.0);
    }
}
