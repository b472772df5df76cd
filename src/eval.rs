//! Perplexity: the book's `eval_perplexity` (state reset, then the corpus in
//! `eval_batch_size` parallel streams of `bptt` steps, exp of the mean batch loss), used for
//! the corpus's splits; every token of a user's text file, in one stream from the start of a
//! sentence; and the `ptb-lm eval` command.
//!
//! Beside every perplexity, bits per character ([`bits_per_char`]): the loss in nats of the
//! tokens scored ÷ (ln 2 × the characters of text they cover, one per line end), so models
//! of one text that read it as words, characters or BPE pieces compare on one number.

use crate::checkpoint::Checkpoint;
use crate::config::DataConfig;
use crate::data::{self, Batches, Corpus, CorpusRecord, Split};
use crate::device;
use crate::dynamic;
use crate::model::LstmLm;
use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Perplexity of `model` over `batches`, from a zero state, without dropout or gradients.
/// Synchronises with the device once, at the end.
pub fn perplexity(model: &LstmLm, batches: &Batches) -> f64 {
    mean_loss(model, batches).exp()
}

/// Bits per character of a mean loss of `mean_loss` nats over `tokens` tokens that cover
/// `chars` characters: `mean_loss · tokens / (ln 2 · chars)`. Where every token is one
/// character, exactly `mean_loss / ln 2`.
pub fn bits_per_char(mean_loss: f64, tokens: u64, chars: u64) -> f64 {
    mean_loss * (tokens as f64 / chars as f64) / std::f64::consts::LN_2
}

/// The mean loss (nats per token) whose exp is [`perplexity`].
pub fn mean_loss(model: &LstmLm, batches: &Batches) -> f64 {
    let (sum, tokens) = score(model, batches.batch_size(), (0..batches.len()).map(|k| batches.get(k)), None)
        .expect("static scoring has no step that fails");
    sum / tokens as f64
}

/// Perplexity of every token of `corpus` but the first, read as one stream from a zero state
/// in chunks of `bptt` (the last one shorter): exp of the mean loss per token. Unlike the
/// book's batching nothing is dropped, so a text of any length can be scored.
pub fn perplexity_of_stream(model: &LstmLm, corpus: &[i64], bptt: i64, device: Device) -> f64 {
    stream_loss(model, corpus, bptt, device).exp()
}

/// The mean loss (nats per token) whose exp is [`perplexity_of_stream`].
pub fn stream_loss(model: &LstmLm, corpus: &[i64], bptt: i64, device: Device) -> f64 {
    if corpus.len() < 2 {
        return f64::NAN;
    }
    let (sum, tokens) =
        score(model, 1, stream_segments(corpus, bptt, device), None).expect("static scoring has no step that fails");
    sum / tokens as f64
}

/// `ids` as one stream (batch 1) in segments of `bptt` tokens (the last one shorter): each
/// segment's inputs and its targets, the tokens one further on; every token but the first is
/// a target once.
pub fn stream_segments(ids: &[i64], bptt: i64, device: Device) -> impl Iterator<Item = (Tensor, Tensor)> {
    let n = ids.len() as i64 - 1;
    let stream = Tensor::from_slice(ids).to_device(device).view([-1, 1]);
    (0..n.max(0)).step_by(bptt.max(1) as usize).map(move |start| {
        let len = bptt.min(n - start);
        (stream.narrow(0, start, len), stream.narrow(0, start + 1, len))
    })
}

/// What a scoring pass does after scoring a segment: dynamic evaluation's update of the
/// weights from the segment's mean loss (still attached to its graph).
pub type Learn<'a> = &'a mut dyn FnMut(&Tensor) -> Result<()>;

