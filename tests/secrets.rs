//! The secrets grep: `sagad` run with every kind of secret — an admin token,
//! auth-file tokens, an HS256 JWT secret, the token it sends participants,
//! a TLS key, a database password — and used with good and bad
//! credentials, at debug log level. None of them may appear in its log, in
//! an error, on `/metrics` or on an admin page. Also: the auth file is
//! reloaded on SIGHUP, and `sagad` listens beyond loopback once TLS and
//! authentication are configured.
#![allow(clippy::unwrap_used)]

#[path = "common/bin.rs"]
mod bin;
#[path = "common/certs.rs"]
mod certs;
mod common;
#[path = "common/https.rs"]
mod https;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bin::*;
use common::*;
use saga_coordinator::proto;

const ADMIN_TOKEN: &str = "admin-SECRET-7f3a9c1e5b";
const CI_TOKEN: &str = "ci-SECRET-4d2b8e6a0c";
const JWT_SECRET: &str = "jwt-SECRET-a1b2c3d4e5f60718293a4b5c6d7e8f90";
const PARTICIPANT_TOKEN: &str = "participant-SECRET-9e8d7c6b5a";
const DB_PASSWORD: &str = "db-SECRET-3c5e7a9b1d";
const GUESSED_TOKEN: &str = "guessed-SECRET-0f1e2d3c4b";

fn hex_sha256(s: &str) -> String {
    saga_coordinator::auth::sha256(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn auth_file(path: &Path, name: &str, token: &str) {
    std::fs::write(
        path,
        format!(
            "principals:\n  - {{name: {name}, token_sha256: {}, roles: [client, definer, viewer, operator]}}\n",
            hex_sha256(token)
        ),
    )
    .unwrap();
}

/// A client over TLS trusting `ca`, sending `token`.
async fn tls_client(grpc: &str, ca: &certs::Pem, token: Option<&str>) -> Client {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.cert))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    client_on(channel, token)
}

fn expired_jwt() -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let claims = serde_json::json!({"sub": "ci", "roles": ["admin"], "exp": 1_000_000});
    let msg = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256"}"#),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
    format!(
        "{msg}.{}",
        b64(ring::hmac::sign(&key, msg.as_bytes()).as_ref())
    )
}

