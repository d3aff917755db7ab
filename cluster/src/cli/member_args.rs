//! Command-line flags every member command (`quill actor`, `quill reward`) shares: where
//! the learner is, the job token, the member's name, its Prometheus endpoint and TLS.

use quill_proto::auth::load_token;
use std::path::PathBuf;

/// How a member finds and joins its job.
#[derive(clap::Args, Debug)]
pub struct MemberArgs {
    /// The learner's HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub learner: String,
    /// File holding the job token (else $QUILL_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A name shown in status and logs (default: host and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Serve this member's Prometheus `GET /metrics` on this HOST:PORT instead of the job's
    /// `metrics.member_prometheus_addr` (port 0 picks a free port; the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub tls: super::tls_args::TlsArgs,
}

impl MemberArgs {
    /// The job token: from `--token-file`, else `$QUILL_TOKEN`.
    pub fn token(&self) -> anyhow::Result<String> {
        Ok(load_token(self.token_file.as_deref())?)
    }

    /// Chooses the process's transport from the TLS flags; `listens` are the flags and
    /// addresses this member serves on, checked against it (plaintext stays on loopback
    /// unless allowed). The learner's address is checked when it is dialed.
    pub fn install_transport(&self, listens: &[(&str, &str)]) -> anyhow::Result<()> {
        self.tls.install_for_member()?;
        tracing::info!("connections: {}", quill_proto::tls::Transport::process());
        for (flag, addr) in listens {
            quill_proto::tls::Transport::process().check(flag, addr)?;
        }
        quill_proto::tls::Transport::process().check("--learner", &self.learner)?;
        Ok(())
    }

    /// `--name`, else host and process id.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(super::default_name)
    }
}
