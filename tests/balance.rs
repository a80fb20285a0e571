//! Balancing and back-pressure towards participants: round robin and least
//! outstanding spread calls as documented, an instance's circuit breaker
//! opens and closes, the in-flight cap holds under a burst, the rate limit
//! holds; what is not reached goes to another instance without an attempt.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use saga_coordinator::participant::Policy;
use saga_coordinator::proto::SagaState;

/// Waits until `f` holds (the event has no signal of its own outside the
/// coordinator), for at most 30 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < end, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `/api/participants` of `coord`.
async fn pools(coord: &TestCoordinator) -> serde_json::Value {
    http(coord.admin, "GET", "/api/participants", &[], "")
        .await
        .json()
}

fn instance<'a>(pools: &'a serde_json::Value, endpoint: &str) -> &'a serde_json::Value {
    pools["participants"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["endpoint"] == endpoint)
        .unwrap()
}

/// A coordinator on `cfg` with definition "one": one step `s` at
/// participant `svc`; a client of it.
async fn with_one_step(
    cfg: saga_coordinator::config::Config,
    idempotent: bool,
) -> (TestCoordinator, Client) {
    let coord = TestCoordinator::start(cfg).await;
    let mut c = coord.client().await;
    register(
        &mut c,
        definition("one", vec![step("s", "svc", idempotent, true)]),
    )
    .await;
    (coord, c)
}

/// Ten sagas one after another over two instances, the first call to
/// instance `a` held: how many calls each instance got.
async fn spread(policy: Policy) -> (usize, usize) {
    let db = TestDb::new().await;
    let (a, b) = (Scripted::default(), Scripted::default());
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    a.script("s.do", vec![Reply::Block(gate_rx, "{}".into())]);
    let (url_a, url_b) = (a.clone().serve().await, b.clone().serve().await);
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url_a), ("svc".into(), url_b)];
    cfg.participant_balance = vec![("svc".into(), policy)];
    let (coord, mut c) = with_one_step(cfg, true).await;
    for k in 1..=10 {
        let a_before = a.calls().len();
        let saga = start(&mut c, "one", "{}").await;
        until("the saga's call", || a.calls().len() + b.calls().len() == k).await;
        let held = a_before == 0 && a.calls().len() == 1;
        if !held {
            // Done before the next starts: only the held call is in flight.
            assert_eq!(
                state(&wait(&mut c, &saga.saga_id).await),
                SagaState::Completed
            );
        }
    }
    let got = (a.calls().len(), b.calls().len());
    gate.send(true).unwrap();
    coord.shutdown().await;
    got
}

#[tokio::test]
async fn round_robin_and_least_outstanding_spread_calls_as_documented() {
    // Round robin: in turn, whatever each instance is doing.
    assert_eq!(spread(Policy::RoundRobin).await, (5, 5));
    // Least outstanding: while `a` holds a call, every new one goes to `b`.
    assert_eq!(spread(Policy::LeastOutstanding).await, (1, 9));
}

/// One instance is not listening: its attempts go to the other without
/// counting an attempt; after two such calls its breaker opens, no call
/// tries it until it has been open for a while, and once it listens again
/// the half-open probe reaches it and closes the breaker.
#[tokio::test]
async fn an_unreached_instance_is_passed_over_and_its_breaker_opens_and_closes() {
    let db = TestDb::new().await;
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_addr = down.local_addr().unwrap();
    drop(down);
    let url_down = format!("http://{down_addr}");
    let up = Scripted::default();
    let url_up = up.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![
        ("svc".into(), url_down.clone()),
        ("svc".into(), url_up.clone()),
    ];
    cfg.participant_breaker_failures = 2;
    cfg.participant_breaker_open_ms = 300;
    let (coord, mut c) = with_one_step(cfg, false).await;
    for _ in 0..6 {
        let saga = start(&mut c, "one", "{}").await;
        let done = wait(&mut c, &saga.saga_id).await;
        assert_eq!(state(&done), SagaState::Completed);
        assert_eq!(
            done.steps[0].attempts, 1,
            "the unreached instance cost no attempt"
        );
    }
    let p = pools(&coord).await;
    assert_eq!(instance(&p, &url_down)["breaker"], "open", "{p}");
    assert_eq!(instance(&p, &url_up)["calls"], 6);
    assert_eq!(
        p["participants"][0]["rerouted"], 2,
        "tried twice, then passed over: {p}"
    );

    // The instance comes back on its address; after the open period one
    // probe reaches it and the breaker closes.
    let back = Scripted::default();
    let listener = tokio::net::TcpListener::bind(down_addr).await.unwrap();
    back.clone().serve_on(listener);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..4 {
        let saga = start(&mut c, "one", "{}").await;
        assert_eq!(
            state(&wait(&mut c, &saga.saga_id).await),
            SagaState::Completed
        );
    }
    let p = pools(&coord).await;
    assert_eq!(instance(&p, &url_down)["breaker"], "closed", "{p}");
    assert!(!back.calls().is_empty(), "calls reach it again");
    let text = http(coord.admin, "GET", "/metrics", &[], "").await.body;
    assert!(
        text.contains(&format!(
        "sagad_participant_instance_breaker_open{{participant=\"svc\",endpoint=\"{url_down}\"}} 0"
    )),
        "{text}"
    );
    assert!(
        text.contains("sagad_participant_rerouted_total{participant=\"svc\"} 2"),
        "{text}"
    );
    coord.shutdown().await;
}

