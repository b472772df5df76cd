//! Training, as the book's `train_better_rnnlm.py` does it: per epoch, SGD (or AdamW, see
//! [`crate::optim`]) with global-norm clipping over the stateful batches, then validation
//! perplexity; a better validation perplexity writes the `best/` checkpoint. At the end, the
//! test perplexity of `best/`. The learning rate of each step and the end of a time budget
//! are [`crate::schedule`]'s to say.
//!
//! Around it: a resumable `last/` checkpoint after every epoch and on Ctrl-C/SIGTERM,
//! per-step seeds derived from (seed, epoch, batch) so an interrupted and resumed run
//! computes exactly what an uninterrupted one does, and recovery from non-finite losses. A run
//! cut in its final test evaluation has every epoch saved: resuming it scores the test split
//! and writes `summary.json`. With `train.log_grad_norm`, each epoch also measures the
//! gradient's norm through time ([`crate::gradflow`]) after validation.

use crate::checkpoint::{self, Checkpoint, Meta, Resume};
use crate::config::Config;
use crate::data::{self, Batches, Corpus, Split};
use crate::device;
use crate::dist::{self, Group, Launch};
use crate::eval;
use crate::failpoint;
use crate::gradflow;
use crate::interrupt;
use crate::metrics::{EpochRecord, MetricsLog};
use crate::model::LstmLm;
use crate::plot;
use crate::progress::Reporter;
use crate::run::RunDir;
use crate::schedule::{LrSchedule, Progress, Reserve, TimeBudget};
use crate::step::TrainStep;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// How often (at most) the loop synchronises with the device to read the loss, check it is
/// finite and update the progress bar.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// In data-parallel training every rank must check at the same steps: every this many
/// batches (and at each epoch's end), not by the clock.
const DIST_CHECK_BATCHES: usize = 25;

/// Training seconds after which the run's duration is projected (once per process).
const PROJECT_AFTER_S: f64 = 10.0;

/// A CPU run projected to take longer than this is told which config is CPU-sized.
const CPU_HINT_AFTER_S: f64 = 30.0 * 60.0;

pub struct TrainOptions {
    pub overwrite: bool,
    pub quiet: bool,
    /// Train at most this many epochs in this process, then stop with a resumable `last/`
    /// and a projection of the whole run's duration.
    pub stop_after: Option<usize>,
}

/// How a training process ended.
pub enum Outcome {
    /// Every epoch trained, the best checkpoint tested.
    Finished(Summary),
    /// Stopped after `--stop-after` epochs as asked.
    Stopped(Projection),
    /// A data-parallel rank other than 0 finished its part (rank 0 reports).
    Worker,
}

/// What the epochs of a `--stop-after` process measured, and what it makes of the whole run.
#[derive(Debug, Clone)]
pub struct Projection {
    pub run_dir: PathBuf,
    /// Epochs trained in this process, and in the run so far, of `total`.
    pub trained: usize,
    pub done: usize,
    pub total: usize,
    /// Mean wall seconds per epoch, training and validation, over this process's epochs
    /// (the first, which includes warm-up and graph capture, left out when there are more).
    pub seconds_per_epoch: f64,
    pub tokens_per_s: f64,
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stopped after {} epoch{} as asked ({} of {} done): {:.1} s per epoch (training and validation, \
             {:.1}k tokens/s); all {} epochs would take about {}, the {} left about {}; continue with: \
             ptb-lm train --resume {}",
            self.trained,
            if self.trained == 1 { "" } else { "s" },
            self.done,
            self.total,
            self.seconds_per_epoch,
            self.tokens_per_s / 1000.0,
            self.total,
            human_duration(self.seconds_per_epoch * self.total as f64),
            self.total - self.done,
            human_duration(self.seconds_per_epoch * (self.total - self.done) as f64),
            self.run_dir.display()
        )
    }
}

/// NT-ASGD's trigger (Merity et al. 2018): the newest validation perplexity is worse than
/// the best of all but the last `nonmono` epochs before it.
pub fn asgd_should_start(history_before: &[f64], current: f64, nonmono: usize) -> bool {
    history_before.len() > nonmono
        && current > history_before[..history_before.len() - nonmono].iter().copied().fold(f64::INFINITY, f64::min)
}

/// Per-step seed: a hash of (seed, epoch, batch), so dropout masks depend only on the
/// position in training.
pub fn step_seed(seed: u64, epoch: usize, batch: usize) -> i64 {
    let mut z = seed ^ ((epoch as u64) << 32) ^ (batch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The mean training loss (nats per token) above which a run counts as diverged even though
/// the loss is still finite: ln(V), what a uniform guess over the vocabulary scores, plus
/// 20 nats (e^20 ≈ 5·10^8 times worse than guessing). No learning model gets there; an
/// exploding one passes it within a few steps on every processor, whether or not its
/// arithmetic has reached inf or NaN yet (which depends on the processor).
pub fn divergence_limit(vocab_size: i64) -> f64 {
    (vocab_size as f64).ln() + 20.0
}

/// Whether a mean loss is diverged: not finite, or above [`divergence_limit`].
pub fn diverged(mean_loss: f64, vocab_size: i64) -> bool {
    !(mean_loss.is_finite() && mean_loss <= divergence_limit(vocab_size))
}

/// Training stopped early (Ctrl-C, SIGTERM or a closed stdout) after saving what it could.
#[derive(Debug)]
pub struct Interrupted {
    pub run_dir: PathBuf,
    /// 1-based epoch in progress.
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
    /// Every epoch was trained and saved; only the final test evaluation was cut short.
    pub finished: bool,
    /// What stopped it: "interrupted", or "stdout was closed".
    pub reason: &'static str,
    /// The split the final evaluation scores (valid where the corpus has no test split).
    pub final_split: Split,
}

/// What a run stopped after its last epoch keeps, and how to finish it.
fn left_to_test(run_dir: &Path, split: Split) -> String {
    let run = run_dir.display();
    format!(
        "every epoch is saved in {run}; continue with: ptb-lm train --resume {run} to score the {split} split \
         with best/ and write summary.json"
    )
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let run = self.run_dir.display();
        if self.finished {
            let (split, run) = (self.final_split, &self.run_dir);
            return write!(f, "{} before the {split} evaluation; {}", self.reason, left_to_test(run, split));
        }
        write!(
            f,
            "{} in epoch {} after batch {} of {}; progress saved in {}; continue with: ptb-lm train --resume {run}",
            self.reason,
            self.epoch,
            self.batch,
            self.batches,
            self.run_dir.join("last").display(),
        )
    }
}

impl std::error::Error for Interrupted {}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub device: String,
    pub num_parameters: i64,
    pub epochs: Vec<EpochRecord>,
    pub best_epoch: Option<usize>,
    pub best_valid_ppl: Option<f64>,
    /// Bits per character beside each perplexity (see [`eval::bits_per_char`]).
    pub best_valid_bpc: Option<f64>,
    /// The split the best checkpoint is finally scored on: `test`, or `valid` where the
    /// corpus has no test split (`data.split` of two parts); `final_*` are its numbers.
    pub final_split: Split,
    pub final_ppl: f64,
    pub final_bpc: f64,
    /// The final numbers again under their old names, only where they are of the test split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_bpc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_seconds: Option<f64>,
    pub train_seconds: f64,
    /// With `train.dynamic_eval`: the test split under dynamic evaluation, and the seconds
    /// of its gradient statistics and pass together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_ppl_dynamic: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_bpc_dynamic: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_seconds: Option<f64>,
}

