//! A learner under a low file-descriptor limit against hostile peers on loopback: floods
//! of idle sockets on its gRPC and `/metrics` ports, a flood of registrations with the
//! longest names allowed, and oversized submissions. Idle sockets are closed, the process
//! does not spin, its memory stays bounded, and an honest member's calls and a scrape with
//! the token are still answered.

mod support;

use quill_proto::rpc::{learner_client, learner_client_in_session};
use quill_proto::{
    HeartbeatRequest, RegisterRequest, Role, RolloutGroup, Sample, ScoredGroup, StatusRequest,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use support::job::{metrics_addr, quill_bin, set, wait_until, Proc, TestJob};
use tonic::Code;

const TOKEN: &str = "test-token-123";
/// The learner's soft limit on open files.
const FD_LIMIT: usize = 256;
/// The job's `cluster.idle_connection_seconds`.
const IDLE_SECONDS: f64 = 2.0;

/// A `/proc/PID/status` field in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// CPU time (user + system) the process used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Opens `n` TCP connections to `addr` that send nothing.
fn idle_sockets(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect()
}

/// How many of `sockets` the server has closed (reads reach the end or an error).
fn closed(sockets: &mut [TcpStream]) -> usize {
    let mut n = 0;
    for s in sockets.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        // What the server sent before closing (its HTTP/2 settings) is read past.
        let is_closed = loop {
            match s.read(&mut [0u8; 256]) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) => {
                    break !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        };
        n += usize::from(is_closed);
    }
    n
}

