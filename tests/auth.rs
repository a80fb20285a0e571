//! Authentication and roles: every RPC and every admin endpoint against
//! every role (and no credential, an expired JWT, a JWT from the wrong
//! issuer); a participant credential cannot hijack another participant;
//! clients read only their own sagas; audit columns; client certificates
//! mapped to principals.
#![allow(clippy::unwrap_used)]

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::path::Path;

use base64::Engine as _;
use common::*;
use saga_coordinator::proto;
use tonic::{Code, Status};

const JWT_SECRET: &str = "jwt-secret-for-the-role-table-0123456789";
const ISSUER: &str = "https://idp.test";

/// Who calls: a name in the table and the bearer token it sends.
struct Who {
    name: &'static str,
    token: Option<String>,
}

fn hex_sha256(s: &str) -> String {
    saga_coordinator::auth::sha256(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn jwt(sub: &str, roles: &[&str], exp_from_now_secs: i64, iss: &str) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "sub": sub, "roles": roles, "iss": iss, "aud": "sagad",
        "exp": now + exp_from_now_secs, "nbf": now - 60,
    });
    let msg = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
    let sig = ring::hmac::sign(&key, msg.as_bytes());
    format!("{msg}.{}", b64(sig.as_ref()))
}

/// The principals of the table: an auth file with one token per role, and
/// JWTs (a good one with role viewer, an expired one, one from another
/// issuer).
fn principals(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<Who>) {
    let roles = [
        ("viewer", "viewer"),
        ("client", "client"),
        ("definer", "definer"),
        ("operator", "operator"),
        ("bank-a", "participant:bank_a"),
        ("admin", "admin"),
    ];
    let mut yaml = String::from("principals:\n");
    let mut who = vec![Who {
        name: "none",
        token: None,
    }];
    for (name, role) in roles {
        let token = format!("{name}-token-{}", uuid::Uuid::new_v4());
        yaml.push_str(&format!(
            "  - {{name: {name}, token_sha256: {}, roles: ['{role}']}}\n",
            hex_sha256(&token)
        ));
        who.push(Who {
            name,
            token: Some(token),
        });
    }
    who.push(Who {
        name: "jwt-viewer",
        token: Some(jwt("dashboards", &["viewer"], 600, ISSUER)),
    });
    who.push(Who {
        name: "jwt-expired",
        token: Some(jwt("dashboards", &["admin"], -600, ISSUER)),
    });
    who.push(Who {
        name: "jwt-wrong-issuer",
        token: Some(jwt("dashboards", &["admin"], 600, "https://evil.test")),
    });
    let auth = dir.join("auth.yaml");
    std::fs::write(&auth, yaml).unwrap();
    let key = dir.join("jwt.key");
    std::fs::write(&key, JWT_SECRET).unwrap();
    (auth, key, who)
}

struct Env {
    coord: TestCoordinator,
    who: Vec<Who>,
    dir: std::path::PathBuf,
    _svc: Scripted,
    _db: TestDb,
}

impl Env {
    async fn new() -> Env {
        let db = TestDb::new().await;
        let svc = Scripted::default();
        let url = svc.clone().serve().await;
        let dir = certs::temp_dir("auth");
        let (auth, key, who) = principals(&dir);
        let mut cfg = test_config(&db);
        cfg.participants = vec![("svc".into(), url)];
        cfg.auth_file = Some(auth);
        cfg.jwt_key = Some(key);
        cfg.jwt_issuer = Some(ISSUER.into());
        cfg.jwt_audience = Some("sagad".into());
        // The table presents many refused credentials from one address.
        cfg.admin_auth_failures_per_minute = 100_000;
        let coord = TestCoordinator::start(cfg).await;
        Env {
            coord,
            who,
            dir,
            _svc: svc,
            _db: db,
        }
    }

    fn token(&self, name: &str) -> Option<&str> {
        self.who
            .iter()
            .find(|w| w.name == name)
            .and_then(|w| w.token.as_deref())
    }

    async fn as_(&self, name: &str) -> Client {
        self.coord.client_with(self.token(name)).await
    }
}

/// Principals of the table that are allowed; the others get
/// PERMISSION_DENIED, or UNAUTHENTICATED without an accepted credential.
const READERS: &[&str] = &["viewer", "operator", "admin", "jwt-viewer"];
const DEFINITION_READERS: &[&str] = &["viewer", "definer", "operator", "admin", "jwt-viewer"];
const OWN_READERS: &[&str] = &["viewer", "client", "operator", "admin", "jwt-viewer"];
const UNAUTHENTICATED: &[&str] = &["none", "jwt-expired", "jwt-wrong-issuer"];

fn expected(allowed: &[&str], who: &str, ok: Code) -> Code {
    if allowed.contains(&who) {
        ok
    } else if UNAUTHENTICATED.contains(&who) {
        Code::Unauthenticated
    } else {
        Code::PermissionDenied
    }
}