/// The one scoring loop, of every perplexity: reads `segments` ((T, B) inputs and targets,
/// each continuing the `batch` streams of the one before) from a zero state without
/// dropout, and returns the summed loss in nats of every target and how many targets there
/// were. Each segment is scored with the weights as they are before it; with `learn` (dynamic
/// evaluation) the loss keeps its graph and `learn` runs on it after the scoring, else
/// nothing is recorded for gradients. Synchronises with the device once, at the end.
pub fn score(
    model: &LstmLm,
    batch: i64,
    segments: impl Iterator<Item = (Tensor, Tensor)>,
    mut learn: Option<Learn>,
) -> Result<(f64, u64)> {
    let grad = learn.is_some();
    let mut state = model.zero_state(batch);
    let mut sum = Tensor::zeros([], (Kind::Double, model.device()));
    let mut tokens = 0u64;
    for (x, y) in segments {
        let _no_grad = (!grad).then(tch::no_grad_guard);
        let f = model.hidden(&x, &state, false);
        let loss = model.decoded_loss(&f.last_dropped, &y);
        sum += loss.detach().to_kind(Kind::Double) * y.numel() as f64;
        tokens += y.numel() as u64;
        if let Some(learn) = learn.as_mut() {
            learn(&loss)?;
        }
        state = f.state.detach();
    }
    Ok((f64::try_from(&sum).unwrap_or(f64::NAN), tokens))
}

/// What `ptb-lm eval` measures.
pub enum Target {
    Split(Split),
    /// The test split, or the validation split where the corpus has none (`data.split` of
    /// two parts; a note says so).
    DefaultSplit,
    File {
        path: PathBuf,
        allow_unk: bool,
    },
}

/// Where `ptb-lm eval` reads the checkpoint's corpus: where training read it (its absolute
/// paths, from the checkpoint), or a directory or single file given instead. Either way the
/// files read must be the text the checkpoint records.
#[derive(Debug, Clone, Default)]
pub struct CorpusPlace {
    pub dir: Option<PathBuf>,
    pub file: Option<PathBuf>,
}

pub struct EvalReport {
    pub name: String,
    pub ppl: f64,
    /// Bits per character of the same tokens (see [`bits_per_char`]).
    pub bpc: f64,
    pub tokens: i64,
    pub seconds: f64,
    /// What a reader should know about the number: caps applied, words read as `<unk>`,
    /// the static perplexity beside a dynamic one.
    pub notes: Vec<String>,
    /// With `--dynamic-search`: (settings, validation perplexity) of every grid point, and
    /// the tokens each was scored on.
    pub search: Vec<(dynamic::Settings, f64)>,
    pub search_tokens: usize,
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
    /// Leave out the progress notes on stderr (statistics collected, and in how long; saved
    /// ones not used, and why); warnings are printed all the same.
    pub quiet: bool,
    /// Run by `train.dynamic_eval`: advice names the config's keys, not eval's flags.
    pub in_training: bool,
}

impl DynamicOptions {
    /// What `train.dynamic_eval` runs: the config's `dynamic_*` settings, else the defaults.
    pub fn of_training(t: &crate::config::TrainConfig, quiet: bool) -> DynamicOptions {
        let d = dynamic::Settings::default();
        DynamicOptions {
            settings: dynamic::Settings {
                lr: t.dynamic_lr.unwrap_or(d.lr),
                decay: t.dynamic_decay.unwrap_or(d.decay),
                ..d
            },
            search: false,
            search_tokens: 0,
            stats_batches: t.dynamic_stats_batches.map(|n| n as usize),
            quiet,
            in_training: true,
        }
    }

    /// "lr 2e-4, decay 0.005, epsilon 2e-5, segments of 5; statistics from 400 training batches".
    pub fn describe(&self) -> String {
        let stats = self.stats_batches.map_or("the whole training split".to_string(), |n| {
            format!("at most {n} training batches of {STATS_BATCH} × {}", self.settings.bptt)
        });
        format!("{}; statistics from {stats}", self.settings.describe())
    }

    /// What a user changes to make the updates smaller, and how else to choose them.
    fn advice(&self) -> (&'static str, &'static str) {
        match (self.in_training, self.search) {
            (true, _) => ("train.dynamic_lr", ", chosen by `ptb-lm eval --checkpoint RUN/best --dynamic-search`"),
            (false, true) => ("--dyn-lr", ""),
            (false, false) => ("--dyn-lr", ", or let --dynamic-search choose"),
        }
    }

    /// Of a training split of `train_tokens`, how many the gradient statistics read.
    pub fn stats_tokens(&self, train_tokens: f64) -> f64 {
        self.stats_batches
            .map_or(train_tokens, |n| train_tokens.min(n as f64 * (STATS_BATCH * self.settings.bptt) as f64))
    }
}

