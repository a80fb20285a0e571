//! Running the `sagad` binary in tests: spawn it, read its log until it has
//! started, wait for it to exit. Included with
//! `#[path = "common/bin.rs"] mod bin;` (beside `mod certs;` and `mod common;`).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::certs;

/// The binary, with `RUST_LOG=info` and no `DATABASE_URL` from outside.
pub fn sagad() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sagad"));
    c.env_remove("DATABASE_URL").env("RUST_LOG", "info");
    c
}

/// Starts the binary with `args` (stdout and stderr piped) and reads its
/// log until it has started: the child, the lines before, the start line,
/// and the rest to come.
pub fn spawn_started(args: &[&str]) -> (std::process::Child, Vec<String>, String, Lines) {
    spawn_cmd_started(sagad().args(args))
}

/// [`spawn_started`] for a command set up by the caller.
pub fn spawn_cmd_started(cmd: &mut Command) -> (std::process::Child, Vec<String>, String, Lines) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (before, started, rest) = until_started(&mut child);
    (child, before, started, rest)
}

/// The lines of a child's log, as they come.
pub type Lines = std::sync::mpsc::Receiver<String>;

/// Reads the child's log until its "sagad started" line; returns the lines
/// before it, that line, and the rest to come. Panics with its stderr if it
/// does not start.
pub fn until_started(child: &mut std::process::Child) -> (Vec<String>, String, Lines) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut before = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("sagad started") => return (before, line, rx),
            Ok(line) => before.push(line),
            Err(e) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("sagad did not start: {e}; stderr: {err}");
            }
        }
    }
}

/// Waits up to `limit` for the child to exit, without blocking the runtime
/// (our own client connections must stay able to close).
pub async fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// `key=value` from a log line.
pub fn log_field(line: &str, key: &str) -> String {
    line.split(&format!("{key}="))
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Whether a new TLS connection trusting `ca` gets a health answer.
pub async fn healthy_over_tls(addr: &str, ca: &certs::Pem) -> bool {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert))
        .domain_name("localhost");
    let Ok(endpoint) =
        Endpoint::from_shared(format!("https://{addr}")).and_then(|e| e.tls_config(tls))
    else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok()
}

/// Sends SIGHUP to `child` and waits (up to 30 s) for a log line containing
/// `logged`; whether it came.
pub async fn hangup_until_logged(
    child: &std::process::Child,
    rest: Lines,
    logged: &'static str,
) -> bool {
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::task::spawn_blocking(move || loop {
        match rest.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains(logged) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    })
    .await
    .unwrap()
}
