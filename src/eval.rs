//! Perplexity: the book's `eval_perplexity` (state reset, then the corpus in
//! `eval_batch_size` parallel streams of `bptt` steps, exp of the mean batch loss), used for
//! the PTB splits; every token of a user's text file, in one stream; and the `ptb-lm eval`
//! command.

use crate::checkpoint::Checkpoint;
use crate::data::{self, Batches, Ptb};
use crate::device;
use crate::model::LstmLm;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Perplexity of `model` over `batches`, from a zero state, without dropout or gradients.
/// Synchronises with the device once, at the end.
pub fn perplexity(model: &LstmLm, batches: &Batches) -> f64 {
    tch::no_grad(|| {
        let mut state = model.zero_state(batches.batch_size());
        let mut sum = Tensor::zeros([], (Kind::Double, batches.device()));
        for k in 0..batches.len() {
            let (x, y) = batches.get(k);
            let f = model.forward(&x, &state, false);
            sum += LstmLm::loss(&f.logits, &y).to_kind(Kind::Double);
            state = f.state;
        }
        (f64::try_from(&sum).unwrap_or(f64::NAN) / batches.len() as f64).exp()
    })
}

/// Perplexity of every token of `corpus` but the first, read as one stream from a zero state
/// in chunks of `bptt` (the last one shorter): exp of the mean loss per token. Unlike the
/// book's batching nothing is dropped, so a text of any length can be scored.
pub fn perplexity_of_stream(model: &LstmLm, corpus: &[i64], bptt: i64, device: Device) -> f64 {
    let n = corpus.len() as i64 - 1;
    if n < 1 {
        return f64::NAN;
    }
    tch::no_grad(|| {
        let ids = Tensor::from_slice(corpus).to_device(device).view([-1, 1]);
        let mut state = model.zero_state(1);
        let mut sum = Tensor::zeros([], (Kind::Double, device));
        let mut start = 0;
        while start < n {
            let len = bptt.min(n - start);
            let f = model.forward(&ids.narrow(0, start, len), &state, false);
            sum += LstmLm::loss(&f.logits, &ids.narrow(0, start + 1, len)).to_kind(Kind::Double) * len as f64;
            state = f.state;
            start += len;
        }
        (f64::try_from(&sum).unwrap_or(f64::NAN) / n as f64).exp()
    })
}

/// What `ptb-lm eval` measures.
pub enum Target {
    Split(String),
    File { path: PathBuf, allow_unk: bool },
}

pub struct EvalReport {
    pub name: String,
    pub ppl: f64,
    pub tokens: i64,
    pub seconds: f64,
}

pub fn run(
    checkpoint: &Path,
    target: &Target,
    data_dir: Option<&Path>,
    choice: crate::config::DeviceChoice,
    batch_size: Option<i64>,
) -> Result<EvalReport> {
    crate::failpoint::torch_error();
    let ckpt = Checkpoint::load(checkpoint)?;
    let cfg = &ckpt.meta.config;
    let device = device::resolve(choice)?;
    let vocab = ckpt.vocab()?;
    let (name, corpus) = match target {
        Target::Split(split) => {
            let dir = data_dir.unwrap_or(&cfg.data.dir);
            let ptb = Ptb::load(dir)?;
            if ptb.vocab != vocab {
                anyhow::bail!(
                    "{}: its vocabulary differs from the checkpoint's ({}): not the corpus it was trained on",
                    data::split_file(dir, "train").display(),
                    checkpoint.display()
                );
            }
            let all = ptb.split(split).with_context(|| format!("unknown split '{split}' (train, valid or test)"))?;
            let limit = match split.as_str() {
                "train" => cfg.data.train_tokens,
                "valid" => cfg.data.valid_tokens,
                _ => cfg.data.test_tokens,
            };
            (split.clone(), data::truncate(all, limit).to_vec())
        }
        Target::File { path, allow_unk } => {
            let text = data::read_text(path)?;
            let ids = vocab.encode(&text, path, *allow_unk)?;
            if ids.len() < 2 {
                bail!("{}: no words to score", path.display());
            }
            (path.display().to_string(), ids)
        }
    };
    let model = ckpt.model(device)?;
    let start = Instant::now();
    let (ppl, tokens) = match target {
        Target::Split(_) => {
            let batches =
                Batches::new(&corpus, batch_size.unwrap_or(cfg.train.eval_batch_size), cfg.train.bptt, device)?;
            (perplexity(&model, &batches), batches.len() as i64 * batches.tokens_per_batch())
        }
        Target::File { .. } => (perplexity_of_stream(&model, &corpus, cfg.train.bptt, device), corpus.len() as i64 - 1),
    };
    Ok(EvalReport { name, ppl, tokens, seconds: start.elapsed().as_secs_f64() })
}
