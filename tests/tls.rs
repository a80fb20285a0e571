//! TLS on `sagad`'s listeners, with certificates made in the test: the gRPC
//! API and the admin server over TLS, plaintext and foreign CAs refused,
//! mutual TLS refusing clients with no or a foreign certificate, and a
//! reload serving a new certificate to new connections.
#![allow(clippy::unwrap_used)]

#[path = "common/certs.rs"]
mod certs;
mod common;
#[path = "common/https.rs"]
mod https;

use std::error::Error as _;

use certs::{temp_dir, Ca, Pem};
use common::*;
use saga_coordinator::proto;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

type Client = proto::coordinator_service_client::CoordinatorServiceClient<Channel>;

/// A gRPC client over TLS trusting `ca`, presenting `identity` if given.
async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &Pem,
    identity: Option<&Pem>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(Client::new(channel))
}

async fn list(c: &mut Client) -> Result<usize, tonic::Status> {
    Ok(c.list_definitions(proto::ListDefinitionsRequest {})
        .await?
        .into_inner()
        .definitions
        .len())
}

/// GET `path` over TLS trusting `ca`; the status.
async fn https_get(addr: std::net::SocketAddr, ca: &Pem, path: &str) -> std::io::Result<u16> {
    Ok(https::request(addr, &ca.cert, "GET", path, &[], "")
        .await?
        .status)
}

