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
//!
//! This file holds the loop: the [`Session`] of one process (its state and the epoch, step
//! and validation of the loop body). Around it, one file per concern: [`setup`] (starting
//! and resuming a run, every check before the run directory is touched), [`guard`] (the
//! divergence guard), [`report`] (what the user sees: projections, progress, epoch lines,
//! metrics and plots) and [`finish`] (checkpoints, the final score, `summary.json`, the
//! interrupted run's error). The learning rate and the time budget are
//! [`crate::schedule`]'s, everything that differs with data-parallel ranks
//! [`crate::replicas`]'s, the step itself [`crate::step`]'s.

use crate::checkpoint::{self, Checkpoint, Meta, Resume};
use crate::config::Config;
use crate::data::{self, Batches, Corpus, Split};
use crate::device;
use crate::eval;
use crate::failpoint;
use crate::gradflow;
use crate::interrupt;
use crate::metrics::{EpochRecord, MetricsLog};
use crate::model::LstmLm;
use crate::plot;
use crate::progress::Reporter;
use crate::replicas::Replicas;
use crate::run::RunDir;
use crate::schedule::{LrSchedule, Progress, Reserve, SpeedMeter, TimeBudget};
use crate::step::TrainStep;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::{Device, Kind};

mod finish;
mod guard;
mod report;
mod setup;

use finish::*;
pub use finish::{GroupError, Interrupted, Summary};
use guard::*;
pub use guard::{diverged, divergence_limit};
pub use report::{human_duration, Projection};
use setup::*;
pub use setup::{resume, train};