/// Starts a new run of `cfg`. Everything that can be checked is checked before the run
/// directory is touched: the corpus, every split against its batch size, the memory.
pub fn train(mut cfg: Config, opts: &TrainOptions, stop: &AtomicBool) -> Result<Outcome> {
    let device = device::resolve(cfg.run.device)?;
    let run = RunDir::new(&cfg.run.out_dir);
    let corpus = load_corpus(&mut cfg, None, None, None)?;
    let splits = Splits::new(&corpus, &cfg, device)?;
    check_memory(&cfg, device)?;
    let group = join_group(&cfg, device)?;
    let _lock = if leads(&group) {
        let lock = run.lock()?;
        run.prepare_fresh(&cfg, opts.overwrite)?;
        run.write_corpus(&corpus.info)?;
        Some(lock)
    } else {
        None
    };
    failpoint::pause("setup");
    tch::manual_seed(cfg.train.seed as i64);
    let model = LstmLm::new(&cfg.model, device, Kind::Float)?;
    Session::new(cfg, corpus, splits, model, device, run, opts, None, group)?.run(stop)
}

/// Joins the process group the launcher's environment describes, if any (see [`crate::dist`]).
fn join_group(cfg: &Config, device: Device) -> Result<Option<Rc<Group>>> {
    let Some(launch) = Launch::from_env()? else { return Ok(None) };
    if !dist::available() {
        bail!("{}", dist::INSTALL_HINT);
    }
    if device.is_cuda() {
        bail!(
            "data-parallel training on CUDA needs the NCCL backend, which this ptb-lm does not build yet; \
             use --device cpu (Gloo)"
        );
    }
    if cfg.train.batch_size % launch.world as i64 != 0 {
        bail!(
            "train.batch_size = {} is not divisible by the {} ranks (WORLD_SIZE): each rank trains an equal share of the streams",
            cfg.train.batch_size,
            launch.world
        );
    }
    Ok(Some(Rc::new(Group::join(&launch)?)))
}

/// Whether this process writes the run (the only one, or rank 0).
fn leads(group: &Option<Rc<Group>>) -> bool {
    group.as_ref().is_none_or(|g| g.rank == 0)
}

/// Continues the run in `run_dir` from its `last/` checkpoint. `overrides` may change only
/// keys that do not alter what is computed (epochs, device, data dir, safety settings).
pub fn resume(run_dir: &Path, overrides: &[String], opts: &TrainOptions, stop: &AtomicBool) -> Result<Outcome> {
    let run = RunDir::new(run_dir);
    let ranked = Launch::from_env()?.is_some();
    let last = run.last();
    if !last.is_dir() {
        if run_dir.file_name().is_some_and(|n| n == "last" || n == "best") && run_dir.join(checkpoint::META).is_file() {
            bail!(
                "{}: a checkpoint, not a run directory: resume the run that holds it, `ptb-lm train --resume {}`",
                run_dir.display(),
                run_dir.parent().unwrap_or(Path::new(".")).display()
            );
        }
        bail!(
            "{}: no resumable checkpoint (last/) in this directory; start a run with `ptb-lm train --config FILE`",
            run_dir.display()
        );
    }
    let _lock = if ranked { None } else { Some(run.lock()?) };
    let ckpt = Checkpoint::load(&last)?;
    let Some(position) = ckpt.meta.resume.clone() else {
        bail!("{}: this checkpoint is not resumable (no training position)", last.display());
    };
    let mut cfg = resumed_config(&ckpt.meta.config, overrides, run_dir)?;
    if position.budget_spent && summarised(&run, position.epoch) {
        bail!(
            "{}: the run already finished: its time budget (train.max_minutes = {}) ended training in epoch {}",
            run_dir.display(),
            cfg.train.max_minutes.unwrap_or(f64::NAN),
            position.epoch
        );
    }
    // Every epoch trained but no summary of them: the final test evaluation was cut short, and
    // the session below goes straight to it.
    if position.epoch > cfg.train.epochs || (position.epoch == cfg.train.epochs && summarised(&run, position.epoch)) {
        if cosine_spans_epochs(&cfg) {
            bail!(
                "{}: the run already finished its {} epochs; its cosine schedule spanned them, so it cannot be \
                 trained further: start a new run with more train.epochs",
                run_dir.display(),
                position.epoch
            );
        }
        bail!(
            "{}: the run already finished {} epochs (train.epochs = {}); train further with --epochs N, N > {}",
            run_dir.display(),
            position.epoch,
            cfg.train.epochs,
            position.epoch
        );
    }
    let device = device::resolve(cfg.run.device)?;
    // The corpus where training read it (absolute paths), unless the resume moves it; either
    // way it must be the same text, file for file.
    let recorded = ckpt.meta.corpus.as_ref();
    let moved = cfg.data != ckpt.meta.config.data;
    let source = recorded.filter(|_| !moved).map(|r| &r.data);
    // A BPE tokenizer is the checkpoint's (learning it again is slow, and needless: the text
    // is checked to be the same); words and characters are read again and compared.
    let tokenizer = ckpt.tokenizer()?;
    let given = matches!(tokenizer, crate::text::Tokenizer::Bpe(_)).then_some(tokenizer);
    let corpus = load_corpus(&mut cfg, source, recorded.map(|r| (r, last.as_path())), given)?;
    data::check_vocab(&corpus.vocab, &ckpt.vocab()?, &corpus.file(Split::Train), &last)?;
    let splits = Splits::new(&corpus, &cfg, device)?;
    check_memory(&cfg, device)?;
    let group = join_group(&cfg, device)?;
    let _rank_lock = if ranked && leads(&group) { Some(run.lock()?) } else { None };
    let model = ckpt.model(device)?;
    if leads(&group) {
        run.write_config(&cfg)?;
    }
    Session::new(cfg, corpus, splits, model, device, run, opts, Some(ckpt), group)?.run(stop)
}

