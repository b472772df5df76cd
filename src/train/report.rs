//! What a run tells its user: the opening lines, the projected duration, the progress bar,
//! the epoch lines, `metrics.jsonl` and the plots.

use super::*;

/// Training seconds after which the run's duration is projected (once per process).
pub(super) const PROJECT_AFTER_S: f64 = 10.0;

/// A CPU run projected to take longer than this is told which config is CPU-sized.
pub(super) const CPU_HINT_AFTER_S: f64 = 30.0 * 60.0;

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

impl Session {
    pub(super) fn projection(&self) -> Projection {
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

    pub(super) fn announce(&self) {
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

    /// The progress bar, and once per process (after [`PROJECT_AFTER_S`] of training, or at
    /// the end of the first epoch if that comes sooner) a projection of the run's duration.
    pub(super) fn report_progress(&mut self, last: &mut (Sound, f64), now: Sound, elapsed: f64, epoch_end: bool) {
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
    pub(super) fn project(&self, speed: f64) {
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

    /// Appends the epoch to metrics.jsonl and redraws the plots.
    pub(super) fn record(&mut self, record: &EpochRecord) -> Result<()> {
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
    pub(super) fn epoch_line(&self, record: &EpochRecord, started_averaging: bool) -> String {
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
}