/// How often (at most) the loop synchronises with the device to read the loss, check it is
/// finite and update the progress bar.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// In data-parallel training every rank must check at the same steps: every this many
/// batches (and at each epoch's end), not by the clock.
const DIST_CHECK_BATCHES: usize = 25;

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
    Finished(Box<Summary>),
    /// Stopped after `--stop-after` epochs as asked.
    Stopped(Projection),
    /// A data-parallel rank other than 0 finished its part (rank 0 reports).
    Worker,
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
    /// The ranks of data-parallel training, or this process alone.
    replicas: Rc<Replicas>,
    /// `train.max_minutes`.
    budget: Option<TimeBudget>,
    /// The learning rate of the last step.
    lr_now: f64,
    /// The fraction of the time budget used, as every rank agreed at the last check (0
    /// without a budget; 1 or more: training ends).
    time_fraction: f64,
    /// Seconds of the last validation (what the time budget estimates evaluations from).
    last_valid_seconds: Option<f64>,
    /// The training speed this process measured (what the budget estimates the dynamic
    /// evaluation from).
    speed: SpeedMeter,
    /// Whether the budget's warning that it cannot hold the evaluations was given.
    budget_warned: bool,
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
        replicas: Rc<Replicas>,
    ) -> Result<Session> {
        let t = &cfg.train;
        let use_graph = t.cuda_graph && device.is_cuda() && crate::cuda::available() && replicas.is_alone();
        let mut splits = splits;
        // A data-parallel rank trains its own block of the streams, with its own state.
        let mut local = t.clone();
        let (start, len) = replicas.shard(t.batch_size);
        splits.train = splits.train.shard(start, len);
        local.batch_size = len;
        let mut step = TrainStep::new(model, &local, use_graph)?;
        step.set_replicas(replicas.clone());
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
                let records = if replicas.leads() { metrics.keep_before(pos.epoch + 1)? } else { Vec::new() };
                (pos, records)
            }
        };
        let (budget, lr_now) = (TimeBudget::of(t), schedule.lr);
        let last_valid_seconds = records.last().map(|r| r.valid_seconds);
        Ok(Session {
            reporter: Reporter::new(opts.quiet || !replicas.leads()),
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
            replicas,
            budget,
            lr_now,
            time_fraction: 0.0,
            last_valid_seconds,
            speed: SpeedMeter::default(),
            budget_warned: false,
        })
    }

    fn leads(&self) -> bool {
        self.replicas.leads()
    }

    /// Training tokens per step, over every rank.
    fn tokens_per_batch(&self) -> f64 {
        self.splits.train.tokens_per_batch() as f64 * self.replicas.world() as f64
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
            dynamic: self.cfg.train.dynamic_eval.then(|| {
                let opts = crate::eval::DynamicOptions::of_training(&self.cfg.train, true);
                (opts.stats_tokens(tokens(&self.splits.train)), train_speed)
            }),
        }
    }

    /// The fraction of the time budget's training time used `epoch_seconds` into the
    /// epoch's training (0 without a budget).
    fn budget_fraction(&self, epoch_seconds: f64, train_speed: f64) -> f64 {
        self.budget.map_or(0.0, |b| b.fraction(self.pos.run_seconds + epoch_seconds, &self.reserve(train_speed)))
    }

    /// Says once when the evaluations after training alone are estimated to take more than
    /// the whole time budget: training then ends at once and the run overruns the budget.
    fn warn_if_budget_cannot_hold(&mut self, train_speed: f64) {
        let Some(b) = self.budget.filter(|_| !self.budget_warned && self.leads()) else { return };
        let reserve = self.reserve(train_speed).seconds();
        if reserve > b.seconds {
            self.budget_warned = true;
            self.reporter.warn(&format!(
                "train.max_minutes = {}: the evaluations after training alone are estimated to take {:.0} s, \
                 more than the budget; training ends now and the run will overrun it (raise train.max_minutes{})",
                b.seconds / 60.0,
                reserve,
                if self.cfg.train.dynamic_eval {
                    ", cap train.dynamic_stats_batches, or set train.dynamic_eval = false and leave out its other \
                     dynamic_* keys"
                } else {
                    ""
                }
            ));
        }
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
                if self.pos.batch == 0 {
                    // The time budget was spent before this epoch's first batch: there is
                    // nothing to validate or record, and last/ says the budget is spent.
                    self.save_last(None)?;
                    break;
                }
                self.end_epoch()?;
                // Every rank stops after the same epoch, wherever the signal found each.
                let (_, stopping, _) = self.replicas.agree(0.0, self.stopping(stop), 0.0)?;
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
        self.finish().map(|s| Outcome::Finished(Box::new(s)))
    }

    /// The batches of the current epoch from `pos.batch` on. Every [`CHECK_EVERY`] the loss
    /// is read: sound, it becomes the point to return to; diverged, training goes back there.
    fn train_epoch(&mut self, stop: &AtomicBool) -> Result<()> {
        let n = self.splits.train.len();
        if self.pos.batch == 0 {
            self.step.reset_state();
            self.settle(Sound::EPOCH_START);
            self.pos.seconds = 0.0;
        }
        device::reset_peak(self.device);
        self.step.snapshot();
        let mut sound = Sound::of(&self.pos);
        let mut counted = sound.counted;
        self.reporter.start_epoch(self.pos.epoch + 1, self.cfg.train.epochs, n, self.pos.batch);
        let t0 = Instant::now();
        let mut last_check = Instant::now();
        let mut last_report = (sound, 0.0f64);
        let mut k = self.pos.batch;
        let start = counted;
        self.time_fraction =
            self.replicas.leaders_value(self.budget_fraction(self.pos.seconds, self.speed.speed(0.0, 0.0)))?;
        while k < n && self.time_fraction < 1.0 {
            self.run_step(k)?;
            counted += 1;
            k += 1;
            let stopping = self.stopping(stop);
            let due = if self.replicas.is_alone() {
                stopping || k == n || last_check.elapsed() >= CHECK_EVERY
            } else {
                k == n || k % DIST_CHECK_BATCHES == 0
            };
            if !due {
                continue;
            }
            last_check = Instant::now();
            let elapsed = self.pos.seconds + t0.elapsed().as_secs_f64();
            // No speed is trusted from the first seconds of a process (see TimeBudget).
            let speed =
                self.speed.speed(t0.elapsed().as_secs_f64(), (counted - start) as f64 * self.tokens_per_batch());
            let fraction = self.budget_fraction(elapsed, speed);
            self.warn_if_budget_cannot_hold(speed);
            let (sum, stopping, fraction) = self.replicas.agree(self.step.loss_sum(), stopping, fraction)?;
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
        // The time budget ends training here (the loop stopped at a sound check), or with
        // this epoch's last batch.
        if k < n || self.time_fraction >= 1.0 {
            self.pos.budget_spent = true;
        }
        // Every exit from the loop is at a sound check (or before the first step).
        debug_assert_eq!(k, sound.batch);
        self.settle(sound);
        self.speed.add(t0.elapsed().as_secs_f64(), (counted - start) as f64 * self.tokens_per_batch());
        self.pos.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// One training step on batch `k` (leaving CUDA graphs if a capture fails).
    fn run_step(&mut self, k: usize) -> Result<()> {
        // The schedule decides the learning rate; this is the one place it reaches the step.
        self.lr_now = self.schedule.at(self.progress(k));
        self.step.set_lr(self.lr_now);
        let (x, y) = self.splits.train.get(k);
        // Each rank draws its own dropout masks for its own streams.
        let rank = self.replicas.rank() as u64;
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

    fn end_epoch(&mut self) -> Result<()> {
        self.reporter.finish();
        let (epoch, n) = (self.pos.epoch, self.splits.train.len());
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
            cut_at_batch: (self.pos.batch < n).then_some([self.pos.batch, n]),
        };
        self.record(&record)?;
        self.last_valid_seconds = Some(valid_seconds);
        self.pos.run_seconds += record.seconds + record.valid_seconds;
        self.pos.epoch += 1;
        self.settle(Sound::EPOCH_START);
        self.pos.seconds = 0.0;
        self.step.reset_state();
        // The budget may run out in validation: then this epoch was the last (what the next
        // would find before its first batch), its line and last/ say so.
        if self.budget.is_some() && !self.pos.budget_spent {
            let fraction = self.budget_fraction(0.0, self.speed.speed(0.0, 0.0));
            self.pos.budget_spent = self.replicas.leaders_value(fraction)? >= 1.0;
        }
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
        let valid_loss = self.replicas.leaders_value(valid_loss)?;
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