/// Whether the learning rate follows a cosine over the run's epochs (not over a time
/// budget), so that the epoch count is part of every step's rate.
fn cosine_spans_epochs(cfg: &Config) -> bool {
    cfg.train.schedule == crate::config::Schedule::Cosine && cfg.train.max_minutes.is_none()
}

/// Whether `summary.json` holds the test result of the run's first `epochs` epochs (not one
/// from before the run was trained further, nor a half-written one).
fn summarised(run: &RunDir, epochs: usize) -> bool {
    let Ok(text) = std::fs::read_to_string(run.summary()) else { return false };
    let Ok(summary) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let last = summary["epochs"].as_array().and_then(|e| e.last()).and_then(|r| r["epoch"].as_u64());
    last == Some(epochs as u64)
}

/// The saved config with `overrides` applied, refused when they change what is computed.
fn resumed_config(old: &Config, overrides: &[String], run_dir: &Path) -> Result<Config> {
    let cfg = if overrides.is_empty() {
        old.clone()
    } else {
        Config::parse(&toml::to_string(old)?, overrides).context("override")?
    };
    if cfg.run.out_dir != old.run.out_dir {
        bail!(
            "when resuming, run.out_dir cannot change: the run is where it is ({}); copy the directory to move it",
            run_dir.display()
        );
    }
    let allowed = [
        "train.epochs",
        "run.device",
        "data.dir/file/train/valid/test",
        "train.max_nan_restarts",
        "train.cuda_graph",
        "train.log_grad_norm",
    ];
    let mut probe = cfg.clone();
    probe.train.epochs = old.train.epochs;
    probe.run.device = old.run.device;
    probe.data.dir = old.data.dir.clone();
    probe.data.file = old.data.file.clone();
    probe.data.train = old.data.train.clone();
    probe.data.valid = old.data.valid.clone();
    probe.data.test = old.data.test.clone();
    probe.train.max_nan_restarts = old.train.max_nan_restarts;
    probe.train.cuda_graph = old.train.cuda_graph;
    probe.train.log_grad_norm = old.train.log_grad_norm;
    if &probe != old {
        bail!("when resuming, only {} may change ({})", allowed.join(", "), crate::run::config_diff(old, &probe));
    }
    if cfg.train.epochs != old.train.epochs && cosine_spans_epochs(old) {
        bail!(
            "when resuming, train.epochs cannot change under train.schedule = \"cosine\": its curve spans the run's {} \
             epochs, and {} would be another curve, matching neither; start a new run for {} epochs",
            old.train.epochs,
            cfg.train.epochs,
            cfg.train.epochs
        );
    }
    let mut cfg = cfg;
    cfg.run.out_dir = run_dir.to_path_buf();
    Ok(cfg)
}

/// Reads the corpus of `cfg` and settles `model.vocab_size`: taken from the corpus when left
/// out, checked against it when set. The settled config is checked again, as loading a
/// checkpoint checks it, so that no run trains to write checkpoints nothing can load.
///
/// `source` reads the corpus from other paths than `cfg.data`'s (a resumed run's recorded
/// absolute paths); with `recorded`, every file read must be the text that record names.
fn load_corpus(
    cfg: &mut Config,
    source: Option<&crate::config::DataConfig>,
    recorded: Option<(&data::CorpusRecord, &Path)>,
    tokenizer: Option<crate::text::Tokenizer>,
) -> Result<Corpus> {
    let corpus = Corpus::load_with(source.unwrap_or(&cfg.data), recorded, tokenizer)?;
    let n = corpus.vocab.len() as i64;
    match cfg.model.vocab_size {
        None => cfg.model.vocab_size = Some(n),
        Some(v) if v != n => bail!(
            "{} gives a vocabulary of {n} words, but model.vocab_size is {v} (leave it out to take the corpus's)",
            corpus.file(Split::Train).display(),
        ),
        Some(_) => {}
    }
    cfg.validate().with_context(|| format!("{}: config with its vocabulary", corpus.file(Split::Train).display()))?;
    Ok(corpus)
}

/// Refuses, before anything is allocated, a model whose training cannot fit the device.
fn check_memory(cfg: &Config, device: Device) -> Result<()> {
    let need = crate::model::training_bytes(cfg);
    let Some(have) = device::memory_available(device) else { return Ok(()) };
    if need > have as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        bail!(
            "model: training it needs about {:.1} GiB ({} parameters, their gradients, recovery copy and \
             averages, and one batch of activations) but {} has {:.1} GiB available; make model.hidden_size, \
             model.num_layers or train.batch_size smaller",
            gib(need),
            crate::model::parameter_count(&cfg.model),
            device::name(device),
            gib(have as f64)
        );
    }
    Ok(())
}

/// The three splits cut into batches. Built before the first step, so a split too short for
/// its batch size is an error at the start, not after the last epoch.
struct Splits {
    train: Batches,
    valid: Batches,
    /// None where the corpus has no test split.
    test: Option<Batches>,
    /// (tokens, characters) the batches of train (all ranks'), valid and test score.
    scored: [(u64, u64); 3],
}

impl Splits {
    /// Bits per character of a mean loss over split `i`'s batches (0 train, 1 valid, 2 test).
    fn bpc(&self, i: usize, mean_loss: f64) -> f64 {
        let (tokens, chars) = self.scored[i];
        eval::bits_per_char(mean_loss, tokens, chars)
    }
}

impl Splits {
    fn new(corpus: &Corpus, cfg: &Config, device: Device) -> Result<Splits> {
        let t = &cfg.train;
        let (train, eval) = ((t.batch_size, "train.batch_size"), (t.eval_batch_size, "train.eval_batch_size"));
        let [train, valid, test] =
            [(Split::Train, train), (Split::Valid, eval), (Split::Test, eval)].map(|(split, batch)| {
                corpus
                    .info
                    .layout
                    .has(split)
                    .then(|| corpus.batches(split, &cfg.data, batch, t.bptt, device))
                    .transpose()
            });
        let (train, valid, test) =
            (train?.expect("every corpus has a train split"), valid?.expect("every corpus has a valid split"), test?);
        let scored = [(Some(&train), Split::Train), (Some(&valid), Split::Valid), (test.as_ref(), Split::Test)].map(
            |(b, split)| {
                b.map_or((0, 0), |b| {
                    ((b.len() as i64 * b.tokens_per_batch()) as u64, b.chars_scored(corpus.chars(split)))
                })
            },
        );
        Ok(Splits { train, valid, test, scored })
    }
}

/// The last check that found the loss and weights sound: the next batch, the loss sum and
/// the number of batches in it.
#[derive(Debug, Clone, Copy)]
struct Sound {
    batch: usize,
    loss_sum: f64,
    counted: usize,
}

