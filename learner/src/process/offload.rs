//! Work taken off the step's critical path: an [`Offload`] is a thread that does jobs in
//! the order they are handed over (publishing weights, writing checkpoints) while the
//! trainer goes on. The first failure stops it and is returned by the next hand-over or
//! by [`Offload::finish`].

use crate::process::error::RunError;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// A thread doing jobs of type `T` in order.
pub struct Offload<T: Send + 'static> {
    jobs: Option<mpsc::Sender<T>>,
    thread: Option<JoinHandle<Result<(), RunError>>>,
}

impl<T: Send + 'static> Offload<T> {
    /// Starts the thread `name`, which runs `work` on every job handed over.
    pub fn spawn(
        name: &str,
        mut work: impl FnMut(T) -> Result<(), RunError> + Send + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<T>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || rx.into_iter().try_for_each(&mut work))
            .expect("spawning a thread");
        Offload {
            jobs: Some(tx),
            thread: Some(thread),
        }
    }

    /// Hands `job` over; an error if an earlier job failed (that job's error).
    pub fn send(&mut self, job: T) -> Result<(), RunError> {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        self.finish()?;
        Err(RunError::Offload("the thread had already stopped".into()))
    }

    /// Waits until every job handed over is done; the first failure, if any.
    pub fn finish(&mut self) -> Result<(), RunError> {
        self.jobs = None;
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(RunError::Offload("the thread panicked".into())),
        }
    }
}

impl<T: Send + 'static> Drop for Offload<T> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn jobs_run_in_order_and_a_failure_reaches_the_caller() {
        let done = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&done);
        let mut offload = Offload::spawn("test", move |n: u32| {
            if n == 3 {
                return Err(RunError::Offload(format!("job {n} failed")));
            }
            seen.lock().unwrap().push(n);
            Ok(())
        });
        for n in 0..4 {
            offload.send(n).unwrap();
        }
        let err = offload.finish().unwrap_err();
        assert_eq!(err.to_string(), "background work: job 3 failed");
        assert_eq!(
            *done.lock().unwrap(),
            vec![0, 1, 2],
            "nothing after the failure"
        );
        let late = offload.send(5).unwrap_err();
        assert_eq!(
            late.to_string(),
            "background work: the thread had already stopped"
        );
    }
}