/// The statistics' batch size over the training split (the reference code's).
const STATS_BATCH: i64 = 100;

/// The fewest validation tokens `--dyn-search-tokens` may ask for: below, the grid points'
/// perplexities say more about the few tokens than about the settings.
pub const MIN_SEARCH_TOKENS: usize = 100;

pub fn run(
    checkpoint: &Path,
    target: &Target,
    place: &CorpusPlace,
    choice: crate::config::DeviceChoice,
    batch_size: Option<i64>,
    dynamic: Option<&DynamicOptions>,
) -> Result<EvalReport> {
    crate::failpoint::torch_error();
    if let Some(d) = dynamic {
        d.settings.validate()?;
        if d.search && d.search_tokens < MIN_SEARCH_TOKENS {
            bail!("--dyn-search-tokens must be at least {MIN_SEARCH_TOKENS} (got {})", d.search_tokens);
        }
    }
    let ckpt = Checkpoint::load(checkpoint)?;
    let cfg = &ckpt.meta.config;
    let device = device::resolve(choice)?;
    let tokenizer = ckpt.tokenizer()?;
    let recorded = ckpt.meta.corpus.as_ref();
    let elsewhere = cfg.data.without_paths();
    let data = match (&place.dir, &place.file) {
        (Some(dir), _) => DataConfig { dir: Some(dir.clone()), ..elsewhere },
        (None, Some(file)) => DataConfig { file: Some(file.clone()), ..elsewhere },
        (None, None) => recorded.map_or_else(|| cfg.data.clone(), |r| r.data.clone()),
    };
    let mut default_note = None;
    let target = match target {
        Target::DefaultSplit if !data.has_test() => {
            if dynamic.is_some_and(|d| d.search) {
                bail!(
                    "--dynamic-search chooses its settings on the validation split, and {}'s corpus has no test \
                     split to score apart from it; give --split valid to score validation anyway, or --file",
                    checkpoint.display()
                );
            }
            default_note = Some("the corpus has no test split (data.split): validation scored".to_string());
            &Target::Split(Split::Valid)
        }
        Target::DefaultSplit => &Target::Split(Split::Test),
        t => t,
    };
    let model = ckpt.model(device)?;
    let mut scored = Scored::read(target, &data, &tokenizer, checkpoint, recorded)?;
    scored.notes.extend(default_note);
    if let Some(d) = dynamic {
        return run_dynamic(&model, &ckpt, &data, &tokenizer, scored, d);
    }
    let start = Instant::now();
    let (loss, tokens, chars) = match scored.split {
        Some(split) => {
            let file = data::Layout::of(&data)?.file(split);
            let batch =
                batch_size.map_or((cfg.train.eval_batch_size, "train.eval_batch_size"), |b| (b, "--batch-size"));
            let batches = data::batches_of(&scored.ids, split, &file, scored.limit, batch, cfg.train.bptt, device)?;
            let tokens = batches.len() as i64 * batches.tokens_per_batch();
            (mean_loss(&model, &batches), tokens, batches.chars_scored(&scored.chars))
        }
        None => (
            stream_loss(&model, &scored.ids, cfg.train.bptt, device),
            scored.ids.len() as i64 - 1,
            scored.stream_chars(),
        ),
    };
    let (ppl, bpc) = (loss.exp(), bits_per_char(loss, tokens as u64, chars));
    let seconds = start.elapsed().as_secs_f64();
    if !ppl.is_finite() {
        bail!("{}: the perplexity of {} is {ppl}: these weights cannot be trusted", checkpoint.display(), scored.name);
    }
    Ok(EvalReport {
        name: scored.name,
        ppl,
        bpc,
        tokens,
        seconds,
        notes: scored.notes,
        search: Vec::new(),
        search_tokens: 0,
    })
}

/// The ids a command scores, and what to say about them.
struct Scored {
    name: String,
    ids: Vec<i64>,
    /// Characters each token covers.
    chars: Vec<u32>,
    /// The split they come from (None: a user's file, which starts with `<eos>`).
    split: Option<Split>,
    limit: Option<usize>,
    notes: Vec<String>,
}

