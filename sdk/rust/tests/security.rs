//! The SDK's side of security: a participant that accepts only sagad's
//! token, and the client over TLS with a token, against a real `sagad`.
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/common/certs.rs"]
mod certs;
#[path = "../../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use saga_sdk::proto::participant_service_client::ParticipantServiceClient;
use saga_sdk::{
    Client, ClientError, ClientTls, Participant, SagaDefinition, SagaState, ServerTls, Step,
};
use serde_json::Value;

const TOKEN: &str = "participant-secret-0123456789";

fn payments(token: Option<&str>) -> Participant {
    let mut b = Participant::builder("payments");
    if let Some(t) = token {
        b = b.require_token(t);
    }
    b.action("charge", |_ctx, v: Value| async move { Ok(v) })
        .build()
}

fn charge() -> SagaDefinition {
    SagaDefinition::builder("pay")
        .step(Step::new("charge", "payments").idempotent())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_participant_requiring_sagads_token_refuses_other_callers() {
    let (addr, _server) = saga_sdk::serve_local(payments(Some(TOKEN)), std::future::pending())
        .await
        .unwrap();
    let call = |token: Option<&'static str>| async move {
        let mut c = ParticipantServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut r = tonic::Request::new(saga_sdk::proto::InvokeRequest {
            saga_id: uuid::Uuid::new_v4().to_string(),
            step: "charge".into(),
            handler: "charge".into(),
            phase: saga_sdk::proto::Phase::Action as i32,
            attempt: 1,
            input_json: "{}".into(),
            ..Default::default()
        });
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        c.invoke(r).await
    };
    for token in [None, Some("not-the-token")] {
        let err = call(token).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(!err.message().contains(TOKEN));
    }
    assert!(call(Some(TOKEN)).await.is_ok());

    // sagad sends the token from its file: the saga completes.
    let db = common::TestDb::new().await;
    let dir = certs::temp_dir("ptoken");
    let file = dir.join("participant-token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let mut cfg = common::test_config(&db);
    cfg.participants = vec![("payments".into(), format!("http://{addr}"))];
    cfg.participant_token_file = Some(file);
    let coord = common::TestCoordinator::start(cfg).await;
    let client = Client::connect(format!("http://{}", coord.addr))
        .await
        .unwrap();
    client.register(&charge()).await.unwrap();
    let saga = client
        .start("pay", &serde_json::json!({"amount": 5}))
        .await
        .unwrap();
    let saga = client.wait(saga.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_client_runs_a_saga_over_tls_with_a_token() {
    let db = common::TestDb::new().await;
    let dir = certs::temp_dir("sdk-tls");
    let ca = certs::Ca::new("sagad CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let admin_token = "admin-token-0123456789";
    let (addr, _server) = saga_sdk::serve_local(payments(None), std::future::pending())
        .await
        .unwrap();
    let mut cfg = common::test_config(&db);
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    cfg.admin_token = Some(admin_token.into());
    cfg.participants = vec![("payments".into(), format!("http://{addr}"))];
    let coord = common::TestCoordinator::start(cfg).await;
    let url = format!("https://{}", coord.addr);
    let tls = ClientTls {
        ca_pem: Some(ca.pem.cert.clone().into_bytes()),
        identity: None,
    };

    let client = Client::connect_tls(&url, tls.clone())
        .await
        .unwrap()
        .with_token(admin_token)
        .unwrap();
    client.register(&charge()).await.unwrap();
    let saga = client
        .start("pay", &serde_json::json!({"amount": 7}))
        .await
        .unwrap();
    let saga = client.wait(saga.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    // The token reaches the operator RPCs: an unknown saga, not a refusal.
    let err = client.resolve(uuid::Uuid::new_v4(), "x").await.unwrap_err();
    assert!(matches!(err, ClientError::NotFound(_)), "{err:?}");
    // Without the token, refused; without the CA, no connection.
    let anonymous = Client::connect_tls(&url, tls).await.unwrap();
    let err = anonymous.resolve(saga.id, "x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(Client::connect(&url).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A participant served over TLS that requires sagad's client certificate:
/// sagad (with --participant-ca/-cert/-key) completes a saga on it; a
/// caller without that certificate does not get through the handshake.
#[tokio::test]
async fn a_participant_over_tls_requires_sagads_client_certificate() {
    let dir = certs::temp_dir("sdk-ptls");
    let participants = certs::Ca::new("participants CA");
    let sagads = certs::Ca::new("sagad client CA");
    let server = participants.server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = ServerTls {
        cert_pem: server.cert.clone(),
        key_pem: server.key.clone(),
        client_ca_pem: Some(sagads.pem.cert.clone()),
    };
    tokio::spawn(payments(None).serve_tls(listener, tls, std::future::pending()));

    let db = common::TestDb::new().await;
    let (ca_file, _) = participants.pem.write(&dir, "participants-ca");
    let (cert, key) = sagads.client("sagad").write(&dir, "sagad");
    let mut cfg = common::test_config(&db);
    cfg.participants = vec![(
        "payments".into(),
        format!("https://localhost:{}", addr.port()),
    )];
    cfg.participant_ca = Some(ca_file);
    cfg.participant_cert = Some(cert);
    cfg.participant_key = Some(key);
    cfg.require_participant_tls = true;
    let coord = common::TestCoordinator::start(cfg).await;
    let client = Client::connect(format!("http://{}", coord.addr))
        .await
        .unwrap();
    client.register(&charge()).await.unwrap();
    let saga = client.start("pay", &serde_json::json!({})).await.unwrap();
    let saga = client.wait(saga.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(saga.state, SagaState::Completed);

    // Trusting the server but without a client certificate: no call.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            &participants.pem.cert,
        ))
        .domain_name("localhost");
    let refused = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok::<_, tonic::transport::Error>(ParticipantServiceClient::new(channel))
    }
    .await;
    if let Ok(mut c) = refused {
        let err = c
            .invoke(saga_sdk::proto::InvokeRequest::default())
            .await
            .unwrap_err();
        assert!(
            format!("{err:?}").contains("CertificateRequired"),
            "{err:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
