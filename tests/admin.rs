//! The admin HTTP server: JSON API, pages, auth, CSRF, escaping, metrics,
//! and query plans with 100,000 sagas.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use saga_coordinator::proto;
use serde_json::Value;
use tonic::Code;

const TOKEN: &str = "test-admin-token-0123456789";

struct Env {
    coord: TestCoordinator,
    client: Client,
    svc: Scripted,
    db: TestDb,
}

async fn env(token: Option<&str>) -> Env {
    let db = TestDb::new().await;
    let svc = Scripted::default();
    let url = svc.clone().serve().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    cfg.admin_token = token.map(str::to_owned);
    let coord = TestCoordinator::start(cfg).await;
    let client = coord.client().await;
    Env {
        coord,
        client,
        svc,
        db,
    }
}

/// A suspended saga (b answers UNIMPLEMENTED) and a completed one.
async fn two_sagas(e: &mut Env, input: &str) -> (String, String) {
    register(
        &mut e.client,
        definition(
            "abc",
            vec![step("a", "svc", true, true), step("b", "svc", true, true)],
        ),
    )
    .await;
    e.svc
        .script("b.do", vec![Reply::Status(Code::Unimplemented)]);
    let bad = start(&mut e.client, "abc", input).await;
    wait(&mut e.client, &bad.saga_id).await;
    let good = start(&mut e.client, "abc", "{}").await;
    wait(&mut e.client, &good.saga_id).await;
    (bad.saga_id, good.saga_id)
}

async fn get(e: &Env, path: &str) -> HttpResponse {
    http(e.coord.admin, "GET", path, &[], "").await
}

async fn post_json(e: &Env, path: &str, auth: Option<&str>, body: &str) -> HttpResponse {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let mut h = vec![
        ("Content-Type", "application/json"),
        ("X-Saga-Actor", "ops-bot"),
    ];
    if let Some(b) = &bearer {
        h.push(("Authorization", b));
    }
    http(e.coord.admin, "POST", path, &h, body).await
}

