//! `quill status`: ask a running job's learner for its status and show it as a table
//! (once, or redrawn every `--watch` seconds), or print the document as JSON.

use super::status_table;
use anyhow::{anyhow, bail, Context};
use quill_proto::auth::load_token;
use quill_proto::rpc::{self, LearnerConn};
use quill_proto::status::StatusDocument;
use quill_proto::StatusRequest;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;

/// How long connecting to the learner and each status call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `quill status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The learner's HOST:PORT (its `cluster.learner_addr`, or OUTPUT_DIR/learner.addr).
    #[arg(long, value_name = "HOST:PORT")]
    pub learner: String,
    /// File holding the job token (else $QUILL_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Redraw the view every SECONDS until interrupted (default: show it once).
    #[arg(long, value_name = "SECONDS", value_parser = positive_seconds)]
    pub watch: Option<f64>,
    /// Print the status document (JSON) instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: super::tls_args::TlsArgs,
}

/// Shows the job's status.
pub fn run(args: Args) -> anyhow::Result<()> {
    check_address(&args.learner)?;
    args.tls.install_for_member()?;
    let token = load_token(args.token_file.as_deref()).map_err(|e| anyhow!("--token-file: {e}"))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let mut learner = connect(&args.learner, &token).await?;
        loop {
            let doc = fetch(&mut learner, &args.learner).await?;
            let text = if args.json {
                format!("{}\n", serde_json::to_string(&doc)?)
            } else {
                status_table::render(&doc)
            };
            let Some(every) = args.watch else {
                print!("{text}");
                return Ok(());
            };
            // Clear the screen and move home, then draw.
            print!("\x1b[2J\x1b[H{text}");
            tokio::time::sleep(Duration::from_secs_f64(every)).await;
        }
    })
}

/// `--learner` must be HOST:PORT with a numeric port.
fn check_address(addr: &str) -> anyhow::Result<()> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        bail!("--learner: `{addr}` is not HOST:PORT");
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("--learner: `{addr}` is not HOST:PORT (port 1-65535)");
    }
    addr.to_socket_addrs()
        .map_err(|e| anyhow!("--learner: cannot resolve `{addr}`: {e}"))?;
    Ok(())
}

async fn connect(addr: &str, token: &str) -> anyhow::Result<LearnerConn> {
    let channel = rpc::endpoint(addr, TIMEOUT)
        .map_err(|e| anyhow!("--learner: {e}"))?
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "--learner: cannot reach the learner at {addr}: {}",
                causes(&e)
            )
        })?;
    Ok(rpc::learner_client(channel, token))
}

async fn fetch(learner: &mut LearnerConn, addr: &str) -> anyhow::Result<StatusDocument> {
    let reply = learner.status(StatusRequest {}).await.map_err(|s| {
        if s.code() == Code::Unauthenticated {
            anyhow!("--token-file: the learner at {addr} refused the job token (wrong token?)")
        } else {
            anyhow!("--learner: status call to {addr} failed: {}", s.message())
        }
    })?;
    serde_json::from_str(&reply.into_inner().json)
        .map_err(|e| anyhow!("--learner: the learner at {addr} sent a malformed status: {e}"))
}

/// An error and its sources, `: `-separated (tonic's top level only says "transport error").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// Parses `--watch`: a finite number of seconds above 0.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("must be a number of seconds above 0, got `{text}`")),
    }
}
