//! Perplexity: the book's `eval_perplexity` (state reset, then the corpus in
//! `eval_batch_size` parallel streams of `bptt` steps, exp of the mean batch loss), used for
//! the corpus's splits; every token of a user's text file, in one stream from the start of a
//! sentence; and the `ptb-lm eval` command.

use crate::checkpoint::Checkpoint;
use crate::config::DataConfig;
use crate::data::{self, Batches, Corpus, Split, EOS};
use crate::device;
use crate::dynamic;
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
    /// What a reader should know about the number: caps applied, words read as `<unk>`,
    /// the static perplexity beside a dynamic one.
    pub notes: Vec<String>,
    /// With `--dynamic-search`: (settings, validation perplexity) of every grid point.
    pub search: Vec<(dynamic::Settings, f64)>,
}

/// How `eval --dynamic` runs (see [`crate::dynamic`]).
#[derive(Debug, Clone)]
pub struct DynamicOptions {
    pub settings: dynamic::Settings,
    /// Choose η and λ on the validation split first (its first `search_tokens` tokens).
    pub search: bool,
    pub search_tokens: usize,
    /// Gradient statistics from at most this many training batches (None: the whole split).
    pub stats_batches: Option<usize>,
}

/// The statistics' batch size over the training split (the reference code's).
const STATS_BATCH: i64 = 100;

pub fn run(
    checkpoint: &Path,
    target: &Target,
    data_dir: Option<&Path>,
    choice: crate::config::DeviceChoice,
    batch_size: Option<i64>,
    dynamic: Option<&DynamicOptions>,
) -> Result<EvalReport> {
    crate::failpoint::torch_error();
    if let Some(d) = dynamic {
        d.settings.validate()?;
    }
    let ckpt = Checkpoint::load(checkpoint)?;
    let cfg = &ckpt.meta.config;
    let device = device::resolve(choice)?;
    let vocab = ckpt.vocab()?;
    let mut data = cfg.data.clone();
    if let Some(dir) = data_dir {
        data = DataConfig { dir: Some(dir.to_path_buf()), file: None, train: None, valid: None, test: None, ..data };
    }
    let model = ckpt.model(device)?;
    let scored = Scored::read(target, &data, &vocab, checkpoint)?;
    if let Some(d) = dynamic {
        return run_dynamic(&model, &ckpt, &data, &vocab, scored, d);
    }
    let start = Instant::now();
    let (ppl, tokens) = match scored.split {
        Some(split) => {
            let file = data::Layout::of(&data)?.file(split);
            let batch =
                batch_size.map_or((cfg.train.eval_batch_size, "train.eval_batch_size"), |b| (b, "--batch-size"));
            let batches = data::batches_of(&scored.ids, split, &file, scored.limit, batch, cfg.train.bptt, device)?;
            (perplexity(&model, &batches), batches.len() as i64 * batches.tokens_per_batch())
        }
        None => (perplexity_of_stream(&model, &scored.ids, cfg.train.bptt, device), scored.ids.len() as i64 - 1),
    };
    let seconds = start.elapsed().as_secs_f64();
    Ok(EvalReport { name: scored.name, ppl, tokens, seconds, notes: scored.notes, search: Vec::new() })
}

/// The ids a command scores, and what to say about them.
struct Scored {
    name: String,
    ids: Vec<i64>,
    /// The split they come from (None: a user's file, which starts with `<eos>`).
    split: Option<Split>,
    limit: Option<usize>,
    notes: Vec<String>,
}

fn unk_note(n: usize) -> String {
    format!("{n} word{} read as <unk>", if n == 1 { "" } else { "s" })
}

impl Scored {
    fn read(target: &Target, data: &DataConfig, vocab: &data::Vocab, checkpoint: &Path) -> Result<Scored> {
        let mut notes = Vec::new();
        match target {
            Target::Split(split) => {
                let (ids, replaced) = Corpus::load_split(data, *split, vocab, checkpoint)?;
                let limit = data::token_limit(data, *split);
                if let Some(n) = limit.filter(|&n| n < ids.len()) {
                    notes.push(format!("its first {n} tokens, as data.{split}_tokens of the checkpoint's config"));
                }
                if replaced > 0 {
                    notes.push(unk_note(replaced));
                }
                let ids = data::truncate(&ids, limit).to_vec();
                Ok(Scored { name: split.to_string(), ids, split: Some(*split), limit, notes })
            }
            Target::File { path, allow_unk } => {
                let text = data::normalise(data::read_text(path)?, data);
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
                Ok(Scored { name: path.display().to_string(), ids, split: None, limit: None, notes })
            }
        }
    }
}

/// `eval --dynamic`: gradient statistics (saved beside the checkpoint's weights, reused
/// when there), the optional search on validation, then the target in one stream.
fn run_dynamic(
    model: &LstmLm,
    ckpt: &Checkpoint,
    data: &DataConfig,
    vocab: &data::Vocab,
    scored: Scored,
    opts: &DynamicOptions,
) -> Result<EvalReport> {
    let mut settings = opts.settings;
    let (train, _) = Corpus::load_split(data, Split::Train, vocab, &ckpt.dir)?;
    let recipe = dynamic::StatsRecipe {
        batch_size: STATS_BATCH,
        bptt: settings.bptt,
        max_batches: opts.stats_batches,
        train_tokens: train.len(),
    };
    let stats = match dynamic::GradStats::load(&ckpt.dir, &recipe, model) {
        Some(s) => s,
        None => {
            let t = Instant::now();
            let s = dynamic::GradStats::collect(model, &train, recipe)?;
            eprintln!(
                "note: gradient statistics over {} training batches in {:.1} s",
                s.batches,
                t.elapsed().as_secs_f64()
            );
            if let Err(e) = s.save(&ckpt.dir) {
                eprintln!("warning: {e:#} (the statistics are not kept for the next run)");
            }
            s
        }
    };
    let mut search = Vec::new();
    if opts.search {
        let (valid, _) = Corpus::load_split(data, Split::Valid, vocab, &ckpt.dir)?;
        let valid = &valid[..valid.len().min(opts.search_tokens.max(2))];
        for point in settings.grid() {
            search.push((point, dynamic::perplexity(model, valid, &stats, &point)?));
        }
        let best = search.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("a non-empty grid");
        settings = best.0;
    }
    let static_ppl = perplexity_of_stream(model, &scored.ids, settings.bptt, model.device());
    let start = Instant::now();
    let ppl = dynamic::perplexity(model, &scored.ids, &stats, &settings)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut notes = scored.notes;
    notes.push(format!("static, one stream: {static_ppl:.4}"));
    if ppl.is_nan() || ppl > static_ppl {
        notes.push("dynamic evaluation made it worse: try a smaller --dyn-lr, or --dynamic-search".to_string());
    }
    Ok(EvalReport {
        name: format!("{} (dynamic: {})", scored.name, settings.describe()),
        ppl,
        tokens: scored.ids.len() as i64 - 1,
        seconds,
        notes,
        search,
    })
}
