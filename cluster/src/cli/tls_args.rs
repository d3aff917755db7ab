//! Command-line flags that choose how a process's connections are carried: the job's TLS
//! files (a per-host certificate and key, the job CA), or leave for plaintext off loopback.

use anyhow::Context;
use quill_config::job::{JobConfig, TlsSection};
use quill_proto::tls::{TlsFiles, Transport};
use std::path::PathBuf;

/// TLS flags shared by every role.
#[derive(clap::Args, Debug, Default)]
pub struct TlsArgs {
    /// The job CA's certificate (PEM), for mutual TLS on every connection (`quill certs`
    /// makes it). Members need --tls-ca, --tls-cert and --tls-key together; a learner takes
    /// them over the job's [cluster.tls] files.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM), issued by the job CA for the names and IPs others
    /// dial this host at.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Talk plaintext to and from non-loopback addresses (without TLS, only loopback is
    /// allowed). Anyone on the network can then read the token and the traffic.
    #[arg(long)]
    pub allow_plaintext: bool,
}

impl TlsArgs {
    /// A member's transport, from the flags alone; installed for the whole process (logged
    /// at debug level: long-running roles log it themselves, one-shot clients stay quiet).
    pub fn install_for_member(&self) -> anyhow::Result<()> {
        let files = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key go together: give all three"),
        };
        let transport =
            Transport::from_settings(files.as_ref(), self.allow_plaintext).context("TLS")?;
        transport.install()?;
        tracing::debug!("connections: {}", Transport::process());
        Ok(())
    }

    /// Applies the flags to the job's `cluster.tls` and `cluster.allow_plaintext` (a flag
    /// wins over the file), checks the result, and installs the job's transport for the
    /// whole process.
    pub fn install_for_job(&self, job: &mut JobConfig) -> anyhow::Result<()> {
        let given = self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_key.is_some();
        if given {
            let mut tls = job.cluster.tls.clone().unwrap_or_default();
            for (flag, into) in [
                (&self.tls_ca, &mut tls.ca_cert),
                (&self.tls_cert, &mut tls.cert),
                (&self.tls_key, &mut tls.key),
            ] {
                if let Some(path) = flag {
                    *into = path.clone();
                }
            }
            job.cluster.tls = Some(tls);
        }
        job.cluster.allow_plaintext |= self.allow_plaintext;
        job.validate()?;
        let files = job.cluster.tls.as_ref().map(files_of);
        let transport = Transport::from_settings(files.as_ref(), job.cluster.allow_plaintext)
            .context("cluster.tls")?;
        transport.install()?;
        tracing::info!("connections: {}", Transport::process());
        Ok(())
    }
}

/// The files a job's `[cluster.tls]` names.
pub fn files_of(tls: &TlsSection) -> TlsFiles {
    TlsFiles {
        ca: tls.ca_cert.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    }
}
