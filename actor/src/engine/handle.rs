//! The engine on its own OS thread, driven through channels (DESIGN invariant 1: tch
//! tensors and grad mode never leave that thread). Its inbox is bounded
//! (`EngineConfig::request_queue`): a caller that finds it full blocks until the engine
//! takes a command, so call [`EngineHandle::submit`] from a thread that may block.

use crate::engine::request::{GenerationError, GenerationRequest, GroupOutput, TokenStream};
use crate::engine::{Engine, EngineConfig, EngineStats, Reply};
use crossbeam_channel::{bounded, Receiver, Sender};
use quill_model::{ModelConfig, Qwen2, Tokenizer};
use quill_proto::blob::WeightBlob;
use std::sync::Arc;
use std::thread::JoinHandle;

enum Command {
    Generate(GenerationRequest, Reply, Option<TokenStream>),
    UpdateWeights(Arc<WeightBlob>, Sender<Result<(), quill_model::Error>>),
    Shutdown,
}

/// A generation engine running on a dedicated thread.
pub struct EngineHandle {
    commands: Sender<Command>,
    stats: Arc<EngineStats>,
    tokenizer: Tokenizer,
    config: ModelConfig,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts the engine thread; `load` runs on that thread and builds the model there.
    pub fn spawn<F>(load: F, config: EngineConfig) -> Result<Self, quill_model::Error>
    where
        F: FnOnce() -> Result<(Qwen2, Tokenizer), quill_model::Error> + Send + 'static,
    {
        let (commands, inbox) = bounded::<Command>(config.request_queue.max(1));
        let (ready_tx, ready_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("quill-engine".into())
            .spawn(move || {
                let engine = match load() {
                    Ok((model, tokenizer)) => Engine::new(model, tokenizer, &config),
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let info = (
                    engine.stats(),
                    engine.tokenizer().clone(),
                    engine.model().config().clone(),
                );
                let _ = ready_tx.send(Ok(info));
                serve(engine, &inbox);
            })
            .map_err(|e| quill_model::Error::io("<engine thread>", e))?;
        let (stats, tokenizer, config) = ready_rx.recv().map_err(|_| {
            quill_model::Error::Device("the engine thread died while loading".into())
        })??;
        Ok(EngineHandle {
            commands,
            stats,
            tokenizer,
            config,
            thread: Some(thread),
        })
    }

    /// Queues a request, waiting while the engine's inbox is full; its group (or error)
    /// arrives on the returned channel.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Receiver<Result<GroupOutput, GenerationError>> {
        self.submit_watched(request, None)
    }

    /// Like [`EngineHandle::submit`], and streams every sampled token to `stream`.
    pub fn submit_watched(
        &self,
        request: GenerationRequest,
        stream: Option<TokenStream>,
    ) -> Receiver<Result<GroupOutput, GenerationError>> {
        let (reply, answer) = bounded(1);
        if let Err(crossbeam_channel::SendError(Command::Generate(_, reply, _))) = self
            .commands
            .send(Command::Generate(request, reply, stream))
        {
            let _ = reply.send(Err(GenerationError::ShutDown));
        }
        answer
    }

    /// Swaps in new weights between two decoding steps; returns once they are in force.
    pub fn update_weights(&self, blob: Arc<WeightBlob>) -> Result<(), quill_model::Error> {
        let (done, wait) = bounded(1);
        let stopped = || quill_model::Error::Device("the generation engine has stopped".into());
        self.commands
            .send(Command::UpdateWeights(blob, done))
            .map_err(|_| stopped())?;
        wait.recv().map_err(|_| stopped())?
    }

    /// A copy of the engine's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids that end a sample: the config's end-of-sequence ids and `<|endoftext|>`.
    pub fn stop_token_ids(&self) -> Vec<i64> {
        let mut ids = self.config.eos_token_ids.clone();
        ids.extend(self.tokenizer.token_id("<|endoftext|>"));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Counters updated by the engine while it runs.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut engine: Engine, inbox: &Receiver<Command>) {
    loop {
        let next = if engine.is_idle() {
            inbox.recv().ok()
        } else {
            match inbox.try_recv() {
                Ok(command) => Some(command),
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    engine.step();
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => None,
            }
        };
        match next {
            Some(Command::Generate(request, reply, stream)) => {
                engine.submit_watched(request, reply, stream)
            }
            Some(Command::UpdateWeights(blob, done)) => {
                let _ = done.send(engine.update_weights(&blob));
            }
            Some(Command::Shutdown) | None => {
                engine.abort_all();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn request(id: u64) -> GenerationRequest {
        GenerationRequest {
            id,
            prompt: vec![1, 2, 3],
            n: 2,
            params: SamplingParams {
                max_new_tokens: 4,
                seed: id,
                ..SamplingParams::default()
            },
        }
    }

    #[test]
    fn a_full_inbox_holds_callers_back_and_loses_no_request() {
        let config = EngineConfig {
            max_batch: 2,
            initial_cache_len: 16,
            request_queue: 1,
        };
        let engine = EngineHandle::spawn(
            || quill_model::load_pretrained("default", tch::Device::Cpu, tch::Kind::Float),
            config,
        )
        .unwrap();
        assert_eq!(engine.commands.capacity(), Some(1));
        let answers: Vec<_> = std::thread::scope(|scope| {
            let callers: Vec<_> = (0..8)
                .map(|id| {
                    let engine = &engine;
                    scope.spawn(move || engine.submit(request(id)).recv().unwrap())
                })
                .collect();
            callers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for (id, answer) in answers.into_iter().enumerate() {
            let group = answer.unwrap();
            assert_eq!(group.id, id as u64);
            assert_eq!(group.samples.len(), 2);
            assert!(group.samples.iter().all(|s| s.tokens.len() == 4));
        }
    }
}
