//! The continuous-batching generation engine.
//!
//! A fixed number of cache slots decode in lock-step, one token per slot per step. When a
//! sample finishes, its slot is refilled from the queue before the next step, so a few very
//! long outputs never hold the batch hostage. A request's prompt is prefilled once and its
//! keys/values are copied into the slot of each of its samples as they are admitted.
//!
//! The engine owns its model and every tensor; it must stay on one OS thread (see
//! [`crate::engine::handle`] for the threaded front end).
//!
//! **Weight updates.** New weights are swapped in between two steps. Sequences in flight
//! keep their slots and their KV cache and continue under the new weights; every token's
//! log-probability is that of the weights it was sampled under, and each sample records
//! the versions in force at its first and last token, so the learner can bound staleness
//! by the oldest and correct the rest with per-token importance ratios.

pub mod fault;
pub mod handle;
pub mod request;
pub mod sampling;
pub mod stop;

use crossbeam_channel::Sender;
use fault::Faults;
use quill_model::{KvCache, Prefix, Qwen2, Tokenizer};
use quill_proto::blob::WeightBlob;
use request::{
    FinishReason, GenerationError, GenerationRequest, GroupOutput, Sample, TokenEvent, TokenStream,
};
use sampling::Sampler;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use stop::StopStrings;
use tch::{Kind, Tensor};

/// Where a finished group (or a failure) is delivered.
pub type Reply = Sender<Result<GroupOutput, GenerationError>>;

/// Commands an [`EngineHandle`](handle::EngineHandle) queues by default before a caller
/// waits (generation requests plus a weight update and the shutdown).
pub const DEFAULT_REQUEST_QUEUE: usize = 64;

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of sequences decoded together (cache slots).
    pub max_batch: usize,
    /// Positions per slot allocated up front; the cache doubles when it needs more.
    pub initial_cache_len: i64,
    /// Commands the engine thread's inbox holds (at least 1); a caller that finds it full
    /// waits until the engine takes one (backpressure, nothing is dropped).
    pub request_queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 32,
            initial_cache_len: 512,
            request_queue: DEFAULT_REQUEST_QUEUE,
        }
    }
}

/// Counters that other threads may read while the engine runs.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Tokens generated so far.
    pub generated_tokens: AtomicU64,
    /// Samples finished so far.
    pub finished_samples: AtomicU64,
    /// Decoding steps taken so far.
    pub steps: AtomicU64,
    /// Sequences decoded so far, summed over steps (divided by `steps`: the mean batch).
    pub decoded_rows: AtomicU64,
    /// The most sequences decoded together in one step.
    pub peak_batch: AtomicU64,
}

struct Group {
    request: GenerationRequest,
    prefix: Option<Rc<Prefix>>,
    stops: StopStrings,
    samples: Vec<Option<Sample>>,
    unfinished: usize,
    admitted: usize,
    reply: Reply,
    stream: Option<TokenStream>,
    started: Instant,
}

struct Active {
    group: u64,
    index: usize,
    version_first: u64,
    sampler: Sampler,
    prompt_len: usize,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
}

impl Active {
    /// The position of the sample's last token: the one the next decode step feeds, so
    /// the cache holds the positions before it.
    fn last_position(&self) -> usize {
        self.prompt_len + self.tokens.len() - 1
    }
}

/// The engine: model, tokenizer, cache slots, queue of samples waiting for a slot.
pub struct Engine {
    model: Qwen2,
    tokenizer: Tokenizer,
    cache: KvCache,
    slots: Vec<Option<Active>>,
    groups: HashMap<u64, Group>,
    queue: VecDeque<u64>,
    next_key: u64,
    version: u64,
    stats: Arc<EngineStats>,
    faults: Faults,
}

