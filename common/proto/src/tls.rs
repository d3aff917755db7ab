//! How quill's processes talk: plaintext on loopback, or mutual TLS with the job's own CA.
//!
//! A [`Transport`] is chosen once per process, before any connection opens
//! ([`Transport::install`], from the job file and the command line), and every gRPC
//! endpoint and server of the process ([`crate::rpc`]) and the learner ring use it:
//! - [`Transport::Loopback`] (the default): plaintext, and only to and from loopback
//!   addresses; dialing anything else is refused, and a server drops connections that do
//!   not come from loopback.
//! - [`Transport::Plaintext`]: plaintext anywhere (the job set `cluster.allow_plaintext`).
//! - [`Transport::Tls`]: TLS 1.2/1.3 (rustls, ring) both ways: a server presents this
//!   host's certificate and requires a client certificate issued by the job CA; a client
//!   checks the server's certificate against the job CA and the host name or IP it dialed.
//!
//! [`make_ca`] and [`make_host`] create a job CA and per-host certificates (`quill certs`).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Longest a TLS handshake on an accepted gRPC connection may take before the connection
/// is closed (so a silent or slow peer cannot hold a connection slot in the handshake);
/// shorter when the server's idle limit is.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The subject name of a job CA made by [`make_ca`] (also how [`make_host`] names its
/// issuer, so an existing CA key can sign more host certificates).
const CA_NAME: &str = "quill job CA";

/// What went wrong loading TLS material or applying the transport policy.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or holds no usable PEM item.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate and key do not form a usable identity (e.g. they do not match).
    #[error("{cert} with {key}: {reason}", cert = cert.display(), key = key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// A plaintext connection to or from a non-loopback address without the job's leave.
    #[error(
        "{what} {addr} is not a loopback address and TLS is off: give the job's certificates \
         (cluster.tls in the job file, --tls-ca/--tls-cert/--tls-key for members; see \
         `quill certs`) or allow plaintext (cluster.allow_plaintext, --allow-plaintext)"
    )]
    Plaintext {
        /// Which address (a flag or field name).
        what: String,
        /// The address.
        addr: String,
    },
    /// Making certificates failed.
    #[error("making certificates: {0}")]
    Generate(String),
    /// [`Transport::install`] was called twice.
    #[error("the process's transport was already chosen")]
    AlreadyInstalled,
}

/// Where a process's TLS material is: the job CA's certificate, and this host's
/// certificate (chain) and private key, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The job CA's certificate.
    pub ca: PathBuf,
    /// This host's certificate (issued by the job CA).
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
}

/// A loaded and checked TLS identity: the job CA and this host's certificate and key.
pub struct TlsIdentity {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity { .. }")
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Reads and checks the files: each must hold PEM of its kind, the key must match the
    /// certificate; errors name the file.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca_pem = read(&files.ca)?;
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates(&files.ca, &ca_pem)? {
            roots.add(ca).map_err(|e| TlsError::File {
                path: files.ca.clone(),
                reason: format!("not a usable CA certificate ({e})"),
            })?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(&files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
            path: files.key.clone(),
            reason: format!("holds no PEM private key ({e})"),
        })?;
        let identity = |e: rustls::Error| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        };
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::File {
                    path: files.ca.clone(),
                    reason: e.to_string(),
                })?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(identity)?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(identity)?;
        Ok(TlsIdentity {
            ca_pem,
            cert_pem,
            key_pem,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// rustls settings for accepting connections: this host's certificate, and a client
    /// certificate from the job CA required.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.server)
    }

    /// rustls settings for dialing: servers checked against the job CA, this host's
    /// certificate presented.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.client)
    }

    /// tonic's server settings for this identity: a handshake not done within `handshake`
    /// closes the connection.
    pub fn tonic_server(&self, handshake: Duration) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .timeout(handshake)
    }

    /// tonic's client settings for dialing `host` (a name or IP the server's certificate
    /// must carry), with a handshake limit of `timeout`.
    pub fn tonic_client(&self, host: &str, timeout: Duration) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(host)
            .timeout(timeout)
    }
}

/// How a process's connections are carried (see the module docs).
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// Plaintext, loopback addresses only.
    #[default]
    Loopback,
    /// Plaintext to and from any address.
    Plaintext,
    /// Mutual TLS with the job CA.
    Tls(Arc<TlsIdentity>),
}

static PROCESS: OnceLock<Transport> = OnceLock::new();

impl Transport {
    /// The transport for `tls` (loaded and checked) or, without it, plaintext anywhere
    /// when `allow_plaintext`, else plaintext on loopback only.
    pub fn from_settings(tls: Option<&TlsFiles>, allow_plaintext: bool) -> Result<Self, TlsError> {
        Ok(match tls {
            Some(files) => Transport::Tls(Arc::new(TlsIdentity::load(files)?)),
            None if allow_plaintext => Transport::Plaintext,
            None => Transport::Loopback,
        })
    }

    /// Makes this the transport of every connection the process opens or accepts from now
    /// on; once per process, before the first connection.
    pub fn install(self) -> Result<(), TlsError> {
        PROCESS.set(self).map_err(|_| TlsError::AlreadyInstalled)
    }

