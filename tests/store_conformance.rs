//! The store conformance suite: every behaviour of `SagaStore`, written once
//! and run against PostgreSQL (a fresh database per test) and SQLite (a
//! fresh file per test). Fencing is a property of a store's writes, so each
//! store proves it here with the same tests; the driver is proven once
//! (`worker::sim`) against any store that passes them.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use saga_coordinator::domain::{
    decide, CallResult, Definition, DefinitionDraft, Fact, Phase, SagaId, SagaState, SagaTrace,
    StepDraft,
};
use saga_coordinator::store::pg::{PgStore, MIGRATOR};
use saga_coordinator::store::sqlite::SqliteStore;
use saga_coordinator::store::{
    Created, Heartbeat, Hold, Lease, NewSaga, OwnerId, SagaQuery, SagaStore, StoreError, StuckRule,
};

/// A fresh store with definition `d` (two idempotent compensatable steps)
/// registered.
struct Fixture {
    store: Arc<dyn SagaStore>,
    def: Definition,
    _db: Option<common::TestDb>,
    _dir: Option<TempDir>,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn draft(name: &str, deadline: Option<Duration>) -> DefinitionDraft {
    let step = |n: &str| StepDraft {
        name: n.into(),
        participant: "p".into(),
        action: n.into(),
        compensation: "u".into(),
        idempotent: true,
        ..Default::default()
    };
    DefinitionDraft {
        name: name.into(),
        steps: vec![step("a"), step("b")],
        deadline,
    }
}

impl Fixture {
    async fn pg() -> Fixture {
        let db = common::TestDb::new().await;
        let pool = db.pool().await;
        MIGRATOR.run(&pool).await.unwrap();
        Fixture::with(Arc::new(PgStore::new(pool)), Some(db), None).await
    }

    async fn sqlite() -> Fixture {
        let dir = std::env::temp_dir().join(format!("sagad-store-{}", uuid::Uuid::new_v4()));
        let store = SqliteStore::open(&dir.join("sagad.db")).await.unwrap();
        Fixture::with(Arc::new(store), None, Some(TempDir(dir))).await
    }

    async fn with(
        store: Arc<dyn SagaStore>,
        db: Option<common::TestDb>,
        dir: Option<TempDir>,
    ) -> Fixture {
        let def = draft("d", None).validate(&Default::default()).unwrap();
        let (def, _) = store
            .definition_register(def, Some("definer"))
            .await
            .unwrap();
        Fixture {
            store,
            def,
            _db: db,
            _dir: dir,
        }
    }

    async fn create(
        &self,
        input: &str,
        owner: Option<(OwnerId, Duration)>,
    ) -> (SagaId, Option<Lease>) {
        let id = SagaId(uuid::Uuid::new_v4());
        let created = self
            .store
            .saga_create(NewSaga {
                id,
                definition: self.def.clone(),
                input: input.into(),
                owner,
                started_by: None,
                trace: None,
            })
            .await
            .unwrap();
        match created {
            Created::New(_, lease, _) => (id, lease),
            Created::Existing(_) => panic!("a fresh id exists"),
        }
    }
}

fn owner() -> OwnerId {
    OwnerId(uuid::Uuid::new_v4())
}

/// The first attempt of step `step`'s action answered `result`.
fn answered(step: usize, result: CallResult) -> Fact {
    Fact::Invoked {
        step,
        phase: Phase::Action,
        attempt: 1,
        result,
        took: Duration::from_millis(7),
    }
}

fn succeeded(step: usize) -> Fact {
    answered(step, CallResult::Succeeded(None))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod pg {
            $(#[tokio::test] async fn $name() { super::$name(&super::Fixture::pg().await).await; })*
        }
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(&super::Fixture::sqlite().await).await; })*
        }
    };
}

