//! Prompt leases: every prompt group handed to an actor has a lease id and a deadline.
//! Expired leases put their prompt back in line for another actor; a group is ingested at
//! most once per lease, and a late answer to an expired lease is refused, so each leased
//! prompt is trained exactly once.
//!
//! [`Ledger`] is the lease book; [`Leases`] puts it, the [`Admission`] state, the dataset
//! and the prompts' token cache under one lock, and `Hub::lease` hands prompts out:
//! leases are issued under the lock, as many as admission allows, prompts are encoded
//! outside it, and their tokens are cached before the reply goes out (an encoding failure
//! leaves the leases to expire, so no prompt is lost). A group stays in the pipeline from
//! its lease until the trainer retires it (trained, or dropped at training).

use super::admission::{Admission, Pipeline};
use super::ingest::Refusal;
use super::Hub;
use crate::data::{Cursor, Dataset, Prompt, PromptText};
use parking_lot::Mutex;
use quill_proto::status::Rejection;
use quill_proto::{
    LeaseReply, LeaseRequest, PromptLease, ReleaseReply, ReleaseRequest, Role, RolloutGroup,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Status;

/// Most prompt groups one lease call hands out.
const MAX_LEASE_BATCH: u32 = 64;

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
    /// The policy version the member ran when it took the lease: its group's samples
    /// start at this version or a later one.
    pub version: u64,
    /// When it expires.
    pub deadline: Instant,
    /// The latest its deadline may be renewed to (`cluster.max_lease_seconds` after it
    /// was issued), so a holder that never delivers cannot keep a prompt forever.
    pub last_chance: Option<Instant>,
    /// Whether the batcher keeps a slot for its group in the batch that is its last
    /// chance (cleared once a submission under it was refused).
    pub reserved: bool,
}

/// The lease book.
#[derive(Debug, Default)]
pub struct Ledger {
    next_id: u64,
    active: HashMap<u64, Lease>,
    ingested: HashSet<u64>,
    reissue: VecDeque<u64>,
    expired: u64,
    released: u64,
    queued: usize,
    untrained: HashMap<u64, Untrained>,
    max_life: Option<Duration>,
    strikes: HashMap<String, u32>,
}

/// An ingested group the trainer has not used up yet.
#[derive(Debug, Clone, Copy)]
struct Untrained {
    prompt_id: u64,
    /// Its lease's version.
    version: u64,
    /// Whether the batcher has taken it off the ingest queue.
    claimed: bool,
}

impl Ledger {
    /// An empty ledger whose lease ids start after `first_id`.
    pub fn starting_at(first_id: u64) -> Self {
        Ledger {
            next_id: first_id,
            ..Ledger::default()
        }
    }

    /// Caps how long any lease may be renewed to, counted from when it was issued.
    pub fn with_max_life(mut self, max_life: Duration) -> Self {
        self.max_life = Some(max_life);
        self
    }

