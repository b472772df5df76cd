//! How long training runs and the learning rate of every step, decided in one place (as
//! nanoGPT's `get_lr` decides it for `train.py`): the training loop asks [`LrSchedule::at`]
//! before each step, and [`TimeBudget`] whether training must end to leave time for what
//! follows it.
//!
//! Schedules (`train.schedule`):
//! * `plateau`, the book's rule: the learning rate is divided by `train.lr_decay` whenever
//!   validation does not improve on the best epoch so far.
//! * `cosine`: half a cosine from `train.lr` down to `train.min_lr` over the run's length
//!   (Loshchilov & Hutter 2017, *SGDR: Stochastic Gradient Descent with Warm Restarts*, one
//!   cycle without restarts, as nanoGPT uses it): the run's steps (epochs × batches), or with
//!   `train.max_minutes` its training time, so the learning rate reaches its floor as the
//!   budget runs out whatever the machine's speed.
//!
//! Both start with a linear warm-up over `train.warmup_steps` steps (Goyal et al. 2017,
//! *Accurate, Large Minibatch SGD*; 0: none). The divergence guard divides the schedule's
//! base rate ([`LrSchedule::lr`]), which every later step then inherits.
//!
//! A time budget (`train.max_minutes`) covers training, validation and the final test
//! evaluation: training ends (mid-epoch if need be, which is then validated as an epoch)
//! when what is left of the budget is what validating and testing are estimated to take.
//! Under a time budget the steps a run trains depend on the machine's speed, so two runs of
//! the same config are not step for step the same; a run cut short and resumed continues
//! from its recorded time.

use crate::config::{Schedule, TrainConfig};

/// The learning-rate rule of a run and what it remembers between epochs.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// The base rate: `train.lr` after the plateau rule's decays and the divergence guard's
    /// divisions (what checkpoints record as `lr`).
    pub lr: f64,
    /// Best validation perplexity so far.
    pub best: Option<f64>,
    kind: Schedule,
    /// `train.lr` (the cosine's start) and `train.min_lr` (its floor).
    initial: f64,
    min_lr: f64,
    factor: f64,
    warmup_steps: u64,
}

/// Where training is: the 0-based step of the run and the fraction of its length done
/// (steps, or training time under a budget).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub fraction: f64,
}

impl LrSchedule {
    pub fn new(t: &TrainConfig) -> LrSchedule {
        LrSchedule {
            lr: t.lr,
            best: None,
            kind: t.schedule,
            initial: t.lr,
            min_lr: t.min_lr,
            factor: t.lr_decay,
            warmup_steps: t.warmup_steps,
        }
    }

    /// Records a validation perplexity: true when it beats the best so far. Under the
    /// plateau rule a perplexity that does not is followed by lr /= `train.lr_decay`
    /// (unless `frozen`, as under averaged SGD).
    pub fn observe(&mut self, valid_ppl: f64, frozen: bool) -> bool {
        let improved = valid_ppl.is_finite() && self.best.is_none_or(|b| valid_ppl < b);
        if improved {
            self.best = Some(valid_ppl);
        } else if !frozen && self.kind == Schedule::Plateau {
            self.lr /= self.factor;
        }
        improved
    }

    /// The learning rate of the step at `p`. During the warm-up the cosine has not started
    /// (whatever the fraction says: a warm-up as long as the run still climbs to `lr`).
    pub fn at(&self, p: Progress) -> f64 {
        let warming = p.step < self.warmup_steps;
        let warm = if warming { (p.step + 1) as f64 / self.warmup_steps as f64 } else { 1.0 };
        let shape = match self.kind {
            Schedule::Plateau => self.lr,
            Schedule::Cosine => {
                let f = if warming { 0.0 } else { p.fraction.clamp(0.0, 1.0) };
                let c = 0.5 * (1.0 + (std::f64::consts::PI * f).cos());
                // The guard's divisions scale the whole curve, floor included.
                (self.min_lr + (self.initial - self.min_lr) * c) * (self.lr / self.initial)
            }
        };
        shape * warm
    }

    /// The fraction of a run of `total` steps done at `step`, counted after the warm-up (so
    /// the cosine starts at its top when the warm-up ends).
    pub fn fraction_of_steps(&self, step: u64, total: u64) -> f64 {
        let w = self.warmup_steps.min(total);
        if total <= w {
            return 1.0;
        }
        step.saturating_sub(w) as f64 / (total - w) as f64
    }
}

/// `train.max_minutes`: when training must end so that validating the last epoch and
/// testing the best one still fit.
///
/// The evaluations' time is estimated from speeds the run measures; the first moments of a
/// run (allocation, warm-up) are far slower than the rest, so no estimate is trusted before
/// [`MIN_MEASURED_S`] seconds of training in the process: until then the budget counts only
/// the time spent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeBudget {
    pub seconds: f64,
}

