//! HTTPS requests from tests (tokio-rustls): included with
//! `#[path = "common/https.rs"] mod https;` beside `mod common;`.
#![allow(dead_code, clippy::unwrap_used)]

/// One HTTP/1.1 request over TLS trusting `ca` (a PEM certificate), to
/// `localhost`.
pub async fn request(
    addr: std::net::SocketAddr,
    ca: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<super::common::HttpResponse> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let s = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    Ok(super::common::http_on(s, addr, method, path, headers, body).await)
}
