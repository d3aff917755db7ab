//! The `quill` binary as a user runs it: generate, init-model, bench, help and bad flags.

mod support;

use support::{quill, stderr, stdout};

#[test]
fn generate_prints_samples_and_throughput() {
    let out = quill(&[
        "generate",
        "-p",
        "Write a 200-word poem about rain.",
        "-n",
        "3",
        "--max-new-tokens",
        "30",
        "--threads",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for j in 0..3 {
        assert!(
            text.contains(&format!("=== prompt 0 sample {j} (")),
            "{text}"
        );
    }
    assert!(text.lines().last().unwrap().contains("tokens/s"), "{text}");
}

#[test]
fn generate_json_carries_tokens_and_logprobs() {
    let out = quill(&[
        "generate",
        "-p",
        "one",
        "-p",
        "two",
        "-n",
        "2",
        "--max-new-tokens",
        "25",
        "--json",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for line in &lines {
        let tokens = line["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 25);
        assert_eq!(tokens.len(), line["logprobs"].as_array().unwrap().len());
        assert!(line["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().unwrap() <= 0.0));
    }
    assert_eq!(lines[2]["prompt"], "two");
    let again = quill(&[
        "generate",
        "-p",
        "one",
        "-p",
        "two",
        "-n",
        "2",
        "--max-new-tokens",
        "25",
        "--json",
        "--seed",
        "3",
    ]);
    assert_same_samples(&stdout(&out), &stdout(&again));
}

/// Two `--json` outputs hold the same samples: identical tokens and text, log-probs equal
/// up to float noise (libtorch's CPU reductions may split work differently run to run).
fn assert_same_samples(a: &str, b: &str) {
    let parse = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (parse(a), parse(b));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["tokens"], y["tokens"], "same seed, same tokens");
        assert_eq!(x["text"], y["text"]);
        let lp = |v: &serde_json::Value| -> Vec<f64> {
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_f64().unwrap())
                .collect()
        };
        for (p, q) in lp(x).iter().zip(lp(y)) {
            assert!((p - q).abs() < 1e-4, "log-probs {p} vs {q}");
        }
    }
}

#[test]
fn init_model_writes_a_directory_that_generates_like_the_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let out = quill(&["init-model", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    let args = |model: &str| {
        quill(&[
            "generate",
            "--model",
            model,
            "-p",
            "hello",
            "--max-new-tokens",
            "20",
            "--json",
            "--temperature",
            "0",
        ])
    };
    assert_same_samples(
        &stdout(&args("default")),
        &stdout(&args(dir.to_str().unwrap())),
    );
}

#[test]
fn help_explains_every_flag() {
    let out = quill(&["generate", "--help"]);
    let help = stdout(&out);
    for flag in [
        "--model",
        "--prompt",
        "--prompt-file",
        "--raw",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--device",
        "--dtype",
        "--batch-size",
        "--stop",
        "--json",
        "--threads",
    ] {
        let lines: Vec<&str> = help.lines().collect();
        let at = lines
            .iter()
            .position(|l| {
                l.trim_start()
                    .trim_start_matches("-p, ")
                    .trim_start_matches("-n, ")
                    .starts_with(flag)
            })
            .unwrap_or_else(|| panic!("{flag} not in help"));
        let description = lines[at + 1].trim();
        assert!(
            description.len() > 10 && !description.starts_with('-'),
            "{flag} lacks a description"
        );
    }
    let out = quill(&["bench", "generate", "--help"]);
    assert!(stdout(&out).contains("--workload"));
}

#[test]
fn bench_rl_refuses_bad_flags_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("bench");
    let out_arg = out_dir.to_str().unwrap();
    let positive =
        "--steps, --quill-steps, --prompts, --eval-samples, --window and --repeats must be positive";
    let cases: [(&[&str], &str); 6] = [
        (
            &["--group-size", "1"],
            "--group-size must be at least 2, got 1",
        ),
        (&["--lr", "0"], "--temperature and --lr must be above 0"),
        (&["--steps", "0"], positive),
        (&["--repeats", "0"], positive),
        (&["--quill-steps", "0"], positive),
        (&["--systems", "async,vllm"], "invalid value 'vllm'"),
    ];
    for (flags, message) in cases {
        let mut args = vec!["bench", "rl", "--out", out_arg];
        args.extend_from_slice(flags);
        let out = quill(&args);
        assert!(!out.status.success(), "{flags:?} should fail");
        assert!(
            stderr(&out).contains(message),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert!(
            !out_dir.exists(),
            "{flags:?}: nothing is written on a bad flag"
        );
    }
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("results.json"), "{}").unwrap();
    let out = quill(&["bench", "rl", "--out", out_arg]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already holds files"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(out_dir.join("results.json")).unwrap(),
        "{}"
    );
}

#[test]
fn bad_flags_fail_with_clear_messages() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["generate", "-p", "x", "--model", "/no/such/model"],
            "/no/such/model",
        ),
        (&["generate"], "no prompt given"),
        (
            &["generate", "-p", "x", "--temperature=-1"],
            "temperature must be >= 0",
        ),
        (
            &["generate", "-p", "x", "--device", "cuda"],
            "no CUDA device",
        ),
        (
            &["generate", "-p", "x", "--dtype", "f8"],
            "unknown dtype `f8`",
        ),
        (
            &["generate", "--prompt-file", "/no/such/file"],
            "reading prompt file /no/such/file",
        ),
    ];
    for (args, message) in cases {
        if args.contains(&"cuda") && tch::Cuda::device_count() > 0 {
            continue;
        }
        let out = quill(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?} panicked");
    }
}

#[test]
#[ignore = "slow tier: runs transformers' generate() for the comparison"]
fn bench_generate_runs_both_systems_and_prints_the_ratio() {
    let python = support::python();
    let out = quill(&[
        "bench",
        "generate",
        "--requests",
        "4",
        "--batch",
        "2",
        "--new-tokens",
        "20",
        "--workload",
        "both",
        "--threads",
        "1",
        "--python",
        python.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for workload in ["fixed", "long-tail"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(workload))
            .unwrap_or_else(|| panic!("{text}"));
        let ratio: f64 = line
            .split_whitespace()
            .last()
            .unwrap()
            .trim_end_matches('x')
            .parse()
            .unwrap();
        assert!(ratio > 0.0, "{line}");
    }
}

#[test]
fn bench_weights_delivers_through_a_star_and_a_tree_and_refuses_bad_flags() {
    for fanout in ["0", "2"] {
        let out = quill(&[
            "bench",
            "weights",
            "--size-mb",
            "8",
            "--chunk-mb",
            "1",
            "--actors",
            "1,3",
            "--fanout",
            fanout,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.starts_with("raw loopback TCP: "), "{text}");
        assert!(text.contains("into a fresh 8 MiB buffer"), "{text}");
        assert!(text.contains(&format!("fan-out {fanout}")), "{text}");
        for actors in ["1", "3"] {
            let row: Vec<f64> = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(actors))
                .unwrap_or_else(|| panic!("no row for {actors} actors: {text}"))
                .split_whitespace()
                .map(|f| f.trim_end_matches(['%', 'x']).parse().unwrap())
                .collect();
            assert!(row[1] > 0.0 && row[2] > 0.0, "{text}");
            // A star sends every actor its own copy from the root; a tree of fan-out 2
            // sends at most two, whatever the number of actors.
            let from_root = row[6];
            let want: f64 = if fanout == "0" {
                actors.parse().unwrap()
            } else {
                1.0f64.max(actors.parse::<f64>().unwrap().min(2.0))
            };
            assert!(
                (from_root - want).abs() < 0.05,
                "{actors} actors, fan-out {fanout}: {text}"
            );
        }
    }
    let cases: [(&[&str], &str); 3] = [
        (
            &["--size-mb", "0"],
            "--size-mb and --chunk-mb must be at least 1",
        ),
        (
            &["--chunk-mb", "0"],
            "--size-mb and --chunk-mb must be at least 1",
        ),
        (&["--actors", "1,0"], "--actors must list positive counts"),
    ];
    for (flags, message) in cases {
        let out = quill(&[&["bench", "weights"], flags].concat());
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(
            stderr(&out).contains(message),
            "{flags:?}: {}",
            stderr(&out)
        );
    }
}

/// A folder with Qwen2.5-7B's config.json.
fn qwen7b_config() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn plan_says_what_fits_and_what_would() {
    let dir = qwen7b_config();
    let folder = dir.path().to_str().unwrap();
    let file = dir.path().join("config.json");
    let base = [
        "plan",
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--max-tokens",
        "16384",
    ];
    let out = quill(&[&base[..], &["--model", folder]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "model: 7.62 B parameters (28 layers",
        "learner: 8 GPUs, sharding none, precision f32",
        "optimiser state (AdamW moments)",
        "does NOT fit",
        "- sharding zero3",
        "KV cache per sample (16384 positions)",
        "samples that fit: ",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let fitting = [
        "--sharding",
        "zero3",
        "--precision",
        "bf16",
        "--activation-checkpointing",
        "--model",
        file.to_str().unwrap(),
    ];
    let out = quill(&[&base[..], &fitting].concat());
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let total = text.lines().find(|l| l.contains("total per rank")).unwrap();
    assert!(total.ends_with("  fits"), "{text}");
    assert!(text.contains("f32 master + AdamW moments"), "{text}");
    assert!(
        text.contains("gradients (bf16 + f32 accumulation)"),
        "{text}"
    );
    let out = quill(&[
        "plan",
        "--model",
        "default",
        "--gpu-memory",
        "4",
        "--max-tokens",
        "100",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("learner: 1 GPU, sharding none"));
}

#[test]
fn plan_explains_its_flags_and_names_bad_ones() {
    let help = stdout(&quill(&["plan", "--help"]));
    for flag in [
        "--model",
        "--gpus",
        "--gpu-memory",
        "--reserve",
        "--group-size",
        "--prompts-per-step",
        "--max-tokens",
        "--sharding",
        "--precision",
        "--activation-checkpointing",
        "--micro-batch-tokens",
        "--logprob-chunk-tokens",
        "--actor-dtype",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} not in help:\n{help}"));
        let rest = help.split(line).nth(1).unwrap().trim_start();
        assert!(
            !rest.starts_with('-') && rest.len() > 10,
            "{flag} lacks a description"
        );
    }
    assert!(
        help.contains("zero3") && help.contains("one layer's weights and gradients"),
        "{help}"
    );
    let dir = qwen7b_config();
    let model = dir.path().to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "--model",
                "/no/such/model",
                "--gpu-memory",
                "80",
                "--max-tokens",
                "10",
            ],
            "/no/such/model",
        ),
        (
            &[
                "--model",
                model,
                "--gpus",
                "0",
                "--gpu-memory",
                "80",
                "--max-tokens",
                "10",
            ],
            "'--gpus <N>': must be at least 1",
        ),
        (
            &[
                "--model",
                model,
                "--gpu-memory",
                "lots",
                "--max-tokens",
                "10",
            ],
            "'--gpu-memory <GIB>': not a finite number",
        ),
        (
            &["--model", model, "--gpu-memory", "0", "--max-tokens", "10"],
            "'--gpu-memory <GIB>': must be above 0",
        ),
        (
            &[
                "--model",
                model,
                "--gpu-memory",
                "80",
                "--max-tokens",
                "40000",
            ],
            "--max-tokens: 40000 exceeds the model's context of 32768",
        ),
        (
            &[
                "--model",
                model,
                "--gpu-memory",
                "80",
                "--max-tokens",
                "10",
                "--sharding",
                "zero4",
            ],
            "invalid value 'zero4' for '--sharding <SHARDING>'",
        ),
        (
            &[
                "--model",
                model,
                "--gpu-memory",
                "2",
                "--reserve",
                "2",
                "--max-tokens",
                "10",
            ],
            "--reserve: 2 GiB leaves nothing of --gpu-memory 2 GiB",
        ),
    ];
    for (flags, message) in cases {
        let out = quill(&[&["plan"][..], flags].concat());
        assert!(!out.status.success(), "{flags:?} should fail");
        assert!(
            stderr(&out).contains(message),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{flags:?} panicked");
    }
}

#[test]
fn gpu_check_stops_at_once_without_cuda() {
    // A PATH holding only `dirname`: no nvidia-smi, so the script must refuse before it
    // builds or runs anything.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/usr/bin/dirname", bin.path().join("dirname")).unwrap();
    let bash = ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("bash");
    let start = std::time::Instant::now();
    let out = std::process::Command::new(bash)
        .arg(support::repo_root().join("scripts/gpu-check.sh"))
        .env("PATH", bin.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gpu-check: no CUDA here: nvidia-smi is not installed"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
}