/// What the evaluations after training will take, estimated from what the run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserve {
    /// Tokens of one validation pass and of the test pass.
    pub valid_tokens: f64,
    pub test_tokens: f64,
    /// Evaluation speed (tokens/s): measured by the last validation, else estimated.
    pub eval_tokens_per_s: f64,
    /// With `train.dynamic_eval`: the training tokens the gradient statistics read (forward
    /// and backward, once; all of the split unless `train.dynamic_stats_batches` caps them)
    /// and the training speed (tokens/s).
    pub dynamic: Option<(f64, f64)>,
}

/// Dynamic evaluation's test pass costs about this many training tokens per token scored
/// (a backward and an update every 5 tokens, one stream). Measured with a 2×200 LSTM: 82k
/// test tokens in 130 s beside 8.9k training tokens/s (14×, 2-core Xeon), and in 406 s
/// beside 4.5k (22×, 2-core AMD EPYC, where 15 took a 60-minute budget 31 s past it). The
/// statistics: 1.2 epochs' time on the Xeon, 1.0 on the EPYC.
const DYNAMIC_TOKEN_COST: f64 = 22.0;
const STATS_EPOCH_COST: f64 = 1.2;

impl Reserve {
    /// Seconds for one more validation and the test (and dynamic evaluation when asked),
    /// with a 10 % margin; 0 while the speeds are unknown.
    pub fn seconds(&self) -> f64 {
        let known = |s: f64| s.is_finite() && s > 0.0;
        let mut s = 0.0;
        if known(self.eval_tokens_per_s) {
            s += (self.valid_tokens + self.test_tokens) / self.eval_tokens_per_s;
        }
        if let Some((train_tokens, speed)) = self.dynamic.filter(|d| known(d.1)) {
            s += (STATS_EPOCH_COST * train_tokens + DYNAMIC_TOKEN_COST * self.test_tokens) / speed;
        }
        1.1 * s
    }
}

/// Seconds of training a process measures before its speed estimates count.
pub const MIN_MEASURED_S: f64 = 5.0;

/// The training speed a process has measured, for the time budget's reserve: the current
/// epoch's own once it has trained [`MIN_MEASURED_S`], else that of all the training this
/// process has done (earlier epochs and this one's start together), so that epochs shorter
/// than that still come to a known speed; unknown (0) before [`MIN_MEASURED_S`] in all.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpeedMeter {
    /// Seconds and tokens of the epochs this process finished training.
    seconds: f64,
    tokens: f64,
}

impl SpeedMeter {
    /// Tokens/s, `seconds` and `tokens` into the current epoch's training (0: not known yet).
    pub fn speed(&self, seconds: f64, tokens: f64) -> f64 {
        let (all_seconds, all_tokens) = (self.seconds + seconds, self.tokens + tokens);
        if seconds >= MIN_MEASURED_S {
            tokens / seconds
        } else if all_seconds >= MIN_MEASURED_S {
            all_tokens / all_seconds
        } else {
            0.0
        }
    }

    /// An epoch's training (or the part this process ran) is over.
    pub fn add(&mut self, seconds: f64, tokens: f64) {
        self.seconds += seconds;
        self.tokens += tokens;
    }
}

impl TimeBudget {
    pub fn of(t: &TrainConfig) -> Option<TimeBudget> {
        t.max_minutes.map(|m| TimeBudget { seconds: m * 60.0 })
    }

    /// Seconds of the budget training may use, given what must be kept for after it.
    pub fn training_seconds(&self, reserve: &Reserve) -> f64 {
        (self.seconds - reserve.seconds()).max(0.0)
    }

