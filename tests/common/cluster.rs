//! PostgreSQL clusters of a test's own: `initdb` in a temporary directory,
//! served on a free port of 127.0.0.1, stopped and deleted when dropped —
//! for tests that restart, kill or fail over the database, which they must
//! not do to the machine's shared server. Included with
//! `#[path = "common/cluster.rs"] mod cluster;`.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the
//! clusters belong to, and run as, the `postgres` OS user.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// One cluster (a primary, or a streaming replica of one).
pub struct Cluster {
    dir: PathBuf,
    data: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
}

/// The newest installed PostgreSQL's programs.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's programs in /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

impl Cluster {
    /// A new primary, started, trusting local connections (replication
    /// included). `conf`: extra `postgresql.conf` lines.
    pub fn primary(conf: &str) -> Cluster {
        let c = Cluster::empty();
        c.run(
            "initdb",
            &[
                "-D",
                c.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        c.configure(conf);
        c.start();
        c
    }

    /// A streaming replica of `primary` (`pg_basebackup -R`), started,
    /// announcing itself as `name` (for `synchronous_standby_names`).
    pub fn replica_of(primary: &Cluster, name: &str) -> Cluster {
        let c = Cluster::empty();
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres application_name={name}",
            primary.port
        );
        c.run(
            "pg_basebackup",
            &[
                "-D",
                c.data(),
                "-d",
                &conninfo,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        // Promoted, it must not wait for a standby of its own (an HA
        // manager such as Patroni sets this on a failover).
        c.configure("synchronous_standby_names = ''");
        c.start();
        c
    }

    fn empty() -> Cluster {
        let dir = std::env::temp_dir().join(format!("sagad-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("data"), std::fs::Permissions::from_mode(0o700)).unwrap();
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        Cluster {
            data: dir.join("data").to_str().unwrap().to_owned(),
            dir,
            port: free_port(),
            bin: bin_dir(),
        }
    }

    fn data(&self) -> &str {
        &self.data
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when root).
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let out = if as_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(&path)
                .args(args)
                .current_dir(&self.dir)
                .output()
        }
        .unwrap();
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn configure(&self, extra: &str) {
        let conf = Path::new(self.data()).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = on\nmax_connections = 200\nwal_level = replica\nmax_wal_senders = 5\n\
             hot_standby = on\n{extra}\n",
            self.port,
            self.dir.display()
        ));
        std::fs::write(&conf, text).unwrap();
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server: `immediate` is a crash (no checkpoint, clients cut
    /// off), `fast` a clean shutdown.
    pub fn stop(&self, mode: &str) {
        self.run("pg_ctl", &["-D", self.data(), "-m", mode, "-w", "stop"]);
    }

    /// Makes a replica the primary.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-D", self.data(), "-w", "promote"]);
    }

    /// `host:port` of this server.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.host())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let args = ["-D", self.data(), "-m", "immediate", "-w", "stop"];
        let _ = if as_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
