//! The leases an actor is working on: each with the deadline the learner last gave it.
//! Heartbeats name them so the learner renews them (a long generation does not outlive
//! its lease); a lease the learner says is lost is dropped, and its group is not
//! delivered.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Leases being generated or delivered, by lease id, with their deadlines (Unix ms).
#[derive(Debug, Default)]
pub struct HeldLeases {
    deadlines: Mutex<HashMap<u64, u64>>,
}

impl HeldLeases {
    /// Starts holding lease `lease_id`, due at `deadline_unix_ms`.
    pub fn take(&self, lease_id: u64, deadline_unix_ms: u64) {
        self.lock().insert(lease_id, deadline_unix_ms);
    }

    /// Stops holding `lease_id` (its group was delivered, refused or given back).
    pub fn done(&self, lease_id: u64) {
        self.lock().remove(&lease_id);
    }

    /// Every held lease id, in order.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Takes a heartbeat's answer for the leases `sent` with it: those `lost` are dropped,
    /// the others (still held) are due at `deadline_unix_ms` (when it is not 0).
    pub fn renewed(&self, sent: &[u64], lost: &[u64], deadline_unix_ms: u64) {
        let mut held = self.lock();
        for id in lost {
            held.remove(id);
        }
        if deadline_unix_ms == 0 {
            return;
        }
        for id in sent {
            if let Some(deadline) = held.get_mut(id) {
                *deadline = (*deadline).max(deadline_unix_ms);
            }
        }
    }

    /// Whether `lease_id` is still held and not past its deadline.
    pub fn is_live(&self, lease_id: u64) -> bool {
        self.lock()
            .get(&lease_id)
            .is_some_and(|&deadline| now_unix_ms() <= deadline)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.deadlines
            .lock()
            .expect("no code panics while holding it")
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_extends_held_leases_and_drops_lost_ones() {
        let held = HeldLeases::default();
        let now = now_unix_ms();
        held.take(1, now - 1);
        held.take(2, now + 60_000);
        held.take(3, now + 60_000);
        assert!(!held.is_live(1), "past its deadline");
        assert!(held.is_live(2));
        assert_eq!(held.ids(), [1, 2, 3]);
        held.renewed(&[1, 2], &[2], now + 120_000);
        assert!(held.is_live(1), "renewed");
        assert!(!held.is_live(2), "lost");
        assert_eq!(held.ids(), [1, 3]);
        held.renewed(&[1], &[], 0);
        assert!(held.is_live(1));
        held.done(1);
        assert!(!held.is_live(1));
        assert_eq!(held.ids(), [3]);
    }
}
