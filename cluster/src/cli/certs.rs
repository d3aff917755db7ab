//! `quill certs`: make a job CA and per-host certificates and keys for mutual TLS.

use anyhow::{bail, Context};
use quill_proto::tls::{make_ca, make_host};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Flags of `quill certs`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Writes OUT/ca.pem and OUT/ca.key (the job CA; an existing pair in OUT is reused, so hosts \
can be added later), and for each --host OUT/<first name>.pem and OUT/<first name>.key. \
Key files get mode 0600. Give the job CA's certificate and a host's own certificate and key \
to each process: the learner in the job file's [cluster.tls], actors and reward workers with \
--tls-ca, --tls-cert and --tls-key. Keep ca.key off the hosts that do not make certificates.

Example: quill certs --out certs --host learner,10.0.0.1 --host actor1,10.0.0.2 \
--host localhost,127.0.0.1")]
pub struct Args {
    /// The folder to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A host to certify: its names and IPs, comma-separated, exactly as other processes
    /// dial it (the address in --learner, --advertise, --relay-advertise or the job file);
    /// the first names its files. Repeat for each host.
    #[arg(long = "host", value_name = "NAME[,NAME|IP...]", required = true)]
    pub hosts: Vec<String>,
    /// Days the CA (when made now) and the host certificates stay valid.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Replace host certificates and keys that already exist in OUT (else refused).
    #[arg(long)]
    pub force: bool,
}

/// Writes `text` to `path`, mode 0600 for keys; refuses to replace a file unless `replace`.
fn write(path: &Path, text: &str, secret: bool, replace: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists: pass --force to replace it",
                path.display()
            )
        } else {
            anyhow::anyhow!("writing {}: {e}", path.display())
        }
    })?;
    if secret {
        // A replaced file keeps its old mode: make it private too.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .with_context(|| format!("making {} private", path.display()))?;
    }
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The names of one `--host` value, checked.
fn names(host: &str) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = host.split(',').map(|n| n.trim().to_owned()).collect();
    if names.iter().any(|n| {
        n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:*".contains(&b))
    }) {
        bail!("--host: {host:?} is not a comma-separated list of host names and IPs");
    }
    Ok(names)
}

/// The file stem for a host's files: its first name, with ':' (IPv6) and '*' as '_'.
fn stem(first: &str) -> String {
    first.replace([':', '*'], "_")
}

/// Makes the CA (or reuses OUT's) and every host's certificate and key.
pub fn run(args: Args) -> anyhow::Result<()> {
    let hosts = args
        .hosts
        .iter()
        .map(|h| names(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stems: Vec<String> = hosts.iter().map(|n| stem(&n[0])).collect();
    stems.sort();
    if let Some(twice) = stems.windows(2).find(|w| w[0] == w[1]) {
        bail!("--host: two hosts would both write {}.pem", twice[0]);
    }
    if stems.iter().any(|s| s == "ca") {
        bail!("--host: a host named `ca` would overwrite the CA's files");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (ca_cert, ca_key) = (args.out.join("ca.pem"), args.out.join("ca.key"));
    let ca_key_pem = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => {
            println!("using the job CA in {}", ca_cert.display());
            std::fs::read_to_string(&ca_key)
                .with_context(|| format!("reading {}", ca_key.display()))?
        }
        (false, false) => {
            let ca = make_ca(args.days)?;
            write(&ca_key, &ca.key_pem, true, false)?;
            write(&ca_cert, &ca.cert_pem, false, false)?;
            println!("made the job CA: {}", ca_cert.display());
            ca.key_pem
        }
        _ => bail!(
            "{} has only one of ca.pem and ca.key: remove it or restore the other",
            args.out.display()
        ),
    };
    for names in &hosts {
        let stem = stem(&names[0]);
        let (cert, key) = (
            args.out.join(format!("{stem}.pem")),
            args.out.join(format!("{stem}.key")),
        );
        if !args.force {
            for path in [&cert, &key] {
                if path.exists() {
                    bail!(
                        "{} already exists: pass --force to replace it",
                        path.display()
                    );
                }
            }
        }
        let made = make_host(&ca_key_pem, names, args.days)
            .with_context(|| format!("the certificate for {}", names.join(",")))?;
        write(&key, &made.key_pem, true, args.force)?;
        write(&cert, &made.cert_pem, false, args.force)?;
        println!(
            "{}: {} and {}",
            names.join(","),
            cert.display(),
            key.display()
        );
    }
    Ok(())
}