/// A participant that takes `took` per call and records the most calls it
/// had in flight at once, and when each call arrived.
#[derive(Clone, Default)]
struct Slow {
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl Slow {
    async fn serve(&self, took: Duration) -> String {
        let me = self.clone();
        let p = saga_sdk::Participant::builder("svc")
            .action("s.do", move |_ctx, _: serde_json::Value| {
                let me = me.clone();
                async move {
                    me.arrivals.lock().unwrap().push(Instant::now());
                    let n = me.now.fetch_add(1, Ordering::SeqCst) + 1;
                    me.most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(took).await;
                    me.now.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .build();
        let (addr, _) = saga_sdk::serve_local(p, std::future::pending())
            .await
            .unwrap();
        format!("http://{addr}")
    }
}

/// A coordinator (configured by `tweak`) with definition "one": one step at
/// a participant `svc` that takes `took` per call.
async fn one_slow_participant(
    took: Duration,
    tweak: impl FnOnce(&mut saga_coordinator::config::Config),
) -> (TestDb, Slow, TestCoordinator) {
    let db = TestDb::new().await;
    let slow = Slow::default();
    let url = slow.serve(took).await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    tweak(&mut cfg);
    let (coord, _) = with_one_step(cfg, true).await;
    (db, slow, coord)
}

/// Starts `n` sagas of definition "one" from 16 callers; waits for all.
async fn burst(coord: &TestCoordinator, n: usize) {
    let mut tasks = Vec::new();
    for k in 0..16 {
        let mut c = coord.client().await;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in (k..n).step_by(16) {
                ids.push(start(&mut c, "one", "{}").await.saga_id);
            }
            for id in ids {
                let done = wait(&mut c, &id).await;
                assert_eq!(state(&done), SagaState::Completed);
                assert_eq!(done.steps[0].attempts, 1, "waiting cost no attempt");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn the_in_flight_cap_holds_under_a_burst_of_500_sagas_to_one_slow_participant() {
    let (_db, slow, coord) = one_slow_participant(Duration::from_millis(20), |cfg| {
        cfg.participant_in_flight_max = vec![("svc".into(), 8)];
    })
    .await;
    burst(&coord, 500).await;
    let most = slow.most.load(Ordering::SeqCst);
    assert!(
        most <= 8,
        "{most} calls in flight at once, over the cap of 8"
    );
    assert!(most >= 2, "the burst overlapped ({most} at most)");
    let p = pools(&coord).await;
    assert!(p["participants"][0]["waited"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(p["participants"][0]["in_flight_max"], 8);
    let text = http(coord.admin, "GET", "/metrics", &[], "").await.body;
    assert!(
        text.contains("sagad_participant_in_flight_max{participant=\"svc\"} 8"),
        "{text}"
    );
    coord.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_holds() {
    let (_db, slow, coord) = one_slow_participant(Duration::ZERO, |cfg| {
        cfg.participant_rate_per_sec = vec![("svc".into(), 20.0)];
    })
    .await;
    burst(&coord, 60).await;
    // A bucket of 20 tokens, refilled at 20 a second: the k-th call (from
    // 0) cannot come before (k + 1 - 20) / 20 s after the first.
    let arrivals = slow.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 60);
    let first = arrivals[0];
    for (k, at) in arrivals.iter().enumerate().skip(20) {
        let earliest = Duration::from_secs_f64((k + 1 - 20) as f64 / 20.0);
        let after = at.duration_since(first);
        assert!(
            after + Duration::from_millis(60) >= earliest,
            "call {k} came {after:?} after the first, before the limit allows ({earliest:?})"
        );
    }
    coord.shutdown().await;
}

/// Instances announced by heartbeat with weights 3 and 1 get three calls
/// for every one, and `/participants` shows them.
#[tokio::test]
async fn heartbeat_weights_share_the_calls() {
    let db = TestDb::new().await;
    let (a, b) = (Scripted::default(), Scripted::default());
    let (url_a, url_b) = (a.clone().serve().await, b.clone().serve().await);
    let coord = TestCoordinator::start(test_config(&db)).await;
    let mut c = coord.client().await;
    for (instance, endpoint, weight) in [("a", &url_a, 3), ("b", &url_b, 1)] {
        c.heartbeat(saga_coordinator::proto::HeartbeatRequest {
            participant: "svc".into(),
            instance_id: instance.into(),
            endpoint: endpoint.clone(),
            ttl: Some(ms(60_000)),
            weight,
        })
        .await
        .unwrap();
    }
    let over = c
        .heartbeat(saga_coordinator::proto::HeartbeatRequest {
            participant: "svc".into(),
            instance_id: "c".into(),
            endpoint: url_b.clone(),
            ttl: Some(ms(60_000)),
            weight: 1_001,
        })
        .await
        .unwrap_err();
    assert_eq!(over.code(), tonic::Code::InvalidArgument);
    assert!(over.message().starts_with("weight:"), "{over:?}");
    register(
        &mut c,
        definition("one", vec![step("s", "svc", true, true)]),
    )
    .await;
    for _ in 0..8 {
        let saga = start(&mut c, "one", "{}").await;
        assert_eq!(
            state(&wait(&mut c, &saga.saga_id).await),
            SagaState::Completed
        );
    }
    assert_eq!((a.calls().len(), b.calls().len()), (6, 2));
    let page = http(coord.admin, "GET", "/participants", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains(&url_a) && page.body.contains("round-robin"),
        "{}",
        page.body
    );
    let p = pools(&coord).await;
    assert_eq!(instance(&p, &url_a)["weight"], 3, "{p}");
    coord.shutdown().await;
}
