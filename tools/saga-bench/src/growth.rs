//! The growth bench: a database that already holds many settled sagas
//! (`--preload-settled N`), and how long the admin page's queries take on
//! it (list, counts, the page itself), beside the throughput levels.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::PgPool;

/// Rows inserted per statement.
const CHUNK_ROWS: u64 = 100_000;
/// Requests per admin path; the median and the worst are reported.
pub const ADMIN_SAMPLES: usize = 20;

/// Inserts `n` settled sagas of `definition` (99% COMPLETED, 1%
/// COMPENSATED, settled over the last 29 days, inside the default
/// retention) with their two history entries each, then analyses.
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
