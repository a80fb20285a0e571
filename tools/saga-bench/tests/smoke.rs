//! A small run of `saga-bench` (one level, a second, low concurrency) so it
//! keeps working; the figures themselves live in the README, not in tests.
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/common/mod.rs"]
mod common;

/// The `sagad` binary: `SAGAD_BIN`, or the one beside `saga-bench` in the
/// target directory (`cargo test --workspace` builds it for the root
/// package's tests).
fn sagad_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SAGAD_BIN") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_saga-bench")).with_file_name("sagad");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bin sagad` (or set SAGAD_BIN)",
        p.display()
    );
    p
}

/// Runs saga-bench on a fresh database with `args` (one level at
/// concurrency 2, a second, no warm-up); returns its results.json and the
/// output folder (the chart is beside it).
async fn run_bench(args: &[&str]) -> (serde_json::Value, std::path::PathBuf) {
    run_bench_on(common::Store::Postgres, args).await
}

async fn run_bench_on(
    store: common::Store,
    args: &[&str],
) -> (serde_json::Value, std::path::PathBuf) {
    let db = common::TestDb::on(store).await;
    let out = std::env::temp_dir().join(format!("saga-bench-{}", uuid::Uuid::new_v4()));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_saga-bench"));
    cmd.args(["--database-url", &db.url, "--concurrency", "2"])
        .args(["--duration-secs", "1", "--warmup-secs", "0"])
        .args(args)
        .arg("--sagad-bin")
        .arg(sagad_bin())
        .arg("--out")
        .arg(&out);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    if args.contains(&"--preload-settled") {
        // The growth bench's second database, beside the test's.
        use sqlx::migrate::MigrateDatabase;
        sqlx::Postgres::drop_database(&format!("{}_grown", db.url))
            .await
            .unwrap();
    }
    let report = std::fs::read_to_string(out.join("results.json")).unwrap();
    (serde_json::from_str(&report).unwrap(), out)
}

#[tokio::test]
async fn saga_bench_runs_and_writes_its_report() {
    // With a token in an auth file: /metrics is read with it too. With
    // settled sagas preloaded (the growth bench), the levels run on an
    // empty database and on the grown one, and the admin reads are timed.
    let (report, out) = run_bench(&[
        "--fail-fraction",
        "0.25",
        "--auth",
        "token",
        "--preload-settled",
        "1000",
        "--growth-rounds",
        "1",
    ])
    .await;
    assert_eq!(report["auth"], "token");
    assert_eq!(report["preloaded_settled_sagas"], 1000);
    let admin = report["admin_ms"].as_array().unwrap();
    assert_eq!(admin.len(), 3, "{admin:?}");
    assert!(admin.iter().all(|a| a["p50"].as_f64().unwrap() > 0.0));
    let empty = report["empty_levels"].as_array().unwrap();
    assert_eq!(empty.len(), 1, "one round, one level: {empty:?}");
    assert!(empty[0]["sagas"].as_u64().unwrap() > 0);
    let level = &report["levels"][0];
    assert_eq!(level["concurrency"], 2);
    assert_eq!(level["errors"], 0);
    assert!(level["sagas"].as_u64().unwrap() > 0);
    assert!(
        level["compensated"].as_u64().unwrap() > 0,
        "a quarter of the sagas compensate"
    );
    assert!(level["commits_per_saga"].as_f64().unwrap() > 0.0);
    assert!(level["ceiling_commits_per_sec"].as_f64().unwrap() > 0.0);
    // Read from sagad's /metrics: every saga is at least written at its
    // start and at its end.
    assert!(level["step_call_mean_ms"].as_f64().unwrap() > 0.0);
    assert!(level["db_write_mean_ms"].as_f64().unwrap() > 0.0);
    assert!(level["db_writes_per_saga"].as_f64().unwrap() >= 2.0);
    assert!(level["db_statements_per_saga"].as_f64().unwrap() > 0.0);
    assert!(std::fs::read_to_string(out.join("chart.svg"))
        .unwrap()
        .starts_with("<svg"));
    let _ = std::fs::remove_dir_all(&out);
}

/// `--database-url sqlite:PATH`: sagad on SQLite; no PostgreSQL figures.
#[tokio::test]
async fn saga_bench_runs_on_sqlite() {
    let (report, out) = run_bench_on(common::Store::Sqlite, &["--fail-fraction", "0.25"]).await;
    let level = &report["levels"][0];
    assert_eq!(level["errors"], 0);
    assert!(level["sagas"].as_u64().unwrap() > 0);
    assert!(level["compensated"].as_u64().unwrap() > 0);
    assert!(level["commits_per_saga"].is_null());
    assert!(level["ceiling_commits_per_sec"].is_null());
    assert!(level["step_call_mean_ms"].as_f64().unwrap() > 0.0);
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn saga_bench_runs_over_tls_with_a_jwt() {
    let args = [
        "--tls",
        "--auth",
        "jwt",
        "--no-ceiling",
        "--stats-settle-secs",
        "0",
    ];
    let (report, out) = run_bench(&args).await;
    assert_eq!(
        (&report["tls"], &report["auth"]),
        (&true.into(), &"jwt".into())
    );
    let level = &report["levels"][0];
    assert_eq!(level["errors"], 0);
    assert!(level["sagas"].as_u64().unwrap() > 0, "{level}");
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn saga_bench_measures_the_memory_of_listing_large_sagas() {
    let db = common::TestDb::new().await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_saga-bench"));
    cmd.args(["--database-url", &db.url, "--list-memory", "12"])
        .arg("--sagad-bin")
        .arg(sagad_bin());
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("each caller read 12 sagas"), "{stdout}");
    assert!(stdout.contains("resident memory"), "{stdout}");
}