    /// The process's transport ([`Transport::Loopback`] unless one was installed).
    pub fn process() -> &'static Transport {
        PROCESS.get_or_init(Transport::default)
    }

    /// The TLS identity, when TLS is on.
    pub fn tls(&self) -> Option<&TlsIdentity> {
        match self {
            Transport::Tls(identity) => Some(identity),
            _ => None,
        }
    }

    /// Whether a plaintext connection may involve `addr` (`HOST:PORT`, or a bare host):
    /// always under TLS or [`Transport::Plaintext`], else only when `addr` is loopback.
    /// `what` names the address in the error (a flag or a job field).
    pub fn check(&self, what: &str, addr: &str) -> Result<(), TlsError> {
        match self {
            Transport::Loopback if !is_loopback(addr) => Err(TlsError::Plaintext {
                what: what.to_owned(),
                addr: addr.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether a plaintext server may take a connection from `peer`.
    pub fn admits(&self, peer: IpAddr) -> bool {
        !matches!(self, Transport::Loopback) || peer.is_loopback()
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Loopback => "plaintext, loopback only",
            Transport::Plaintext => "plaintext, any address (allowed by the job)",
            Transport::Tls(_) => "mutual TLS with the job CA",
        })
    }
}

/// The host part of `HOST:PORT` (`[v6]:port` unbracketed); the whole text when it has no
/// port.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// Whether `addr` (`HOST:PORT` or a host) names this machine's loopback: `localhost` or a
/// loopback IP. Other names count as not loopback (no lookup is made).
pub fn is_loopback(addr: &str) -> bool {
    let host = host_of(addr);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The name a TLS client checks the server at `addr` against: its host (name or IP).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = host_of(addr);
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is not a host name or IP for TLS: {e}"))
}

/// A job CA: its certificate and key, PEM.
pub struct MadeCa {
    /// The CA certificate.
    pub cert_pem: String,
    /// The CA's private key.
    pub key_pem: String,
}

/// A host certificate and key, PEM.
pub struct MadeHost {
    /// The certificate, issued by the job CA.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

fn generate(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn ca_params(days: u32) -> Result<rcgen::CertificateParams, TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    Ok(params)
}

fn validity(params: &mut rcgen::CertificateParams, days: u32) {
    let now = std::time::SystemTime::now();
    // A day back, so clocks a little behind still accept a fresh certificate.
    params.not_before = (now - Duration::from_secs(86_400)).into();
    params.not_after = (now + Duration::from_secs(86_400 * u64::from(days))).into();
}

/// Makes a new job CA valid for `days` days (ECDSA P-256).
pub fn make_ca(days: u32) -> Result<MadeCa, TlsError> {
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = ca_params(days)?.self_signed(&key).map_err(generate)?;
    Ok(MadeCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Makes a certificate and key for a host known by `names` (DNS names or IPs; every
/// one goes in the certificate, the first is its common name), valid for `days` days
/// and for both serving and dialing, issued by the CA whose key is `ca_key_pem` (made by
/// [`make_ca`]).
pub fn make_host(ca_key_pem: &str, names: &[String], days: u32) -> Result<MadeHost, TlsError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem)
        .map_err(|e| TlsError::Generate(format!("the CA key: {e}")))?;
    let issuer = rcgen::Issuer::new(ca_params(days)?, ca_key);
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| TlsError::Generate(format!("host names {names:?}: {e}")))?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, first.as_str());
    }
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    Ok(MadeHost {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A job CA and one host certificate for `names`, written into `dir` as ca.pem,
    /// host.pem and host.key; the files.
    pub(crate) fn write_job_certs(dir: &Path, names: &[&str]) -> TlsFiles {
        let ca = make_ca(30).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let host = make_host(&ca.key_pem, &names, 30).unwrap();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("host.pem"),
            key: dir.join("host.key"),
        };
        std::fs::write(&files.ca, ca.cert_pem).unwrap();
        std::fs::write(&files.cert, host.cert_pem).unwrap();
        std::fs::write(&files.key, host.key_pem).unwrap();
        files
    }

    #[test]
    fn made_certificates_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_job_certs(dir.path(), &["localhost", "127.0.0.1"]);
        TlsIdentity::load(&files).unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_job_certs(dir.path(), &["localhost"]);
        let missing = TlsFiles {
            key: dir.path().join("nope.key"),
            ..files.clone()
        };
        let err = TlsIdentity::load(&missing).unwrap_err().to_string();
        assert!(
            err.contains("nope.key") && err.contains("No such file"),
            "{err}"
        );
        std::fs::write(dir.path().join("junk.pem"), "not pem at all").unwrap();
        let junk = TlsFiles {
            cert: dir.path().join("junk.pem"),
            ..files.clone()
        };
        let err = TlsIdentity::load(&junk).unwrap_err().to_string();
        assert!(
            err.contains("junk.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        // A key from another host does not match the certificate.
        let elsewhere = tempfile::tempdir().unwrap();
        let other = write_job_certs(elsewhere.path(), &["localhost"]);
        let mismatched = TlsFiles {
            key: other.key.clone(),
            ..files
        };
        let err = TlsIdentity::load(&mismatched).unwrap_err().to_string();
        assert!(
            err.contains("host.pem with") && err.contains("host.key"),
            "{err}"
        );
    }

    #[test]
    fn plaintext_is_for_loopback_unless_allowed() {
        for addr in ["127.0.0.1:5", "localhost:5", "[::1]:5", "127.3.2.1:0"] {
            assert!(is_loopback(addr), "{addr}");
            Transport::Loopback.check("x", addr).unwrap();
        }
        for addr in ["10.0.0.1:5", "0.0.0.0:5", "node7:5", "[::]:5"] {
            assert!(!is_loopback(addr), "{addr}");
            let err = Transport::Loopback.check("--listen", addr).unwrap_err();
            assert!(err
                .to_string()
                .starts_with(&format!("--listen {addr} is not")));
            Transport::Plaintext.check("x", addr).unwrap();
        }
        assert!(!Transport::Loopback.admits("10.1.1.1".parse().unwrap()));
        assert!(Transport::Loopback.admits("127.0.0.1".parse().unwrap()));
        assert!(Transport::Plaintext.admits("10.1.1.1".parse().unwrap()));
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("node:80"), "node");
        assert_eq!(host_of("node"), "node");
    }
}