#[tokio::test]
async fn no_secret_reaches_the_log_an_error_metrics_or_a_page() {
    let db = TestDb::new().await;
    let dir = certs::temp_dir("secrets");
    let ca = certs::Ca::new("secrets CA");
    let server = ca.server();
    let (cert, key) = server.write(&dir, "server");
    let auth = dir.join("auth.yaml");
    auth_file(&auth, "ci", CI_TOKEN);
    let jwt_key = dir.join("jwt.key");
    std::fs::write(&jwt_key, JWT_SECRET).unwrap();
    let participant_token = dir.join("participant.token");
    std::fs::write(&participant_token, PARTICIPANT_TOKEN).unwrap();
    let svc = Scripted::default();
    let svc_url = svc.clone().serve().await;
    // Trust authentication ignores the password, but it is in the URL.
    let url = db
        .url
        .replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1);
    assert!(url.contains(DB_PASSWORD), "{url}");
    let path = |p: &Path| p.display().to_string();
    let (mut child, before, started, rest) =
        spawn_cmd_started(sagad().env("RUST_LOG", "debug").args([
            "--database-url",
            &url,
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--tls-cert",
            &path(&cert),
            "--tls-key",
            &path(&key),
            "--auth-file",
            &path(&auth),
            "--jwt-key",
            &path(&jwt_key),
            "--admin-token",
            ADMIN_TOKEN,
            "--participant-token-file",
            &path(&participant_token),
            "--participant",
            &format!("svc={svc_url}"),
        ]));
    let (grpc, admin) = (
        log_field(&started, "grpc_addr"),
        log_field(&started, "admin_addr").parse().unwrap(),
    );
    let mut seen: Vec<String> = before;
    seen.push(started);

    // Good and bad credentials over gRPC.
    let mut ci = tls_client(&grpc, &ca.pem, Some(CI_TOKEN)).await;
    register(
        &mut ci,
        definition("order", vec![step("a", "svc", true, true)]),
    )
    .await;
    let s = start(&mut ci, "order", "{}").await;
    assert_eq!(
        state(&wait(&mut ci, &s.saga_id).await),
        proto::SagaState::Completed
    );
    let call = svc.calls_to("a.do");
    assert_eq!(call.len(), 1, "the participant was called");
    for token in [GUESSED_TOKEN.to_owned(), expired_jwt()] {
        let mut c = tls_client(&grpc, &ca.pem, Some(&token)).await;
        let err = c
            .list_sagas(proto::ListSagasRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        seen.push(err.message().to_owned());
    }

    // The admin server: pages, the API, metrics, a login and a failed one.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let guessed = format!("Bearer {GUESSED_TOKEN}");
    for (method, p, headers, body) in [
        (
            "GET",
            "/metrics".to_owned(),
            vec![("Authorization", bearer.as_str())],
            "",
        ),
        (
            "GET",
            "/".into(),
            vec![("Authorization", bearer.as_str())],
            "",
        ),
        (
            "GET",
            format!("/sagas/{}", s.saga_id),
            vec![("Authorization", bearer.as_str())],
            "",
        ),
        (
            "GET",
            "/api/sagas".into(),
            vec![("Authorization", guessed.as_str())],
            "",
        ),
        (
            "GET",
            "/definitions".into(),
            vec![("Authorization", bearer.as_str())],
            "",
        ),
    ] {
        let r = https::request(admin, &ca.pem.cert, method, &p, &headers, body)
            .await
            .unwrap();
        seen.push(format!("{method} {p} -> {} {}", r.status, r.body));
    }
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    for token in [GUESSED_TOKEN, ADMIN_TOKEN] {
        let r = https::request(
            admin,
            &ca.pem.cert,
            "POST",
            "/login",
            &form,
            &format!("name=eve&token={token}"),
        )
        .await
        .unwrap();
        seen.push(format!(
            "POST /login -> {} {:?} {}",
            r.status, r.headers, r.body
        ));
    }

    // Stop it and read everything it wrote.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(wait_exit(&mut child, Duration::from_secs(20))
        .await
        .is_some());
    seen.extend(rest.try_iter());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    seen.push(stderr);
    assert!(
        seen.iter().any(|l| l.contains("sagad stopped")),
        "the whole log was read"
    );
    assert!(seen.iter().any(|l| l.contains("DEBUG")), "at debug level");
    assert!(
        seen.iter()
            .any(|l| l.contains("auth.yaml") && l.contains("readable by every user")),
        "a world-readable auth file is warned of"
    );

    let key_body: String = server.key.lines().nth(1).unwrap().to_owned();
    let secrets = [
        ("admin token", ADMIN_TOKEN),
        ("auth-file token", CI_TOKEN),
        ("JWT secret", JWT_SECRET),
        ("participant token", PARTICIPANT_TOKEN),
        ("database password", DB_PASSWORD),
        ("guessed token", GUESSED_TOKEN),
        ("TLS key", &key_body),
    ];
    for line in &seen {
        for (what, secret) in secrets {
            assert!(!line.contains(secret), "the {what} leaked: {line}");
        }
        assert!(!line.contains("SECRET"), "a secret leaked: {line}");
    }
    println!("checked {} log lines and answers", seen.len());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A changed auth file takes effect on SIGHUP: the new token is accepted,
/// the removed one no longer is.
#[tokio::test]
async fn sighup_reloads_the_auth_file() {
    let db = TestDb::new().await;
    let dir = certs::temp_dir("auth-reload");
    let auth = dir.join("auth.yaml");
    auth_file(&auth, "first", "first-token-0123456789");
    let (mut child, _, started, rest) = spawn_started(&[
        "--database-url",
        &db.url,
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--auth-file",
        &auth.display().to_string(),
    ]);
    let grpc = log_field(&started, "grpc_addr");
    let lists = |token: &'static str| {
        let grpc = grpc.clone();
        async move {
            client_at(&grpc, Some(token))
                .await
                .list_sagas(proto::ListSagasRequest::default())
                .await
                .map_err(|s| s.code())
        }
    };
    assert!(lists("first-token-0123456789").await.is_ok());
    assert!(lists("second-token-0123456789").await.is_err());

    auth_file(&auth, "second", "second-token-0123456789");
    let reloaded = hangup_until_logged(&child, rest, "reloaded the auth file").await;
    assert!(reloaded, "sagad logs the reload");
    assert!(lists("second-token-0123456789").await.is_ok());
    assert_eq!(
        lists("first-token-0123456789").await.unwrap_err(),
        tonic::Code::Unauthenticated
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// With TLS and authentication, listening on every address needs no
/// `--insecure-allow-plaintext` and warns of nothing.
#[tokio::test]
async fn beyond_loopback_starts_with_tls_and_authentication() {
    let db = TestDb::new().await;
    let dir = certs::temp_dir("public");
    let ca = certs::Ca::new("public CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let (mut child, before, started, _rest) = spawn_started(&[
        "--database-url",
        &db.url,
        "--grpc-addr",
        "0.0.0.0:0",
        "--admin-addr",
        "0.0.0.0:0",
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
        "--admin-token",
        ADMIN_TOKEN,
    ]);
    let port = log_field(&started, "grpc_addr")
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let mut c = tls_client(&format!("127.0.0.1:{port}"), &ca.pem, None).await;
    let err = c
        .list_sagas(proto::ListSagasRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !before.iter().any(|l| l.contains("WARN")),
        "nothing to warn of: {before:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
