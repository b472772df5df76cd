//! What a run tells the person watching it: a progress bar per epoch on stderr (only on a
//! terminal, never with --quiet) and one line per epoch on stdout (not with --quiet).
//!
//! When nobody reads stdout any more (`ptb-lm train ... | head -1`), the lines stop and
//! [`Reporter::output_closed`] says so, so training can stop as it does on Ctrl-C. (This
//! needs SIGPIPE ignored, as `ptb-lm train` sets it; otherwise the write kills the process.)

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::cell::Cell;
use std::io::{IsTerminal, Write};

pub struct Reporter {
    quiet: bool,
    bar: Option<ProgressBar>,
    closed: Cell<bool>,
}

impl Reporter {
    pub fn new(quiet: bool) -> Reporter {
        Reporter { quiet, bar: None, closed: Cell::new(false) }
    }

    /// Whether a write to stdout failed (its reader went away).
    pub fn output_closed(&self) -> bool {
        self.closed.get()
    }

    pub fn start_epoch(&mut self, epoch: usize, epochs: usize, batches: usize, done: usize) {
        self.finish();
        if self.quiet || !std::io::stderr().is_terminal() {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(batches as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        bar.set_position(done as u64);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    pub fn update(&self, done: usize, ppl: f64, bpc: f64, lr: f64, tokens_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(format!("ppl {ppl:.2} | bpc {bpc:.3} | lr {lr:.4} | {:.1}k tok/s", tokens_per_s / 1000.0));
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Whether this reporter leaves out all but warnings (--quiet, or a rank that does not lead).
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// A result line on stdout (suppressed by --quiet).
    pub fn line(&self, msg: &str) {
        if self.quiet || self.closed.get() {
            return;
        }
        let write = || {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{msg}").and_then(|_| out.flush())
        };
        let written = match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        };
        if written.is_err() {
            self.closed.set(true);
        }
    }

    /// A warning on stderr (always shown).
    pub fn warn(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("warning: {msg}")),
            None => eprintln!("warning: {msg}"),
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}
