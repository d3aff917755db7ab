//! `quill bench weights`: raw loopback TCP bandwidth, then the time to deliver one weights
//! version to 1, 2, 4, 8 … actor processes through the relay tree, with the same relay and
//! fetch code (`quill_relay`) and tree assignment (`quill_relay::tree`)
//! the actors use. The actor processes are `quill bench relay-node` (hidden): they only
//! receive, relay and verify weights (per-chunk and whole-blob CRC32), no engine. The last
//! column is how many copies of the model the root (the learner's place) sent.

use anyhow::{bail, Context};
use quill_proto::auth::TOKEN_ENV;
use quill_proto::blob::{ManifestEntry, WeightBlob};
use quill_proto::rpc;
use quill_proto::weight_relay_server::WeightRelayServer;
use quill_proto::WeightSource;
use quill_relay::tree;
use quill_relay::{Fetcher, RelayNode, RelayService, Transfer};
use rand::{RngCore, SeedableRng};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of `quill bench weights`.
#[derive(clap::Args, Debug)]
pub struct WeightsArgs {
    /// Size of the synthetic bf16 model in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mb: usize,
    /// Actor process counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub actors: Vec<usize>,
    /// Children per node of the relay tree (the root included); 1 is a chain, 0 a star (every
    /// actor fetches from the root, as with a rank-0 broadcast).
    #[arg(long, default_value_t = 1)]
    pub fanout: usize,
    /// Bytes per chunk in MiB (the job's cluster.weight_chunk_bytes).
    #[arg(long, default_value_t = 4)]
    pub chunk_mb: usize,
    /// Carry every transfer over mutual TLS with a throwaway job CA (what TLS costs).
    #[arg(long)]
    pub tls: bool,
}

/// Flags of the hidden `quill bench relay-node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// Where to serve the relay (IP:PORT).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    #[command(flatten)]
    pub tls: crate::cli::tls_args::TlsArgs,
}

/// The plan one relay node gets on its stdin.
#[derive(serde::Serialize, serde::Deserialize)]
struct Plan {
    version: u64,
    sources: Vec<(String, String)>,
    stall_seconds: f64,
}

/// Runs the benchmark and prints its table.
pub fn run(args: WeightsArgs) -> anyhow::Result<()> {
    if args.size_mb == 0 || args.chunk_mb == 0 {
        bail!("--size-mb and --chunk-mb must be at least 1");
    }
    if args.actors.is_empty() || args.actors.contains(&0) {
        bail!("--actors must list positive counts, e.g. 1,2,4,8");
    }
    let size = args.size_mb << 20;
    let raw = raw_tcp_bandwidth(size, false)?;
    let held = raw_tcp_bandwidth(size, true)?;
    println!(
        "raw loopback TCP: {:.2} GB/s ({} MiB in one stream); into a fresh {} MiB buffer \
         (what holding the copy costs): {:.2} GB/s",
        raw / 1e9,
        args.size_mb,
        args.size_mb,
        held / 1e9
    );
    let certs = tempfile::tempdir().context("a folder for the bench's certificates")?;
    let node_flags = if args.tls {
        bench_tls(certs.path())?
    } else {
        Vec::new()
    };
    println!("connections: {}", quill_proto::tls::Transport::process());
    let blob = Arc::new(synthetic_blob(size));
    let token = format!("bench-{}", std::process::id());
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let (root_addr, root) =
        runtime.block_on(serve_root(Arc::clone(&blob), args.chunk_mb << 20, &token))?;
    println!(
        "{} MiB bf16 model, {} MiB chunks, fan-out {}",
        args.size_mb, args.chunk_mb, args.fanout
    );
    println!(
        "{:>6} {:>9} {:>8} {:>10} {:>8} {:>8} {:>10}",
        "actors", "seconds", "GB/s", "of raw", "of held", "vs 1", "from root"
    );
    let mut first = None;
    for &n in &args.actors {
        let served_before = root.bytes_served.load(Ordering::Relaxed);
        let seconds = deliver(
            n,
            &root_addr,
            &token,
            &node_flags,
            blob.version,
            args.fanout,
        )?;
        let copies =
            (root.bytes_served.load(Ordering::Relaxed) - served_before) as f64 / size as f64;
        let rate = size as f64 / seconds;
        let base = *first.get_or_insert(seconds);
        println!(
            "{n:>6} {seconds:>9.3} {:>8.2} {:>9.0}% {:>7.0}% {:>7.2}x {copies:>9.2}x",
            rate / 1e9,
            100.0 * rate / raw,
            100.0 * rate / held,
            seconds / base
        );
    }
    Ok(())
}