conformance!(
    definitions_are_versioned_by_content,
    create_is_idempotent_by_id_and_keeps_what_it_was_given,
    a_stale_owner_cannot_write_extend_or_release,
    leases_expire_by_the_stores_clock_and_a_claim_after_is_unclean,
    one_renewal_extends_every_lease_still_held_and_no_other,
    operator_writes_fence_the_owner_and_refuse_stale_reads_and_busy_sagas,
    concurrent_claims_never_hand_out_the_same_saga,
    listing_filters_and_pages_by_keyset,
    counts_stuck_and_activity,
    heartbeats_expire_and_withdraw,
    retention_deletes_only_settled_sagas_older_than_the_setting,
);

async fn definitions_are_versioned_by_content(f: &Fixture) {
    let again = draft("d", None).validate(&Default::default()).unwrap();
    let (same, new) = f.store.definition_register(again, None).await.unwrap();
    assert!(!new, "the same content is not a new version");
    assert_eq!(same.version, f.def.version);
    let changed = draft("d", Some(Duration::from_secs(60)))
        .validate(&Default::default())
        .unwrap();
    let (v2, new) = f
        .store
        .definition_register(changed, Some("ada"))
        .await
        .unwrap();
    assert!(new);
    assert_eq!(v2.version, f.def.version + 1);
    let (latest, reg) = f.store.definition_get("d", None).await.unwrap().unwrap();
    assert_eq!((latest.version, reg.by.as_deref()), (2, Some("ada")));
    let (first, reg) = f.store.definition_get("d", Some(1)).await.unwrap().unwrap();
    assert_eq!((first.deadline, reg.by.as_deref()), (None, Some("definer")));
    assert!(f
        .store
        .definition_get("d", Some(3))
        .await
        .unwrap()
        .is_none());
    let all = f.store.definition_list().await.unwrap();
    assert_eq!(
        all.iter().map(|(d, _)| d.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

async fn create_is_idempotent_by_id_and_keeps_what_it_was_given(f: &Fixture) {
    let (def, _) = f
        .store
        .definition_register(
            draft("timed", Some(Duration::from_secs(60)))
                .validate(&Default::default())
                .unwrap(),
            None,
        )
        .await
        .unwrap();
    let id = SagaId(uuid::Uuid::new_v4());
    let trace = SagaTrace {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: Some("v=1".into()),
        caller_span: None,
        saga_span: false,
    };
    let new = || NewSaga {
        id,
        definition: def.clone(),
        input: r#"{"n":1}"#.into(),
        owner: Some((owner(), Duration::from_secs(30))),
        started_by: Some("client-7".into()),
        trace: Some(trace.clone()),
    };
    let Created::New(saga, Some(lease), at) = f.store.saga_create(new()).await.unwrap() else {
        panic!("not created with a lease")
    };
    assert_eq!((lease.epoch, saga.state), (1, SagaState::Running));
    assert!(lease.until > at);
    let deadline = saga.deadline_at.unwrap();
    assert_eq!(deadline - saga.created_at, chrono::Duration::seconds(60));
    let Created::Existing(again) = f.store.saga_create(new()).await.unwrap() else {
        panic!("created twice")
    };
    assert_eq!(again.id, id);
    let rec = f.store.saga_get(id).await.unwrap().unwrap();
    assert!(rec.leased);
    assert_eq!((rec.epoch, rec.event_seq), (1, 1));
    assert_eq!(rec.owner, Some(lease.owner));
    assert_eq!(rec.saga.input, r#"{"n":1}"#);
    assert_eq!(rec.saga.started_by.as_deref(), Some("client-7"));
    assert_eq!(rec.saga.trace, Some(trace));
    assert_eq!(rec.saga.deadline_at, Some(deadline));
    let events = f.store.saga_events(id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].seq, events[0].kind.as_str()), (1, "started"));
    assert!(f
        .store
        .saga_get(SagaId(uuid::Uuid::new_v4()))
        .await
        .unwrap()
        .is_none());
}

async fn a_stale_owner_cannot_write_extend_or_release(f: &Fixture) {
    let (a, b) = (owner(), owner());
    let ttl = Duration::from_millis(300);
    let (id, Some(la)) = f.create("{}", Some((a, ttl))).await else {
        panic!("no lease")
    };
    // A's lease runs out; B claims: the epoch moves on.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let claimed = f
        .store
        .lease_claim_due(b, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let lb = claimed[0].lease;
    assert!(lb.epoch > la.epoch, "epochs only grow");
    assert!(claimed[0].unclean, "A never gave the saga back");
    let before = f.store.saga_get(id).await.unwrap().unwrap();
    let d = decide(
        &claimed[0].saga,
        &f.def,
        succeeded(0),
        claimed[0].db_now,
        0.0,
    )
    .unwrap();
    for refused in [
        f.store
            .saga_save(&la, &d, false, Hold::Keep(ttl))
            .await
            .err(),
        f.store.lease_extend(&la, ttl).await.err(),
        f.store.lease_release(&la).await.err(),
    ] {
        assert!(
            matches!(refused, Some(StoreError::LeaseLost)),
            "{refused:?}"
        );
    }
    let after = f.store.saga_get(id).await.unwrap().unwrap();
    assert_eq!(after.saga, before.saga, "nothing changed");
    assert_eq!(
        (after.epoch, after.event_seq),
        (before.epoch, before.event_seq)
    );

    // B's write goes through, with its history entries in order.
    f.store
        .saga_save(&lb, &d, false, Hold::Keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let rec = f.store.saga_get(id).await.unwrap().unwrap();
    assert_eq!(rec.event_seq, 2);
    let events = f.store.saga_events(id).await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(events[1].kind.as_str(), "step_succeeded");
    assert_eq!(events[1].took, Some(Duration::from_millis(7)));
    // Extending keeps it; releasing makes it due at once for anyone.
    let until = f
        .store
        .lease_extend(&lb, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(until > lb.until);
    f.store.lease_release(&lb).await.unwrap();
    assert!(!f.store.saga_get(id).await.unwrap().unwrap().leased);
    let again = f.store.lease_claim_due(a, 10, ttl).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(!again[0].unclean, "B gave it back");
    assert!(again[0].lease.epoch > lb.epoch);
}

async fn one_renewal_extends_every_lease_still_held_and_no_other(f: &Fixture) {
    let (a, b) = (owner(), owner());
    let ttl = Duration::from_millis(300);
    let mut held = Vec::new();
    for _ in 0..4 {
        let (id, Some(lease)) = f.create("{}", Some((a, ttl))).await else {
            panic!("no lease")
        };
        held.push((id, lease));
    }
    assert!(f
        .store
        .lease_renew(a, &[], ttl)
        .await
        .unwrap()
        .sagas
        .is_empty());
    // A renews all four in time; the leases run on.
    let renewed = f
        .store
        .lease_renew(
            a,
            &held
                .iter()
                .map(|(id, l)| (*id, l.epoch))
                .collect::<Vec<_>>(),
            ttl,
        )
        .await
        .unwrap();
    assert_eq!(renewed.sagas.len(), 4);
    assert!(renewed.until.unwrap() > held[0].1.until);
    // Then A stops renewing saga 0, which B claims; an operator aborts
    // saga 1 (a new epoch, no owner); saga 2 is renewed under a stale epoch.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let claimed = f
        .store
        .lease_claim_due(b, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4, "every lease ran out");
    for c in &claimed {
        f.store.lease_release(&c.lease).await.unwrap();
    }
    let relet = f.store.lease_claim_due(a, 10, ttl).await.unwrap();
    assert_eq!(relet.len(), 4);
    let lease_of = |id: SagaId| relet.iter().find(|c| c.saga.id == id).unwrap().lease;
    let b_claims = f
        .store
        .lease_claim_due(b, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(b_claims.is_empty(), "A holds them again");
    let rec = f.store.saga_get(held[1].0).await.unwrap().unwrap();
    let abort = decide(
        &rec.saga,
        &f.def,
        Fact::OperatorAbort {
            actor: "op".into(),
            note: "n".into(),
        },
        relet[0].db_now,
        0.0,
    )
    .unwrap();
    f.store
        .saga_operator_save(&rec, &abort, false, false)
        .await
        .unwrap();
    let renew = [
        (held[1].0, lease_of(held[1].0).epoch),
        (held[2].0, lease_of(held[2].0).epoch - 1),
        (held[3].0, lease_of(held[3].0).epoch),
        (SagaId(uuid::Uuid::new_v4()), 1),
    ];
    let renewed = f
        .store
        .lease_renew(a, &renew, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(renewed.sagas, vec![held[3].0], "only the lease still held");
    // B (another owner) renews nothing of A's.
    let by_b = f
        .store
        .lease_renew(b, &[(held[3].0, lease_of(held[3].0).epoch)], ttl)
        .await
        .unwrap();
    assert!(by_b.sagas.is_empty());
    // After A's short leases run out, saga 0 and 2 (and the aborted one) are
    // claimable; saga 3 is not: its renewed lease holds.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let claimed = f.store.lease_claim_due(b, 10, ttl).await.unwrap();
    let mut ids: Vec<_> = claimed.iter().map(|c| c.saga.id).collect();
    ids.sort();
    let mut want = vec![held[0].0, held[1].0, held[2].0];
    want.sort();
    assert_eq!(ids, want);
}

async fn leases_expire_by_the_stores_clock_and_a_claim_after_is_unclean(f: &Fixture) {
    let ttl = Duration::from_millis(300);
    let (id, Some(lease)) = f.create("{}", Some((owner(), ttl))).await else {
        panic!("no lease")
    };
    // While the lease holds nobody else gets the saga.
    assert!(f
        .store
        .lease_claim_due(owner(), 10, ttl)
        .await
        .unwrap()
        .is_empty());
    assert!(f.store.saga_get(id).await.unwrap().unwrap().leased);
    // Settled sagas are never due.
    let d = decide(
        &f.store.saga_get(id).await.unwrap().unwrap().saga,
        &f.def,
        Fact::OperatorAbort {
            actor: "op".into(),
            note: "n".into(),
        },
        lease.until,
        0.0,
    )
    .unwrap();
    assert_eq!(d.saga.state, SagaState::Compensating);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert!(!f.store.saga_get(id).await.unwrap().unwrap().leased);
    let claimed = f.store.lease_claim_due(owner(), 10, ttl).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].unclean);
    let lease = claimed[0].lease;
    let done = decide(
        &claimed[0].saga,
        &f.def,
        succeeded(0),
        claimed[0].db_now,
        0.0,
    )
    .unwrap();
    let done = decide(&done.saga, &f.def, succeeded(1), claimed[0].db_now, 0.0).unwrap();
    assert_eq!(done.saga.state, SagaState::Completed);
    f.store
        .saga_save(&lease, &done, true, Hold::Release(None))
        .await
        .unwrap();
    let rec = f.store.saga_get(id).await.unwrap().unwrap();
    assert_eq!(rec.saga.state, SagaState::Completed);
    assert!(rec.owner.is_none());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(f
        .store
        .lease_claim_due(owner(), 10, ttl)
        .await
        .unwrap()
        .is_empty());
}

async fn operator_writes_fence_the_owner_and_refuse_stale_reads_and_busy_sagas(f: &Fixture) {
    let (a, b) = (owner(), owner());
    let ttl = Duration::from_secs(60);
    let (ida, Some(la)) = f.create("1", Some((a, ttl))).await else {
        panic!("no lease")
    };
    let (idb, _) = f.create("2", Some((b, ttl))).await;
    let rec = f.store.saga_get(ida).await.unwrap().unwrap();
    let retry = |rec: &saga_coordinator::store::SagaRecord| {
        decide(
            &rec.saga,
            &f.def,
            Fact::OperatorRetry {
                actor: "op".into(),
                note: String::new(),
            },
            rec.saga.updated_at,
            0.0,
        )
        .unwrap()
    };
    // "Retry now" of a saga being driven: busy, nothing written.
    assert!(matches!(
        f.store
            .saga_operator_save(&rec, &retry(&rec), false, true)
            .await,
        Err(StoreError::Busy)
    ));
    // Abort fences the owner out at once.
    let abort = decide(
        &rec.saga,
        &f.def,
        Fact::OperatorAbort {
            actor: "op".into(),
            note: "stop".into(),
        },
        rec.saga.updated_at,
        0.0,
    )
    .unwrap();
    f.store
        .saga_operator_save(&rec, &abort, false, false)
        .await
        .unwrap();
    let after = f.store.saga_get(ida).await.unwrap().unwrap();
    assert_eq!(after.epoch, rec.epoch + 1);
    assert_eq!((after.owner, after.leased), (None, false));
    assert_eq!(after.saga.state, SagaState::Compensating);
    let d = decide(&rec.saga, &f.def, succeeded(0), rec.saga.updated_at, 0.0).unwrap();
    assert!(matches!(
        f.store.saga_save(&la, &d, false, Hold::Keep(ttl)).await,
        Err(StoreError::LeaseLost)
    ));
    // A second write from the same stale read is a conflict.
    assert!(matches!(
        f.store.saga_operator_save(&rec, &abort, false, false).await,
        Err(StoreError::Conflict)
    ));
    let kinds: Vec<String> = f
        .store
        .saga_events(ida)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind.as_str().to_owned())
        .collect();
    assert_eq!(kinds, vec!["started", "operator_abort", "compensating"]);
    // The aborted saga is due at once; release_all is per owner.
    assert_eq!(f.store.lease_release_all(b).await.unwrap(), 1);
    assert_eq!(f.store.lease_release_all(a).await.unwrap(), 0);
    let mut due: Vec<SagaId> = f
        .store
        .lease_claim_due(owner(), 10, ttl)
        .await
        .unwrap()
        .iter()
        .map(|c| c.saga.id)
        .collect();
    due.sort_by_key(|s| s.0);
    let mut want = vec![ida, idb];
    want.sort_by_key(|s| s.0);
    assert_eq!(due, want);
}

async fn concurrent_claims_never_hand_out_the_same_saga(f: &Fixture) {
    for i in 0..40 {
        f.create(&i.to_string(), None).await;
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let me = owner();
            let mut got = Vec::new();
            loop {
                let c = store
                    .lease_claim_due(me, 3, Duration::from_secs(60))
                    .await
                    .unwrap();
                if c.is_empty() {
                    return got;
                }
                got.extend(c.into_iter().map(|c| c.saga.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort_by_key(|s| s.0);
    all.dedup();
    assert_eq!((n, all.len()), (40, 40), "each saga claimed exactly once");
}

async fn listing_filters_and_pages_by_keyset(f: &Fixture) {
    let mut ids = Vec::new();
    for i in 0..7 {
        let by = if i % 2 == 0 { "even" } else { "odd" };
        let id = SagaId(uuid::Uuid::new_v4());
        f.store
            .saga_create(NewSaga {
                id,
                definition: f.def.clone(),
                input: format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(1_000)),
                owner: None,
                started_by: Some(by.into()),
                trace: None,
            })
            .await
            .unwrap();
        ids.push(id);
    }
    // Newest first, three a page, every saga once.
    let mut q = SagaQuery {
        limit: 3,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = f.store.saga_list(&q).await.unwrap();
        assert!(page.sagas.len() <= 3);
        seen.extend(page.sagas.iter().map(|s| s.id));
        match page.next {
            Some(next) => q.after = Some(next),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    // Filters.
    let own = SagaQuery {
        limit: 50,
        started_by: Some("odd".into()),
        ..Default::default()
    };
    assert_eq!(f.store.saga_list(&own).await.unwrap().sagas.len(), 3);
    let none = SagaQuery {
        limit: 50,
        definition: Some("other".into()),
        ..Default::default()
    };
    assert!(f.store.saga_list(&none).await.unwrap().sagas.is_empty());
    let running = SagaQuery {
        limit: 50,
        states: vec![SagaState::Running],
        ..Default::default()
    };
    assert_eq!(f.store.saga_list(&running).await.unwrap().sagas.len(), 7);
    let old = SagaQuery {
        limit: 50,
        created_before: Some(chrono::Utc::now() - chrono::Duration::hours(1)),
        ..Default::default()
    };
    assert!(f.store.saga_list(&old).await.unwrap().sagas.is_empty());
    // A byte budget cuts the page (the first saga always fits) and says
    // more follow.
    let budget = SagaQuery {
        limit: 50,
        bytes_max: Some(2_500),
        ..Default::default()
    };
    let page = f.store.saga_list(&budget).await.unwrap();
    assert!((1..7).contains(&page.sagas.len()), "{}", page.sagas.len());
    assert!(page.next.is_some());
}

async fn counts_stuck_and_activity(f: &Fixture) {
    let ttl = Duration::from_secs(60);
    let (_, Some(lease)) = f.create("{}", Some((owner(), ttl))).await else {
        panic!("no lease")
    };
    f.create("{}", None).await;
    // Suspend the first (a misconfigured participant).
    let rec = f.store.saga_get(lease.saga_id).await.unwrap().unwrap();
    let fact = answered(0, CallResult::Misconfigured("UNIMPLEMENTED".into()));
    let d = decide(&rec.saga, &f.def, fact, rec.saga.updated_at, 0.0).unwrap();
    assert_eq!(d.saga.state, SagaState::Suspended);
    f.store
        .saga_save(&lease, &d, true, Hold::Release(None))
        .await
        .unwrap();
    let rule = StuckRule {
        idle_for: Duration::from_secs(3_600),
        attempts_min: 5,
    };
    let counts = f
        .store
        .saga_counts(rule, Duration::from_secs(86_400))
        .await
        .unwrap();
    let n = |s: SagaState| {
        counts
            .by_state
            .iter()
            .find(|(x, _)| *x == s)
            .map_or(0, |(_, n)| *n)
    };
    assert_eq!(
        (n(SagaState::Running), n(SagaState::Suspended), counts.stuck),
        (1, 1, 1)
    );
    let stuck = SagaQuery {
        limit: 50,
        stuck: Some(rule),
        ..Default::default()
    };
    let listed = f.store.saga_list(&stuck).await.unwrap().sagas;
    assert_eq!(
        listed.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![lease.saga_id]
    );
    // Idle long enough: the running one is stuck too.
    let eager = StuckRule {
        idle_for: Duration::ZERO,
        attempts_min: 5,
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        f.store
            .saga_counts(eager, Duration::from_secs(60))
            .await
            .unwrap()
            .stuck,
        2
    );
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let activity = f.store.saga_activity(since).await.unwrap();
    let started: i64 = activity.iter().map(|m| m.started).sum();
    let suspended: i64 = activity.iter().map(|m| m.suspended).sum();
    assert_eq!((started, suspended), (2, 1));
}

fn beat<'a>(
    participant: &'a str,
    instance_id: &'a str,
    endpoint: &'a str,
    ttl: Duration,
) -> Heartbeat<'a> {
    Heartbeat {
        participant,
        instance_id,
        endpoint,
        weight: 1,
        ttl,
    }
}

async fn heartbeats_expire_and_withdraw(f: &Fixture) {
    let s = &f.store;
    s.participant_heartbeat(
        &beat("pay", "i1", "http://127.0.0.1:1", Duration::from_secs(60)),
        Some("pay"),
    )
    .await
    .unwrap();
    s.participant_heartbeat(
        &beat(
            "pay",
            "i2",
            "http://127.0.0.1:2",
            Duration::from_millis(200),
        ),
        None,
    )
    .await
    .unwrap();
    s.participant_heartbeat(
        &beat("other", "i1", "http://127.0.0.1:3", Duration::from_secs(60)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        s.participant_endpoints("pay").await.unwrap(),
        vec![
            ("http://127.0.0.1:1".into(), 1),
            ("http://127.0.0.1:2".into(), 1)
        ]
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        s.participant_endpoints("pay").await.unwrap(),
        vec![("http://127.0.0.1:1".to_owned(), 1)]
    );
    // A zero ttl withdraws; a new endpoint for the same instance replaces it.
    s.participant_heartbeat(
        &beat("pay", "i1", "http://127.0.0.1:1", Duration::ZERO),
        Some("pay"),
    )
    .await
    .unwrap();
    assert!(s.participant_endpoints("pay").await.unwrap().is_empty());
    s.participant_heartbeat(
        &beat("pay", "i1", "http://127.0.0.1:9", Duration::from_secs(60)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        s.participant_endpoints("pay").await.unwrap(),
        vec![("http://127.0.0.1:9".to_owned(), 1)]
    );
    // A weight announced is kept (the largest where instances share an
    // endpoint).
    let heavy = Heartbeat {
        weight: 5,
        ..beat("pay", "i3", "http://127.0.0.1:9", Duration::from_secs(60))
    };
    s.participant_heartbeat(&heavy, None).await.unwrap();
    assert_eq!(
        s.participant_endpoints("pay").await.unwrap(),
        vec![("http://127.0.0.1:9".to_owned(), 5)]
    );
    assert!(s.participant_endpoints("nobody").await.unwrap().is_empty());
}

async fn retention_deletes_only_settled_sagas_older_than_the_setting(f: &Fixture) {
    let ttl = Duration::from_secs(60);
    let settle = |fact: Fact| {
        let f = &f;
        async move {
            let (id, Some(lease)) = f.create("{}", Some((owner(), ttl))).await else {
                panic!("no lease")
            };
            let rec = f.store.saga_get(id).await.unwrap().unwrap();
            let mut d = decide(&rec.saga, &f.def, fact, rec.saga.updated_at, 0.0).unwrap();
            if d.saga.state == SagaState::Running {
                d = decide(&d.saga, &f.def, succeeded(1), rec.saga.updated_at, 0.0).unwrap();
            }
            f.store
                .saga_save(&lease, &d, true, Hold::Release(None))
                .await
                .unwrap();
            (id, d.saga.state)
        }
    };
    let (completed, s1) = settle(succeeded(0)).await;
    let refused = answered(0, CallResult::Failed("no".into()));
    let (compensated, s2) = settle(refused).await;
    let misconfigured = answered(0, CallResult::Misconfigured("UNIMPLEMENTED".into()));
    let (suspended, s3) = settle(misconfigured).await;
    assert_eq!(
        (s1, s2, s3),
        (
            SagaState::Completed,
            SagaState::Compensated,
            SagaState::Suspended
        )
    );
    let (running, _) = f.create("{}", None).await;
    // Nothing settled before an hour ago.
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(f.store.saga_purge(hour_ago, 500).await.unwrap(), 0);
    // Everything settled before a moment from now, one batch at a time:
    // only the completed and the compensated saga, with their history.
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(f.store.saga_purge(later, 1).await.unwrap(), 1);
    assert_eq!(f.store.saga_purge(later, 500).await.unwrap(), 1);
    assert_eq!(f.store.saga_purge(later, 500).await.unwrap(), 0);
    for gone in [completed, compensated] {
        assert!(f.store.saga_get(gone).await.unwrap().is_none());
        assert!(f.store.saga_events(gone).await.unwrap().is_empty());
    }
    for kept in [suspended, running] {
        assert!(f.store.saga_get(kept).await.unwrap().is_some());
        assert!(!f.store.saga_events(kept).await.unwrap().is_empty());
    }
}
