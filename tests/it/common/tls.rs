//! Test TLS: a CA made with rcgen, leaf certificates for servers and clients, a TLS server on
//! 127.0.0.1:0 and TLS channels to it.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vectord::config::{Config, TlsConfig};

/// A test certificate authority that signs leaf certificates.
pub struct Pki {
    pub ca_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca,
        }
    }

    /// A leaf certificate and its key (PEM), for `names`, for a server or a client.
    pub fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A TLS server on 127.0.0.1:0 (cert for "localhost"), mTLS when `client_ca` is given.
/// Stopped when dropped; `dir` holds its files.
pub struct TlsServer {
    pub port: u16,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _tmp: tempfile::TempDir,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn tls_server(pki: &Pki, client_ca: Option<&Pki>) -> TlsServer {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = pki.leaf(&["localhost"], false);
    let cert = write(tmp.path(), "server.pem", &cert);
    let key = write(tmp.path(), "server.key", &key);
    let client_ca = client_ca.map(|c| write(tmp.path(), "client-ca.pem", &c.ca_pem));
    let mut config = Config::for_tests(&tmp.path().join("db"));
    config.tls = Some(TlsConfig::load(&cert, &key, client_ca.as_deref()).expect("tls files"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(vectord::server::run(listener, config, async move {
        let _ = stopped.await;
    }));
    TlsServer {
        port,
        dir: tmp.path().to_path_buf(),
        stop: Some(stop),
        _tmp: tmp,
    }
}

/// Connects over TLS trusting `ca`, with a client identity if given.
pub async fn tls_channel(
    port: u16,
    ca: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Waits for SERVING through `ch`; the first error is returned (a refused handshake).
pub async fn serving(ch: Channel) -> Result<(), Status> {
    let mut stream = HealthClient::new(ch)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    while let Some(msg) = stream.message().await? {
        if msg.status == ServingStatus::Serving as i32 {
            return Ok(());
        }
    }
    Err(Status::unavailable("health stream ended"))
}
