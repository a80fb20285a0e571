//! The database going away: a PostgreSQL failover to a synchronous replica
//! loses no acknowledged saga, and while the database is down the API fails
//! fast and everything resumes when it returns. Each test runs its own
//! PostgreSQL clusters (`common/cluster.rs`), since it stops them.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::Cluster;
use common::*;
use saga_coordinator::config::Config;
use saga_coordinator::proto::{self, SagaState};
use tonic::Code;

/// A coordinator configuration on `url` calling the scripted `svc`.
fn config(url: &str, svc_url: &str) -> Config {
    let mut cfg = Config::with_database(url);
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    cfg.poll_interval_ms = 200;
    cfg.lease_ttl_ms = 1_000;
    cfg.db_probe_interval_ms = 100;
    cfg.db_probe_timeout_ms = 500;
    cfg.participants = vec![("svc".into(), svc_url.into())];
    cfg
}

fn request() -> proto::StartSagaRequest {
    proto::StartSagaRequest {
        definition: "ab".into(),
        input_json: "{}".into(),
        ..Default::default()
    }
}

/// Polls `/readyz` until it answers `status` (the probe's view changing is
/// the event; it has no other signal outside the process).
async fn until_ready_is(coord: &TestCoordinator, status: u16) {
    let until = Instant::now() + Duration::from_secs(30);
    while http(coord.admin, "GET", "/readyz", &[], "").await.status != status {
        assert!(Instant::now() < until, "/readyz never said {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failover_to_a_synchronous_replica_loses_no_acknowledged_saga() {
    let primary =
        Cluster::primary("synchronous_standby_names = 'replica1'\nsynchronous_commit = on");
    let replica = Cluster::replica_of(&primary, "replica1");
    let svc = Scripted::default();
    let svc_url = svc.clone().serve().await;
    let url = format!(
        "postgres://postgres@{},{}/sagad?target_session_attrs=read-write",
        primary.host(),
        replica.host()
    );
    let coord = TestCoordinator::start(config(&url, &svc_url)).await;
    let mut c = coord.client().await;
    let ab = vec![step("a", "svc", true, true), step("b", "svc", true, true)];
    register(&mut c, definition("ab", ab)).await;

    // Callers start sagas throughout; each acknowledged start is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), coord.addr.to_string());
        tokio::spawn(async move {
            let mut c = client_at(&addr, None).await;
            let (mut acked, mut refused) = (Vec::new(), 0);
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.start_saga(request()).await {
                    Ok(r) => acked.push((Instant::now(), r.into_inner().saga.unwrap().saga_id)),
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    primary.stop("immediate");
    let failed_over = Instant::now();
    replica.promote();
    until_ready_is(&coord, 200).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused) = load.await.unwrap();

    let before = acked.iter().filter(|(at, _)| *at < failed_over).count();
    assert!(before > 0, "sagas acknowledged before the failover");
    assert!(acked.len() > before, "and after it, on the new primary");
    for (_, id) in &acked {
        assert_eq!(state(&wait(&mut c, id).await), SagaState::Completed, "{id}");
    }
    println!(
        "failover: {} sagas acknowledged ({before} before the primary stopped), {refused} starts refused UNAVAILABLE meanwhile, every one completed",
        acked.len()
    );
    coord.shutdown().await;
}

#[tokio::test]
async fn while_the_database_is_away_calls_fail_fast_and_all_resumes_after() {
    let pg = Cluster::primary("");
    let svc = Scripted::default();
    let svc_url = svc.clone().serve().await;
    let mut cfg = config(&pg.url("sagad"), &svc_url);
    // Far longer than a fast failure: an answer after this long waited for
    // a connection.
    cfg.db_acquire_timeout_ms = 30_000;
    let coord = TestCoordinator::start(cfg).await;
    let mut c = coord.client().await;
    let ab = vec![step("a", "svc", true, true), step("b", "svc", true, true)];
    register(&mut c, definition("ab", ab)).await;
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    svc.script("b.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let before = start(&mut c, "ab", "{}").await;
    svc.wait_calls("b.do", 1).await;

    pg.stop("fast");
    until_ready_is(&coord, 503).await;
    let asked = Instant::now();
    let err = c.start_saga(request()).await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "database unavailable; try again");
    assert!(
        took < Duration::from_secs(10),
        "refused after {took:?}: it waited for the pool"
    );
    // The saga's call answers while the database is away: its write fails,
    // and the saga is finished once the database is back.
    gate.send(true).unwrap();

    pg.start();
    until_ready_is(&coord, 200).await;
    let after = start(&mut c, "ab", "{}").await;
    for saga in [after, before] {
        assert_eq!(
            state(&wait(&mut c, &saga.saga_id).await),
            SagaState::Completed
        );
    }
    coord.shutdown().await;
}

/// The probe's own connection dying (a restart of that backend, an idle
/// cut by a proxy) is not the database going away: the probe tries once
/// more on a new connection before it refuses any call.
#[tokio::test]
async fn a_broken_probe_connection_is_not_an_outage() {
    use saga_coordinator::store::pg::hosts::{watch, Health, Hosts, Probe};
    let db = TestDb::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .min_connections(0)
        .connect_lazy(&db.url)
        .unwrap();
    let health = Arc::new(Health::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let probe = Probe {
        every: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
    };
    let hosts = Arc::new(Hosts::parse(&db.url).unwrap());
    let task = tokio::spawn(watch(pool, hosts, health.clone(), probe, stop.clone()));
    let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let backends = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    for _ in 0..3 {
        // The probe is connected (it is the only client of this database)…
        let until = Instant::now() + Duration::from_secs(30);
        while backends().await == 0 {
            assert!(Instant::now() < until, "the probe never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // …and its connection is cut: the next round finds it dead.
        db.terminate_sessions(false).await;
        while backends().await > 0 {
            assert!(Instant::now() < until, "the session did not end");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Reconnected in the round that found its connection dead.
    let until = Instant::now() + Duration::from_secs(30);
    while backends().await == 0 {
        assert!(Instant::now() < until, "the probe never reconnected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(health.is_up());
    assert_eq!(health.generation(), 0, "the database was never found away");
    stop.cancel();
    task.await.unwrap();
}
