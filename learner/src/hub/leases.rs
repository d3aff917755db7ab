//! Prompt leases: every prompt group handed to an actor has a lease id and a deadline.
//! Expired leases put their prompt back in line for another actor; a group is ingested at
//! most once per lease, and a late answer to an expired lease is refused, so each leased
//! prompt is trained exactly once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Why a lease cannot be completed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No such lease was ever issued, or it expired and its prompt went to someone else.
    #[error("lease {0} is unknown or has expired")]
    Unknown(u64),
    /// This lease's group was already ingested.
    #[error("lease {0} was already ingested")]
    Duplicate(u64),
}

/// One outstanding lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The prompt it covers.
    pub prompt_id: u64,
    /// The member holding it.
    pub member: String,
    /// When it expires.
    pub deadline: Instant,
}

/// The lease book.
#[derive(Debug, Default)]
pub struct Ledger {
    next_id: u64,
    active: HashMap<u64, Lease>,
    ingested: HashSet<u64>,
    reissue: VecDeque<u64>,
    expired: u64,
}

impl Ledger {
    /// An empty ledger whose lease ids start after `first_id`.
    pub fn starting_at(first_id: u64) -> Self {
        Ledger {
            next_id: first_id,
            ..Ledger::default()
        }
    }

    /// Moves every overdue lease's prompt to the re-issue queue.
    pub fn expire(&mut self, now: Instant) {
        let overdue: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in overdue {
            let lease = self.active.remove(&id).expect("listed above");
            self.reissue.push_back(lease.prompt_id);
            self.expired += 1;
        }
    }

    /// Drops every lease a departed member held, putting its prompts back in line.
    pub fn release_member(&mut self, member: &str) {
        let held: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, lease)| lease.member == member)
            .map(|(&id, _)| id)
            .collect();
        for id in held {
            let lease = self.active.remove(&id).expect("listed above");
            self.reissue.push_back(lease.prompt_id);
        }
    }

    /// A prompt waiting to be re-issued, if any.
    pub fn take_reissue(&mut self) -> Option<u64> {
        self.reissue.pop_front()
    }

    /// Records a new lease of `prompt_id` to `member` and returns its id.
    pub fn issue(&mut self, prompt_id: u64, member: &str, ttl: Duration, now: Instant) -> u64 {
        self.next_id += 1;
        self.active.insert(
            self.next_id,
            Lease {
                prompt_id,
                member: member.to_owned(),
                deadline: now + ttl,
            },
        );
        self.next_id
    }

    /// The active lease with this id.
    pub fn get(&self, lease_id: u64) -> Result<&Lease, LeaseError> {
        if self.ingested.contains(&lease_id) {
            return Err(LeaseError::Duplicate(lease_id));
        }
        self.active
            .get(&lease_id)
            .ok_or(LeaseError::Unknown(lease_id))
    }

    /// Marks a lease's group as ingested and returns its prompt id.
    pub fn complete(&mut self, lease_id: u64) -> Result<u64, LeaseError> {
        self.get(lease_id)?;
        let lease = self.active.remove(&lease_id).expect("checked");
        self.ingested.insert(lease_id);
        Ok(lease.prompt_id)
    }

    /// Prompts that are leased or waiting for re-issue: what a checkpoint must keep so
    /// that a resumed job still trains them.
    pub fn outstanding_prompts(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.reissue.iter().copied().collect();
        out.extend(self.active.values().map(|l| l.prompt_id));
        out
    }

    /// Queues prompts for (re-)issue, e.g. the outstanding prompts of a checkpoint.
    pub fn requeue(&mut self, prompts: impl IntoIterator<Item = u64>) {
        self.reissue.extend(prompts);
    }

    /// The highest lease id issued so far.
    pub fn last_id(&self) -> u64 {
        self.next_id
    }

    /// Leases currently out.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Leases that expired so far.
    pub fn expired_count(&self) -> u64 {
        self.expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_lease_completes_once() {
        let mut ledger = Ledger::default();
        let now = Instant::now();
        let id = ledger.issue(5, "a", TTL, now);
        assert_eq!(ledger.complete(id), Ok(5));
        assert_eq!(ledger.complete(id), Err(LeaseError::Duplicate(id)));
        assert_eq!(ledger.complete(999), Err(LeaseError::Unknown(999)));
    }

    #[test]
    fn expired_leases_are_reissued_and_late_answers_refused() {
        let mut ledger = Ledger::default();
        let now = Instant::now();
        let old = ledger.issue(3, "a", TTL, now);
        let kept = ledger.issue(4, "b", TTL * 3, now);
        ledger.expire(now + TTL * 2);
        assert_eq!(ledger.take_reissue(), Some(3));
        assert_eq!(ledger.take_reissue(), None);
        assert_eq!(ledger.expired_count(), 1);
        assert_eq!(ledger.complete(old), Err(LeaseError::Unknown(old)));
        assert_eq!(ledger.complete(kept), Ok(4));
    }

    #[test]
    fn a_departed_member_gives_its_prompts_back() {
        let mut ledger = Ledger::starting_at(100);
        let now = Instant::now();
        let a = ledger.issue(1, "a", TTL, now);
        ledger.issue(2, "b", TTL, now);
        ledger.issue(3, "a", TTL, now);
        assert!(a > 100);
        ledger.release_member("a");
        let mut back = vec![
            ledger.take_reissue().unwrap(),
            ledger.take_reissue().unwrap(),
        ];
        back.sort_unstable();
        assert_eq!(back, vec![1, 3]);
        assert_eq!(ledger.active_count(), 1);
        ledger.requeue([9]);
        let mut outstanding = ledger.outstanding_prompts();
        outstanding.sort_unstable();
        assert_eq!(outstanding, vec![2, 9]);
    }
}
