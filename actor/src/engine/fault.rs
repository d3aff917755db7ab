//! Fault injection for tests of how actors survive a broken engine: with
//! `QUILL_FAULT_ENGINE_FAILS_AFTER=N` in its environment, the engine prefills the first `N`
//! groups and fails every later one, as an engine on a broken device would. Unset (always,
//! outside such tests), it changes nothing.

/// The environment variable that turns the fault on.
pub const FAILS_AFTER_VAR: &str = "QUILL_FAULT_ENGINE_FAILS_AFTER";

/// The injected fault, if any, and how many groups were prefilled so far.
#[derive(Debug, Default)]
pub(super) struct Faults {
    fails_after: Option<u64>,
    prefilled: u64,
}

impl Faults {
    /// The fault the environment asks for (none when the variable is unset; a value that
    /// is not a count is reported and ignored).
    pub(super) fn from_env() -> Self {
        let fails_after =
            std::env::var(FAILS_AFTER_VAR)
                .ok()
                .and_then(|value| match value.parse() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        tracing::error!("{FAILS_AFTER_VAR}={value:?} is not a count; ignored");
                        None
                    }
                });
        Faults {
            fails_after,
            prefilled: 0,
        }
    }

    /// Called before each group's prefill: the injected failure, once it is due.
    pub(super) fn before_prefill(&mut self) -> Result<(), quill_model::Error> {
        if self.fails_after.is_some_and(|n| self.prefilled >= n) {
            return Err(quill_model::Error::Device(format!(
                "injected fault ({FAILS_AFTER_VAR}): the engine fails after {} groups",
                self.prefilled
            )));
        }
        self.prefilled += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_comes_after_the_given_number_of_groups() {
        let mut faults = Faults {
            fails_after: Some(2),
            prefilled: 0,
        };
        assert!(faults.before_prefill().is_ok());
        assert!(faults.before_prefill().is_ok());
        let err = faults.before_prefill().unwrap_err().to_string();
        assert!(
            err.contains("injected fault") && err.contains("after 2 groups"),
            "{err}"
        );
        assert!(faults.before_prefill().is_err(), "and every group after");
        let mut none = Faults::default();
        for _ in 0..100 {
            assert!(none.before_prefill().is_ok());
        }
    }
}
