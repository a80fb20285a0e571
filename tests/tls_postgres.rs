//! `sagad` against a PostgreSQL that requires TLS: a cluster made in the
//! test (initdb as the `postgres` OS user, `ssl=on`, a CA and server
//! certificate made in the test, `hostssl` only in pg_hba.conf). With
//! `sslmode=verify-full` and the CA it runs sagas; without TLS, or with
//! another CA, it cannot connect.
#![allow(clippy::unwrap_used)]

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use certs::{Ca, Pem};
use common::*;
use saga_coordinator::config::Config;
use saga_coordinator::proto;

/// The PostgreSQL server binaries of this machine (Debian's layout).
fn pg_bin(tool: &str) -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries (/usr/lib/postgresql): scripts/test installs them");
    let mut dirs: Vec<PathBuf> = versions.map(|d| d.unwrap().path()).collect();
    dirs.sort();
    dirs.last().unwrap().join("bin").join(tool)
}

/// Runs a PostgreSQL tool as the `postgres` OS user (initdb refuses root).
fn as_postgres(tool: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin(tool))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throw-away cluster on a free port that only accepts TLS; stopped and
/// removed on drop.
struct TlsCluster {
    dir: PathBuf,
    port: u16,
}

impl TlsCluster {
    fn start(server: &Pem) -> TlsCluster {
        let dir = std::env::temp_dir().join(format!("sagad-pgtls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        chown_postgres(&dir);
        as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        let write = |name: &str, text: &str, mode: u32| {
            let p = data.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            chown_postgres(&p);
        };
        write("server.crt", &server.cert, 0o644);
        write("server.key", &server.key, 0o600);
        // TLS only: no plain `host` line, so a plaintext client is refused.
        write(
            "pg_hba.conf",
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            0o600,
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c fsync=off",
            dir.display()
        );
        as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-l",
                dir.join("log").to_str().unwrap(),
                "start",
            ],
        );
        TlsCluster { dir, port }
    }

    fn url(&self, query: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/sagad?{query}", self.port)
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn chown_postgres(p: &Path) {
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sagad_runs_on_a_postgres_that_requires_tls() {
    let ca = Ca::new("sagad test CA");
    let cluster = TlsCluster::start(&ca.server());
    let ca_path = cluster.dir.join("ca.pem");
    std::fs::write(&ca_path, &ca.pem.cert).unwrap();

    // Plaintext is refused by the server (hostssl only).
    let plain = Config::with_database(&cluster.url("sslmode=disable"));
    let err = saga_coordinator::server::connect(&plain)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("no pg_hba.conf entry"), "{err}");
    // TLS to a server whose certificate another CA signed is refused.
    let other_path = cluster.dir.join("other-ca.pem");
    std::fs::write(&other_path, &Ca::new("another CA").pem.cert).unwrap();
    let wrong = Config::with_database(&cluster.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other_path.display()
    )));
    assert!(saga_coordinator::server::connect(&wrong).await.is_err());

    // Verified TLS: the database is created, migrated, and sagas run.
    let mut cfg = Config::with_database(&cluster.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca_path.display()
    )));
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    let svc = Scripted::default();
    cfg.participants = vec![("svc".into(), svc.clone().serve().await)];
    let coord = TestCoordinator::start(cfg).await;
    let mut client = coord.client().await;
    register(
        &mut client,
        definition(
            "tls",
            vec![step("a", "svc", true, true), step("b", "svc", false, true)],
        ),
    )
    .await;
    let saga = start(&mut client, "tls", "{}").await;
    let done = wait(&mut client, &saga.saga_id).await;
    assert_eq!(state(&done), proto::SagaState::Completed);
    drop(coord);
    drop(cluster);
}