/// `GET /metrics` with `authorization` (if any): the status line.
fn scrape(addr: &str, authorization: Option<&str>) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_floods_are_bounded_and_honest_calls_still_answered() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 1000);
        set(t, "sampling", "group_size", 2);
        set(t, "sampling", "max_new_tokens", 24);
        set(t, "cluster", "idle_connection_seconds", IDLE_SECONDS);
        set(t, "metrics", "require_token", true);
    });
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""))
        .arg(quill_bin())
        .args(["learner", "--config"])
        .arg(&job.config)
        .arg("--token-file")
        .arg(&job.token)
        .args(["--threads", "1", "--metrics-listen", "127.0.0.1:0"]);
    let mut learner = Proc::spawn(command, &job.dir.path().join("learner.log"));
    let addr = job.learner_addr(&mut learner);
    let metrics = metrics_addr(&mut learner);
    let pid = learner.child.id();
    let channel = support::job::grpc_channel(&addr).await;
    let mut status = learner_client(channel.clone(), TOKEN);
    status.status(StatusRequest {}).await.unwrap();
    let rss_before = status_bytes(pid, "VmRSS:");

    // Idle sockets: twice the descriptor limit on the gRPC port, 100 on /metrics.
    let cpu_before = cpu_seconds(pid);
    let flood_started = Instant::now();
    let mut grpc_idle = idle_sockets(&addr, FD_LIMIT * 2);
    let mut metrics_idle = idle_sockets(&metrics, 100);
    let answered = wait_until(
        "a Status call during the socket flood",
        Duration::from_secs(30),
        &mut [&mut learner],
        || {
            let runtime = tokio::runtime::Handle::current();
            let mut fresh = learner_client(
                tokio::task::block_in_place(|| runtime.block_on(support::job::grpc_channel(&addr))),
                TOKEN,
            );
            let reply =
                tokio::task::block_in_place(|| runtime.block_on(fresh.status(StatusRequest {})));
            reply.ok().map(|_| flood_started.elapsed())
        },
    );
    println!("Status answered {answered:?} into the socket flood");
    std::thread::sleep(Duration::from_secs_f64(IDLE_SECONDS * 2.0));
    let grpc_closed = closed(&mut grpc_idle);
    println!(
        "{grpc_closed} of {} idle gRPC sockets closed",
        grpc_idle.len()
    );
    assert!(grpc_closed >= grpc_idle.len() * 9 / 10, "{grpc_closed}");
    let cpu = cpu_seconds(pid) - cpu_before;
    let wall = flood_started.elapsed().as_secs_f64();
    println!("learner CPU {cpu:.2} s over {wall:.1} s of socket flood");
    assert!(
        cpu < wall * 0.5,
        "the learner spun: {cpu} s CPU in {wall} s"
    );
    let scraped = wait_until(
        "a scrape during the /metrics flood",
        Duration::from_secs(30),
        &mut [&mut learner],
        || {
            let line = scrape(&metrics, Some(&format!("Bearer {TOKEN}"))).ok()?;
            line.contains("200").then_some(line)
        },
    );
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
    assert!(scrape(&metrics, None).unwrap().starts_with("HTTP/1.1 401"));
    println!(
        "{} of 100 idle /metrics sockets closed",
        closed(&mut metrics_idle)
    );
    drop((grpc_idle, metrics_idle));

    // Registrations with the longest allowed names, and an honest member heart-beating.
    let honest = learner_client(channel.clone(), TOKEN)
        .register(RegisterRequest {
            role: Role::Reward as i32,
            name: "honest".into(),
            address: "127.0.0.1:1".into(),
            relay_address: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut honest_client = learner_client_in_session(channel.clone(), TOKEN, &honest.session);
    let registrations = 100_000usize;
    let flood = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut refused = 0usize;
            let mut calls = tokio::task::JoinSet::new();
            for i in 0..registrations {
                let mut client = learner_client(channel.clone(), TOKEN);
                calls.spawn(async move {
                    client
                        .register(RegisterRequest {
                            role: Role::Actor as i32,
                            name: format!("{i:0>256}"),
                            address: String::new(),
                            relay_address: "127.0.0.1:9".into(),
                        })
                        .await
                });
                if calls.len() >= 64 {
                    if let Some(Ok(Err(status))) = calls.join_next().await {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        refused += 1;
                    }
                }
            }
            while let Some(answer) = calls.join_next().await {
                if let Ok(Err(_)) = answer {
                    refused += 1;
                }
            }
            refused
        })
    };
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() {
        let sent = Instant::now();
        honest_client
            .heartbeat(HeartbeatRequest {
                member_id: honest.member_id.clone(),
                ..HeartbeatRequest::default()
            })
            .await
            .unwrap();
        slowest = slowest.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = flood.await.unwrap();
    println!("{registrations} registrations: {refused} refused; slowest heartbeat {slowest:?}");
    assert!(refused > 0, "the member cap was never reached");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");

    // Oversized submissions are refused from their length prefix.
    let huge_sample = Sample {
        tokens: vec![5; 1_000_000],
        logprobs: vec![-1.0; 1_000_000],
        ..Sample::default()
    };
    for samples in [vec![huge_sample], vec![Sample::default(); 1_000_000]] {
        let group = ScoredGroup {
            rollout: Some(RolloutGroup {
                samples,
                ..RolloutGroup::default()
            }),
            reward_worker: honest.member_id.clone(),
            ..ScoredGroup::default()
        };
        let err = honest_client.submit_scored(group).await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    }
    let big = ScoredGroup {
        reward_worker: honest.member_id.clone(),
        rollout: Some(RolloutGroup {
            question: "x".repeat(255 << 20),
            ..RolloutGroup::default()
        }),
        ..ScoredGroup::default()
    };
    let err = honest_client.submit_scored(big).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    let peak = status_bytes(pid, "VmHWM:");
    let rss = status_bytes(pid, "VmRSS:");
    println!(
        "learner memory: {} MiB before the floods, {} MiB after, peak {} MiB",
        rss_before >> 20,
        rss >> 20,
        peak >> 20
    );
    // The bound: HTTP/2 flow-control windows (32 MiB a connection) and the member book.
    assert!(
        peak < rss_before + (96 << 20),
        "peak {peak} vs {rss_before} before"
    );
    honest_client
        .heartbeat(HeartbeatRequest {
            member_id: honest.member_id.clone(),
            ..HeartbeatRequest::default()
        })
        .await
        .unwrap();
    status.status(StatusRequest {}).await.unwrap();
    assert!(learner.child.try_wait().unwrap().is_none(), "still running");
}