    /// The fraction of the training time used after `elapsed` seconds (1 or more: stop).
    pub fn fraction(&self, elapsed: f64, reserve: &Reserve) -> f64 {
        let t = self.training_seconds(reserve);
        if t <= 0.0 {
            1.0
        } else {
            elapsed / t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn epochs_shorter_than_the_warm_up_still_come_to_a_known_speed() {
        let mut m = SpeedMeter::default();
        assert_eq!(m.speed(1.0, 1000.0), 0.0, "unknown before 5 s in all");
        for _ in 0..4 {
            m.add(1.0, 1000.0);
        }
        // Four 1-second epochs and one second into the fifth: 5 s measured, 1000 tokens/s.
        assert_eq!(m.speed(1.0, 1000.0), 1000.0);
        // A long epoch counts its own speed alone once it has 5 s (warm-up left behind).
        assert_eq!(m.speed(5.0, 10_000.0), 2000.0);
    }

    /// configs/rnnlm.toml (lr 20, lr_decay 4) with `overrides` such as "train.min_lr=2".
    fn train_config(overrides: &[&str]) -> TrainConfig {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse(include_str!("../configs/rnnlm.toml"), &o).expect("valid config").train
    }

    fn at(s: &LrSchedule, step: u64, fraction: f64) -> f64 {
        s.at(Progress { step, fraction })
    }

    #[test]
    fn the_plateau_rule_divides_exactly_when_validation_does_not_improve() {
        let mut s = LrSchedule::new(&train_config(&[]));
        assert!(s.observe(100.0, false));
        assert_eq!(s.lr, 20.0);
        assert!(!s.observe(101.0, false));
        assert_eq!(s.lr, 5.0);
        assert!(s.observe(90.0, false));
        assert_eq!(s.lr, 5.0);
        assert!(!s.observe(f64::NAN, false));
        assert_eq!(s.lr, 1.25);
        assert!(!s.observe(95.0, true), "frozen keeps the rate");
        assert_eq!(s.lr, 1.25);
        assert_eq!(at(&s, 1000, 0.7), 1.25, "the plateau rule is flat between validations");
    }

    #[test]
    fn the_cosine_runs_from_the_rate_to_its_floor_and_never_decays_on_a_plateau() {
        let mut s = LrSchedule::new(&train_config(&["train.schedule=cosine", "train.min_lr=2"]));
        assert_eq!(at(&s, 0, 0.0), 20.0);
        assert!((at(&s, 0, 0.5) - 11.0).abs() < 1e-12);
        assert_eq!(at(&s, 0, 1.0), 2.0);
        assert_eq!(at(&s, 0, 7.0), 2.0, "past the end it stays at the floor");
        let mut last = f64::INFINITY;
        for i in 0..=100 {
            let lr = at(&s, 0, i as f64 / 100.0);
            assert!(lr <= last, "monotone: {lr} after {last}");
            last = lr;
        }
        s.observe(100.0, false);
        s.observe(200.0, false);
        assert_eq!(s.lr, 20.0, "no plateau decay under the cosine");
        s.lr /= 4.0; // the divergence guard
        assert_eq!(at(&s, 0, 0.0), 5.0);
        assert_eq!(at(&s, 0, 1.0), 0.5);
    }

    #[test]
    fn the_warm_up_climbs_linearly_to_the_rate_and_the_cosine_starts_after_it() {
        let s = LrSchedule::new(&train_config(&["train.schedule=cosine", "train.warmup_steps=4"]));
        let lrs: Vec<f64> = (0..4).map(|k| at(&s, k, s.fraction_of_steps(k, 104))).collect();
        assert_eq!(lrs, vec![5.0, 10.0, 15.0, 20.0]);
        assert_eq!(s.fraction_of_steps(4, 104), 0.0);
        assert_eq!(s.fraction_of_steps(54, 104), 0.5);
        assert_eq!(s.fraction_of_steps(104, 104), 1.0);
        assert_eq!(s.fraction_of_steps(3, 3), 1.0, "a run shorter than its warm-up");
        // A warm-up as long as the run (or longer) still climbs: the cosine has not started.
        let long = LrSchedule::new(&train_config(&["train.schedule=cosine", "train.warmup_steps=1000"]));
        assert_eq!(at(&long, 0, long.fraction_of_steps(0, 300)), 0.02);
        assert_eq!(at(&long, 299, long.fraction_of_steps(299, 300)), 6.0);
        assert_eq!(at(&long, 299, 1.0), 6.0, "under a time budget too");
        let p = LrSchedule::new(&train_config(&["train.warmup_steps=2"]));
        assert_eq!((at(&p, 0, 0.0), at(&p, 1, 0.0), at(&p, 2, 0.0)), (10.0, 20.0, 20.0));
    }

    #[test]
    fn a_time_budget_keeps_room_for_validation_and_test() {
        let b = TimeBudget::of(&train_config(&["train.max_minutes=10"])).expect("a budget");
        assert_eq!(b.seconds, 600.0);
        let r = Reserve { valid_tokens: 1000.0, test_tokens: 1000.0, eval_tokens_per_s: 22.0, dynamic: None };
        assert!((r.seconds() - 100.0).abs() < 1e-9);
        assert!((b.training_seconds(&r) - 500.0).abs() < 1e-9);
        assert!((b.fraction(250.0, &r) - 0.5).abs() < 1e-12);
        assert!(b.fraction(500.0, &r) >= 1.0);
        let unknown = Reserve { eval_tokens_per_s: 0.0, ..r };
        assert_eq!(b.training_seconds(&unknown), 600.0);
        let too_slow = Reserve { eval_tokens_per_s: 1.0, ..r };
        assert_eq!(b.fraction(0.0, &too_slow), 1.0, "no time to train at all: stop");
        assert!(TimeBudget::of(&train_config(&[])).is_none());
        let dynamic = Reserve { dynamic: Some((10_000.0, 1000.0)), ..r };
        let want = 100.0 + 1.1 * (STATS_EPOCH_COST * 10.0 + DYNAMIC_TOKEN_COST * 1.0);
        assert!((dynamic.seconds() - want).abs() < 1e-9, "dynamic evaluation is kept room for");
    }
}