#[tokio::test]
async fn json_api_reads() {
    let mut e = env(None).await;
    let (bad, good) = two_sagas(&mut e, r#"{"order": 1}"#).await;

    let stats = get(&e, "/api/stats").await;
    assert_eq!(stats.status, 200);
    let s = stats.json();
    assert_eq!(
        (
            s["counts"]["SUSPENDED"].as_i64(),
            s["counts"]["COMPLETED"].as_i64(),
            s["stuck"].as_i64()
        ),
        (Some(1), Some(1), Some(1))
    );

    let list = get(&e, "/api/sagas?state=suspended").await.json();
    let ids: Vec<&str> = list["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["saga_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![bad.as_str()]);
    assert_eq!(list["sagas"][0]["current_step"], "b");
    assert_eq!(list["sagas"][0]["input"]["order"], 1);
    let stuck = get(&e, "/api/sagas?stuck=true").await.json();
    assert_eq!(stuck["sagas"].as_array().unwrap().len(), 1);
    let young = get(&e, "/api/sagas?min_age_secs=3600").await.json();
    assert!(
        young["sagas"].as_array().unwrap().is_empty(),
        "nothing is an hour old"
    );
    let page = get(&e, "/api/sagas?page_size=1").await.json();
    assert_eq!(page["sagas"].as_array().unwrap().len(), 1);
    let token = page["next_page_token"].as_str().unwrap().to_owned();
    let page2 = get(&e, &format!("/api/sagas?page_size=1&page_token={token}"))
        .await
        .json();
    assert_ne!(page["sagas"][0]["saga_id"], page2["sagas"][0]["saga_id"]);
    assert!(page2["next_page_token"].is_null());

    let one = get(&e, &format!("/api/sagas/{good}")).await;
    assert_eq!(one.status, 200);
    let one = one.json();
    assert_eq!(one["state"], "COMPLETED");
    assert_eq!(one["steps"][0]["kind"], "compensatable");
    let events = get(&e, &format!("/api/sagas/{good}/events")).await.json();
    assert_eq!(events["events"][0]["kind"], "started");
    let defs = get(&e, "/api/definitions").await.json();
    assert_eq!(defs["definitions"][0]["name"], "abc");
    assert_eq!(defs["definitions"][0]["steps"][1]["kind"], "compensatable");

    for (path, status, field) in [
        ("/api/sagas?state=NOPE", 400, Some("state")),
        ("/api/sagas?page_size=x", 400, Some("page_size")),
        ("/api/sagas?page_token=zzz", 400, Some("page_token")),
        ("/api/sagas?stuck=maybe", 400, Some("stuck")),
        ("/api/sagas/not-a-uuid", 400, Some("saga_id")),
        ("/api/sagas/7f0c1a52-9a6e-4d3b-8f3e-2b1d0c9e8a71", 404, None),
        ("/api/nothing", 404, None),
    ] {
        let r = get(&e, path).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        let j = r.json();
        assert!(j["error"].is_string(), "{path}: {j}");
        if let Some(f) = field {
            assert_eq!(j["field"], f, "{path}");
        }
    }
}

#[tokio::test]
async fn json_api_actions_need_the_token() {
    let mut e = env(Some(TOKEN)).await;
    let (bad, good) = two_sagas(&mut e, "{}").await;
    let retry = format!("/api/sagas/{bad}/retry");
    assert_eq!(post_json(&e, &retry, None, "{}").await.status, 401);
    let wrong = post_json(&e, &retry, Some("wrong-token-wrong-token"), "{}").await;
    assert_eq!(wrong.status, 401, "an unknown token is no credential");
    assert!(!wrong.body.contains("wrong-token"), "{}", wrong.body);
    // Reads need it too, once authentication is configured.
    assert_eq!(get(&e, &format!("/api/sagas/{bad}")).await.status, 401);
    assert_eq!(get(&e, "/metrics").await.status, 401);
    assert_eq!(get(&e, "/healthz").await.status, 200, "probes stay open");
    let r = http(
        e.coord.admin,
        "POST",
        &retry,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "note=x",
    )
    .await;
    assert_eq!(r.status, 415, "only JSON bodies: {}", r.body);
    assert!(r.json()["error"].is_string());
    let r = post_json(&e, &retry, Some(TOKEN), "{not json").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].is_string());
    let r = post_json(&e, &format!("/api/sagas/{bad}/resolve"), Some(TOKEN), "{}").await;
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("note")));
    let r = post_json(&e, &format!("/api/sagas/{good}/abort"), Some(TOKEN), "{}").await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = post_json(&e, &format!("/api/sagas/{bad}/explode"), Some(TOKEN), "{}").await;
    assert_eq!(r.status, 404);

    let r = post_json(
        &e,
        &retry,
        Some(TOKEN),
        r#"{"note": "fixed the deployment"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = wait(&mut e.client, &bad).await;
    assert_eq!(state(&done), proto::SagaState::Completed);
    let evs = events(&mut e.client, &bad).await;
    let op = evs.iter().find(|ev| ev.kind == "operator_retry").unwrap();
    assert_eq!(
        op.detail, "by admin (claimed: ops-bot): fixed the deployment",
        "the person named, and the principal"
    );

    // gRPC operator RPCs need the token too.
    let mut anonymous = e.coord.client_with(None).await;
    let err = anonymous
        .resolve_saga(proto::ResolveSagaRequest {
            saga_id: good.clone(),
            note: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(proto::ResolveSagaRequest {
        saga_id: good.clone(),
        note: "x".into(),
    });
    req.metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        anonymous.resolve_saga(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut req = tonic::Request::new(proto::ResolveSagaRequest {
        saga_id: good,
        note: "x".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    assert_eq!(
        anonymous.resolve_saga(req).await.unwrap_err().code(),
        Code::FailedPrecondition,
        "authorized; COMPLETED is final"
    );
}

fn session_cookie(r: &HttpResponse) -> String {
    let c = r.header("set-cookie").unwrap();
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Strict"),
        "{c}"
    );
    c.split(';').next().unwrap().to_owned()
}

fn csrf_of(page: &str) -> String {
    page.split("name=csrf value=")
        .nth(1)
        .unwrap()
        .split('>')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_page_logs_in_checks_csrf_and_confirms_actions() {
    let mut e = env(Some(TOKEN)).await;
    let (bad, _) = two_sagas(&mut e, "{}").await;
    let page = get(&e, &format!("/sagas/{bad}")).await;
    assert_eq!(page.status, 401, "reading needs a login too");
    assert!(page.body.contains("id=login-button"), "{}", page.body);
    assert!(
        page.body.contains(&format!("value='/sagas/{bad}'")),
        "and comes back here"
    );
    assert!(!page.body.contains("name=csrf"));

    let form = "application/x-www-form-urlencoded";
    let r = http(
        e.coord.admin,
        "POST",
        "/login",
        &[("Content-Type", form)],
        &format!("name=alice&token=wrong&next=/sagas/{bad}"),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = http(
        e.coord.admin,
        "POST",
        "/login",
        &[("Content-Type", form)],
        &format!("name=alice&token={TOKEN}&next=//evil.example"),
    )
    .await;
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some("/")),
        "no open redirect"
    );
    let r = http(
        e.coord.admin,
        "POST",
        "/login",
        &[("Content-Type", form)],
        &format!("name=alice&token={TOKEN}&next=/sagas/{bad}"),
    )
    .await;
    assert_eq!(r.status, 303);
    let cookie = session_cookie(&r);
    let page = http(
        e.coord.admin,
        "GET",
        &format!("/sagas/{bad}"),
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    let csrf = csrf_of(&page.body);
    assert!(page.body.contains("id=retry-button"));

    let act = |body: String, cookie: Option<String>| {
        let addr = e.coord.admin;
        let path = format!("/sagas/{bad}/action");
        async move {
            let mut h = vec![("Content-Type", form)];
            let c;
            if let Some(x) = cookie {
                c = x;
                h.push(("Cookie", &c));
            }
            http(addr, "POST", &path, &h, &body).await
        }
    };
    assert_eq!(
        act(format!("action=retry&confirm=yes&csrf={csrf}"), None)
            .await
            .status,
        401,
        "no session"
    );
    assert_eq!(
        act(
            "action=retry&confirm=yes&csrf=forged".into(),
            Some(cookie.clone())
        )
        .await
        .status,
        403,
        "CSRF"
    );
    assert_eq!(
        act(format!("action=retry&csrf={csrf}"), Some(cookie.clone()))
            .await
            .status,
        400,
        "not confirmed"
    );
    assert_eq!(
        events(&mut e.client, &bad)
            .await
            .iter()
            .filter(|ev| ev.kind.starts_with("operator"))
            .count(),
        0
    );

    let r = act(
        format!("action=resolve&confirm=yes&csrf={csrf}&note="),
        Some(cookie.clone()),
    )
    .await;
    assert_eq!(r.status, 303);
    let shown = http(
        e.coord.admin,
        "GET",
        r.header("location").unwrap(),
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert!(
        shown.body.contains("resolve refused: note: required"),
        "the result is shown"
    );

    let r = act(
        format!("action=retry&confirm=yes&csrf={csrf}&note=redeployed"),
        Some(cookie.clone()),
    )
    .await;
    assert_eq!(r.status, 303);
    let done = wait(&mut e.client, &bad).await;
    assert_eq!(state(&done), proto::SagaState::Completed);
    let op = events(&mut e.client, &bad)
        .await
        .into_iter()
        .find(|ev| ev.kind == "operator_retry")
        .unwrap();
    assert_eq!(
        op.detail, "by admin (claimed: alice): redeployed",
        "actor and note recorded"
    );
    let shown = http(
        e.coord.admin,
        "GET",
        r.header("location").unwrap(),
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert!(shown.body.contains("retry done"));

    let r = http(e.coord.admin, "POST", "/logout", &[("Cookie", &cookie)], "").await;
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(
        act(
            format!("action=retry&confirm=yes&csrf={csrf}"),
            Some(cookie)
        )
        .await
        .status,
        401,
        "session ended"
    );
}

#[tokio::test]
async fn user_text_is_escaped_everywhere() {
    let mut e = env(None).await;
    let nasty =
        r#"{"name": "<script>alert('x')</script>", "q": "\"><img src=x onerror=alert(1)>"}"#;
    let (bad, _) = two_sagas(&mut e, nasty).await;
    // A note with markup, recorded in the history.
    e.client
        .retry_saga(proto::RetrySagaRequest {
            saga_id: bad.clone(),
            note: "<b>bold</b>".into(),
        })
        .await
        .unwrap();
    wait(&mut e.client, &bad).await;
    for path in [
        format!("/sagas/{bad}"),
        "/".into(),
        "/?definition=abc".into(),
    ] {
        let page = get(&e, &path).await;
        assert_eq!(page.status, 200, "{path}");
        assert!(!page.body.contains("<script>"), "{path} has raw markup");
        assert!(!page.body.contains("<img"), "{path}");
        assert!(!page.body.contains("<b>bold"), "{path}");
    }
    let page = get(&e, &format!("/sagas/{bad}")).await;
    assert!(page
        .body
        .contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    assert!(page.body.contains("&lt;b&gt;bold&lt;/b&gt;"));
    let r = get(&e, "/?definition=%3Cscript%3E").await;
    assert_eq!(r.status, 400);
    assert!(!r.body.contains("<script>"));
}

/// `/metrics` answers "how many are stuck, how long do sagas take, is
/// anything in flight" from a real run.
#[tokio::test]
async fn metrics_answer_operators_questions() {
    let mut e = env(None).await;
    two_sagas(&mut e, "{}").await;
    let m = get(&e, "/metrics").await.body;
    for line in [
        "sagad_sagas{state=\"SUSPENDED\"} 1\n",
        "sagad_sagas{state=\"COMPLETED\"} 1\n",
        "sagad_sagas{state=\"RUNNING\"} 0\n",
        "sagad_sagas_stuck 1\n",
        "sagad_saga_settle_seconds_count{definition=\"abc\"} 2\n",
        "sagad_participant_calls_in_flight 0\n",
        "sagad_lease_takeovers_total 0\n",
        "sagad_leases_lost_total 0\n",
    ] {
        assert!(m.contains(line), "{line}: {m}");
    }
}

#[tokio::test]
async fn pages_show_counts_stuck_first_and_definitions() {
    let mut e = env(None).await;
    let (bad, good) = two_sagas(&mut e, "{}").await;
    let list = get(&e, "/").await;
    assert_eq!(list.status, 200);
    assert!(
        list.body.contains("id=count-stuck><b>1</b>"),
        "{}",
        list.body
    );
    assert!(list.body.contains("id=count-SUSPENDED><b>1</b>"));
    let stuck_at = list.body.find("<table id=stuck>").unwrap();
    let all_at = list.body.find("<table id=sagas>").unwrap();
    assert!(stuck_at < all_at, "stuck sagas come first");
    assert!(list.body[stuck_at..all_at].contains(&bad));
    assert!(!list.body[stuck_at..all_at].contains(&good));
    let filtered = get(&e, "/?state=COMPLETED").await;
    assert!(filtered.body[filtered.body.find("<table id=sagas>").unwrap()..].contains(&good));
    assert!(!filtered.body[filtered.body.find("<table id=sagas>").unwrap()..].contains(&bad));
    let defs = get(&e, "/definitions").await;
    assert!(defs.body.contains("abc@1") && defs.body.contains("compensatable"));
    let saga = get(&e, &format!("/sagas/{bad}")).await;
    assert!(saga.body.contains("id=history") && saga.body.contains("suspended"));
    assert!(saga.body.contains("UNIMPLEMENTED"));
    // Without a token configured, forms carry the process CSRF token.
    assert!(saga.body.contains("name=csrf"));
    let metrics = get(&e, "/metrics").await;
    assert!(
        metrics.body.contains("sagad_sagas_started_total 2"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("sagad_sagas_suspended_total 1"));
    assert!(metrics.body.contains(
        r#"sagad_step_attempts_total{participant="svc",phase="action",outcome="misconfigured"} 1"#
    ));
    assert!(metrics.body.contains("sagad_step_duration_seconds_bucket"));
    // The saga above was started and suspended through the write lanes.
    assert!(
        !metrics.body.contains("sagad_db_write_requests_total 0\n")
            && metrics.body.contains("sagad_db_write_requests_total "),
        "{}",
        metrics.body
    );
    assert_eq!(get(&e, "/readyz").await.status, 200);
}

#[tokio::test]
async fn sagad_refuses_a_public_admin_address_without_tls_and_authentication() {
    let db = TestDb::new().await;
    let mut cfg = test_config(&db);
    cfg.admin_addr = "0.0.0.0:0".parse().unwrap();
    let err = start_error(cfg.clone()).await;
    assert!(
        err.contains("--admin-addr") && err.contains("neither TLS") && err.contains("--auth-file"),
        "{err}"
    );
    cfg.admin_token = Some(TOKEN.into());
    let err = start_error(cfg).await;
    assert!(err.contains("there is no TLS"), "{err}");
}

/// Whether the plan has a sequential scan with no `Limit` above it (a seq
/// scan under a limit stops after that many rows).
fn unbounded_seq_scan(plan: &Value, limited: bool) -> bool {
    match plan {
        Value::Array(a) => a.iter().any(|p| unbounded_seq_scan(p, limited)),
        Value::Object(o) => {
            let kind = o.get("Node Type").and_then(Value::as_str).unwrap_or("");
            let limited = limited || kind == "Limit";
            (kind == "Seq Scan" && !limited) || o.values().any(|v| unbounded_seq_scan(v, limited))
        }
        _ => false,
    }
}

/// Query plans of the admin queries with 100,000 sagas: no sequential scan
/// of `sagas`.
#[tokio::test]
async fn admin_queries_use_indexes_with_100k_sagas() {
    let mut e = env(None).await;
    register(
        &mut e.client,
        definition("bulk", vec![step("a", "svc", true, true)]),
    )
    .await;
    let pool = e.db.pool().await;
    sqlx::query(
        "INSERT INTO sagas (saga_id, definition, version, state, input, steps, created_at, updated_at,
                            started_by)
         SELECT gen_random_uuid(), 'bulk', 1,
                CASE WHEN i % 1000 = 0 THEN 'SUSPENDED' WHEN i % 997 = 0 THEN 'COMPENSATED' ELSE 'COMPLETED' END,
                '{}', '[{\"state\":\"SUCCEEDED\"}]', now() - i * interval '1 second', now() - i * interval '1 second',
                'client-' || (i % 50)
         FROM generate_series(1, 100000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE sagas").execute(&pool).await.unwrap();
    let list = saga_coordinator::store::pg::saga_list_sql();
    // (name, states array, single state, definition, created before, stuck
    // idle ms, may sort, started by)
    type Case = (
        &'static str,
        Vec<String>,
        Option<&'static str>,
        Option<&'static str>,
        bool,
        Option<i64>,
        bool,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        ("all", vec![], None, None, false, None, false, None),
        (
            "one settled state (100k rows)",
            vec![],
            Some("COMPLETED"),
            None,
            false,
            None,
            false,
            None,
        ),
        (
            "one rare state",
            vec![],
            Some("SUSPENDED"),
            None,
            false,
            None,
            false,
            None,
        ),
        (
            "two states",
            vec!["SUSPENDED".into(), "COMPENSATED".into()],
            None,
            None,
            false,
            None,
            true,
            None,
        ),
        (
            "by definition",
            vec![],
            None,
            Some("bulk"),
            false,
            None,
            false,
            None,
        ),
        (
            "stuck",
            vec![],
            None,
            None,
            false,
            Some(300_000),
            true,
            None,
        ),
        ("older than", vec![], None, None, true, None, false, None),
        (
            "a client's own",
            vec![],
            None,
            None,
            false,
            None,
            false,
            Some("client-7"),
        ),
    ];
    for (name, states, single, def, older, stuck, may_sort, by) in cases {
        let sql = format!("EXPLAIN (FORMAT JSON) {list}");
        let plan = sqlx::query_scalar::<_, Value>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(states)
            .bind(def)
            .bind(older.then(chrono::Utc::now))
            .bind(None::<chrono::DateTime<chrono::Utc>>)
            .bind(None::<uuid::Uuid>)
            .bind(stuck)
            .bind(stuck.map(|_| 5i32))
            .bind(51i64)
            .bind(single)
            .bind(by)
            .bind(Some(3i64 << 20))
            .fetch_one(&pool)
            .await
            .unwrap()
            .to_string();
        println!("plan for {name}: {plan}");
        assert!(
            !plan.contains("\"Seq Scan\""),
            "{name} scans the table: {plan}"
        );
        assert!(
            may_sort || !plan.contains("\"Sort\""),
            "{name} sorts instead of reading in index order: {plan}"
        );
    }
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) {}",
        saga_coordinator::store::pg::SAGA_COUNTS_SQL
    )))
    .bind(86_400_000i64)
    .bind(300_000i64)
    .bind(5i32)
    .bind(saga_coordinator::store::COUNT_CAP)
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("plan for counts: {plan}");
    assert!(
        !unbounded_seq_scan(&plan, false),
        "counts scan the whole table: {plan}"
    );
    // A state with few rows is counted through the index: a sequential scan
    // under a limit reads the whole table when few rows match (a million
    // settled sagas made the admin page take a second that way).
    let text = plan.to_string();
    for rare in [
        "RUNNING",
        "COMPENSATING",
        "SUSPENDED",
        "COMPENSATED",
        "RESOLVED",
    ] {
        assert!(
            text.contains(&format!("Index Cond\":\"(state = '{rare}'::text)"))
                || text.contains(&format!("Index Cond\":\"((state = '{rare}'::text)")),
            "{rare} is not counted through the index: {plan}"
        );
    }
    // The activity chart's counts read the last hour through indexes, with
    // a history of 200,000 entries.
    sqlx::query(
        "INSERT INTO saga_events (saga_id, seq, at, kind)
         SELECT saga_id, 1, created_at, 'started' FROM sagas
         UNION ALL
         SELECT saga_id, 2, updated_at, lower(state) FROM sagas",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE saga_events")
        .execute(&pool)
        .await
        .unwrap();
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) {}",
        saga_coordinator::store::pg::SAGA_ACTIVITY_SQL
    )))
    .bind(chrono::Utc::now() - chrono::Duration::hours(1))
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("plan for activity: {plan}");
    assert!(
        !unbounded_seq_scan(&plan, false),
        "activity scans a whole table: {plan}"
    );
    // Retention finds the oldest settled sagas through their index.
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (FORMAT JSON) {}",
        saga_coordinator::store::pg::SAGA_PURGE_SQL
    )))
    .bind(chrono::Utc::now() - chrono::Duration::hours(12))
    .bind(500i64)
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("plan for purge: {plan}");
    assert!(
        plan.to_string().contains("sagas_settled_updated_at_idx"),
        "purge does not use the settled index: {plan}"
    );
    assert!(
        !unbounded_seq_scan(&plan, false),
        "purge scans sagas: {plan}"
    );
    // And the page renders.
    let page = get(&e, "/?state=SUSPENDED").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=count-SUSPENDED><b>100</b>"));
    assert!(
        page.body.contains("id=count-COMPLETED><b>10000+</b>"),
        "counts stop at the cap"
    );
    // One a second over the last hour: the chart counts about 3,540-3,600.
    let started = page
        .body
        .split("id=activity-started>")
        .nth(1)
        .and_then(|s| s.split("<b>").nth(1))
        .and_then(|s| s.split("</b>").next())
        .unwrap()
        .parse::<i64>()
        .unwrap();
    assert!((3_500..=3_600).contains(&started), "{started}");
}

#[tokio::test]
async fn readyz_fails_while_the_database_does_not_answer() {
    let e = env(None).await;
    assert_eq!(get(&e, "/readyz").await.status, 200);
    e.db.terminate_sessions(true).await;
    let r = get(&e, "/readyz").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["status"], "not ready");
    assert_eq!(
        get(&e, "/healthz").await.status,
        200,
        "the process itself is up"
    );
    e.db.accept_connections().await;
    assert_eq!(
        get(&e, "/readyz").await.status,
        200,
        "ready again once the database answers"
    );
}