struct Session {
    cfg: Config,
    corpus: Corpus,
    device: Device,
    run: RunDir,
    step: TrainStep,
    schedule: LrSchedule,
    metrics: MetricsLog,
    records: Vec<EpochRecord>,
    reporter: Reporter,
    splits: Splits,
    pos: Resume,
    /// Wall seconds (training and validation) of each epoch this process ran.
    epoch_walls: Vec<f64>,
    /// Whether the run's duration has been projected yet.
    projected: bool,
    /// Continued from a checkpoint (rather than started).
    resumed: bool,
    /// See [`TrainOptions::stop_after`].
    stop_after: Option<usize>,
    /// The process group of data-parallel training (None: this process alone).
    group: Option<Rc<Group>>,
    /// `train.max_minutes`.
    budget: Option<TimeBudget>,
    /// The learning rate of the last step.
    lr_now: f64,
    /// The fraction of the time budget used, as every rank agreed at the last check (0
    /// without a budget; 1 or more: training ends).
    time_fraction: f64,
    /// Seconds of the last validation (what the time budget estimates evaluations from).
    last_valid_seconds: Option<f64>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: Config,
        corpus: Corpus,
        splits: Splits,
        model: LstmLm,
        device: Device,
        run: RunDir,
        opts: &TrainOptions,
        resumed: Option<Checkpoint>,
        group: Option<Rc<Group>>,
    ) -> Result<Session> {
        let t = &cfg.train;
        let use_graph = t.cuda_graph && device.is_cuda() && crate::cuda::available() && group.is_none();
        let mut splits = splits;
        // A data-parallel rank trains its own block of the streams, with its own state.
        let mut local = t.clone();
        if let Some(g) = &group {
            let (start, len) = g.shard(t.batch_size);
            splits.train = splits.train.shard(start, len);
            local.batch_size = len;
        }
        let mut step = TrainStep::new(model, &local, use_graph)?;
        if let Some(g) = &group {
            step.set_group(g.clone());
        }
        let metrics = MetricsLog::new(run.metrics());
        let mut schedule = LrSchedule::new(t);
        let (pos, records) = match &resumed {
            None => (Resume::start(), Vec::new()),
            Some(ckpt) => {
                let pos = ckpt.meta.resume.clone().expect("checked by resume()");
                schedule.lr = ckpt.meta.lr;
                schedule.best = ckpt.meta.best_valid_ppl;
                step.restore_resumable(&ckpt.state, pos.asgd_count, &ckpt.dir.join(checkpoint::STATE))?;
                step.reset_loss_sum(pos.loss_sum);
                let records = if leads(&group) { metrics.keep_before(pos.epoch + 1)? } else { Vec::new() };
                (pos, records)
            }
        };
        let (budget, lr_now) = (TimeBudget::of(t), schedule.lr);
        let last_valid_seconds = records.last().map(|r| r.valid_seconds);
        Ok(Session {
            reporter: Reporter::new(opts.quiet || !leads(&group)),
            cfg,
            corpus,
            device,
            run,
            step,
            schedule,
            metrics,
            records,
            splits,
            pos,
            epoch_walls: Vec::new(),
            projected: false,
            resumed: resumed.is_some(),
            stop_after: opts.stop_after,
            group,
            budget,
            lr_now,
            time_fraction: 0.0,
            last_valid_seconds,
        })
    }

    fn leads(&self) -> bool {
        leads(&self.group)
    }

    /// Training tokens per step, over every rank.
    fn tokens_per_batch(&self) -> f64 {
        self.splits.train.tokens_per_batch() as f64 * self.group.as_ref().map_or(1, |g| g.world) as f64
    }

    /// What every rank agrees on at a check: the mean of the ranks' loss sums, whether any
    /// of them is to stop, and rank 0's `fraction` of the time budget. Alone: its own.
    fn agree(&self, loss_sum: f64, stopping: bool, fraction: f64) -> Result<(f64, bool, f64)> {
        let Some(g) = &self.group else { return Ok((loss_sum, stopping, fraction)) };
        let fraction = if g.rank == 0 { fraction } else { 0.0 };
        let t = Tensor::from_slice(&[loss_sum, if stopping { 1.0 } else { 0.0 }, fraction]);
        g.allreduce_sum(&t)?;
        let v = Vec::<f64>::try_from(&t)?;
        Ok((v[0] / g.world as f64, v[1] > 0.0, v[2]))
    }

    /// Whether another epoch is to be trained: not past `train.epochs`, nor the time budget.
    fn more_epochs(&self) -> bool {
        self.pos.epoch < self.cfg.train.epochs && !self.pos.budget_spent
    }

    /// What the evaluations after training will take, at the last validation's speed (or,
    /// before one, at twice `train_speed` tokens/s, as validation runs without backward).
    fn reserve(&self, train_speed: f64) -> Reserve {
        let tokens = |b: &Batches| (b.len() as i64 * b.tokens_per_batch()) as f64;
        let valid_tokens = tokens(&self.splits.valid);
        Reserve {
            valid_tokens,
            // The final evaluation scores the test split, or validation where there is none.
            test_tokens: tokens(self.splits.test.as_ref().unwrap_or(&self.splits.valid)),
            eval_tokens_per_s: match self.last_valid_seconds {
                Some(s) if s > 0.0 => valid_tokens / s,
                _ => 2.0 * train_speed,
            },
            dynamic: self.cfg.train.dynamic_eval.then(|| (tokens(&self.splits.train), train_speed)),
        }
    }

    /// The fraction of the time budget's training time used `epoch_seconds` into the
    /// epoch's training (0 without a budget).
    fn budget_fraction(&self, epoch_seconds: f64, train_speed: f64) -> f64 {
        self.budget.map_or(0.0, |b| b.fraction(self.pos.run_seconds + epoch_seconds, &self.reserve(train_speed)))
    }

    /// Where the step of batch `k` stands in the run, for the learning-rate schedule: its
    /// step, and the fraction done of the time budget (every rank's, as agreed at the last
    /// check) or else of the run's steps.
    fn progress(&self, k: usize) -> Progress {
        let n = self.splits.train.len() as u64;
        let step = self.pos.epoch as u64 * n + k as u64;
        let fraction = match self.budget {
            Some(_) => self.time_fraction,
            None => self.schedule.fraction_of_steps(step, self.cfg.train.epochs as u64 * n),
        };
        Progress { step, fraction }
    }

    /// Rank 0's value of `x`, on every rank (so every rank takes the same decisions).
    fn leaders_value(&self, x: f64) -> Result<f64> {
        let Some(g) = &self.group else { return Ok(x) };
        let t = Tensor::from_slice(&[if g.rank == 0 { x } else { 0.0 }]);
        g.allreduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(&t)?[0])
    }

    fn vocab_size(&self) -> i64 {
        self.cfg.model.vocab()
    }

    /// Whether to stop: a signal, or nobody reads stdout any more.
    fn stopping(&self, stop: &AtomicBool) -> bool {
        stop.load(Ordering::SeqCst) || self.reporter.output_closed()
    }

    fn reason(&self) -> &'static str {
        if self.reporter.output_closed() {
            "stdout was closed"
        } else {
            "interrupted"
        }
    }

    fn run(mut self, stop: &AtomicBool) -> Result<Outcome> {
        self.announce();
        {
            let _graceful = interrupt::Graceful::enter();
            while self.more_epochs() {
                self.train_epoch(stop)?;
                self.end_epoch()?;
                // Every rank stops after the same epoch, wherever the signal found each.
                let (_, stopping, _) = self.agree(0.0, self.stopping(stop), 0.0)?;
                if stopping && self.more_epochs() {
                    return Err(self.interrupted(false).into());
                }
                if self.stop_after.is_some_and(|n| self.epoch_walls.len() >= n) && self.more_epochs() {
                    return Ok(if self.leads() { Outcome::Stopped(self.projection()) } else { Outcome::Worker });
                }
            }
        }
        self.reporter.finish();
        // Past the last collective, rank 0 alone decides how the run ends.
        if !self.leads() {
            return Ok(Outcome::Worker);
        }
        if self.stopping(stop) {
            return Err(self.interrupted(true).into());
        }
        let split = self.final_split();
        let _note = interrupt::Note::enter(format!(
            "interrupted in the {split} evaluation; {}",
            left_to_test(&self.run.root, split)
        ));
        failpoint::pause("test");
        self.finish().map(Outcome::Finished)
    }

    fn projection(&self) -> Projection {
        let walls = &self.epoch_walls;
        let steady = if walls.len() > 1 { &walls[1..] } else { &walls[..] };
        let recent = &self.records[self.records.len() - steady.len()..];
        Projection {
            run_dir: self.run.root.clone(),
            trained: walls.len(),
            done: self.pos.epoch,
            total: self.cfg.train.epochs,
            seconds_per_epoch: steady.iter().sum::<f64>() / steady.len() as f64,
            tokens_per_s: recent.iter().map(|r| r.tokens_per_s).sum::<f64>() / recent.len() as f64,
        }
    }

    fn announce(&self) {
        if !self.resumed {
            self.reporter.line(&self.corpus.describe());
            let how = self.step.describe();
            self.reporter.line(&format!(
                "training {} parameters on {} ({}), {} batches of {}x{} per epoch{}{}",
                self.step.model.num_parameters(),
                device::name(self.device),
                self.cfg.run.out_dir.display(),
                self.splits.train.len(),
                self.cfg.train.batch_size,
                self.cfg.train.bptt,
                if how.is_empty() { "" } else { ", " },
                how
            ));
        } else if !self.more_epochs() {
            self.reporter.line(&format!(
                "resuming {} after its last epoch ({} of {}): scoring the test split with best/",
                self.run.root.display(),
                self.pos.epoch,
                self.cfg.train.epochs
            ));
        } else {
            self.reporter.line(&format!(
                "resuming {} at epoch {}, batch {} of {}",
                self.run.root.display(),
                self.pos.epoch + 1,
                self.pos.batch,
                self.splits.train.len()
            ));
        }
    }

    fn interrupted(&self, finished: bool) -> Interrupted {
        Interrupted {
            run_dir: self.run.root.clone(),
            epoch: self.pos.epoch + 1,
            batch: self.pos.batch,
            batches: self.splits.train.len(),
            finished,
            reason: self.reason(),
            final_split: self.final_split(),
        }
    }

    /// The split the best checkpoint is finally scored on: test, or valid where there is none.
    fn final_split(&self) -> Split {
        if self.splits.test.is_some() {
            Split::Test
        } else {
            Split::Valid
        }
    }

    /// The batches of the current epoch from `pos.batch` on. Every [`CHECK_EVERY`] the loss
    /// is read: sound, it becomes the point to return to; diverged, training goes back there.
    fn train_epoch(&mut self, stop: &AtomicBool) -> Result<()> {
        let n = self.splits.train.len();
        if self.pos.batch == 0 {
            self.step.reset_state();
            self.step.reset_loss_sum(0.0);
            self.pos.loss_sum = 0.0;
            self.pos.loss_batches = 0;
            self.pos.seconds = 0.0;
        }
        device::reset_peak(self.device);
        self.step.snapshot();
        let mut sound = Sound { batch: self.pos.batch, loss_sum: self.pos.loss_sum, counted: self.pos.loss_batches };
        let mut counted = sound.counted;
        self.reporter.start_epoch(self.pos.epoch + 1, self.cfg.train.epochs, n, self.pos.batch);
        let t0 = Instant::now();
        let mut last_check = Instant::now();
        let mut last_report = (sound, 0.0f64);
        let mut k = self.pos.batch;
        let start = counted;
        self.time_fraction = self.leaders_value(self.budget_fraction(self.pos.seconds, 0.0))?;
        while k < n && self.time_fraction < 1.0 {
            self.run_step(k)?;
            counted += 1;
            k += 1;
            let stopping = self.stopping(stop);
            let due = match self.group {
                None => stopping || k == n || last_check.elapsed() >= CHECK_EVERY,
                Some(_) => k == n || k % DIST_CHECK_BATCHES == 0,
            };
            if !due {
                continue;
            }
            last_check = Instant::now();
            let elapsed = self.pos.seconds + t0.elapsed().as_secs_f64();
            // No speed is trusted from the first seconds of a process (see TimeBudget).
            let measured = t0.elapsed().as_secs_f64();
            let speed = if measured >= crate::schedule::MIN_MEASURED_S {
                (counted - start) as f64 * self.tokens_per_batch() / measured
            } else {
                0.0
            };
            let fraction = self.budget_fraction(elapsed, speed);
            let (sum, stopping, fraction) = self.agree(self.step.loss_sum(), stopping, fraction)?;
            self.time_fraction = fraction;
            let mean = (sum - sound.loss_sum) / (counted - sound.counted).max(1) as f64;
            if diverged(mean, self.vocab_size()) || !self.step.weights_finite() {
                self.recover(k - 1, sound, mean, elapsed)?;
                counted = sound.counted;
                k = sound.batch;
            } else {
                self.step.snapshot();
                sound = Sound { batch: k, loss_sum: sum, counted };
            }
            self.report_progress(&mut last_report, sound, elapsed, k == n);
            if stopping && sound.batch < n {
                self.save_sound_state(sound, elapsed)?;
                return Err(self.interrupted(false).into());
            }
        }
        // The time budget ends training here (the loop stopped at a sound check).
        if k < n {
            self.pos.budget_spent = true;
        }
        self.pos.batch = k;
        self.pos.loss_sum = sound.loss_sum;
        self.pos.loss_batches = sound.counted;
        self.pos.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Saves the last sound check as the resumable position in `last/` (before stopping
    /// mid-epoch).
    fn save_sound_state(&mut self, sound: Sound, elapsed: f64) -> Result<()> {
        self.pos.batch = sound.batch;
        self.pos.loss_sum = sound.loss_sum;
        self.pos.loss_batches = sound.counted;
        self.pos.seconds = elapsed;
        self.save_last(None)?;
        self.reporter.finish();
        Ok(())
    }

    /// One training step on batch `k` (leaving CUDA graphs if a capture fails).
    fn run_step(&mut self, k: usize) -> Result<()> {
        // The schedule decides the learning rate; this is the one place it reaches the step.
        self.lr_now = self.schedule.at(self.progress(k));
        self.step.set_lr(self.lr_now);
        let (x, y) = self.splits.train.get(k);
        // Each rank draws its own dropout masks for its own streams.
        let rank = self.group.as_ref().map_or(0, |g| g.rank as u64);
        let seed = step_seed(self.cfg.train.seed ^ rank.wrapping_mul(0xD1B5_4A32_D192_ED03), self.pos.epoch, k);
        if let Err(e) = self.step.run(&x, &y, seed) {
            if !self.step.uses_graph() {
                return Err(e);
            }
            self.reporter.warn(&format!("{e:#}; continuing without CUDA graphs"));
            self.step.fall_back_to_eager();
            self.step.run(&x, &y, seed)?;
        }
        let global = self.pos.epoch * self.splits.train.len() + k;
        if let Some(d) = failpoint::diverge_after(global) {
            self.step.provoke(d);
        }
        failpoint::pause_after_step(global);
        Ok(())
    }

    /// The progress bar, and once per process (after [`PROJECT_AFTER_S`] of training, or at
    /// the end of the first epoch if that comes sooner) a projection of the run's duration.
    fn report_progress(&mut self, last: &mut (Sound, f64), now: Sound, elapsed: f64, epoch_end: bool) {
        let (before, e0) = *last;
        if now.batch > before.batch && now.counted > before.counted {
            let batches = (now.counted - before.counted) as f64;
            let loss = (now.loss_sum - before.loss_sum) / batches;
            let speed = batches * self.tokens_per_batch() / (elapsed - e0).max(1e-9);
            self.reporter.update(now.batch, loss.exp(), self.splits.bpc(0, loss), self.schedule.lr, speed);
            if !self.projected && (elapsed >= PROJECT_AFTER_S || epoch_end) {
                self.projected = true;
                self.project(speed);
            }
        }
        *last = (now, elapsed);
    }

    /// Says how long the remaining epochs will take at `speed` tokens/s (validation
    /// included, estimated at twice the training speed), and on a CPU which run fits one.
    fn project(&self, speed: f64) {
        let t = &self.cfg.train;
        let per_epoch = self.splits.train.len() as f64 * self.tokens_per_batch() / speed
            + self.splits.valid.len() as f64 * self.splits.valid.tokens_per_batch() as f64 / (2.0 * speed);
        let remaining = (t.epochs - self.pos.epoch) as f64 * per_epoch;
        let mut msg = format!(
            "projected: {} per epoch, about {} for the {} epoch{} left, at {:.1}k tokens/s",
            human_duration(per_epoch),
            human_duration(remaining),
            t.epochs - self.pos.epoch,
            if t.epochs - self.pos.epoch == 1 { "" } else { "s" },
            speed / 1000.0
        );
        if let Some(b) = self.budget {
            let left = (1.0 - self.time_fraction).max(0.0) * b.training_seconds(&self.reserve(speed));
            msg.push_str(&format!(
                "; the time budget (train.max_minutes = {}) ends training in about {}",
                b.seconds / 60.0,
                human_duration(left)
            ));
        } else if !self.device.is_cuda() && remaining > CPU_HINT_AFTER_S {
            msg.push_str(
                "; that is long for a CPU: configs/rnnlm.toml (`make train CONFIG=configs/rnnlm.toml`) \
                 is the CPU-sized run",
            );
        }
        self.reporter.line(&msg);
    }

    /// A diverged span (loss not finite or above [`divergence_limit`], or weights not
    /// finite): back to the last sound check with lr divided. After `max_nan_restarts`, that
    /// sound state goes to `last/` (resumable) and the run stops with an error.
    fn recover(&mut self, batch: usize, sound: Sound, mean_loss: f64, elapsed: f64) -> Result<()> {
        self.pos.nan_restarts += 1;
        self.step.restore();
        self.step.reset_loss_sum(sound.loss_sum);
        let divisor = self.cfg.train.nan_lr_divisor();
        self.schedule.lr /= divisor;
        let what = if !mean_loss.is_finite() {
            "loss not finite".to_string()
        } else if diverged(mean_loss, self.vocab_size()) {
            format!("mean loss {mean_loss:.3e}, above the limit {:.1}", divergence_limit(self.vocab_size()))
        } else {
            "weights not finite".to_string()
        };
        let (epoch, max) = (self.pos.epoch + 1, self.cfg.train.max_nan_restarts);
        if self.pos.nan_restarts > max {
            self.save_sound_state(sound, elapsed)?;
            bail!(
                "training diverged in epoch {epoch}, batch {} ({what}), {} times (train.max_nan_restarts = {max}); \
                 the last sound weights, with lr lowered to {}, are in {}: continue with `ptb-lm train --resume {} \
                 --set train.max_nan_restarts={}`, or start again with a smaller train.lr or train.max_grad",
                batch + 1,
                self.pos.nan_restarts,
                self.schedule.lr,
                self.run.last().display(),
                self.run.root.display(),
                self.pos.nan_restarts + max.max(1),
            );
        }
        self.reporter.warn(&format!(
            "training diverged in epoch {epoch}, batch {} ({what}): went back to batch {} of the last sound check \
             and divided lr by {divisor} (now {}); {} of {max} restarts used",
            batch + 1,
            sound.batch,
            self.schedule.lr,
            self.pos.nan_restarts
        ));
        Ok(())
    }

    fn end_epoch(&mut self) -> Result<()> {
        self.reporter.finish();
        let epoch = self.pos.epoch;
        let train_loss = self.pos.loss_sum / self.pos.loss_batches.max(1) as f64;
        let train_ppl = train_loss.exp();
        let lr_used = self.lr_now;
        let (valid_ppl, valid_bpc, valid_seconds) = self.validate()?;
        let grad_norm_through_time = self.grad_norm_through_time()?;
        let averaging = self.step.averaging();
        let start_averaging = self.cfg.train.asgd
            && !averaging
            && (asgd_should_start(&self.pos.valid_history, valid_ppl, self.cfg.train.asgd_nonmono)
                || failpoint::average_after(epoch + 1));
        // Averaging keeps the learning rate from the epoch it starts on.
        let improved = self.schedule.observe(valid_ppl, averaging || start_averaging);
        self.pos.valid_history.push(valid_ppl);
        if improved {
            self.save_best(valid_ppl)?;
        }
        if start_averaging {
            self.step.start_averaging(None);
        }
        let record = EpochRecord {
            epoch: epoch + 1,
            lr: lr_used,
            train_ppl,
            valid_ppl,
            train_bpc: Some(self.splits.bpc(0, train_loss)),
            valid_bpc: Some(valid_bpc),
            tokens_per_s: (self.pos.loss_batches as f64 * self.tokens_per_batch()) / self.pos.seconds.max(1e-9),
            seconds: self.pos.seconds,
            valid_seconds,
            device: device::name(self.device),
            improved,
            cuda_graph: self.step.uses_graph(),
            averaging,
            peak_gpu_mib: device::peak_gpu_mib(self.device),
            peak_rss_mib: device::peak_rss_mib(),
            grad_norm_through_time,
        };
        self.record(&record)?;
        self.last_valid_seconds = Some(valid_seconds);
        self.pos.run_seconds += record.seconds + record.valid_seconds;
        self.pos.epoch += 1;
        self.pos.batch = 0;
        self.pos.loss_sum = 0.0;
        self.pos.loss_batches = 0;
        self.pos.seconds = 0.0;
        self.step.reset_state();
        self.step.reset_loss_sum(0.0);
        // last/ describes its own weights: the raw ones, which were validated only when they
        // are also the ones in use (not averaging).
        self.save_last((!averaging).then_some(valid_ppl))?;
        self.epoch_walls.push(record.seconds + record.valid_seconds);
        self.reporter.line(&self.epoch_line(&record, start_averaging));
        Ok(())
    }

    /// Validation perplexity and bits per character (of the averaged weights under averaged
    /// SGD) and its seconds; a diverged one is an error, before anything of the epoch is saved.
    fn validate(&mut self) -> Result<(f64, f64, f64)> {
        let t = Instant::now();
        let valid_b = &self.splits.valid;
        let valid_loss = self.step.with_averaged(|m| eval::mean_loss(m, valid_b));
        let valid_loss = self.leaders_value(valid_loss)?;
        let valid_ppl = valid_loss.exp();
        if diverged(valid_ppl.ln(), self.vocab_size()) {
            bail!(
                "epoch {}: the validation perplexity is {valid_ppl} although training was sound (the weights \
                 diverged on other data); nothing of this epoch was saved: {} holds the state before it \
                 (`ptb-lm train --resume {}`), or start again with a smaller train.lr",
                self.pos.epoch + 1,
                self.run.last().display(),
                self.run.root.display()
            );
        }
        Ok((valid_ppl, self.splits.bpc(1, valid_loss), t.elapsed().as_secs_f64()))
    }

    /// With `train.log_grad_norm`, the gradient's norm through time on the validation split's
    /// first batch, for the weights being trained (not averaged-SGD means); the leading rank
    /// alone measures (no collective). A norm that overflowed is said in a warning, and the
    /// epoch's record goes without the field.
    fn grad_norm_through_time(&self) -> Result<Option<Vec<f64>>> {
        if !self.cfg.train.log_grad_norm || !self.leads() {
            return Ok(None);
        }
        let (x, y) = self.splits.valid.get(0);
        let norms = gradflow::norms_through_time(&self.step.model, &x, &y)?;
        if let Some(k) = norms.iter().position(|n| !n.is_finite()) {
            self.reporter.warn(&format!(
                "epoch {}: the gradient's norm through time is not finite {k} steps back (it exploded beyond \
                 float range); metrics.jsonl records this epoch without it",
                self.pos.epoch + 1
            ));
            return Ok(None);
        }
        Ok(Some(norms))
    }

    /// Appends the epoch to metrics.jsonl and redraws the plots.
    fn record(&mut self, record: &EpochRecord) -> Result<()> {
        self.records.push(record.clone());
        if !self.leads() {
            return Ok(());
        }
        self.metrics.append(record)?;
        let title = format!("{}: perplexity per epoch", self.run.root.display());
        if let Err(e) = plot::perplexity_png(&self.records, &self.run.plot(), &title) {
            self.reporter.warn(&format!("{e:#}"));
        }
        if self.records.iter().any(|r| r.grad_norm_through_time.is_some()) {
            let title = format!("{}: gradient norm through time ({})", self.run.root.display(), self.cfg.model.cell);
            if let Err(e) = plot::grad_norm_png(&self.records, &self.run.grad_norm_plot(), &title) {
                self.reporter.warn(&format!("{e:#}"));
            }
        }
        Ok(())
    }

    /// "epoch   3 | lr ... | best | ETA 12 min".
    fn epoch_line(&self, record: &EpochRecord, started_averaging: bool) -> String {
        let left = self.cfg.train.epochs - self.pos.epoch;
        let eta = if self.pos.budget_spent {
            " | time budget spent: testing".to_string()
        } else if let Some(b) = self.budget {
            format!(" | time budget: {} left", human_duration((b.seconds - self.pos.run_seconds).max(0.0)))
        } else if left > 0 {
            let mean = self.epoch_walls.iter().sum::<f64>() / self.epoch_walls.len() as f64;
            format!(" | ETA {}", human_duration(mean * left as f64))
        } else {
            String::new()
        };
        format!(
            "epoch {:>3} | lr {:>8.4} | train ppl {:>9.2} | valid ppl {:>9.2} | valid bpc {:>6.3} | {:>6.1}k tok/s \
             | {:>6.1} s{}{}{eta}",
            record.epoch,
            record.lr,
            record.train_ppl,
            record.valid_ppl,
            record.valid_bpc.unwrap_or(f64::NAN),
            record.tokens_per_s / 1000.0,
            record.seconds,
            if record.improved { " | best" } else { "" },
            if started_averaging { " | averaging from now on" } else { "" },
        )
    }

    fn meta(&self, valid_ppl: Option<f64>, resume: Option<Resume>) -> Meta {
        Meta {
            format: checkpoint::FORMAT,
            ptb_lm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.cfg.clone(),
            vocab: self.corpus.vocab.words().to_vec(),
            epoch: self.pos.epoch,
            lr: self.schedule.lr,
            valid_ppl,
            best_valid_ppl: self.schedule.best,
            resume,
            corpus: Some(self.corpus.record.clone()),
        }
    }

    /// Never writes non-finite weights (the checks above make this unreachable).
    fn ensure_finite(&self) -> Result<()> {
        if !self.step.weights_finite() {
            bail!("{}: refusing to save non-finite weights", self.run.root.display());
        }
        Ok(())
    }

    /// The weights that were just validated (the averaged ones under averaged SGD).
    fn save_best(&mut self, valid_ppl: f64) -> Result<()> {
        self.ensure_finite()?;
        if !self.leads() {
            return Ok(());
        }
        let weights = self.step.averaged_named().unwrap_or_else(|| self.step.model.named_parameters());
        let mut meta = self.meta(Some(valid_ppl), None);
        meta.epoch += 1;
        checkpoint::save_with(&self.run.best(), &meta, &weights, &[], &self.corpus.tokenizer.files())
    }

    fn save_last(&mut self, valid_ppl: Option<f64>) -> Result<()> {
        self.ensure_finite()?;
        self.pos.asgd_count = self.step.averaged_count();
        let state = self.step.resumable_state()?;
        if !self.leads() {
            return Ok(());
        }
        let meta = self.meta(valid_ppl, Some(self.pos.clone()));
        let files = self.corpus.tokenizer.files();
        checkpoint::save_with(&self.run.last(), &meta, &self.step.model.named_parameters(), &state, &files)
    }

    fn finish(self) -> Result<Summary> {
        if !self.run.best().exists() {
            bail!(
                "no epoch reached a finite validation perplexity, so there is no best checkpoint to test \
                 (see {}); try a smaller train.lr",
                self.run.metrics().display()
            );
        }
        let best = Checkpoint::load(&self.run.best())?;
        let model = best.model(self.device)?;
        let t = Instant::now();
        // With no test split, the best checkpoint is scored on validation, and says so.
        let (final_split, batches, i) = match &self.splits.test {
            Some(test) => (Split::Test, test, 2),
            None => (Split::Valid, &self.splits.valid, 1),
        };
        let final_loss = eval::mean_loss(&model, batches);
        let (final_ppl, final_bpc, seconds) =
            (final_loss.exp(), self.splits.bpc(i, final_loss), t.elapsed().as_secs_f64());
        let is_test = final_split == Split::Test;
        let summary = Summary {
            run_dir: self.run.root.clone(),
            device: device::name(self.device),
            num_parameters: model.num_parameters(),
            epochs: self.records.clone(),
            best_epoch: Some(best.meta.epoch),
            best_valid_ppl: self.schedule.best,
            best_valid_bpc: self.schedule.best.map(|p| self.splits.bpc(1, p.ln())),
            final_split,
            final_ppl,
            final_bpc,
            test_ppl: is_test.then_some(final_ppl),
            test_bpc: is_test.then_some(final_bpc),
            test_seconds: is_test.then_some(seconds),
            train_seconds: self.records.iter().map(|r| r.seconds + r.valid_seconds).sum(),
            test_ppl_dynamic: None,
            test_bpc_dynamic: None,
            dynamic_seconds: None,
        };
        let no_test = if is_test { "" } else { " (no test split: the best checkpoint scored on validation)" };
        self.reporter.line(&format!(
            "best valid ppl {:.2} (epoch {}) | {final_split} ppl {final_ppl:.2} | {final_split} bpc {final_bpc:.4}{no_test} \
             | checkpoint {}",
            summary.best_valid_ppl.unwrap_or(f64::NAN),
            best.meta.epoch,
            self.run.best().display()
        ));
        let mut summary = summary;
        if self.cfg.train.dynamic_eval {
            let t = Instant::now();
            let report = self.dynamic_test()?;
            summary.test_ppl_dynamic = Some(report.ppl);
            summary.test_bpc_dynamic = Some(report.bpc);
            summary.dynamic_seconds = Some(t.elapsed().as_secs_f64());
            self.reporter.line(&format!(
                "test ppl {:.2} | test bpc {:.4} with {} ({:.0} s)",
                report.ppl,
                report.bpc,
                report.name.trim_start_matches("test (").trim_end_matches(')'),
                t.elapsed().as_secs_f64()
            ));
        }
        // The summary is the run's commit point: written whole, after every evaluation.
        crate::fsutil::write_atomic(&self.run.summary(), serde_json::to_string_pretty(&summary)?.as_bytes())?;
        Ok(summary)
    }

    /// `train.dynamic_eval`: the test split of best/ under dynamic evaluation, exactly as
    /// `ptb-lm eval --checkpoint RUN/best --dynamic` scores it (statistics kept in best/).
    fn dynamic_test(&self) -> Result<eval::EvalReport> {
        let opts = eval::DynamicOptions {
            settings: crate::dynamic::Settings::default(),
            search: false,
            search_tokens: 0,
            stats_batches: None,
        };
        let target = eval::Target::Split(Split::Test);
        eval::run(&self.run.best(), &target, &eval::CorpusPlace::default(), self.cfg.run.device, None, Some(&opts))
    }
}

/// "45 s", "12 min", "3 h 05 min".
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let m = (s + 30) / 60;
    match s {
        0..=99 => format!("{s} s"),
        100..=5999 => format!("{m} min"),
        _ => format!("{} h {:02} min", m / 60, m % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asgd_trigger_is_non_monotone() {
        // Worse than the best before the last 2 epochs: trigger.
        assert!(asgd_should_start(&[100.0, 90.0, 95.0, 96.0], 97.0, 2));
        // Better than it: no trigger.
        assert!(!asgd_should_start(&[100.0, 90.0, 95.0, 96.0], 89.0, 2));
        // Too little history.
        assert!(!asgd_should_start(&[100.0, 90.0], 200.0, 2));
    }

    #[test]
    fn divergence_is_a_loss_far_above_guessing_or_not_finite() {
        let v = 10_000;
        let guess = (v as f64).ln();
        assert!(!diverged(guess, v), "a uniform guess is not diverged");
        assert!(!diverged(guess + 19.9, v));
        assert!(diverged(guess + 20.1, v));
        assert!(diverged(1e30, v), "huge but finite");
        assert!(diverged(f64::INFINITY, v) && diverged(f64::NAN, v));
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(human_duration(42.4), "42 s");
        assert_eq!(human_duration(720.0), "12 min");
        assert_eq!(human_duration(7199.0), "2 h 00 min");
        assert_eq!(human_duration(6.0 * 3600.0 + 310.0), "6 h 05 min");
    }

    #[test]
    fn step_seeds_differ_by_position() {
        let a = step_seed(1, 0, 0);
        assert!(a >= 0);
        assert_ne!(a, step_seed(1, 0, 1));
        assert_ne!(a, step_seed(1, 1, 0));
        assert_ne!(a, step_seed(2, 0, 0));
        assert_eq!(a, step_seed(1, 0, 0));
    }
}
