//! HTTPS and service-account credentials for the fake apiserver: a CA and a server
//! certificate made at test start (rcgen), served with rustls (the ring provider kube-rs
//! already uses), and the directory the in-cluster config reads.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};

/// Where a pod's in-cluster config reads its credentials (the kubelet mounts a projected
/// volume there): `token`, `ca.crt` and `namespace`.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why HTTPS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the test CA or server certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("building the TLS server configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A self-signed CA and a server certificate it signed, valid for the given names and
/// addresses (the address clients dial must be among them: kube-rs checks IP SANs).
pub struct ServerTls {
    /// The CA certificate (PEM): what a client trusts, the service account's `ca.crt`.
    pub ca_pem: String,
    pub(super) acceptor: TlsAcceptor,
}

impl ServerTls {
    /// A fresh CA and server certificate for `addresses` plus the names the in-cluster
    /// `kubernetes` Service has (`kubernetes.default.svc`, ...) and `localhost`.
    pub fn self_signed(addresses: &[IpAddr]) -> Result<ServerTls, TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "fake-apiserver-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"];
        let mut params = CertificateParams::new(names.map(String::from).to_vec())?;
        params.distinguished_name.push(DnType::CommonName, "fake-apiserver");
        params.subject_alt_names.extend(addresses.iter().map(|a| SanType::IpAddress(*a)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        Ok(ServerTls { ca_pem: ca.pem(), acceptor: TlsAcceptor::from(Arc::new(config)) })
    }
}

/// Writes what the kubelet mounts at [`SERVICE_ACCOUNT_DIR`] into `dir`: `token`, `ca.crt`
/// (PEM) and `namespace`, readable by the pod's user only, as the kubelet's projected
/// volume is.
pub fn write_service_account_dir(dir: &Path, token: &str, ca_pem: &str, namespace: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    for (name, content) in [("token", token), ("ca.crt", ca_pem), ("namespace", namespace)] {
        let path = dir.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
