//! `sagactl`, the binary, against a live `sagad`.
#![allow(clippy::unwrap_used)]

// The coordinator's test harness (a fresh database, sagad in-process,
// scripted participants), shared with the root package's tests.
#[path = "../../../tests/common/certs.rs"]
mod certs;
#[path = "../../../tests/common/mod.rs"]
mod common;

use common::*;
use saga_coordinator::proto;
use serde_json::Value;
use tonic::Code;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

const TOKEN: &str = "sagactl-test-token-123";

/// sagactl with the admin token in its environment.
async fn sagactl(coordinator: &str, args: &[&str]) -> Out {
    sagactl_as(coordinator, Some(TOKEN), args).await
}

/// sagactl with `token` in its environment, or none.
async fn sagactl_as(coordinator: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sagactl"));
    match token {
        Some(t) => cmd.env("SAGAD_ADMIN_TOKEN", t),
        None => cmd.env_remove("SAGAD_ADMIN_TOKEN"),
    };
    cmd.env("USER", "carol")
        .arg("--coordinator")
        .arg(coordinator)
        .args(args);
    // Off the runtime: the participants of the test run on it meanwhile.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const YAML: &str = "
name: order
deadline_ms: 60000
steps:
  - name: reserve
    participant: svc
    action: reserve.do
    compensation: reserve.undo
    idempotent: true
    timeout_ms: 2000
    retry: { max_attempts: 2, initial_backoff_ms: 10, multiplier: 2, max_backoff_ms: 20 }
  - name: charge
    participant: svc
    action: charge.do
    idempotent: true
";

#[tokio::test]
async fn operators_can_list_show_and_act_with_reliable_exit_codes() {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    cfg.admin_token = Some(TOKEN.into());
    let coord = TestCoordinator::start(cfg).await;
    let mut client = coord.client().await;
    let addr = format!("http://{}", coord.addr);
    let dir = std::env::temp_dir().join(format!("sagactl-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();

    // definitions register: YAML, then the same content as JSON.
    let yaml = dir.join("order.yaml");
    std::fs::write(&yaml, YAML).unwrap();
    let r = sagactl(&addr, &["definitions", "register", yaml.to_str().unwrap()]).await;
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, "registered order@1"),
        "{}",
        r.stderr
    );
    let json_file = dir.join("order.json");
    std::fs::write(
        &json_file,
        r#"{"name": "order", "deadline_ms": 60000, "steps": [
            {"name": "reserve", "participant": "svc", "action": "reserve.do", "compensation": "reserve.undo",
             "idempotent": true, "timeout_ms": 2000,
             "retry": {"max_attempts": 2, "initial_backoff_ms": 10, "multiplier": 2, "max_backoff_ms": 20}},
            {"name": "charge", "participant": "svc", "action": "charge.do", "idempotent": true}]}"#,
    )
    .unwrap();
    let r = sagactl(
        &addr,
        &[
            "definitions",
            "register",
            json_file.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["created"].as_bool(), v["definition"]["version"].as_u64()),
        (Some(false), Some(1))
    );
    let r = sagactl(&addr, &["definitions", "list"]).await;
    assert!(
        r.stdout.contains("order") && r.stdout.contains("reserve → charge"),
        "{}",
        r.stdout
    );
    // A file that is not a definition: usage error; a definition the
    // coordinator refuses: refused, naming the field.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "name: x\nsteps: []\nextra: 1\n").unwrap();
    assert_eq!(
        sagactl(&addr, &["definitions", "register", bad.to_str().unwrap()])
            .await
            .code,
        2
    );
    std::fs::write(&bad, "name: x\nsteps: []\n").unwrap();
    let r = sagactl(&addr, &["definitions", "register", bad.to_str().unwrap()]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("INVALID_ARGUMENT: definition.steps: must not be empty"),
        "{}",
        r.stderr
    );

    // A suspended saga and a completed one.
    svc.script("charge.do", vec![Reply::Status(Code::Unimplemented)]);
    let bad_saga = start(&mut client, "order", r#"{"id": 1}"#).await;
    wait(&mut client, &bad_saga.saga_id).await;
    let good = start(&mut client, "order", "{}").await;
    wait(&mut client, &good.saga_id).await;

    let r = sagactl(&addr, &["list", "--stuck"]).await;
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("SAGA"), "a table: {}", r.stdout);
    assert!(
        r.stdout.contains(&bad_saga.saga_id) && !r.stdout.contains(&good.saga_id),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("UNIMPLEMENTED"));
    let r = sagactl(&addr, &["list", "--state", "completed", "--json"]).await;
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["sagas"].as_array().unwrap().len(), 1);
    assert_eq!(v["sagas"][0]["saga_id"], good.saga_id.as_str());
    let r = sagactl(&addr, &["list", "--older-than", "3600", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&r.stdout).unwrap()["sagas"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        sagactl(&addr, &["list", "--state", "sideways"]).await.code,
        2
    );

    let r = sagactl(&addr, &["show", &bad_saga.saga_id]).await;
    assert!(
        r.stdout.contains("state       SUSPENDED") && r.stdout.contains("charge"),
        "{}",
        r.stdout
    );
    let r = sagactl(&addr, &["show", &bad_saga.saga_id, "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&r.stdout).unwrap()["input"]["id"],
        1
    );
    let r = sagactl(&addr, &["events", &bad_saga.saga_id]).await;
    assert!(r.stdout.contains("started") && r.stdout.contains("suspended"));
    let r = sagactl(&addr, &["show", &uuid::Uuid::new_v4().to_string()]).await;
    assert_eq!(r.code, 3, "not found: {}", r.stderr);
    assert_eq!(sagactl(&addr, &["show", "nope"]).await.code, 1);

    // Reading and acting need the token (here given with --token).
    let r = sagactl_as(&addr, None, &["retry", &bad_saga.saga_id]).await;
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("UNAUTHENTICATED"), "{}", r.stderr);
    assert_eq!(sagactl_as(&addr, None, &["list"]).await.code, 1);
    let token = ["--token", TOKEN];
    let r = sagactl_as(&addr, None, &["resolve", &bad_saga.saga_id]).await;
    assert_eq!(r.code, 2, "--note is required: {}", r.stderr);
    let r = sagactl_as(
        &addr,
        None,
        &[&["abort", &good.saga_id][..], &token].concat(),
    )
    .await;
    assert_eq!(r.code, 1, "a completed saga cannot be aborted");
    let r = sagactl_as(
        &addr,
        None,
        &[&["retry", &bad_saga.saga_id, "--note", "fixed"][..], &token].concat(),
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r
        .stdout
        .starts_with(&format!("retried {}", bad_saga.saga_id)));
    let done = wait(&mut client, &bad_saga.saga_id).await;
    assert_eq!(state(&done), proto::SagaState::Completed);
    let ev = events(&mut client, &bad_saga.saga_id).await;
    assert_eq!(
        ev.iter()
            .find(|e| e.kind == "operator_retry")
            .unwrap()
            .detail,
        "by admin (claimed: carol): fixed"
    );

    // An unreachable coordinator.
    let r = sagactl("http://127.0.0.1:1", &["list"]).await;
    assert_eq!(r.code, 4);
    assert!(
        r.stderr
            .contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `https://` coordinator: verified against `--ca`; without it (the
/// system's roots do not know the test CA) it cannot be reached.
#[tokio::test]
async fn it_reaches_a_tls_coordinator_trusting_its_ca() {
    let db = TestDb::new().await;
    let dir = certs::temp_dir("sagactl-tls");
    let ca = certs::Ca::new("sagactl CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let (ca_file, _) = ca.pem.write(&dir, "ca");
    let mut cfg = test_config(&db);
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    cfg.admin_token = Some(TOKEN.into());
    let coord = TestCoordinator::start(cfg).await;
    let url = format!("https://localhost:{}", coord.addr.port());
    let ca_arg = ca_file.display().to_string();
    let r = sagactl(&url, &["--ca", &ca_arg, "list"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("SAGA"), "{}", r.stdout);
    assert_eq!(sagactl(&url, &["list"]).await.code, 4, "unknown CA");
    let r = sagactl_as(&url, None, &["--ca", &ca_arg, "list"]).await;
    assert_eq!(r.code, 1, "no credential: {}", r.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
