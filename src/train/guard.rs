//! The divergence guard: the last check that found the loss and the weights sound, `last/`
//! written from it on a signal, and the rollback to it (with a smaller learning rate) when a
//! loss turns non-finite or far above guessing.

use super::*;

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

/// The last check that found the loss and weights sound: the next batch, the loss sum and
/// the number of batches in it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sound {
    pub(super) batch: usize,
    pub(super) loss_sum: f64,
    pub(super) counted: usize,
}

impl Sound {
    /// The start of an epoch.
    pub(super) const EPOCH_START: Sound = Sound { batch: 0, loss_sum: 0.0, counted: 0 };

    /// Where the resumable record `pos` stands.
    pub(super) fn of(pos: &Resume) -> Sound {
        Sound { batch: pos.batch, loss_sum: pos.loss_sum, counted: pos.loss_batches }
    }
}

impl Session {
    /// Moves the run's position to `sound`, in the resumable record and in the step's device
    /// loss sum alike: the one place the position within an epoch moves.
    pub(super) fn settle(&mut self, sound: Sound) {
        self.pos.batch = sound.batch;
        self.pos.loss_sum = sound.loss_sum;
        self.pos.loss_batches = sound.counted;
        self.step.reset_loss_sum(sound.loss_sum);
    }

    /// Saves the last sound check as the resumable position in `last/` (before stopping
    /// mid-epoch).
    pub(super) fn save_sound_state(&mut self, sound: Sound, elapsed: f64) -> Result<()> {
        self.settle(sound);
        self.pos.seconds = elapsed;
        self.save_last(None)?;
        self.reporter.finish();
        Ok(())
    }

    /// A diverged span (loss not finite or above [`divergence_limit`], or weights not
    /// finite): back to the last sound check with lr divided. After `max_nan_restarts`, that
    /// sound state goes to `last/` (resumable) and the run stops with an error.
    pub(super) fn recover(&mut self, batch: usize, sound: Sound, mean_loss: f64, elapsed: f64) -> Result<()> {
        self.pos.nan_restarts += 1;
        self.step.restore();
        self.settle(sound);
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
            return Err(GroupError(format!(
                "training diverged in epoch {epoch}, batch {} ({what}), {} times (train.max_nan_restarts = {max}); \
                 the last sound weights, with lr lowered to {}, are in {}: continue with `ptb-lm train --resume {} \
                 --set train.max_nan_restarts={}`, or start again with a smaller train.lr or train.max_grad",
                batch + 1,
                self.pos.nan_restarts,
                self.schedule.lr,
                self.run.last().display(),
                self.run.root.display(),
                self.pos.nan_restarts + max.max(1),
            ))
            .into());
        }
        // Every rank went back together: the first says it for the group.
        if !self.leads() {
            return Ok(());
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

    /// Never writes non-finite weights (the checks above make this unreachable).
    pub(super) fn ensure_finite(&self) -> Result<()> {
        if !self.step.weights_finite() {
            bail!("{}: refusing to save non-finite weights", self.run.root.display());
        }
        Ok(())
    }
}