fn unk_note(n: usize, unit: &str) -> String {
    format!("{n} {unit}{} read as <unk>", if n == 1 { "" } else { "s" })
}

impl Scored {
    fn read(
        target: &Target,
        data: &DataConfig,
        tokenizer: &Tokenizer,
        checkpoint: &Path,
        recorded: Option<&CorpusRecord>,
    ) -> Result<Scored> {
        let mut notes = Vec::new();
        match target {
            Target::DefaultSplit => unreachable!("resolved to a split first"),
            Target::Split(split) => {
                let mut e = Corpus::load_split(data, *split, tokenizer, checkpoint, recorded)?;
                let limit = data::token_limit(data, *split);
                if let Some(n) = limit.filter(|&n| n < e.ids.len()) {
                    notes.push(format!("its first {n} tokens, as data.{split}_tokens of the checkpoint's config"));
                    e.truncate(n);
                }
                // Only the words among the tokens scored.
                if !e.unknown.is_empty() {
                    notes.push(unk_note(e.unknown.len(), tokenizer.unit()));
                }
                Ok(Scored { name: split.to_string(), ids: e.ids, chars: e.chars, split: Some(*split), limit, notes })
            }
            Target::File { path, allow_unk } => {
                let text = data::normalise(data::read_text(path)?, data);
                let mut e = tokenizer.encode(&text, path, *allow_unk)?;
                let eos = tokenizer.eos()?;
                if !e.ids.iter().any(|&t| t != eos) {
                    let what = if tokenizer.kind().is_word() { "words" } else { "text" };
                    bail!("{}: no {what} to score", path.display());
                }
                if !e.unknown.is_empty() {
                    notes.push(unk_note(e.unknown.len(), tokenizer.unit()));
                }
                // Scored from the start of a sentence, as in training: the first word after <eos>
                // (which is read, not scored).
                e.ids.insert(0, eos);
                e.chars.insert(0, 1);
                Ok(Scored {
                    name: path.display().to_string(),
                    ids: e.ids,
                    chars: e.chars,
                    split: None,
                    limit: None,
                    notes,
                })
            }
        }
    }

    /// The characters of every token but the first: those a stream scores.
    fn stream_chars(&self) -> u64 {
        self.chars.iter().skip(1).map(|&c| c as u64).sum()
    }
}