/// Makes a throwaway job CA and a certificate for 127.0.0.1 in `dir`, carries this
/// process's connections over TLS with them, and returns the flags that do the same for a
/// relay node.
fn bench_tls(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    use quill_proto::tls::{make_ca, make_host, TlsFiles, Transport};
    let ca = make_ca(1)?;
    let host = make_host(&ca.key_pem, &["127.0.0.1".to_owned()], 1)?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("host.pem"),
        key: dir.join("host.key"),
    };
    std::fs::write(&files.ca, ca.cert_pem)?;
    std::fs::write(&files.cert, host.cert_pem)?;
    std::fs::write(&files.key, host.key_pem)?;
    Transport::from_settings(Some(&files), false)?.install()?;
    let text = |p: &std::path::Path| p.display().to_string();
    Ok(vec![
        "--tls-ca".into(),
        text(&files.ca),
        "--tls-cert".into(),
        text(&files.cert),
        "--tls-key".into(),
        text(&files.key),
    ])
}

/// Bytes per second of one plain TCP stream over loopback moving `size` bytes: read into
/// one reused 4 MiB buffer, or (`hold`) into a fresh buffer of `size` bytes, as a receiver
/// that keeps the model must (its pages are faulted in as the bytes arrive).
fn raw_tcp_bandwidth(size: usize, hold: bool) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; if hold { size } else { 4 << 20 }];
        let mut got = 0;
        loop {
            let at = if hold { got.min(size) } else { 0 };
            let end = buf.len().min(at + (4 << 20));
            match stream.read(&mut buf[at..end])? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let chunk = vec![7u8; 4 << 20];
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr)?;
    let mut sent = 0;
    while sent < size {
        let n = chunk.len().min(size - sent);
        stream.write_all(&chunk[..n])?;
        sent += n;
    }
    drop(stream);
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let seconds = started.elapsed().as_secs_f64();
    if got != size {
        bail!("raw TCP: received {got} of {size} bytes");
    }
    Ok(size as f64 / seconds)
}

/// Random bf16 weights as 64 tensors (the last one takes the remainder).
fn synthetic_blob(size: usize) -> WeightBlob {
    let mut bytes = vec![0u8; size];
    rand_chacha::ChaCha8Rng::seed_from_u64(0).fill_bytes(&mut bytes);
    let tensors = 64.min(size / 2).max(1);
    let per = size / tensors / 2 * 2;
    let manifest = (0..tensors)
        .map(|i| {
            let offset = i * per;
            let len = if i + 1 == tensors { size - offset } else { per };
            ManifestEntry {
                name: format!("layers.{i}.weight"),
                dtype: "bf16".into(),
                shape: vec![(len / 2) as i64],
                offset: offset as u64,
                len: (len / 2 * 2) as u64,
            }
        })
        .collect();
    WeightBlob {
        version: 1,
        manifest,
        crc32: crc32fast::hash(&bytes),
        bytes,
    }
}

/// Serves `blob` as a complete relay (the learner's place in the tree); returns its address
/// and the node (whose `bytes_served` counts what the root sent).
async fn serve_root(
    blob: Arc<WeightBlob>,
    chunk: usize,
    token: &str,
) -> anyhow::Result<(String, Arc<RelayNode>)> {
    let node = RelayNode::new(Duration::from_secs(30));
    let version = blob.version;
    node.promote(&Transfer::complete(blob, chunk));
    node.set_latest(version);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    spawn_relay(listener, Arc::clone(&node), token);
    Ok((addr, node))
}