    /// Moves every overdue lease's prompt to the re-issue queue, and counts a strike
    /// against its holder.
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
            *self.strikes.entry(lease.member).or_default() += 1;
        }
    }

    /// Leases `member` let expire since it last delivered a group.
    pub fn strikes(&self, member: &str) -> u32 {
        self.strikes.get(member).copied().unwrap_or(0)
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
        self.strikes.remove(member);
    }

    /// A prompt waiting to be re-issued, if any.
    pub fn take_reissue(&mut self) -> Option<u64> {
        self.reissue.pop_front()
    }

    /// Records a new lease of `prompt_id` to `member`, running policy `version`, and
    /// returns its id.
    pub fn issue(
        &mut self,
        prompt_id: u64,
        member: &str,
        version: u64,
        ttl: Duration,
        now: Instant,
    ) -> u64 {
        self.next_id += 1;
        self.active.insert(
            self.next_id,
            Lease {
                prompt_id,
                member: member.to_owned(),
                version,
                deadline: now + ttl,
                last_chance: self.max_life.map(|life| now + life.max(ttl)),
                reserved: true,
            },
        );
        self.next_id
    }

    /// Stops keeping a batch slot for this lease's group, and ends the lease at `until`
    /// if it would run longer: a submission under it was refused, so its group may never
    /// come; the lease stays open that long for a corrected one.
    pub fn unreserve(&mut self, lease_id: u64, until: Instant) {
        if let Some(lease) = self.active.get_mut(&lease_id) {
            lease.reserved = false;
            lease.deadline = lease.deadline.min(until);
        }
    }

    /// Extends to `until` (no later than their last chance) the leases among `lease_ids`
    /// that `member` holds and that still keep a batch slot; returns those among
    /// `lease_ids` it no longer holds.
    pub fn renew(&mut self, member: &str, lease_ids: &[u64], until: Instant) -> Vec<u64> {
        let mut lost = Vec::new();
        for id in lease_ids {
            match self.active.get_mut(id) {
                Some(lease) if lease.member == member => {
                    if lease.reserved {
                        let until = lease.last_chance.map_or(until, |last| until.min(last));
                        lease.deadline = lease.deadline.max(until);
                    }
                }
                _ if self.ingested.contains(id) => {}
                _ => lost.push(*id),
            }
        }
        lost
    }

    /// Ends the leases among `lease_ids` that `member` holds and puts their prompts at
    /// the front of the line; returns how many it held.
    pub fn release(&mut self, member: &str, lease_ids: &[u64]) -> usize {
        let mut released = 0;
        for id in lease_ids {
            if self.active.get(id).is_some_and(|l| l.member == member) {
                let lease = self.active.remove(id).expect("checked");
                self.reissue.push_front(lease.prompt_id);
                released += 1;
            }
        }
        self.released += released as u64;
        released
    }

    /// Leases released by their holders so far.
    pub fn released_count(&self) -> u64 {
        self.released
    }

    /// Ends an active lease whose group can never be accepted and puts its prompt back
    /// in line at once; `false` when no such lease is active.
    pub fn abandon(&mut self, lease_id: u64) -> bool {
        let Some(lease) = self.active.remove(&lease_id) else {
            return false;
        };
        self.reissue.push_back(lease.prompt_id);
        true
    }

    /// Notes that the batcher has taken this lease's ingested group off the queue.
    pub fn claim(&mut self, lease_id: u64) {
        if let Some(group) = self.untrained.get_mut(&lease_id) {
            group.claimed = true;
        }
    }

    /// Groups the batcher has not taken yet (leased, or ingested and still queued) whose
    /// lease version is `at - max_staleness`: trained at version `at` they are at their
    /// staleness bound, so the batch trained at `at` is their last chance.
    pub fn due(&self, at: u64, max_staleness: u64) -> usize {
        let due = |version: u64| version + max_staleness == at;
        self.active
            .values()
            .filter(|lease| lease.reserved && due(lease.version))
            .count()
            + self
                .untrained
                .values()
                .filter(|g| !g.claimed && due(g.version))
                .count()
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

    /// Marks a lease's group as ingested (queued for the trainer until [`Self::retire`])
    /// and returns its prompt id.
    pub fn complete(&mut self, lease_id: u64) -> Result<u64, LeaseError> {
        self.get(lease_id)?;
        let lease = self.active.remove(&lease_id).expect("checked");
        self.strikes.remove(&lease.member);
        self.ingested.insert(lease_id);
        self.untrained.insert(
            lease_id,
            Untrained {
                prompt_id: lease.prompt_id,
                version: lease.version,
                claimed: false,
            },
        );
        self.queued += 1;
        Ok(lease.prompt_id)
    }

    /// Takes `groups` ingested groups out of the pipeline: the trainer trained or
    /// dropped them.
    pub fn retire(&mut self, groups: usize) {
        self.queued = self.queued.saturating_sub(groups);
    }

    /// Groups leased, or ingested and not yet retired.
    pub fn in_pipeline(&self) -> usize {
        self.active.len() + self.queued
    }

    /// How many leases each member holds (members holding none are absent).
    pub fn holdings(&self) -> HashMap<&str, usize> {
        let mut held = HashMap::new();
        for lease in self.active.values() {
            *held.entry(lease.member.as_str()).or_default() += 1;
        }
        held
    }

    /// Prompts that are leased or waiting for re-issue.
    pub fn outstanding_prompts(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.reissue.iter().copied().collect();
        out.extend(self.active.values().map(|l| l.prompt_id));
        out
    }

    /// Prompts a checkpoint must keep so that a resumed job still trains them: those
    /// outstanding and those whose groups were ingested but not yet trained.
    pub fn untrained_prompts(&self) -> Vec<u64> {
        let mut out = self.outstanding_prompts();
        out.extend(self.untrained.values().map(|g| g.prompt_id));
        out
    }

    /// Notes that these leases' ingested groups were used up: trained, or dropped with
    /// nothing to teach.
    pub fn consumed(&mut self, lease_ids: &[u64]) {
        for lease_id in lease_ids {
            self.untrained.remove(lease_id);
        }
    }

    /// Puts the prompt of an ingested group that was dropped untrained (too stale by the
    /// time it could be trained) back in line.
    pub fn requeue_untrained(&mut self, lease_id: u64) {
        if let Some(group) = self.untrained.remove(&lease_id) {
            self.reissue.push_back(group.prompt_id);
        }
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

/// The lease book, admission, the dataset and the prompts' tokens: one consistent piece
/// of state.
struct Book {
    dataset: Dataset,
    ledger: Ledger,
    admission: Admission,
    prompt_tokens: HashMap<u64, Vec<i64>>,
    data_exhausted: bool,
}

/// A request for leases as admission sees it.
#[derive(Debug, Clone, Copy)]
struct Ask {
    /// Leases wanted.
    count: usize,
    /// The policy version the asking actor runs.
    version: u64,
    /// Versions the asking actor is behind.
    lag: u64,
    /// Live actors sharing the room.
    actors: usize,
    /// Most leases one member may hold (`cluster.leases_per_actor`).
    cap: usize,
}

impl Ask {
    /// Leases a member may let expire in a row, without delivering a group, before it
    /// gets no more: two full rounds of its cap.
    fn strike_limit(&self) -> u32 {
        u32::try_from(self.cap.saturating_mul(2)).unwrap_or(u32::MAX)
    }
}

/// One prompt handed out: its lease, the prompt, and its tokens when already encoded.
struct Issued {
    lease_id: u64,
    prompt: Prompt,
    tokens: Option<Vec<i64>>,
}

/// The prompts and their leases, under one lock, and the secret lease keys derive from.
pub struct Leases {
    book: Mutex<Book>,
    key_secret: [u8; 32],
}

impl Leases {
    /// Leases over `dataset`, continuing `ledger` (a fresh one or a checkpoint's), under
    /// `admission`.
    pub fn new(dataset: Dataset, ledger: Ledger, admission: Admission) -> Self {
        Leases {
            book: Mutex::new(Book {
                dataset,
                ledger,
                admission,
                prompt_tokens: HashMap::new(),
                data_exhausted: false,
            }),
            key_secret: rand::random(),
        }
    }

    /// The key of lease `lease_id`: an HMAC of its id under this learner's secret, given
    /// only to the actor the lease is issued to, which must send it back with the group.
    pub fn key(&self, lease_id: u64) -> u64 {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.key_secret)
            .expect("HMAC takes a key of any length");
        mac.update(&lease_id.to_le_bytes());
        let tag = mac.finalize().into_bytes();
        u64::from_le_bytes(tag[..8].try_into().expect("8 of 32 bytes"))
    }

    /// Issues up to `ask.count` leases to `member` (expired ones' prompts first, then new
    /// prompts): as many as admission allows, fewer when the data runs out; none, with
    /// `FAILED_PRECONDITION`, to a member that let too many leases expire undelivered.
    fn issue(
        &self,
        member: &str,
        ask: Ask,
        ttl: Duration,
        now: Instant,
    ) -> Result<Vec<Issued>, Status> {
        let mut guard = self.book.lock();
        let book = &mut *guard;
        book.ledger.expire(now);
        let strikes = book.ledger.strikes(member);
        if strikes >= ask.strike_limit() {
            return Err(Status::failed_precondition(format!(
                "member {member} let {strikes} leases expire in a row without delivering a \
                 group, so it gets no more (a generation must finish within \
                 cluster.max_lease_seconds; register again to start over)"
            )));
        }
        let holdings = book.ledger.holdings();
        let held = |m: &str| holdings.get(m).copied().unwrap_or(0);
        let pipeline = Pipeline {
            outstanding: book.ledger.in_pipeline(),
            held: held(member),
            actors: ask.actors,
        };
        let want = ask.count.min(ask.cap.saturating_sub(pipeline.held));
        let count = book
            .admission
            .grant(member, want, ask.lag, pipeline, held, now);
        let mut issued = Vec::new();
        for _ in 0..count {
            let prompt = match book.ledger.take_reissue() {
                Some(id) => book.dataset.get(id).cloned(),
                None => book.dataset.next_prompt(),
            };
            let Some(prompt) = prompt else {
                book.data_exhausted = true;
                break;
            };
            issued.push(Issued {
                lease_id: book.ledger.issue(prompt.id, member, ask.version, ttl, now),
                tokens: book.prompt_tokens.get(&prompt.id).cloned(),
                prompt,
            });
        }
        Ok(issued)
    }

    /// Caches a prompt's tokens (what its groups must carry).
    fn remember(&self, prompt_id: u64, tokens: Vec<i64>) {
        self.book.lock().prompt_tokens.insert(prompt_id, tokens);
    }

    /// Puts the prompts of every lease the given members hold back in line.
    pub fn release_members(&self, members: &[String]) {
        let mut book = self.book.lock();
        for member in members {
            book.ledger.release_member(member);
            book.admission.forget(member);
        }
    }

    /// Takes `groups` ingested groups out of the pipeline (trained or dropped).
    pub fn retire(&self, groups: usize) {
        self.book.lock().ledger.retire(groups);
    }

    /// Groups leased, or ingested and not yet retired.
    #[cfg(test)]
    pub(super) fn in_pipeline(&self) -> usize {
        self.book.lock().ledger.in_pipeline()
    }

    /// Whether every prompt has been served, no lease is out and the batcher has taken
    /// every ingested group.
    pub fn data_done(&self) -> bool {
        let book = self.book.lock();
        book.data_exhausted
            && book.ledger.outstanding_prompts().is_empty()
            && book.ledger.untrained.values().all(|g| g.claimed)
    }

    /// The dataset cursor, the prompts not yet trained (leased, waiting for re-issue, or
    /// ingested and untrained), and the last lease id.
    pub fn data_state(&self) -> (Cursor, Vec<u64>, u64) {
        let book = self.book.lock();
        (
            book.dataset.cursor(),
            book.ledger.untrained_prompts(),
            book.ledger.last_id(),
        )
    }

    /// See [`Ledger::consumed`].
    pub fn consumed(&self, lease_ids: &[u64]) {
        self.book.lock().ledger.consumed(lease_ids);
    }

    /// See [`Ledger::requeue_untrained`].
    pub fn requeue_untrained(&self, lease_id: u64) {
        self.book.lock().ledger.requeue_untrained(lease_id);
    }

    /// Leases out now, leases expired so far and leases their holders released.
    pub fn counts(&self) -> (usize, u64, u64) {
        let book = self.book.lock();
        (
            book.ledger.active_count(),
            book.ledger.expired_count(),
            book.ledger.released_count(),
        )
    }

    /// See [`Ledger::renew`]: the renewed leases last `ttl` from now.
    pub fn renew(&self, member: &str, lease_ids: &[u64], ttl: Duration) -> Vec<u64> {
        let until = Instant::now() + ttl;
        self.book.lock().ledger.renew(member, lease_ids, until)
    }

    /// See [`Ledger::renew`].
    #[cfg(test)]
    fn renew_until(&self, member: &str, lease_ids: &[u64], until: Instant) -> Vec<u64> {
        self.book.lock().ledger.renew(member, lease_ids, until)
    }

    /// See [`Ledger::release`].
    pub fn release(&self, member: &str, lease_ids: &[u64]) -> usize {
        self.book.lock().ledger.release(member, lease_ids)
    }

    /// Checks that the group's lease is active, that the group carries the lease's key,
    /// and that it is for the group's prompt: the same prompt id, prompt tokens and target
    /// range as leased.
    pub fn check(&self, rollout: &RolloutGroup) -> Result<(), Refusal> {
        let lease_id = rollout.lease_id;
        let prompt_id = rollout.prompt_id;
        let book = self.book.lock();
        let lease = book.ledger.get(lease_id).map_err(|e| match e {
            LeaseError::Duplicate(_) => Refusal::new(Rejection::Duplicate, e.to_string()),
            LeaseError::Unknown(_) => Refusal::new(Rejection::UnknownLease, e.to_string()),
        })?;
        if rollout.lease_key != self.key(lease_id) {
            return Err(Refusal::new(
                Rejection::WrongLeaseKey,
                format!(
                    "lease {lease_id}: the group does not carry the lease's key (only the \
                     actor the lease was issued to can answer it)"
                ),
            ));
        }
        let malformed = |message: String| Err(Refusal::new(Rejection::Malformed, message));
        if lease.prompt_id != prompt_id {
            return malformed(format!(
                "lease {lease_id} is for prompt {}, not {prompt_id}",
                lease.prompt_id
            ));
        }
        if book.prompt_tokens.get(&prompt_id) != Some(&rollout.prompt_tokens) {
            return malformed(format!(
                "lease {lease_id}: the prompt tokens differ from the leased prompt"
            ));
        }
        if let Some(prompt) = book.dataset.get(prompt_id) {
            let (lo, hi) = (prompt.range.lo(), prompt.range.hi());
            if (rollout.length_lo, rollout.length_hi) != (lo, hi) {
                return malformed(format!(
                    "lease {lease_id}: target range {}..{} words, the leased prompt's is \
                     {lo}..{hi}",
                    rollout.length_lo, rollout.length_hi
                ));
            }
        }
        Ok(())
    }

    /// Marks a lease's group as ingested and returns its prompt id.
    pub fn complete(&self, lease_id: u64) -> Result<u64, LeaseError> {
        self.book.lock().ledger.complete(lease_id)
    }

    /// See [`Ledger::unreserve`]: the lease stays open for `grace` at most.
    pub fn unreserve(&self, lease_id: u64, grace: Duration) {
        let until = Instant::now() + grace;
        self.book.lock().ledger.unreserve(lease_id, until);
    }

    /// See [`Ledger::abandon`].
    pub fn abandon(&self, lease_id: u64) -> bool {
        self.book.lock().ledger.abandon(lease_id)
    }

    /// Notes that the batcher took these leases' groups off the queue, then counts the
    /// groups still to come whose last chance is the batch trained at `at`
    /// ([`Ledger::due`]), under one lock.
    pub fn claim_and_count_due(&self, claimed: &[u64], at: u64, max_staleness: u64) -> usize {
        let mut book = self.book.lock();
        for &lease_id in claimed {
            book.ledger.claim(lease_id);
        }
        book.ledger.due(at, max_staleness)
    }

    /// Holds the book's lock and panics, as a failing handler would.
    #[cfg(test)]
    pub(super) fn hold_and_panic(&self) {
        let _held = self.book.lock();
        panic!("a handler panicked while holding the lease book");
    }
}

impl Hub {
    /// Answers a `Lease` call as [`Hub::lease`] does, but when the pipeline has no room
    /// for the member it waits up to `patience` for room to free (a step retiring its
    /// groups, a new version, a member leaving) before answering with no leases. A member
    /// behind the newest version is answered at once, so that it fetches the weights
    /// that admission waits for.
    pub async fn lease_or_wait(
        &self,
        req: LeaseRequest,
        patience: Duration,
    ) -> Result<LeaseReply, Status> {
        let until = tokio::time::Instant::now() + patience;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let reply = self.lease(req.clone())?;
            // A member told to wait for weights is behind the newest version too.
            let empty =
                reply.leases.is_empty() && !reply.finished && reply.latest_version <= req.version;
            if !empty || tokio::time::timeout_at(until, room).await.is_err() {
                return Ok(reply);
            }
        }
    }

    /// Answers a `Lease` call: nothing once the job is over, "wait for weights" to an
    /// actor more than `max_staleness` versions behind, else up to `max_groups` prompts
    /// (at most [`MAX_LEASE_BATCH`]) as admission allows, each with its tokens, group
    /// size and seed.
    pub fn lease(&self, req: LeaseRequest) -> Result<LeaseReply, Status> {
        let current = self.version();
        self.members.check_role(&req.member_id, Role::Actor)?;
        if self.is_finished() {
            return Ok(LeaseReply {
                finished: true,
                latest_version: current,
                ..LeaseReply::default()
            });
        }
        if req.version + self.job.grpo.max_staleness < current {
            return Ok(LeaseReply {
                wait_for_weights: true,
                latest_version: current,
                ..LeaseReply::default()
            });
        }
        let ttl = Duration::from_secs(self.job.cluster.lease_seconds);
        let deadline = unix_ms(SystemTime::now() + ttl);
        let ask = Ask {
            count: req.max_groups.min(MAX_LEASE_BATCH) as usize,
            version: req.version,
            lag: current.saturating_sub(req.version),
            actors: self.members.live_actors().max(1),
            cap: self.job.cluster.leases_per_actor,
        };
        let issued = self
            .leases
            .issue(&req.member_id, ask, ttl, Instant::now())?;
        let mut leases = Vec::with_capacity(issued.len());
        for Issued {
            lease_id,
            prompt,
            tokens,
        } in issued
        {
            let prompt_tokens = match tokens {
                Some(tokens) => tokens,
                None => {
                    let tokens = self
                        .tokenizer
                        .encode(&self.prompt_text(&prompt))
                        .map_err(|e| Status::internal(e.to_string()))?;
                    self.leases.remember(prompt.id, tokens.clone());
                    tokens
                }
            };
            leases.push(PromptLease {
                lease_id,
                prompt_id: prompt.id,
                question: prompt.as_str().to_owned(),
                prompt_tokens,
                length_lo: prompt.range.lo(),
                length_hi: prompt.range.hi(),
                group_size: self.job.sampling.group_size as u32,
                deadline_unix_ms: deadline,
                seed: self.job.job.seed ^ lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                key: self.leases.key(lease_id),
            });
        }
        Ok(LeaseReply {
            leases,
            latest_version: current,
            ..LeaseReply::default()
        })
    }

    /// Answers a `ReleaseLeases` call: the leases the member holds end now and their
    /// prompts are leased again first.
    pub fn release(&self, req: &ReleaseRequest) -> ReleaseReply {
        let released = self.leases.release(&req.member_id, &req.lease_ids);
        if released > 0 {
            tracing::warn!(member = %req.member_id, released, reason = %req.reason, "leases released");
            self.room.notify_waiters();
        }
        ReleaseReply {
            released: released as u32,
        }
    }

    /// The text a prompt is encoded from: a question in the job's template, or a raw prompt.
    fn prompt_text(&self, prompt: &Prompt) -> String {
        match &prompt.text {
            PromptText::Question(q) => self.job.template.render(q),
            PromptText::Raw(p) => p.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch at `at` (0 before it).
pub(super) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    const TTL: Duration = Duration::from_secs(10);

    /// Admission with room for every test here.
    fn roomy() -> Admission {
        let bound = super::super::admission::Bound {
            batch: 64,
            max_staleness: 1,
        };
        Admission::new(bound, TTL)
    }

    /// A rollout answering lease `lease_id` of `prompt`, with `tokens`.
    fn rollout(lease_id: u64, prompt: &Prompt, tokens: &[i64]) -> RolloutGroup {
        RolloutGroup {
            lease_id,
            prompt_id: prompt.id,
            prompt_tokens: tokens.to_vec(),
            length_lo: prompt.range.lo(),
            length_hi: prompt.range.hi(),
            ..RolloutGroup::default()
        }
    }

    /// A request for `count` leases from the only actor, up to date.
    fn ask(count: usize) -> Ask {
        Ask {
            count,
            version: 0,
            lag: 0,
            actors: 1,
            cap: usize::MAX,
        }
    }

    #[test]
    fn a_lease_completes_once() {
        let mut ledger = Ledger::default();
        let now = Instant::now();
        let id = ledger.issue(5, "a", 0, TTL, now);
        assert_eq!(ledger.complete(id), Ok(5));
        assert_eq!(ledger.complete(id), Err(LeaseError::Duplicate(id)));
        assert_eq!(ledger.complete(999), Err(LeaseError::Unknown(999)));
    }

    #[test]
    fn expired_leases_are_reissued_and_late_answers_refused() {
        let mut ledger = Ledger::default();
        let now = Instant::now();
        let old = ledger.issue(3, "a", 0, TTL, now);
        let kept = ledger.issue(4, "b", 0, TTL * 3, now);
        ledger.expire(now + TTL * 2);
        assert_eq!(ledger.take_reissue(), Some(3));
        assert_eq!(ledger.take_reissue(), None);
        assert_eq!(ledger.expired_count(), 1);
        assert_eq!(ledger.complete(old), Err(LeaseError::Unknown(old)));
        assert_eq!(ledger.complete(kept), Ok(4));
    }

    #[test]
    fn holders_renew_and_release_their_leases() {
        let mut ledger = Ledger::default();
        let now = Instant::now();
        ledger.issue(3, "a", 0, TTL, now);
        let b = ledger.issue(4, "b", 0, TTL, now);
        let gone = ledger.issue(5, "a", 0, TTL, now);
        ledger.expire(now + TTL);
        let mut again: Vec<u64> = std::iter::from_fn(|| ledger.take_reissue()).collect();
        again.sort_unstable();
        assert_eq!(again, [3, 4, 5]);
        // Renewed before the deadline, a lease outlives it; another member's lease is not
        // renewed (nor released), and an expired one is reported lost.
        let a = ledger.issue(3, "a", 0, TTL, now + TTL);
        let b2 = ledger.issue(4, "b", 0, TTL, now + TTL);
        assert_eq!(
            ledger.renew("a", &[a, b2, gone], now + TTL * 3),
            vec![b2, gone]
        );
        ledger.expire(now + TTL * 2 + Duration::from_millis(1));
        assert_eq!(ledger.take_reissue(), Some(4));
        assert_eq!(ledger.active_count(), 1);
        // An unreserved lease (a refused submission) is not extended past its grace.
        ledger.unreserve(a, now + TTL * 2);
        ledger.renew("a", &[a], now + TTL * 9);
        ledger.expire(now + TTL * 2);
        assert_eq!(ledger.take_reissue(), Some(3));
        // Releasing puts prompts first in line; only the holder releases.
        let c = ledger.issue(6, "a", 0, TTL, now);
        let d = ledger.issue(7, "b", 0, TTL, now);
        ledger.requeue([9]);
        assert_eq!(ledger.release("a", &[c, d, b]), 1);
        assert_eq!(ledger.take_reissue(), Some(6));
        assert_eq!(ledger.take_reissue(), Some(9));
        assert_eq!(ledger.released_count(), 1);
    }

    #[test]
    fn a_holder_that_never_delivers_loses_its_leases_and_then_gets_none() {
        let life = TTL * 3;
        let leases = Leases::new(
            Dataset::new(crate::data::default_prompts(), 1, false, 1),
            Ledger::default().with_max_life(life),
            roomy(),
        );
        let hoard = Ask { cap: 2, ..ask(2) };
        let now = Instant::now();
        // Renewed on every heartbeat, a lease still ends `max_life` after it was issued.
        let held = leases.issue("hoarder", hoard, TTL, now).unwrap();
        let ids: Vec<u64> = held.iter().map(|i| i.lease_id).collect();
        let mut at = now;
        while at < now + life {
            assert!(leases.renew_until("hoarder", &ids, at + TTL).is_empty());
            at += TTL / 2;
        }
        let mut hoarded: Vec<u64> = held.iter().map(|i| i.prompt.id).collect();
        let mut reissued: Vec<u64> = leases
            .issue("honest", ask(2), TTL, now + life)
            .unwrap()
            .iter()
            .map(|i| i.prompt.id)
            .collect();
        hoarded.sort_unstable();
        reissued.sort_unstable();
        assert_eq!(
            reissued, hoarded,
            "the hoarded prompts went to another actor"
        );
        // Every lease it lets expire is a strike; at twice its cap it gets no more.
        assert_eq!(
            leases
                .issue("hoarder", hoard, TTL, now + life)
                .unwrap()
                .len(),
            2
        );
        let refused = leases
            .issue("hoarder", hoard, TTL, now + life + TTL)
            .err()
            .expect("a member that never delivers gets no more leases");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("cluster.max_lease_seconds"),
            "{}",
            refused.message()
        );
        // A member that delivers starts over.
        let mut ledger = Ledger::default();
        ledger.issue(1, "a", 0, TTL, now);
        let kept = ledger.issue(2, "a", 0, TTL * 9, now);
        ledger.expire(now + TTL);
        assert_eq!(ledger.strikes("a"), 1);
        ledger.complete(kept).unwrap();
        assert_eq!(ledger.strikes("a"), 0);
    }

    fn leases() -> Leases {
        Leases::new(
            Dataset::new(crate::data::default_prompts(), 1, false, 1),
            Ledger::default(),
            roomy(),
        )
    }

    #[test]
    fn an_expired_lease_is_reissued_before_new_prompts() {
        let leases = leases();
        let now = Instant::now();
        let first = leases.issue("a", ask(2), TTL, now).unwrap();
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|i| i.tokens.is_none()));
        // Both leases expire together; either prompt may come back first.
        leases.remember(first[0].prompt.id, vec![1, 2]);
        leases.remember(first[1].prompt.id, vec![3, 4]);
        let later = leases.issue("b", ask(1), TTL, now + TTL * 2).unwrap();
        let again = first
            .iter()
            .find(|f| f.prompt.id == later[0].prompt.id)
            .expect("an expired prompt is reissued before a new one");
        let tokens = if again.prompt.id == first[0].prompt.id {
            vec![1, 2]
        } else {
            vec![3, 4]
        };
        assert_eq!(later[0].tokens, Some(tokens.clone()));
        assert!(later[0].lease_id > first[1].lease_id);
        assert_eq!(leases.counts(), (1, 2, 0));
        let refusal = leases.check(&rollout(again.lease_id, &again.prompt, &tokens));
        assert_eq!(refusal.unwrap_err().reason, Rejection::UnknownLease);
    }

    #[test]
    fn a_lease_is_checked_against_its_prompt_and_completes_once() {
        let leases = leases();
        let issued = leases
            .issue("a", ask(1), TTL, Instant::now())
            .unwrap()
            .remove(0);
        let (id, prompt) = (issued.lease_id, issued.prompt.id);
        leases.remember(prompt, vec![3, 4]);
        let leased = RolloutGroup {
            lease_key: leases.key(id),
            ..rollout(id, &issued.prompt, &[3, 4])
        };
        let reason = |change: &dyn Fn(&mut RolloutGroup)| {
            let mut group = leased.clone();
            change(&mut group);
            leases.check(&group).unwrap_err()
        };
        assert_eq!(reason(&|g| g.prompt_id += 1).reason, Rejection::Malformed);
        assert_eq!(
            reason(&|g| g.prompt_tokens.pop().map(drop).unwrap()).reason,
            Rejection::Malformed
        );
        let wrong_range = reason(&|g| g.length_hi += 1);
        assert_eq!(wrong_range.reason, Rejection::Malformed);
        assert!(
            wrong_range.message.contains("target range"),
            "{wrong_range}"
        );
        let forged = reason(&|g| g.lease_key ^= 1);
        assert_eq!(forged.reason, Rejection::WrongLeaseKey);
        assert!(forged.message.contains("lease's key"), "{forged}");
        assert_ne!(leases.key(id), leases.key(id + 1));
        leases.check(&leased).unwrap();
        assert_eq!(leases.complete(id), Ok(prompt));
        assert_eq!(reason(&|_| {}).reason, Rejection::Duplicate);
    }

    #[test]
    fn released_members_give_their_prompts_back_and_the_data_runs_out() {
        let leases = Leases::new(
            Dataset::new(crate::data::default_prompts()[..2].to_vec(), 1, false, 1),
            Ledger::default(),
            roomy(),
        );
        let now = Instant::now();
        let issued = leases.issue("a", ask(5), TTL, now).unwrap();
        assert_eq!(issued.len(), 2);
        assert!(!leases.data_done(), "leases are out");
        leases.release_members(&["a".to_owned()]);
        let (_, mut outstanding, last) = leases.data_state();
        outstanding.sort_unstable();
        assert_eq!(outstanding, vec![0, 1]);
        assert_eq!(last, 2);
        let mut completed = Vec::new();
        for again in leases.issue("b", ask(5), TTL, now).unwrap() {
            leases.complete(again.lease_id).unwrap();
            completed.push(again.lease_id);
        }
        assert!(
            !leases.data_done(),
            "the batcher has not taken the groups yet"
        );
        leases.claim_and_count_due(&completed, 0, 1);
        assert!(leases.data_done());
    }

    #[test]
    fn a_member_holds_at_most_its_cap_and_only_actors_lease() {
        let (hub, _queue) = testing::hub(testing::hub_job());
        let actor = testing::register(&hub, quill_proto::Role::Actor);
        let ask = |member_id: &str| LeaseRequest {
            member_id: member_id.to_owned(),
            max_groups: 64,
            version: 0,
        };
        let cap = hub.job.cluster.leases_per_actor;
        assert_eq!(hub.lease(ask(&actor)).unwrap().leases.len(), cap);
        assert!(hub.lease(ask(&actor)).unwrap().leases.is_empty());
        let reward = testing::register(&hub, quill_proto::Role::Reward);
        let err = hub.lease(ask(&reward)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn the_hub_hands_out_encoded_prompts_and_holds_back_stale_actors() {
        let mut job = testing::hub_job();
        job.grpo.max_staleness = 1;
        job.cluster.leases_per_actor = 100;
        let (hub, _queue) = testing::hub(job);
        let actor = testing::register(&hub, quill_proto::Role::Actor);
        let ask = |max_groups, version| LeaseRequest {
            member_id: actor.clone(),
            max_groups,
            version,
        };
        let reply = hub.lease(ask(100, 0)).unwrap();
        assert_eq!(
            reply.leases.len(),
            24,
            "every default prompt, under the batch cap"
        );
        let lease = &reply.leases[0];
        let text = hub.job.template.render(&lease.question);
        assert_eq!(lease.prompt_tokens, hub.tokenizer.encode(&text).unwrap());
        assert_eq!(lease.group_size, 2);
        assert_ne!(lease.seed, reply.leases[1].seed);
        assert!(hub.lease(ask(1, 0)).unwrap().leases.is_empty());
        hub.publish(testing::blob(2));
        assert!(hub.lease(ask(1, 0)).unwrap().wait_for_weights);
        let unknown = LeaseRequest {
            member_id: "actor-9".into(),
            ..ask(1, 2)
        };
        assert_eq!(
            hub.lease(unknown).unwrap_err().code(),
            tonic::Code::NotFound
        );
        hub.finish();
        assert!(hub.lease(ask(1, 2)).unwrap().finished);
    }

    #[test]
    fn a_departed_member_gives_its_prompts_back() {
        let mut ledger = Ledger::starting_at(100);
        let now = Instant::now();
        let a = ledger.issue(1, "a", 0, TTL, now);
        ledger.issue(2, "b", 0, TTL, now);
        ledger.issue(3, "a", 0, TTL, now);
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

    #[tokio::test]
    async fn the_hub_admits_what_the_next_steps_consume_and_waits_for_room() {
        let mut job = testing::hub_job();
        job.grpo.prompts_per_step = 2;
        job.grpo.max_staleness = 1;
        let (hub, _queue) = testing::hub(job);
        let hub = std::sync::Arc::new(hub);
        let a = testing::register(&hub, quill_proto::Role::Actor);
        let b = testing::register(&hub, quill_proto::Role::Actor);
        let ask = |member: &str, max_groups, version| LeaseRequest {
            member_id: member.to_owned(),
            max_groups,
            version,
        };
        // Room for (1 + 1) · 2 = 4 groups, a fair share of 2 for each of two actors.
        let first = hub.lease(ask(&a, 10, 0)).unwrap().leases;
        assert_eq!(first.len(), 2, "a's share");
        assert_eq!(hub.lease(ask(&b, 10, 0)).unwrap().leases.len(), 2);
        assert!(hub.lease(ask(&a, 1, 0)).unwrap().leases.is_empty());
        for lease in &first {
            hub.submit(testing::scored_group(lease, 2)).await.unwrap();
        }
        assert_eq!(hub.leases.in_pipeline(), 4, "queued groups still count");
        assert!(hub.lease(ask(&a, 1, 0)).unwrap().leases.is_empty());
        let waiting = {
            let hub = std::sync::Arc::clone(&hub);
            let req = ask(&a, 2, 0);
            tokio::spawn(async move { hub.lease_or_wait(req, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no room yet");
        hub.retire(2);
        let woke = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("retiring wakes the waiting call")
            .unwrap()
            .unwrap();
        assert_eq!(woke.leases.len(), 2);
        // A step later an actor still on version 0 may only fill (1 + 1 − 1) · 2 groups.
        hub.retire(0);
        hub.publish(testing::blob(1));
        assert_eq!(hub.leases.in_pipeline(), 4);
        let behind = hub.lease_or_wait(ask(&b, 1, 0), Duration::from_secs(30));
        let behind = tokio::time::timeout(Duration::from_secs(5), behind)
            .await
            .expect("an actor behind the newest version is answered at once")
            .unwrap();
        assert!(behind.leases.is_empty());
        assert_eq!(behind.latest_version, 1, "it learns which version to fetch");
    }
}
