//! Training, as the book's `train_better_rnnlm.py` does it: per epoch, SGD with global-norm
//! clipping over the stateful batches, then validation perplexity; a better validation
//! perplexity writes the `best/` checkpoint, a worse (or equal) one divides the learning
//! rate by `lr_decay`. At the end, the test perplexity of `best/`.
//!
//! Around it: a resumable `last/` checkpoint after every epoch and on Ctrl-C/SIGTERM,
//! per-step seeds derived from (seed, epoch, batch) so an interrupted and resumed run
//! computes exactly what an uninterrupted one does, and recovery from non-finite losses.

use crate::checkpoint::{self, Checkpoint, Meta, Resume};
use crate::config::Config;
use crate::data::{self, Batches, Ptb};
use crate::device;
use crate::eval;
use crate::metrics::{EpochRecord, MetricsLog};
use crate::model::LstmLm;
use crate::plot;
use crate::progress::Reporter;
use crate::run::RunDir;
use crate::step::TrainStep;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::{Device, Kind};

/// How often (at most) the loop synchronises with the device to read the loss, check it is
/// finite and update the progress bar.
const CHECK_EVERY: Duration = Duration::from_millis(500);

pub struct TrainOptions {
    pub overwrite: bool,
    pub quiet: bool,
}

/// The book's learning-rate rule.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub factor: f64,
    pub best: Option<f64>,
}

