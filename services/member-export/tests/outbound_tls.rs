//! Outbound HTTPS to the partner trusts the system's roots plus `partner.ca_file`: a partner
//! behind a private CA is reachable with that CA configured and refused without it.

use std::{sync::Arc, time::Duration};

use mall_test_support::certs::{Authority, Validity};
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An HTTPS endpoint under a private CA that answers every request with 200 and `ok`.
async fn private_https(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    mall_grpc::tls::install_crypto_provider();
    let ca = Authority::new(dir, "private").expect("a CA");
    let server = ca
        .issue("partner", None, &["partner.internal"], Validity::Current)
        .expect("a certificate");
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&server.cert)
        .expect("PEM")
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&server.key).expect("a key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let port = listener.local_addr().expect("an address").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca.ca_file().to_owned())
}

#[tokio::test]
async fn a_partner_behind_a_private_ca_is_trusted_only_with_that_ca() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (port, ca_file) = private_https(dir.path()).await;
    let url = format!("https://localhost:{port}/members");
    let trusting = member_export::partner::http_client(Duration::from_secs(5), Some(&ca_file))
        .expect("a client");
    let response = trusting
        .get(&url)
        .send()
        .await
        .expect("the private CA is trusted");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("a body"), "ok");

    let system_only =
        member_export::partner::http_client(Duration::from_secs(5), None).expect("a client");
    let error = system_only
        .get(&url)
        .send()
        .await
        .expect_err("not trusted by the system's roots");
    assert!(error.is_connect(), "{error:?}");

    let missing = member_export::partner::http_client(
        Duration::from_secs(5),
        Some(&dir.path().join("missing.crt")),
    )
    .expect_err("a missing CA file stops start-up");
    assert!(
        format!("{missing:#}").contains("partner.ca_file"),
        "{missing:#}"
    );
}