fn code<T>(r: Result<tonic::Response<T>, Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test]
async fn every_rpc_against_every_role() {
    let e = Env::new().await;
    let mut admin = e.as_("admin").await;
    register(
        &mut admin,
        definition("order", vec![step("a", "svc", true, true)]),
    )
    .await;
    let others = start(&mut admin, "order", "{}").await.saga_id;
    wait(&mut admin, &others).await;
    let mut client = e.as_("client").await;
    let own = start(&mut client, "order", r#"{"mine": true}"#).await;
    assert_eq!(own.started_by, "client", "the principal is recorded");
    wait(&mut admin, &own.saga_id).await;
    let missing = uuid::Uuid::new_v4().to_string();

    for w in &e.who {
        let mut c = e.as_(w.name).await;
        let who = w.name;
        let wait_req = |id: &str| proto::WaitSagaRequest {
            saga_id: id.into(),
            timeout: Some(ms(10)),
        };
        #[rustfmt::skip]
        let table: Vec<(&str, (Code, String), Code)> = vec![
            ("RegisterDefinition", code(c.register_definition(proto::RegisterDefinitionRequest {
                definition: Some(definition(&format!("by-{who}"), vec![step("a", "svc", true, true)])),
            }).await), expected(&["definer", "admin"], who, Code::Ok)),
            ("GetDefinition", code(c.get_definition(proto::GetDefinitionRequest {
                name: "order".into(), version: 0,
            }).await), expected(DEFINITION_READERS, who, Code::Ok)),
            ("ListDefinitions", code(c.list_definitions(proto::ListDefinitionsRequest {}).await),
                expected(DEFINITION_READERS, who, Code::Ok)),
            ("StartSaga", code(c.start_saga(proto::StartSagaRequest {
                definition: "order".into(), input_json: "{}".into(), ..Default::default()
            }).await), expected(&["client", "admin"], who, Code::Ok)),
            ("GetSaga (its own)", code(c.get_saga(proto::GetSagaRequest { saga_id: own.saga_id.clone() }).await),
                expected(OWN_READERS, who, Code::Ok)),
            ("GetSaga (another's)", code(c.get_saga(proto::GetSagaRequest { saga_id: others.clone() }).await),
                expected(READERS, who, Code::Ok)),
            ("WaitSaga (its own)", code(c.wait_saga(wait_req(&own.saga_id)).await),
                expected(OWN_READERS, who, Code::Ok)),
            ("WaitSaga (another's)", code(c.wait_saga(wait_req(&others)).await),
                expected(READERS, who, Code::Ok)),
            ("ListSagas", code(c.list_sagas(proto::ListSagasRequest::default()).await),
                expected(OWN_READERS, who, Code::Ok)),
            ("GetSagaEvents (its own)", code(c.get_saga_events(proto::GetSagaEventsRequest { saga_id: own.saga_id.clone() }).await),
                expected(OWN_READERS, who, Code::Ok)),
            ("GetSagaEvents (another's)", code(c.get_saga_events(proto::GetSagaEventsRequest { saga_id: others.clone() }).await),
                expected(READERS, who, Code::Ok)),
            ("RetrySaga", code(c.retry_saga(proto::RetrySagaRequest { saga_id: missing.clone(), note: String::new() }).await),
                expected(&["operator", "admin"], who, Code::NotFound)),
            ("AbortSaga", code(c.abort_saga(proto::AbortSagaRequest { saga_id: missing.clone(), note: String::new() }).await),
                expected(&["operator", "admin"], who, Code::NotFound)),
            ("ResolveSaga", code(c.resolve_saga(proto::ResolveSagaRequest { saga_id: missing.clone(), note: "x".into() }).await),
                expected(&["operator", "admin"], who, Code::NotFound)),
            ("Heartbeat as bank_a", code(c.heartbeat(proto::HeartbeatRequest {
                participant: "bank_a".into(), instance_id: format!("i-{who}"),
                endpoint: "http://127.0.0.1:9".into(), ttl: Some(ms(0)), weight: 0,
            }).await), expected(&["bank-a", "admin"], who, Code::Ok)),
            ("Heartbeat as payments", code(c.heartbeat(proto::HeartbeatRequest {
                participant: "payments".into(), instance_id: format!("i-{who}"),
                endpoint: "http://127.0.0.1:9".into(), ttl: Some(ms(0)), weight: 0,
            }).await), expected(&["admin"], who, Code::Ok)),
        ];
        for (rpc, (got, message), want) in table {
            assert_eq!(got, want, "{rpc} as {who}: {message}");
            if let Some(t) = &w.token {
                assert!(
                    !message.contains(t.as_str()),
                    "{rpc} as {who} echoes the token"
                );
            }
            if got == Code::PermissionDenied {
                assert!(message.contains("needs role"), "{rpc} as {who}: {message}");
            }
        }
    }
}

#[tokio::test]
async fn a_client_lists_only_the_sagas_it_started() {
    let e = Env::new().await;
    let mut admin = e.as_("admin").await;
    register(
        &mut admin,
        definition("order", vec![step("a", "svc", true, true)]),
    )
    .await;
    start(&mut admin, "order", "{}").await;
    let mut client = e.as_("client").await;
    let own = start(&mut client, "order", "{}").await.saga_id;
    let list = |mut c: Client| async move {
        c.list_sagas(proto::ListSagasRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sagas
            .into_iter()
            .map(|s| s.saga_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(client).await, vec![own.clone()]);
    assert_eq!(list(e.as_("viewer").await).await.len(), 2);
    // Its definition names who registered it.
    let def = admin
        .get_definition(proto::GetDefinitionRequest {
            name: "order".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .definition
        .unwrap();
    assert_eq!(def.registered_by, "admin");
    // The admin page and API show who started it.
    let page = http(
        e.coord.admin,
        "GET",
        &format!("/sagas/{own}"),
        &[(
            "Authorization",
            &format!("Bearer {}", e.token("viewer").unwrap()),
        )],
        "",
    )
    .await;
    assert!(page.body.contains("id=started-by>client<"), "{}", page.body);
    let _ = std::fs::remove_dir_all(&e.dir);
}

/// Admin endpoints: (method, path, allowed, status when allowed).
#[tokio::test]
async fn every_admin_endpoint_against_every_role() {
    let e = Env::new().await;
    let mut admin = e.as_("admin").await;
    register(
        &mut admin,
        definition("order", vec![step("a", "svc", true, true)]),
    )
    .await;
    let id = start(&mut admin, "order", "{}").await.saga_id;
    wait(&mut admin, &id).await;
    let missing = uuid::Uuid::new_v4();
    let endpoints: Vec<(&str, String, &[&str], u16)> = vec![
        ("GET", "/".into(), READERS, 200),
        ("GET", format!("/sagas/{id}"), READERS, 200),
        ("GET", "/definitions".into(), DEFINITION_READERS, 200),
        ("GET", "/api/stats".into(), READERS, 200),
        ("GET", "/api/sagas".into(), READERS, 200),
        ("GET", format!("/api/sagas/{id}"), READERS, 200),
        ("GET", format!("/api/sagas/{id}/events"), READERS, 200),
        ("GET", "/api/definitions".into(), DEFINITION_READERS, 200),
        ("GET", "/metrics".into(), READERS, 200),
        (
            "POST",
            format!("/api/sagas/{missing}/retry"),
            &["operator", "admin"],
            404,
        ),
        (
            "POST",
            format!("/api/sagas/{missing}/abort"),
            &["operator", "admin"],
            404,
        ),
        (
            "POST",
            format!("/api/sagas/{missing}/resolve"),
            &["operator", "admin"],
            404,
        ),
        // The page's action form needs a login session (CSRF); a bearer
        // credential with the role gets as far as that check.
        (
            "POST",
            format!("/sagas/{missing}/action"),
            &["operator", "admin"],
            403,
        ),
    ];
    let everyone: Vec<&str> = e.who.iter().map(|w| w.name).collect();
    let open: Vec<(&str, String, &[&str], u16)> = vec![
        ("GET", "/healthz".into(), &everyone, 200),
        ("GET", "/readyz".into(), &everyone, 200),
    ];
    for w in &e.who {
        let bearer = w.token.as_ref().map(|t| format!("Bearer {t}"));
        for (method, path, allowed, ok) in endpoints.iter().chain(&open) {
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(b) = &bearer {
                headers.push(("Authorization", b));
            }
            let body = if *method == "POST" {
                r#"{"note":"x"}"#
            } else {
                ""
            };
            let r = http(e.coord.admin, method, path, &headers, body).await;
            let want = if allowed.contains(&w.name) {
                *ok
            } else if UNAUTHENTICATED.contains(&w.name) {
                401
            } else {
                403
            };
            assert_eq!(r.status, want, "{method} {path} as {}: {}", w.name, r.body);
            if let Some(t) = &w.token {
                assert!(
                    !r.body.contains(t.as_str()),
                    "{method} {path} echoes the token"
                );
            }
            if path.starts_with("/api/") && r.status >= 400 {
                assert!(r.json()["error"].is_string(), "{path}: {}", r.body);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&e.dir);
}

/// The tour's hijack: a credential for bank_a heartbeats as payments, with
/// its own endpoint and then with ttl 0 naming the real instance; both are
/// refused, and the next payments action reaches the real instance.
#[tokio::test]
async fn a_participant_credential_cannot_pose_as_another_participant() {
    let db = TestDb::new().await;
    let dir = certs::temp_dir("hijack");
    let (payments_token, bank_token) = ("payments-token-0123456789", "bank-a-token-0123456789");
    let auth = dir.join("auth.yaml");
    std::fs::write(
        &auth,
        format!(
            "principals:\n  - {{name: payments-svc, token_sha256: {}, roles: ['participant:payments']}}\n  \
             - {{name: bank-a-svc, token_sha256: {}, roles: ['participant:bank_a']}}\n  \
             - {{name: shop, token_sha256: {}, roles: [client, definer, viewer]}}\n",
            hex_sha256(payments_token),
            hex_sha256(bank_token),
            hex_sha256("shop-token-0123456789"),
        ),
    )
    .unwrap();
    let mut cfg = test_config(&db);
    cfg.auth_file = Some(auth);
    let coord = TestCoordinator::start(cfg).await;
    let real = Scripted::default();
    let real_url = real.clone().serve().await;
    let impostor = Scripted::default();
    let impostor_url = impostor.clone().serve().await;

    let beat = |endpoint: &str, instance: &str, ttl_ms: u64| proto::HeartbeatRequest {
        participant: "payments".into(),
        instance_id: instance.into(),
        endpoint: endpoint.into(),
        ttl: Some(ms(ttl_ms)),
        weight: 0,
    };
    let mut payments = coord.client_with(Some(payments_token)).await;
    payments
        .heartbeat(beat(&real_url, "payments-1", 60_000))
        .await
        .unwrap();
    let mut bank = coord.client_with(Some(bank_token)).await;
    let err = bank
        .heartbeat(beat(&impostor_url, "payments-2", 60_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("participant:payments"), "{err:?}");
    let err = bank
        .heartbeat(beat(&real_url, "payments-1", 0))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "cannot withdraw it either"
    );

    let mut shop = coord.client_with(Some("shop-token-0123456789")).await;
    register(
        &mut shop,
        definition("pay", vec![step("charge", "payments", true, true)]),
    )
    .await;
    let s = start(&mut shop, "pay", r#"{"amount": 5}"#).await;
    let done = wait(&mut shop, &s.saga_id).await;
    assert_eq!(state(&done), proto::SagaState::Completed);
    assert_eq!(
        real.calls_to("charge.do").len(),
        1,
        "the real instance got it"
    );
    assert!(impostor.calls().is_empty(), "the impostor got nothing");

    // Audit: the instance was registered by its principal.
    let pool = db.pool().await;
    let (by, withdrawn): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT registered_by, withdrawn_by FROM participant_instances WHERE instance_id = 'payments-1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((by.as_deref(), withdrawn), (Some("payments-svc"), None));
    payments
        .heartbeat(beat(&real_url, "payments-1", 0))
        .await
        .unwrap();
    let withdrawn: Option<String> = sqlx::query_scalar(
        "SELECT withdrawn_by FROM participant_instances WHERE instance_id = 'payments-1'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(withdrawn.as_deref(), Some("payments-svc"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under mutual TLS a client certificate's subject names a principal: no
/// token needed; an unmapped certificate is no credential.
#[tokio::test]
async fn a_client_certificate_subject_maps_to_a_principal() {
    let db = TestDb::new().await;
    let dir = certs::temp_dir("cert-subject");
    let ca = certs::Ca::new("clients and server");
    let (cert, key) = ca.server().write(&dir, "server");
    let (ca_file, _) = ca.pem.write(&dir, "ca");
    let auth = dir.join("auth.yaml");
    std::fs::write(
        &auth,
        "principals:\n  - {name: bank-a, cert_subject: 'CN=bank-a', roles: ['participant:bank_a']}\n",
    )
    .unwrap();
    let mut cfg = test_config(&db);
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    cfg.tls_client_ca = Some(ca_file);
    cfg.auth_file = Some(auth);
    let coord = TestCoordinator::start(cfg).await;
    let connect = |identity: certs::Pem| {
        let ca = ca.pem.cert.clone();
        let addr = coord.addr;
        async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .identity(tonic::transport::Identity::from_pem(
                    identity.cert,
                    identity.key,
                ))
                .domain_name("localhost");
            let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            client_on(channel, None)
        }
    };
    let beat = proto::HeartbeatRequest {
        participant: "bank_a".into(),
        instance_id: "bank-a-1".into(),
        endpoint: "https://127.0.0.1:9".into(),
        ttl: Some(ms(1_000)),
        weight: 0,
    };
    let mut bank = connect(ca.client("bank-a")).await;
    bank.heartbeat(beat.clone()).await.unwrap();
    let err = bank
        .list_sagas(proto::ListSagasRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut stranger = connect(ca.client("stranger")).await;
    let err = stranger.heartbeat(beat).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