impl Engine {
    /// An engine around a loaded model.
    pub fn new(model: Qwen2, tokenizer: Tokenizer, config: &EngineConfig) -> Self {
        let slots = config.max_batch.max(1);
        let cache = KvCache::new(
            model.config(),
            slots as i64,
            config.initial_cache_len,
            model.kind(),
            model.device(),
        );
        Engine {
            model,
            tokenizer,
            cache,
            slots: (0..slots).map(|_| None).collect(),
            groups: HashMap::new(),
            queue: VecDeque::new(),
            next_key: 0,
            version: 0,
            stats: Arc::new(EngineStats::default()),
            faults: Faults::from_env(),
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<EngineStats> {
        Arc::clone(&self.stats)
    }

    /// The model.
    pub fn model(&self) -> &Qwen2 {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The weights version in force.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Swaps in new weights (between steps; sequences in flight continue under them).
    pub fn update_weights(&mut self, blob: &WeightBlob) -> Result<(), quill_model::Error> {
        let tensors = quill_model::weights::from_blob(blob)?;
        self.model.load_weights(&tensors)?;
        self.version = blob.version;
        Ok(())
    }

    /// Whether nothing is queued or decoding.
    pub fn is_idle(&self) -> bool {
        self.groups.is_empty()
    }

    /// Queues a request; invalid requests are answered on `reply` at once.
    pub fn submit(&mut self, request: GenerationRequest, reply: Reply) {
        self.submit_watched(request, reply, None);
    }

    /// Like [`Engine::submit`], and sends every sampled token to `stream` as it comes.
    pub fn submit_watched(
        &mut self,
        request: GenerationRequest,
        reply: Reply,
        stream: Option<TokenStream>,
    ) {
        if let Err(reason) = self.check(&request) {
            let _ = reply.send(Err(GenerationError::Invalid {
                id: request.id,
                reason,
            }));
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        self.queue.extend(std::iter::repeat_n(key, request.n));
        self.groups.insert(
            key,
            Group {
                stops: StopStrings::new(&request.params.stop_strings),
                samples: vec![None; request.n],
                unfinished: request.n,
                admitted: 0,
                prefix: None,
                reply,
                stream,
                started: Instant::now(),
                request,
            },
        );
    }

    fn check(&self, request: &GenerationRequest) -> Result<(), String> {
        if request.n == 0 {
            return Err("n must be at least 1".into());
        }
        if request.prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        let context = self.model.config().max_position_embeddings as usize;
        if request.prompt.len() >= context {
            return Err(format!(
                "the prompt has {} tokens but the model's context holds {context}",
                request.prompt.len()
            ));
        }
        self.model
            .check_tokens(&request.prompt)
            .map_err(|e| e.to_string())?;
        let vocab = self.model.config().vocab_size;
        if let Some(id) = request
            .params
            .stop_token_ids
            .iter()
            .find(|&&id| id < 0 || id >= vocab)
        {
            return Err(format!(
                "stop token id {id} is outside the vocabulary (size {vocab})"
            ));
        }
        request.params.validate()
    }

    /// Runs until every queued request is answered.
    pub fn run_until_idle(&mut self) {
        while !self.is_idle() {
            self.step();
        }
    }

    /// Fills free slots from the queue, then decodes one token in every busy slot.
    pub fn step(&mut self) {
        let _guard = tch::no_grad_guard();
        self.admit();
        self.compact();
        let busy: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some())
            .collect();
        if busy.is_empty() {
            return;
        }
        let mut slot_ids = Vec::with_capacity(busy.len());
        let mut tokens = Vec::with_capacity(busy.len());
        let mut positions = Vec::with_capacity(busy.len());
        let mut divisors = Vec::with_capacity(busy.len());
        for &s in &busy {
            let active = self.slots[s].as_ref().expect("busy");
            slot_ids.push(s as i64);
            tokens.push(*active.tokens.last().expect("a sampled first token"));
            positions.push(active.last_position() as i64);
            divisors.push(self.groups[&active.group].request.params.logit_divisor() as f32);
        }
        let rows = self
            .model
            .decode(&mut self.cache, &slot_ids, &tokens, &positions)
            .and_then(|logits| log_softmax_rows(&logits, &divisors));
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .decoded_rows
            .fetch_add(busy.len() as u64, Ordering::Relaxed);
        self.stats
            .peak_batch
            .fetch_max(busy.len() as u64, Ordering::Relaxed);
        match rows {
            Ok(rows) => {
                let vocab = rows.len() / busy.len();
                for (row, &s) in busy.iter().enumerate() {
                    self.advance(s, &rows[row * vocab..(row + 1) * vocab]);
                }
            }
            Err(error) => {
                for &s in &busy {
                    if let Some(active) = self.slots[s].take() {
                        self.fail_group(active.group, error.to_string());
                    }
                }
            }
        }
    }

    fn admit(&mut self) {
        while let Some(free) = self.slots.iter().position(Option::is_none) {
            let Some(key) = self.queue.pop_front() else {
                return;
            };
            let prefix = match self.prefix_of(key) {
                Ok(prefix) => prefix,
                Err(error) => {
                    self.fail_group(key, error.to_string());
                    continue;
                }
            };
            let group = self.groups.get_mut(&key).expect("queued groups exist");
            let index = group.admitted;
            group.admitted += 1;
            if group.admitted == group.request.n {
                group.prefix = None;
            }
            let params = &group.request.params;
            let sampler = Sampler::new(params, index as u64);
            let divisor = params.logit_divisor() as f32;
            let row = match log_softmax_rows(&prefix.last_logits.unsqueeze(0), &[divisor]) {
                Ok(row) => row,
                Err(error) => {
                    self.fail_group(key, error.to_string());
                    continue;
                }
            };
            self.cache.load_prefix(free as i64, &prefix);
            self.slots[free] = Some(Active {
                group: key,
                index,
                version_first: self.version,
                sampler,
                prompt_len: prefix.len as usize,
                tokens: Vec::new(),
                logprobs: Vec::new(),
            });
            self.advance(free, &row);
        }
    }

    /// Moves busy slots down into free ones below them, each with its cache rows, so that
    /// the busy slots are `0..n` and the decode reads the cache's first rows as a view
    /// instead of gathering scattered rows in every layer at every step.
    fn compact(&mut self) {
        let mut low = 0;
        let mut high = self.slots.len();
        loop {
            while low < high && self.slots[low].is_some() {
                low += 1;
            }
            while high > low && self.slots[high - 1].is_none() {
                high -= 1;
            }
            if low >= high {
                return;
            }
            let active = self.slots[high - 1].take().expect("busy slot");
            let written = active.last_position() as i64;
            self.cache.copy_slot(high as i64 - 1, low as i64, written);
            self.slots[low] = Some(active);
        }
    }

    fn prefix_of(&mut self, key: u64) -> Result<Rc<Prefix>, quill_model::Error> {
        let group = self.groups.get_mut(&key).expect("queued groups exist");
        if let Some(prefix) = &group.prefix {
            return Ok(Rc::clone(prefix));
        }
        self.faults.before_prefill()?;
        let prefix = Rc::new(self.model.prefill(&group.request.prompt)?);
        group.prefix = Some(Rc::clone(&prefix));
        Ok(prefix)
    }

    /// Samples the next token of the sample in slot `s` from its log-prob row and retires
    /// the sample if it is done.
    fn advance(&mut self, s: usize, row: &[f32]) {
        let active = self.slots[s].as_mut().expect("busy slot");
        let (token, logprob) = active.sampler.pick(row);
        active.tokens.push(token);
        active.logprobs.push(logprob);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let group = &self.groups[&active.group];
        if let Some(stream) = &group.stream {
            let _ = stream.sender.send(TokenEvent {
                index: active.index,
                token,
                logprob,
                top: top_k(row, stream.top_logprobs),
            });
        }
        let params = &group.request.params;
        let context = self.model.config().max_position_embeddings as usize;
        let finish = if params.stop_token_ids.contains(&token) {
            Some(FinishReason::StopToken(token))
        } else if let Some(stop) = group
            .stops
            .completed_by_last(&self.tokenizer, &active.tokens)
        {
            Some(FinishReason::StopString(stop))
        } else if active.tokens.len() >= params.max_new_tokens {
            Some(FinishReason::Length)
        } else if active.prompt_len + active.tokens.len() >= context {
            Some(FinishReason::Context)
        } else {
            None
        };
        if let Some(finish) = finish {
            let active = self.slots[s].take().expect("busy slot");
            self.finish(active, finish);
        }
    }

    fn finish(&mut self, active: Active, finish: FinishReason) {
        self.stats.finished_samples.fetch_add(1, Ordering::Relaxed);
        let text = self.tokenizer.decode_generated(&active.tokens);
        let Some(group) = self.groups.get_mut(&active.group) else {
            return;
        };
        group.samples[active.index] = Some(Sample {
            tokens: active.tokens,
            logprobs: active.logprobs,
            finish,
            text,
            version_first: active.version_first,
            version_last: self.version,
        });
        group.unfinished -= 1;
        if group.unfinished == 0 {
            let group = self.groups.remove(&active.group).expect("present");
            let output = GroupOutput {
                id: group.request.id,
                seconds: group.started.elapsed().as_secs_f64(),
                samples: group
                    .samples
                    .into_iter()
                    .map(|s| s.expect("finished"))
                    .collect(),
                prompt: group.request.prompt,
            };
            let _ = group.reply.send(Ok(output));
        }
    }

    /// Drops a group: its queued samples, its busy slots, and answers with an error.
    fn fail_group(&mut self, key: u64, reason: String) {
        self.queue.retain(|&k| k != key);
        for slot in &mut self.slots {
            if slot.as_ref().is_some_and(|a| a.group == key) {
                *slot = None;
            }
        }
        if let Some(group) = self.groups.remove(&key) {
            let _ = group.reply.send(Err(GenerationError::Failed {
                id: group.request.id,
                reason,
            }));
        }
    }

    /// Answers every queued or running request with [`GenerationError::ShutDown`].
    pub fn abort_all(&mut self) {
        self.queue.clear();
        self.slots.iter_mut().for_each(|s| *s = None);
        for (_, group) in self.groups.drain() {
            let _ = group.reply.send(Err(GenerationError::ShutDown));
        }
    }
}

/// The `k` largest entries of a log-prob row with their token ids, largest first.
fn top_k(row: &[f32], k: usize) -> Vec<(i64, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut ids: Vec<usize> = (0..row.len()).collect();
    let k = k.min(row.len());
    let by_value = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    ids.select_nth_unstable_by(k - 1, by_value);
    ids.truncate(k);
    ids.sort_unstable_by(by_value);
    ids.into_iter().map(|i| (i as i64, row[i])).collect()
}

/// `log_softmax(logits / divisor)` per row, copied to the host as one flat vector.
fn log_softmax_rows(logits: &Tensor, divisors: &[f32]) -> Result<Vec<f32>, quill_model::Error> {
    let divisors = Tensor::from_slice(divisors)
        .to(logits.device())
        .unsqueeze(1);
    let rows = (logits / divisors)
        .log_softmax(-1, Kind::Float)
        .to(tch::Device::Cpu)
        .reshape([-1]);
    Ok(Vec::<f32>::try_from(&rows)?)
}