#[tokio::test]
async fn grpc_and_admin_serve_tls_and_refuse_plaintext_and_foreign_cas() {
    let db = TestDb::new().await;
    let dir = temp_dir("tls");
    let ca = Ca::new("sagad test CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let mut cfg = test_config(&db);
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    let coord = TestCoordinator::start(cfg).await;

    let mut c = tls_client(coord.addr, &ca.pem, None).await.unwrap();
    assert_eq!(list(&mut c).await.unwrap(), 0);
    // A client that trusts another CA fails the handshake.
    assert!(tls_client(coord.addr, &Ca::new("other").pem, None)
        .await
        .is_err());
    // A plaintext client gets no answer, only a transport error.
    let plain = Endpoint::from_shared(format!("http://{}", coord.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let err = list(&mut Client::new(channel)).await.unwrap_err();
        assert!(err.source().is_some(), "a transport error: {err:?}");
    }

    // The admin server uses the same certificate.
    let status = https_get(coord.admin, &ca.pem, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    let raw = http_raw(coord.admin).await;
    assert!(
        !raw.starts_with("HTTP/1.1 200"),
        "plaintext was served: {raw:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plaintext GET /healthz; whatever comes back (a TLS alert, nothing).
async fn http_raw(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let db = TestDb::new().await;
    let dir = temp_dir("mtls");
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let client_ca = dir.join("client-ca.pem");
    std::fs::write(&client_ca, &clients.pem.cert).unwrap();
    let mut cfg = test_config(&db);
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(key);
    cfg.tls_client_ca = Some(client_ca);
    let coord = TestCoordinator::start(cfg).await;

    let ok = clients.client("billing");
    let mut c = tls_client(coord.addr, &ca.pem, Some(&ok)).await.unwrap();
    assert_eq!(list(&mut c).await.unwrap(), 0);

    let foreign = Ca::new("someone else").client("billing");
    for identity in [None, Some(&foreign)] {
        // The handshake fails: at connect, or at the first call.
        match tls_client(coord.addr, &ca.pem, identity).await {
            Err(_) => {}
            Ok(mut c) => {
                let err = list(&mut c).await.unwrap_err();
                assert!(err.source().is_some(), "a transport error: {err:?}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_bad_certificate_is_one_clear_error_naming_the_file() {
    let db = TestDb::new().await;
    let dir = temp_dir("badtls");
    let cert = dir.join("server.crt");
    std::fs::write(&cert, "not a certificate").unwrap();
    let key = dir.join("server.key");
    std::fs::write(&key, "SECRET-KEY-MATERIAL").unwrap();
    let mut cfg = test_config(&db);
    cfg.tls_cert = Some(cert.clone());
    cfg.tls_key = Some(key);
    let err = start_error(cfg).await;
    assert!(err.contains(&cert.display().to_string()), "{err}");
    assert!(!err.contains("SECRET"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serves `svc` over TLS on 127.0.0.1 with `server`'s certificate, asking
/// for a client certificate from `client_ca` if given; its https:// URL.
async fn serve_tls(svc: Scripted, server: &Pem, client_ca: Option<&Pem>) -> String {
    use tonic::transport::{Server, ServerTlsConfig};
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&server.cert, &server.key));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(&ca.cert));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(proto::participant_service_server::ParticipantServiceServer::new(svc))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    format!("https://{addr}")
}

/// Runs a one-step saga on `coord`'s participant `svc`; its final state.
async fn one_step(coord: &TestCoordinator, name: &str) -> proto::SagaState {
    let mut client = coord.client().await;
    register(
        &mut client,
        definition(name, vec![step("a", "svc", false, true)]),
    )
    .await;
    let saga = start(&mut client, name, "{}").await;
    state(&wait(&mut client, &saga.saga_id).await)
}

#[tokio::test]
async fn participants_are_called_over_verified_mutual_tls() {
    let dir = temp_dir("ptls");
    let participants = Ca::new("participants CA");
    let sagads = Ca::new("sagad client CA");
    let svc = Scripted::default();
    let url = serve_tls(svc.clone(), &participants.server(), Some(&sagads.pem)).await;
    let ca_file = dir.join("participants-ca.pem");
    std::fs::write(&ca_file, &participants.pem.cert).unwrap();
    let (cert, key) = sagads.client("sagad").write(&dir, "sagad");

    let db = TestDb::new().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url.clone())];
    cfg.participant_ca = Some(ca_file.clone());
    cfg.participant_cert = Some(cert);
    cfg.participant_key = Some(key);
    let coord = TestCoordinator::start(cfg).await;
    assert_eq!(one_step(&coord, "mtls").await, proto::SagaState::Completed);
    assert_eq!(svc.calls().len(), 1);
    drop(coord);

    // Without sagad's client certificate the participant refuses the
    // handshake: the step never reaches it, and the saga waits for an
    // operator once the pivot's attempts are spent.
    let db = TestDb::new().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    cfg.participant_ca = Some(ca_file);
    let coord = TestCoordinator::start(cfg).await;
    assert_eq!(
        one_step(&coord, "nocert").await,
        proto::SagaState::Suspended
    );
    assert_eq!(svc.calls().len(), 1, "no call got through");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn https_participants_are_verified_against_the_participant_ca() {
    // Served with a certificate the system's roots do not know: refused.
    let participants = Ca::new("private CA");
    let svc = Scripted::default();
    let url = serve_tls(svc.clone(), &participants.server(), None).await;
    let db = TestDb::new().await;
    let mut cfg = test_config(&db);
    cfg.participants = vec![("svc".into(), url)];
    let coord = TestCoordinator::start(cfg).await;
    assert_eq!(
        one_step(&coord, "untrusted").await,
        proto::SagaState::Suspended
    );
    assert!(svc.calls().is_empty());
}

#[tokio::test]
async fn require_participant_tls_refuses_plaintext_endpoints() {
    let db = TestDb::new().await;
    let mut cfg = test_config(&db);
    cfg.require_participant_tls = true;
    let coord = TestCoordinator::start(cfg.clone()).await;
    let mut client = coord.client().await;
    let beat = |endpoint: &str| proto::HeartbeatRequest {
        participant: "payments".into(),
        instance_id: "p-1".into(),
        endpoint: endpoint.into(),
        ttl: Some(ms(10_000)),
        weight: 0,
    };
    let err = client
        .heartbeat(beat("http://127.0.0.1:7001"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("endpoint: plaintext endpoints are refused")
            && err.message().contains("--require-participant-tls"),
        "{}",
        err.message()
    );
    client
        .heartbeat(beat("https://127.0.0.1:7001"))
        .await
        .unwrap();
    drop(coord);

    // A static plaintext endpoint: sagad does not start.
    cfg.participants = vec![("svc".into(), "http://127.0.0.1:7001".into())];
    let err = start_error(cfg).await;
    assert!(
        err.contains("--participant svc=http://127.0.0.1:7001")
            && err.contains("--require-participant-tls"),
        "{err}"
    );
}