impl LrSchedule {
    /// Records a validation perplexity: true when it beats the best so far; otherwise the
    /// learning rate is divided by `factor` (unless `frozen`, as under averaged SGD).
    pub fn observe(&mut self, valid_ppl: f64, frozen: bool) -> bool {
        let improved = valid_ppl.is_finite() && self.best.is_none_or(|b| valid_ppl < b);
        if improved {
            self.best = Some(valid_ppl);
        } else if !frozen {
            self.lr /= self.factor;
        }
        improved
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

/// Ctrl-C or SIGTERM stopped training after saving a resumable checkpoint.
#[derive(Debug)]
pub struct Interrupted {
    pub run_dir: PathBuf,
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "interrupted in epoch {} after batch {} of {}; progress saved in {}; continue with: ptb-lm train --resume {}",
            self.epoch,
            self.batch,
            self.batches,
            self.run_dir.join("last").display(),
            self.run_dir.display()
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
    pub test_ppl: f64,
    pub test_seconds: f64,
    pub train_seconds: f64,
}

/// Starts a new run of `cfg`.
pub fn train(cfg: Config, opts: &TrainOptions, stop: &AtomicBool) -> Result<Summary> {
    let device = device::resolve(cfg.run.device)?;
    let run = RunDir::new(&cfg.run.out_dir);
    let ptb = load_corpus(&cfg)?;
    let _lock = run.lock()?;
    run.prepare_fresh(&cfg, opts.overwrite)?;
    tch::manual_seed(cfg.train.seed as i64);
    let model = LstmLm::new(&cfg.model, device, Kind::Float)?;
    Session::new(cfg, ptb, model, device, run, opts, None)?.run(stop)
}

/// Continues the run in `run_dir` from its `last/` checkpoint. `overrides` may change only
/// keys that do not alter what is computed (epochs, device, data dir, safety settings).
pub fn resume(run_dir: &Path, overrides: &[String], opts: &TrainOptions, stop: &AtomicBool) -> Result<Summary> {
    let run = RunDir::new(run_dir);
    let last = run.last();
    if !last.is_dir() {
        bail!(
            "{}: no resumable checkpoint (last/) in this directory; start a run with `ptb-lm train --config FILE`",
            run_dir.display()
        );
    }
    let _lock = run.lock()?;
    let ckpt = Checkpoint::load(&last)?;
    let Some(position) = ckpt.meta.resume.clone() else {
        bail!("{}: this checkpoint is not resumable (no training position)", last.display());
    };
    let old = ckpt.meta.config.clone();
    let cfg = if overrides.is_empty() {
        old.clone()
    } else {
        Config::parse(&toml::to_string(&old)?, overrides).context("override")?
    };
    let allowed = ["train.epochs", "run.device", "data.dir", "train.max_nan_restarts", "train.cuda_graph"];
    let mut probe = cfg.clone();
    probe.train.epochs = old.train.epochs;
    probe.run.device = old.run.device;
    probe.data.dir = old.data.dir.clone();
    probe.train.max_nan_restarts = old.train.max_nan_restarts;
    probe.train.cuda_graph = old.train.cuda_graph;
    probe.run.out_dir = old.run.out_dir.clone();
    if probe != old {
        bail!("when resuming, only {} may change ({})", allowed.join(", "), crate::run::config_diff(&old, &probe));
    }
    let mut cfg = cfg;
    cfg.run.out_dir = run_dir.to_path_buf();
    if position.epoch >= cfg.train.epochs {
        bail!(
            "{}: the run already finished its {} epochs; raise them with --epochs N to train further",
            run_dir.display(),
            cfg.train.epochs
        );
    }
    let device = device::resolve(cfg.run.device)?;
    let ptb = load_corpus(&cfg)?;
    if ptb.vocab.words() != ckpt.meta.vocab.as_slice() {
        bail!(
            "{}: its vocabulary differs from the checkpoint's ({}): not the corpus this run was trained on",
            data::split_file(&cfg.data.dir, "train").display(),
            last.display()
        );
    }
    let model = ckpt.model(device)?;
    run.write_config(&cfg)?;
    Session::new(cfg, ptb, model, device, run, opts, Some(ckpt))?.run(stop)
}

fn load_corpus(cfg: &Config) -> Result<Ptb> {
    let ptb = Ptb::load(&cfg.data.dir)?;
    if ptb.vocab.len() as i64 != cfg.model.vocab_size {
        bail!(
            "{} gives a vocabulary of {} words, but model.vocab_size is {}",
            data::split_file(&cfg.data.dir, "train").display(),
            ptb.vocab.len(),
            cfg.model.vocab_size
        );
    }
    Ok(ptb)
}

struct Session {
    cfg: Config,
    ptb: Ptb,
    device: Device,
    run: RunDir,
    step: TrainStep,
    schedule: LrSchedule,
    metrics: MetricsLog,
    records: Vec<EpochRecord>,
    reporter: Reporter,
    train_b: Batches,
    valid_b: Batches,
    pos: Resume,
}

impl Session {
    fn new(
        cfg: Config,
        ptb: Ptb,
        model: LstmLm,
        device: Device,
        run: RunDir,
        opts: &TrainOptions,
        resumed: Option<Checkpoint>,
    ) -> Result<Session> {
        let t = &cfg.train;
        let train_b = Batches::new(data::truncate(&ptb.train, cfg.data.train_tokens), t.batch_size, t.bptt, device)
            .context("training data")?;
        let valid_b =
            Batches::new(data::truncate(&ptb.valid, cfg.data.valid_tokens), t.eval_batch_size, t.bptt, device)
                .context("validation data")?;
        let use_graph = t.cuda_graph && device.is_cuda() && crate::cuda::available();
        let mut step = TrainStep::new(model, t, use_graph)?;
        let metrics = MetricsLog::new(run.metrics());
        let mut schedule = LrSchedule { lr: t.lr, factor: t.lr_decay, best: None };
        let mut records = Vec::new();
        let pos = match &resumed {
            None => Resume {
                epoch: 0,
                batch: 0,
                loss_sum: 0.0,
                loss_batches: 0,
                seconds: 0.0,
                nan_restarts: 0,
                best_epoch: None,
                valid_history: Vec::new(),
                asgd_count: 0,
            },
            Some(ckpt) => {
                let pos = ckpt.meta.resume.clone().expect("checked by resume()");
                schedule.lr = ckpt.meta.lr;
                schedule.best = ckpt.meta.best_valid_ppl;
                tch::no_grad(|| -> Result<()> {
                    for (name, t) in step.state.named() {
                        let src = ckpt.state_tensor(&name)?;
                        if src.size() != t.size() {
                            bail!(
                                "{}: '{name}' has shape {:?}, expected {:?}",
                                ckpt.dir.display(),
                                src.size(),
                                t.size()
                            );
                        }
                        t.shallow_clone().copy_(src);
                    }
                    Ok(())
                })?;
                if pos.asgd_count > 0 {
                    let avg = step
                        .model
                        .named_parameters()
                        .iter()
                        .map(|(n, _)| ckpt.state_tensor(&format!("avg.{n}")).map(|t| t.shallow_clone()))
                        .collect::<Result<Vec<_>>>()?;
                    step.start_averaging(Some((avg, pos.asgd_count)));
                }
                step.reset_loss_sum(pos.loss_sum);
                records = metrics.keep_before(pos.epoch + 1)?;
                pos
            }
        };
        step.set_lr(schedule.lr);
        Ok(Session {
            reporter: Reporter::new(opts.quiet),
            cfg,
            ptb,
            device,
            run,
            step,
            schedule,
            metrics,
            records,
            train_b,
            valid_b,
            pos,
        })
    }

    fn run(mut self, stop: &AtomicBool) -> Result<Summary> {
        let epochs = self.cfg.train.epochs;
        if self.pos.epoch == 0 && self.pos.batch == 0 {
            let how = self.step.describe();
            self.reporter.line(&format!(
                "training {} parameters on {} ({}), {} batches of {}x{} per epoch{}{}",
                self.step.model.num_parameters(),
                device::name(self.device),
                self.cfg.run.out_dir.display(),
                self.train_b.len(),
                self.cfg.train.batch_size,
                self.cfg.train.bptt,
                if how.is_empty() { "" } else { ", " },
                how
            ));
        } else {
            self.reporter.line(&format!(
                "resuming {} at epoch {}, batch {} of {}",
                self.run.root.display(),
                self.pos.epoch + 1,
                self.pos.batch,
                self.train_b.len()
            ));
        }
        while self.pos.epoch < epochs {
            self.train_epoch(stop)?;
            self.end_epoch()?;
            if stop.load(Ordering::SeqCst) && self.pos.epoch < epochs {
                return Err(self.interrupted().into());
            }
        }
        self.reporter.finish();
        self.finish()
    }

    fn interrupted(&self) -> Interrupted {
        Interrupted {
            run_dir: self.run.root.clone(),
            epoch: self.pos.epoch + 1,
            batch: self.pos.batch,
            batches: self.train_b.len(),
        }
    }

    /// The batches of the current epoch from `pos.batch` on.
    fn train_epoch(&mut self, stop: &AtomicBool) -> Result<()> {
        let n = self.train_b.len();
        let epoch = self.pos.epoch;
        if self.pos.batch == 0 {
            self.step.reset_state();
            self.step.reset_loss_sum(0.0);
            self.pos.loss_sum = 0.0;
            self.pos.loss_batches = 0;
            self.pos.seconds = 0.0;
        }
        if let Device::Cuda(i) = self.device {
            crate::cuda::reset_peak(i);
        }
        self.step.snapshot();
        let mut good = (self.pos.loss_sum, self.pos.loss_batches);
        let mut counted = self.pos.loss_batches;
        self.reporter.start_epoch(epoch + 1, self.cfg.train.epochs, n, self.pos.batch);
        let t0 = Instant::now();
        let mut last_check = Instant::now();
        let mut last_report = (self.pos.batch, self.pos.loss_sum, 0.0f64);
        let tokens_per_batch = self.train_b.tokens_per_batch() as f64;
        for k in self.pos.batch..n {
            let (x, y) = self.train_b.get(k);
            let seed = step_seed(self.cfg.train.seed, epoch, k);
            if let Err(e) = self.step.run(&x, &y, seed) {
                if !self.step.uses_graph() {
                    return Err(e);
                }
                self.reporter.warn(&format!("{e:#}; continuing without CUDA graphs"));
                self.step.fall_back_to_eager();
                self.step.run(&x, &y, seed)?;
            }
            counted += 1;
            let interrupted = stop.load(Ordering::SeqCst);
            if !(interrupted || k + 1 == n || last_check.elapsed() >= CHECK_EVERY) {
                continue;
            }
            last_check = Instant::now();
            let sum = self.step.loss_sum();
            if !sum.is_finite() || !self.step.weights_finite() {
                self.recover_from_nan(epoch, k)?;
                self.step.reset_loss_sum(good.0);
                counted = good.1;
            } else {
                self.step.snapshot();
                good = (sum, counted);
            }
            let elapsed = self.pos.seconds + t0.elapsed().as_secs_f64();
            let (b0, s0, e0) = last_report;
            let ppl = if k + 1 > b0 { ((good.0 - s0) / (k + 1 - b0) as f64).exp() } else { f64::NAN };
            let speed = (k + 1 - b0) as f64 * tokens_per_batch / (elapsed - e0).max(1e-9);
            self.reporter.update(k + 1, ppl, self.schedule.lr, speed);
            last_report = (k + 1, good.0, elapsed);
            if interrupted && k + 1 < n {
                self.pos.batch = k + 1;
                self.pos.loss_sum = good.0;
                self.pos.loss_batches = counted;
                self.pos.seconds = elapsed;
                self.save_last(None)?;
                self.reporter.finish();
                return Err(self.interrupted().into());
            }
        }
        self.pos.batch = n;
        self.pos.loss_sum = good.0;
        self.pos.loss_batches = counted;
        self.pos.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// A non-finite loss or weight: back to the last good weights, lr divided, or give up.
    fn recover_from_nan(&mut self, epoch: usize, batch: usize) -> Result<()> {
        self.pos.nan_restarts += 1;
        let max = self.cfg.train.max_nan_restarts;
        if self.pos.nan_restarts > max || !self.step.restore() {
            let kept = if self.run.best().exists() {
                format!("the best weights so far are in {}", self.run.best().display())
            } else {
                "no checkpoint was written".to_string()
            };
            bail!(
                "training diverged: non-finite loss in epoch {}, batch {} ({} times, train.max_nan_restarts = {max}); \
                 {kept}; try a smaller train.lr or train.max_grad",
                epoch + 1,
                batch + 1,
                self.pos.nan_restarts,
            );
        }
        let divisor = self.cfg.train.nan_lr_divisor();
        self.schedule.lr /= divisor;
        self.step.set_lr(self.schedule.lr);
        self.reporter.warn(&format!(
            "non-finite loss in epoch {}, batch {}: restored the weights of the last check and divided lr by {} (now {}); {} of {max} restarts used",
            epoch + 1,
            batch + 1,
            divisor,
            self.schedule.lr,
            self.pos.nan_restarts
        ));
        Ok(())
    }

    fn end_epoch(&mut self) -> Result<()> {
        self.reporter.finish();
        let epoch = self.pos.epoch;
        let train_ppl = (self.pos.loss_sum / self.pos.loss_batches.max(1) as f64).exp();
        let lr_used = self.schedule.lr;
        let t = Instant::now();
        let valid_b = &self.valid_b;
        let valid_ppl = self.step.with_averaged(|m| eval::perplexity(m, valid_b));
        let valid_seconds = t.elapsed().as_secs_f64();
        let history = self.pos.valid_history.clone();
        let averaging = self.step.averaging();
        let improved = self.schedule.observe(valid_ppl, averaging);
        self.pos.valid_history.push(valid_ppl);
        if improved {
            self.pos.best_epoch = Some(epoch + 1);
            self.save_best(valid_ppl)?;
        } else if !averaging {
            self.step.set_lr(self.schedule.lr);
        }
        let mut note = String::new();
        if self.cfg.train.asgd && !averaging && asgd_should_start(&history, valid_ppl, self.cfg.train.asgd_nonmono) {
            self.step.start_averaging(None);
            // Averaging keeps the learning rate: undo this epoch's decay.
            self.schedule.lr = lr_used;
            self.step.set_lr(lr_used);
            note = " | averaging from now on".to_string();
        }
        let record = EpochRecord {
            epoch: epoch + 1,
            lr: lr_used,
            train_ppl,
            valid_ppl,
            tokens_per_s: (self.pos.loss_batches as f64 * self.train_b.tokens_per_batch() as f64)
                / self.pos.seconds.max(1e-9),
            seconds: self.pos.seconds,
            valid_seconds,
            device: device::name(self.device),
            improved,
            cuda_graph: self.step.uses_graph(),
            averaging,
            peak_gpu_mib: device::peak_gpu_mib(self.device),
            peak_rss_mib: device::peak_rss_mib(),
        };
        self.metrics.append(&record)?;
        self.records.push(record.clone());
        let title = format!("{}: perplexity per epoch", self.run.root.display());
        if let Err(e) = plot::perplexity_png(&self.records, &self.run.plot(), &title) {
            self.reporter.warn(&format!("{e:#}"));
        }
        self.pos.epoch += 1;
        self.pos.batch = 0;
        self.pos.loss_sum = 0.0;
        self.pos.loss_batches = 0;
        self.pos.seconds = 0.0;
        self.step.reset_state();
        self.step.reset_loss_sum(0.0);
        self.save_last(Some(valid_ppl))?;
        self.reporter.line(&format!(
            "epoch {:>3} | lr {:>8.4} | train ppl {:>9.2} | valid ppl {:>9.2} | {:>6.1}k tok/s | {:>6.1} s{}{}",
            record.epoch,
            record.lr,
            record.train_ppl,
            record.valid_ppl,
            record.tokens_per_s / 1000.0,
            record.seconds,
            if improved { " | best" } else { "" },
            note
        ));
        Ok(())
    }

    fn meta(&self, valid_ppl: Option<f64>, resume: Option<Resume>) -> Meta {
        Meta {
            format: checkpoint::FORMAT,
            ptb_lm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.cfg.clone(),
            vocab: self.ptb.vocab.words().to_vec(),
            epoch: self.pos.epoch,
            lr: self.schedule.lr,
            valid_ppl,
            best_valid_ppl: self.schedule.best,
            resume,
        }
    }

    fn ensure_finite(&mut self) -> Result<()> {
        if !self.step.weights_finite() {
            self.recover_from_nan(self.pos.epoch, self.pos.batch)?;
        }
        Ok(())
    }

    /// The weights that were just validated (the averaged ones under averaged SGD).
    fn save_best(&mut self, valid_ppl: f64) -> Result<()> {
        self.ensure_finite()?;
        let weights = self.step.averaged_named().unwrap_or_else(|| self.step.model.named_parameters());
        let mut meta = self.meta(Some(valid_ppl), None);
        meta.epoch += 1;
        checkpoint::save(&self.run.best(), &meta, &weights, &[])
    }

    fn save_last(&mut self, valid_ppl: Option<f64>) -> Result<()> {
        self.ensure_finite()?;
        self.pos.asgd_count = self.step.averaged_count();
        let mut state = self.step.state.named();
        if let Some(avg) = self.step.averaged_named() {
            state.extend(avg.into_iter().map(|(n, t)| (format!("avg.{n}"), t)));
        }
        let meta = self.meta(valid_ppl, Some(self.pos.clone()));
        checkpoint::save(&self.run.last(), &meta, &self.step.model.named_parameters(), &state)
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
        let test_b = Batches::new(
            data::truncate(&self.ptb.test, self.cfg.data.test_tokens),
            self.cfg.train.eval_batch_size,
            self.cfg.train.bptt,
            self.device,
        )
        .context("test data")?;
        let t = Instant::now();
        let test_ppl = eval::perplexity(&model, &test_b);
        let summary = Summary {
            run_dir: self.run.root.clone(),
            device: device::name(self.device),
            num_parameters: model.num_parameters(),
            epochs: self.records.clone(),
            best_epoch: Some(best.meta.epoch),
            best_valid_ppl: self.schedule.best,
            test_ppl,
            test_seconds: t.elapsed().as_secs_f64(),
            train_seconds: self.records.iter().map(|r| r.seconds + r.valid_seconds).sum(),
        };
        std::fs::write(self.run.summary(), serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("{}: cannot write", self.run.summary().display()))?;
        self.reporter.line(&format!(
            "best valid ppl {:.2} (epoch {}) | test ppl {:.2} | checkpoint {}",
            summary.best_valid_ppl.unwrap_or(f64::NAN),
            best.meta.epoch,
            test_ppl,
            self.run.best().display()
        ));
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_decays_exactly_when_validation_does_not_improve() {
        let mut s = LrSchedule { lr: 20.0, factor: 4.0, best: None };
        let mut lrs = Vec::new();
        for ppl in [300.0, 200.0, 210.0, 190.0, 190.0, 150.0, f64::NAN] {
            let improved = s.observe(ppl, false);
            lrs.push((improved, s.lr));
        }
        assert_eq!(
            lrs,
            [(true, 20.0), (true, 20.0), (false, 5.0), (true, 5.0), (false, 1.25), (true, 1.25), (false, 0.3125)]
        );
        assert_eq!(s.best, Some(150.0));
    }

    #[test]
    fn frozen_schedule_keeps_lr() {
        let mut s = LrSchedule { lr: 30.0, factor: 4.0, best: Some(100.0) };
        assert!(!s.observe(120.0, true));
        assert_eq!(s.lr, 30.0);
    }

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
    fn step_seeds_differ_by_position() {
        let a = step_seed(1, 0, 0);
        assert!(a >= 0);
        assert_ne!(a, step_seed(1, 0, 1));
        assert_ne!(a, step_seed(1, 1, 0));
        assert_ne!(a, step_seed(2, 0, 0));
        assert_eq!(a, step_seed(1, 0, 0));
    }
}
