//! Learning-rate schedules.

use crate::error::{LearnerError, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// How the learning rate moves with the optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Linear warm-up from 0 over `warmup_steps` updates, then constant (0: constant).
    WarmupConstant {
        /// Updates the ramp lasts.
        warmup_steps: u64,
    },
    /// Linear warm-up from 0, then cosine decay from the base rate to `min_lr`, reached at
    /// update `total_steps` and held after it.
    Cosine {
        /// Updates the ramp lasts.
        warmup_steps: u64,
        /// The update at which the decay reaches `min_lr`.
        total_steps: u64,
        /// The final learning rate.
        min_lr: f64,
    },
}

impl Default for LrSchedule {
    /// A constant learning rate.
    fn default() -> Self {
        LrSchedule::WarmupConstant { warmup_steps: 0 }
    }
}

impl LrSchedule {
    /// Checks the schedule against the base learning rate; the error names the field.
    pub fn validate(&self, base_lr: f64) -> Result<()> {
        if let LrSchedule::Cosine {
            warmup_steps,
            total_steps,
            min_lr,
        } = *self
        {
            if total_steps <= warmup_steps {
                return Err(LearnerError::config(
                    "total_steps",
                    format!("must exceed warmup_steps ({warmup_steps})"),
                ));
            }
            if !(min_lr.is_finite() && (0.0..=base_lr).contains(&min_lr)) {
                return Err(LearnerError::config(
                    "min_lr",
                    format!("must be in [0, lr = {base_lr}]"),
                ));
            }
        }
        Ok(())
    }

    /// The learning rate of update number `step` (1 for the first update): during warm-up
    /// `base_lr · step / warmup_steps`, so the ramp starts from 0 and the first update
    /// already moves the weights.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        let (warmup, decay) = match *self {
            LrSchedule::WarmupConstant { warmup_steps } => (warmup_steps, None),
            LrSchedule::Cosine {
                warmup_steps,
                total_steps,
                min_lr,
            } => (warmup_steps, Some((total_steps, min_lr))),
        };
        if step < warmup {
            return base_lr * step as f64 / warmup as f64;
        }
        match decay {
            None => base_lr,
            Some((total, min_lr)) => {
                let progress = ((step - warmup) as f64 / (total - warmup) as f64).min(1.0);
                min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn warmup_then_constant() {
        let s = LrSchedule::WarmupConstant { warmup_steps: 4 };
        let lrs: Vec<f64> = (1..=6).map(|k| s.lr(1.0, k)).collect();
        assert_eq!(lrs, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        close(LrSchedule::default().lr(3e-6, 1), 3e-6);
    }

    #[test]
    fn cosine_decays_to_min_lr() {
        let s = LrSchedule::Cosine {
            warmup_steps: 2,
            total_steps: 12,
            min_lr: 0.1,
        };
        close(s.lr(1.0, 1), 0.5);
        close(s.lr(1.0, 2), 1.0);
        close(s.lr(1.0, 7), 0.55);
        close(s.lr(1.0, 12), 0.1);
        close(s.lr(1.0, 100), 0.1);
        let mut previous = f64::INFINITY;
        for k in 2..=12 {
            let lr = s.lr(1.0, k);
            assert!(lr < previous);
            previous = lr;
        }
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let s = LrSchedule::Cosine {
            warmup_steps: 5,
            total_steps: 5,
            min_lr: 0.0,
        };
        assert!(s
            .validate(1.0)
            .unwrap_err()
            .to_string()
            .contains("total_steps"));
        let s = LrSchedule::Cosine {
            warmup_steps: 0,
            total_steps: 5,
            min_lr: 2.0,
        };
        assert!(s.validate(1.0).unwrap_err().to_string().contains("min_lr"));
    }
}
