//! Child processes of a local launch: started with their logs forwarded under a prefix,
//! tied to the launcher's life (they get SIGTERM if it dies), stopped together on Ctrl-C.

use anyhow::Context;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A started child with its name.
pub struct Process {
    /// The prefix of its log lines.
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `command` with stdout/stderr forwarded line by line under `[name]`. The
    /// child receives SIGTERM if the launcher dies, so no process is left behind.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Self> {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        // SAFETY: prctl is async-signal-safe and only affects the child being created.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        forward(format!("[{name}] "), out, false);
        forward(format!("[{name}] "), err, true);
        Ok(Process {
            name: name.to_owned(),
            child,
            status: None,
        })
    }

    /// The exit status if it has exited.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// The OS process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn signal(&mut self, signal: libc::c_int) {
        if self.poll().is_none() {
            // SAFETY: sending a signal to our own child's pid.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }
}

fn forward(prefix: String, stream: impl Read + Send + 'static, to_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if to_stderr {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "{prefix}{line}");
            }
        }
    });
}

/// Stops every process: SIGTERM, then SIGKILL for any still running after `grace`.
pub fn stop_all(processes: &mut [Process], grace: Duration) {
    for p in processes.iter_mut() {
        p.signal(libc::SIGTERM);
    }
    wait_all(processes, grace);
    for p in processes.iter_mut() {
        if p.poll().is_none() {
            eprintln!(
                "[launcher] {} did not stop in {:?}; killing it",
                p.name, grace
            );
            p.signal(libc::SIGKILL);
            let _ = p.child.wait();
        }
    }
}

/// Waits up to `limit` for every process to exit; returns whether they all did.
pub fn wait_all(processes: &mut [Process], limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if processes.iter_mut().all(|p| p.poll().is_some()) {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
