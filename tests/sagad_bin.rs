//! The `sagad` binary itself: start-up errors, database creation, health,
//! and a clean stop on SIGTERM.
#![allow(clippy::unwrap_used)]

#[path = "common/bin.rs"]
mod bin;
#[path = "common/certs.rs"]
mod certs;
mod common;

use bin::*;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use sqlx::{Connection, Executor};

#[test]
fn an_unreachable_database_is_one_clear_line_naming_it_without_the_password() {
    let out = sagad()
        .args([
            "--database-url",
            "postgres://someone:s3cret@127.0.0.1:1/nowhere",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot connect to database at postgres://someone:***@127.0.0.1:1/nowhere"),
        "{err}"
    );
    assert!(!err.contains("s3cret"));
}

#[test]
fn bad_flags_are_refused() {
    let out = sagad()
        .args(["--participant", "payments"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("expected NAME=URL"));
}

#[test]
fn beyond_loopback_needs_insecure_allow_plaintext_and_is_refused_before_the_database() {
    for flag in ["--grpc-addr", "--admin-addr"] {
        let mut args = vec![
            "--database-url",
            "postgres://someone:s3cret@127.0.0.1:1/nowhere",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--admin-token",
            "0123456789abcdef-admin",
        ];
        let at = args.iter().position(|a| *a == flag).unwrap();
        args[at + 1] = "0.0.0.0:0";
        let out = sagad().args(&args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{flag} 0.0.0.0:0 is not a loopback address"))
                && err.contains("--insecure-allow-plaintext"),
            "{err}"
        );
    }
}

#[test]
fn insecure_allow_plaintext_starts_beyond_loopback_and_warns() {
    let db = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(common::TestDb::new());
    let (mut child, before, started, _rest) = spawn_started(&[
        "--database-url",
        &db.url,
        "--grpc-addr",
        "0.0.0.0:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--insecure-allow-plaintext",
    ]);
    let _ = child.kill();
    let _ = child.wait();
    let warned = before.iter().any(|l| {
        l.contains("WARN")
            && l.contains(
                "--grpc-addr 0.0.0.0:0 is beyond loopback and there is neither TLS (--tls-cert/--tls-key) nor authentication",
            )
    });
    assert!(warned, "{before:?}\n{started}");
}

#[tokio::test]
async fn creates_its_database_serves_health_and_stops_on_sigterm() {
    let admin = common::admin_url();
    let name = format!("sagabin_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let (mut child, _before, started, rx) = spawn_started(&[
        "--database-url",
        &url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let field = |key: &str| log_field(&started, key);
    let (grpc, admin_addr) = (field("grpc_addr"), field("admin_addr"));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "saga.v1.CoordinatorService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    for (path, want) in [("/healthz", "200"), ("/readyz", "200"), ("/nope", "404")] {
        let mut s = std::net::TcpStream::connect(&admin_addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {want}")),
            "{path}: {resp}"
        );
    }

    drop(health);
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "sagad did not stop cleanly on SIGTERM: {status:?}"
    );
    let lines: Vec<String> = rx.try_iter().collect();
    let stopped = lines.iter().any(|l| l.contains("sagad stopped"));
    assert!(stopped, "logs the stop");

    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    let exists: (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(exists.0, "sagad created its database");
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .await
    .unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_tls_certificate_for_new_connections() {
    let db = common::TestDb::new().await;
    let dir = certs::temp_dir("reload");
    let (first, second) = (certs::Ca::new("first CA"), certs::Ca::new("second CA"));
    let (cert, key) = first.server().write(&dir, "server");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let (mut child, _, started, rest) = spawn_started(&[
        "--database-url",
        &db.url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let grpc = log_field(&started, "grpc_addr");
    assert!(healthy_over_tls(&grpc, &first.pem).await);
    assert!(!healthy_over_tls(&grpc, &second.pem).await);

    second.server().write(&dir, "server");
    let reloaded = hangup_until_logged(&child, rest, "reloaded TLS certificates").await;
    assert!(reloaded, "sagad logs the reload");
    assert!(
        healthy_over_tls(&grpc, &second.pem).await,
        "new connections get the new certificate"
    );
    assert!(!healthy_over_tls(&grpc, &first.pem).await);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--log-format json`: every line one JSON object; a saga's lines carry
/// its id.
#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_saga_id() {
    let db = common::TestDb::new().await;
    let svc = common::Scripted::default();
    let url = svc.clone().serve().await;
    let (mut child, before, started, rest) = spawn_started(&[
        "--database-url",
        &db.url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--participant",
        &format!("svc={url}"),
    ]);
    let line: serde_json::Value = serde_json::from_str(&started).unwrap();
    assert_eq!(line["message"], "sagad started");
    let grpc = line["grpc_addr"].as_str().unwrap().to_owned();
    let mut c = common::client_at(&grpc, None).await;
    common::register(
        &mut c,
        common::definition("abc", vec![common::step("a", "svc", true, true)]),
    )
    .await;
    svc.script(
        "a.do",
        vec![common::Reply::Status(tonic::Code::Unimplemented)],
    );
    let saga = common::start(&mut c, "abc", "{}").await;
    common::wait(&mut c, &saga.saga_id).await;
    let id = saga.saga_id.clone();
    // The suspension is logged at info inside the saga's span.
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        while let Ok(l) = rest.recv_timeout(Duration::from_secs(20)) {
            let done = l.contains(&id);
            seen.push(l);
            if done {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    for l in before.iter().chain(&lines) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    let suspended: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(suspended["span"]["saga_id"], saga.saga_id, "{suspended}");
    assert!(suspended["span"]["epoch"].is_number(), "{suspended}");
}

/// `sagad dev`: the whole coordinator on a SQLite file, no database server;
/// a saga runs, the admin server is ready, and a second `sagad` on the same
/// file is refused with one line saying why. An in-memory SQLite URL is
/// refused (it would lose every saga at exit).
#[tokio::test]
async fn dev_runs_on_sqlite_and_refuses_a_second_process_on_its_file() {
    let dir = std::env::temp_dir().join(format!("sagad-dev-{}", uuid::Uuid::new_v4()));
    let data_dir = dir.to_string_lossy().into_owned();
    let svc = common::Scripted::default();
    let url = svc.clone().serve().await;
    let (mut child, _, started, _rest) = spawn_started(&[
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--participant",
        &format!("svc={url}"),
        "dev",
        "--data-dir",
        &data_dir,
    ]);
    let grpc = log_field(&started, "grpc_addr");
    let admin = log_field(&started, "admin_addr");
    let mut c = common::client_at(&grpc, None).await;
    common::register(
        &mut c,
        common::definition("abc", vec![common::step("a", "svc", true, true)]),
    )
    .await;
    let saga = common::start(&mut c, "abc", "{}").await;
    let done = common::wait(&mut c, &saga.saga_id).await;
    assert_eq!(
        common::state(&done),
        saga_coordinator::proto::SagaState::Completed
    );
    let ready = common::http(admin.parse().unwrap(), "GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(dir.join("sagad.db").exists());

    let second = sagad()
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["dev", "--data-dir", &data_dir])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8(second.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("in use by another sagad") && err.contains("PostgreSQL"),
        "{err}"
    );
    let _ = child.kill();
    let _ = child.wait();

    let memory = sagad()
        .args(["--database-url", "sqlite::memory:"])
        .output()
        .unwrap();
    assert!(!memory.status.success());
    let err = String::from_utf8(memory.stderr).unwrap();
    assert!(err.contains("name a file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
