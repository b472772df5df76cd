//! Perplexity: the book's `eval_perplexity` (state reset, then the corpus in
//! `eval_batch_size` parallel streams of `bptt` steps, exp of the mean batch loss), used for
//! the corpus's splits; every token of a user's text file, in one stream from the start of a
//! sentence; and the `ptb-lm eval` command.

use crate::checkpoint::Checkpoint;
use crate::data::{self, Batches, Corpus, Split, EOS};
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
    Split(Split),
    File { path: PathBuf, allow_unk: bool },
}

pub struct EvalReport {
    pub name: String,
    pub ppl: f64,
    pub tokens: i64,
    pub seconds: f64,
    /// What a reader should know about the number: caps applied, words read as `<unk>`.
    pub notes: Vec<String>,
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
    let mut data = cfg.data.clone();
    if let Some(dir) = data_dir {
        data = crate::config::DataConfig {
            dir: Some(dir.to_path_buf()),
            file: None,
            train: None,
            valid: None,
            test: None,
            ..data
        };
    }
    let model = ckpt.model(device)?;
    let mut notes = Vec::new();
    let unk_note = |n: usize| format!("{n} word{} read as <unk>", if n == 1 { "" } else { "s" });
    match target {
        Target::Split(split) => {
            let (ids, replaced) = Corpus::load_split(&data, *split, &vocab, checkpoint)?;
            let limit = match split {
                Split::Train => data.train_tokens,
                Split::Valid => data.valid_tokens,
                Split::Test => data.test_tokens,
            };
            if let Some(n) = limit.filter(|&n| n < ids.len()) {
                notes.push(format!("its first {n} tokens, as data.{split}_tokens of the checkpoint's config"));
            }
            if replaced > 0 {
                notes.push(unk_note(replaced));
            }
            let file = data::Layout::of(&data)?.file(*split);
            let batch =
                batch_size.map_or((cfg.train.eval_batch_size, "train.eval_batch_size"), |b| (b, "--batch-size"));
            let batches =
                data::batches_of(data::truncate(&ids, limit), *split, &file, limit, batch, cfg.train.bptt, device)?;
            let start = Instant::now();
            let ppl = perplexity(&model, &batches);
            let tokens = batches.len() as i64 * batches.tokens_per_batch();
            Ok(EvalReport { name: split.to_string(), ppl, tokens, seconds: start.elapsed().as_secs_f64(), notes })
        }
        Target::File { path, allow_unk } => {
            let text = data::normalise(data::read_text(path)?, &data);
            let (mut ids, replaced) = vocab.encode_counted(&text, path, *allow_unk)?;
            if ids.is_empty() || !ids.iter().any(|&t| Some(t) != vocab.id(EOS)) {
                bail!("{}: no words to score", path.display());
            }
            if replaced > 0 {
                notes.push(unk_note(replaced));
            }
            // Scored from the start of a sentence, as in training: the first word after <eos>.
            let eos = vocab.id(EOS).context("the vocabulary has no <eos>")?;
            ids.insert(0, eos);
            let start = Instant::now();
            let ppl = perplexity_of_stream(&model, &ids, cfg.train.bptt, device);
            Ok(EvalReport {
                name: path.display().to_string(),
                ppl,
                tokens: ids.len() as i64 - 1,
                seconds: start.elapsed().as_secs_f64(),
                notes,
            })
        }
    }
}