/// Serves `node` as a weight relay on `listener` in the background, as an actor does.
fn spawn_relay(listener: tokio::net::TcpListener, node: Arc<RelayNode>, token: &str) {
    tokio::spawn(rpc::serve(
        listener,
        token.to_owned(),
        WeightRelayServer::new(RelayService(node)),
        rpc::SMALL_REQUEST_BYTES,
        quill_config::job::JobConfig::default()
            .cluster
            .idle_connection(),
        std::future::pending(),
    ));
}

struct NodeProc {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    addr: String,
}

impl NodeProc {
    fn next_line(&mut self) -> anyhow::Result<String> {
        match self.lines.next() {
            Some(line) => Ok(line?),
            None => bail!("a relay node exited early ({:?})", self.child.wait()?),
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.wait_timeout_secs(10).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

trait WaitTimeout {
    fn wait_timeout_secs(&mut self, secs: u64) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for Child {
    fn wait_timeout_secs(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Starts `n` relay nodes, hands each its sources from the relay tree, and returns the
/// seconds until the last one holds the verified blob.
fn deliver(
    n: usize,
    root: &str,
    token: &str,
    node_flags: &[String],
    version: u64,
    fanout: usize,
) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("finding the quill binary")?;
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        let mut child = Command::new(&exe)
            .args(["bench", "relay-node"])
            .args(node_flags)
            .env(TOKEN_ENV, token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a relay node")?;
        let stdout = child.stdout.take().expect("piped");
        let mut node = NodeProc {
            child,
            lines: BufReader::new(stdout).lines(),
            addr: String::new(),
        };
        let line = node.next_line()?;
        node.addr = line
            .strip_prefix("listening ")
            .with_context(|| format!("unexpected relay node output `{line}`"))?
            .to_owned();
        nodes.push(node);
    }
    let tree: Vec<tree::Node> = nodes
        .iter()
        .enumerate()
        .map(|(i, p)| tree::Node {
            id: format!("node-{i}"),
            address: p.addr.clone(),
            holds: false,
            receiving: false,
        })
        .collect();
    let started = Instant::now();
    for (i, node) in nodes.iter_mut().enumerate() {
        let sources = tree::sources(&tree, &tree[i].id, fanout)
            .into_iter()
            .map(|s| {
                if s.address.is_empty() {
                    ("root".to_owned(), root.to_owned())
                } else {
                    (s.member_id, s.address)
                }
            })
            .collect();
        let plan = Plan {
            version,
            sources,
            stall_seconds: 30.0,
        };
        let stdin = node.child.stdin.as_mut().expect("piped");
        writeln!(stdin, "{}", serde_json::to_string(&plan)?)?;
        stdin.flush()?;
    }
    for node in &mut nodes {
        let line = node.next_line()?;
        if !line.starts_with("done") {
            bail!("relay node: {line}");
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The hidden relay node: prints `listening ADDR`, reads its plan from stdin, fetches and
/// relays the version, prints `done` (or `failed: …`), and serves until stdin closes.
pub fn node(args: NodeArgs) -> anyhow::Result<()> {
    let token = quill_proto::auth::load_token(None)?;
    args.tls.install_for_member()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        println!("listening {}", listener.local_addr()?);
        let mut line = String::new();
        let mut stdin = BufReader::new(std::io::stdin());
        tokio::task::block_in_place(|| stdin.read_line(&mut line))?;
        let plan: Plan = serde_json::from_str(&line).context("reading the plan")?;
        let stall = Duration::from_secs_f64(plan.stall_seconds);
        let node = RelayNode::new(stall);
        node.set_latest(plan.version);
        let transfer = node.begin(plan.version);
        spawn_relay(listener, Arc::clone(&node), &token);
        let sources: Vec<WeightSource> = plan
            .sources
            .into_iter()
            .map(|(member_id, address)| WeightSource { member_id, address })
            .collect();
        let fetcher = Fetcher {
            learner: None,
            token,
            stall,
        };
        match fetcher.fetch(&transfer, &sources, 2).await {
            Ok(report) => {
                node.promote(&transfer);
                println!("done {} from {}", transfer.received(), report.source);
            }
            Err(e) => println!("failed: {e}"),
        }
        tokio::task::block_in_place(|| {
            let mut rest = String::new();
            let _ = stdin.read_to_string(&mut rest);
        });
        Ok(())
    })
}