/// A dynamic evaluation that blew up: its rate too large for the model. An error of its own
/// kind, whose cure (a smaller rate) the caller can name in its own terms.
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// `eval --dynamic`: gradient statistics (saved beside the checkpoint's weights and reused
/// only for the same weights, training text and recipe), the optional search on validation,
/// then the target in one stream. A diverged result is an error, not a number.
fn run_dynamic(
    model: &LstmLm,
    ckpt: &Checkpoint,
    data: &DataConfig,
    tokenizer: &Tokenizer,
    scored: Scored,
    opts: &DynamicOptions,
) -> Result<EvalReport> {
    let mut settings = opts.settings;
    let recorded = ckpt.meta.corpus.as_ref();
    // The training tokens the model was trained on (`data.train_tokens` of its config).
    let read_train = || {
        let limit = data::token_limit(data, Split::Train);
        let read = Corpus::load_split(data, Split::Train, tokenizer, &ckpt.dir, recorded);
        read.map(|e| data::truncate(&e.ids, limit).to_vec()).map_err(|e| {
            anyhow::anyhow!(
                "{e:#}; dynamic evaluation computes its gradient statistics on the training split \
                 (none saved in {} are for these weights and settings)",
                ckpt.dir.display()
            )
        })
    };
    // The training text is known by the checkpoint's record of it where there is one: then
    // saved statistics need no corpus at all.
    let mut train = None;
    let train_sha256 = match recorded.and_then(|r| r.file_of(Split::Train)) {
        Some(f) => dynamic::train_digest(&f.sha256, data, tokenizer),
        None => {
            let ids = read_train()?;
            let digest = dynamic::ids_digest(&ids);
            train = Some(ids);
            digest
        }
    };
    let key = dynamic::StatsKey {
        recipe: dynamic::StatsRecipe { batch_size: STATS_BATCH, bptt: settings.bptt, max_batches: opts.stats_batches },
        weights_sha256: dynamic::weights_digest(model),
        train_sha256,
    };
    let stats = match dynamic::GradStats::load(&ckpt.dir, &key, model) {
        dynamic::Saved::Found(s) => s,
        saved => {
            if let (dynamic::Saved::Stale(why), false) = (saved, opts.quiet) {
                eprintln!("note: the gradient statistics saved in {} are not used: {why}", ckpt.dir.display());
            }
            let train = match train {
                Some(t) => t,
                None => read_train()?,
            };
            let t = Instant::now();
            let s = dynamic::GradStats::collect(model, &train, key)
                .with_context(|| format!("--dyn-bptt {}", settings.bptt))?;
            if !opts.quiet {
                eprintln!(
                    "note: gradient statistics over {} training batches in {:.1} s",
                    s.batches,
                    t.elapsed().as_secs_f64()
                );
            }
            if let Err(e) = s.save(&ckpt.dir) {
                eprintln!("warning: {e:#} (the statistics are not kept for the next run)");
            }
            s
        }
    };
    let mut search = Vec::new();
    let mut search_tokens = 0;
    if opts.search {
        let valid = Corpus::load_split(data, Split::Valid, tokenizer, &ckpt.dir, recorded)?.ids;
        // The first token is read, not scored: `search_tokens` predictions.
        let valid = &valid[..valid.len().min(opts.search_tokens + 1)];
        search_tokens = valid.len().saturating_sub(1);
        if search_tokens < MIN_SEARCH_TOKENS {
            bail!(
                "--dynamic-search: the validation split has only {search_tokens} tokens; it needs at least {MIN_SEARCH_TOKENS}"
            );
        }
        for point in settings.grid() {
            search.push((point, dynamic::perplexity(model, valid, &stats, &point)?));
        }
        let vocab_size = tokenizer.len() as i64;
        let sound = search.iter().filter(|p| !dynamic::diverged(p.1, vocab_size));
        let Some(best) = sound.min_by(|a, b| a.1.total_cmp(&b.1)) else {
            bail!(
                "--dynamic-search: every point of the grid diverged on validation (with --dyn-epsilon {:e}); \
                 use a larger --dyn-epsilon",
                settings.epsilon
            );
        };
        settings = best.0;
    }
    let static_loss = stream_loss(model, &scored.ids, settings.bptt, model.device());
    let static_ppl = static_loss.exp();
    let start = Instant::now();
    let loss = dynamic::mean_loss(model, &scored.ids, &stats, &settings)?;
    let ppl = loss.exp();
    let seconds = start.elapsed().as_secs_f64();
    let (tokens, chars) = (scored.ids.len() as u64 - 1, scored.stream_chars());
    let (lr_name, or_search) = opts.advice();
    if dynamic::diverged(ppl, tokenizer.len() as i64) {
        let or_epsilon = if opts.in_training { "" } else { " or a larger --dyn-epsilon" };
        return Err(Diverged(format!(
            "dynamic evaluation diverged on {} ({}): perplexity {ppl:.4e}, worse than a uniform guess over the {} \
             words; use a smaller {lr_name}{or_epsilon}{or_search}",
            scored.name,
            settings.describe(),
            tokenizer.len()
        ))
        .into());
    }
    let mut notes = scored.notes;
    notes.push(format!(
        "static, one stream: {static_ppl:.4} (bits per character {:.4})",
        bits_per_char(static_loss, tokens, chars)
    ));
    if ppl > static_ppl * (1.0 + 1e-9) {
        notes.push(format!("dynamic evaluation made it worse: try a smaller {lr_name}{or_search}"));
    } else if settings.lr == 0.0 {
        notes.push("with --dyn-lr 0 the weights never change: this is static evaluation".to_string());
    }
    Ok(EvalReport {
        name: format!("{} (dynamic: {})", scored.name, settings.describe()),
        ppl,
        bpc: bits_per_char(loss, tokens, chars),
        tokens: scored.ids.len() as i64 - 1,
        seconds,
        notes,
        search,
        search_tokens,
    })
}
