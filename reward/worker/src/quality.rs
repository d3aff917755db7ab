//! The quality reward: a sequence-classification reward model on its own thread (its
//! tensors never leave it), scoring `question + "\n\n" + answer` in batches.

use crate::RewardWorkerError;
use crossbeam_channel::{bounded, Sender};
use quill_model::device::parse_device;
use quill_model::{Qwen2, Tokenizer};
use std::path::Path;

/// Where the quality reward comes from.
pub enum Quality {
    /// A local reward model.
    Model(QualityScorer),
    /// An LLM judge on an OpenAI-compatible endpoint.
    Judge(Box<crate::judge::Judge>),
}

impl Quality {
    /// Scores `(question, answer)` pairs (blocking; call from a blocking task inside the
    /// tokio runtime).
    pub fn score(&self, items: &[(String, String)]) -> Result<Vec<f64>, String> {
        match self {
            Quality::Model(scorer) => scorer.score(
                items
                    .iter()
                    .map(|(question, answer)| format!("{question}\n\n{answer}"))
                    .collect(),
            ),
            Quality::Judge(judge) => tokio::runtime::Handle::current().block_on(judge.score(items)),
        }
    }
}

type Job = (Vec<String>, Sender<Result<Vec<f64>, String>>);

/// A handle to the reward-model thread.
#[derive(Clone)]
pub struct QualityScorer {
    jobs: Sender<Job>,
}

impl QualityScorer {
    /// Loads the reward model in `dir` on `device` and starts its thread.
    pub fn start(dir: &Path, device: &str, batch: usize) -> Result<Self, RewardWorkerError> {
        let (jobs, inbox) = bounded::<Job>(64);
        let (ready_tx, ready_rx) = bounded(1);
        let dir = dir.to_owned();
        let device = device.to_owned();
        std::thread::Builder::new()
            .name("quill-quality".into())
            .spawn(move || {
                let loaded = (|| -> quill_model::Result<(Qwen2, Tokenizer)> {
                    let device = parse_device(&device)?;
                    let model = Qwen2::load(&dir, device, tch::Kind::Float)?;
                    let _ = model.classify(&[vec![0]])?;
                    Ok((model, Tokenizer::from_file(&dir.join("tokenizer.json"))?))
                })();
                let (model, tokenizer) = match loaded {
                    Ok(parts) => {
                        let _ = ready_tx.send(Ok(()));
                        parts
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _guard = tch::no_grad_guard();
                for (texts, reply) in inbox {
                    let _ = reply.send(score(&model, &tokenizer, &texts, batch.max(1)));
                }
            })
            .map_err(RewardWorkerError::QualityThread)?;
        ready_rx
            .recv()
            .map_err(|_| "the reward-model thread died".to_owned())
            .and_then(|loaded| loaded)
            .map_err(RewardWorkerError::QualityModel)?;
        Ok(QualityScorer { jobs })
    }

    /// Scores texts (blocking; call from a blocking task).
    pub fn score(&self, texts: Vec<String>) -> Result<Vec<f64>, String> {
        let (reply, answer) = bounded(1);
        self.jobs
            .send((texts, reply))
            .map_err(|_| "the reward-model thread stopped".to_owned())?;
        answer
            .recv()
            .map_err(|_| "the reward-model thread stopped".to_owned())?
    }
}

fn score(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    texts: &[String],
    batch: usize,
) -> Result<Vec<f64>, String> {
    let context = model.config().max_position_embeddings as usize;
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch) {
        let rows = chunk
            .iter()
            .map(|t| {
                let mut ids = tokenizer.encode(t).map_err(|e| e.to_string())?;
                ids.truncate(context);
                if ids.is_empty() {
                    ids.push(0);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let scores = model.classify(&rows).map_err(|e| e.to_string())?;
        let first = scores.select(1, 0);
        out.extend(
            Vec::<f64>::try_from(&first.to_kind(tch::Kind::Double)).map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    #[ignore = "slow tier: runs transformers (tests/reference/reference.py)"]
    fn scores_match_transformers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = dir.path().join("tokenizer.json");
        std::fs::write(&tokenizer, quill_model::default_model::tokenizer_json()).unwrap();
        let texts = vec![
            "Write about the sea.\n\nThe sea is wide and the light is low.".to_owned(),
            "写一篇散文\n\n春天来了，花开了。".to_owned(),
            "short".to_owned(),
        ];
        let texts_file = dir.path().join("texts.json");
        std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
        let model = dir.path().join("rm");
        let scores = dir.path().join("scores.safetensors");
        let status = Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/reference/reference.py"))
            .arg("reward-model")
            .args([&model, &tokenizer, &texts_file, &scores])
            .status()
            .unwrap();
        assert!(status.success());
        let want = tch::Tensor::read_safetensors(&scores).unwrap().remove(0).1;
        let want = Vec::<f64>::try_from(&want.to_kind(tch::Kind::Double)).unwrap();
        let scorer = QualityScorer::start(&model, "cpu", 2).unwrap();
        let got = scorer.score(texts).unwrap();
        assert_eq!(got.len(), 3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "quill {g} vs transformers {w}");
        }
        assert!(
            want.iter().any(|w| w.abs() > 1e-3),
            "the scores are not trivially zero"
        );
    }

    #[test]
    fn a_missing_reward_model_is_a_clear_error() {
        let err = QualityScorer::start(Path::new("/no/such/rm"), "cpu", 2)
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("loading the quality reward model") && text.contains("/no/such/rm"),
            "{text}"
        );
    }
}
