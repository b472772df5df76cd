//! Test hooks that provoke, on any machine, faults that real runs meet only by chance:
//! a pause at a chosen point (so a test can send a signal or kill the process there) and a
//! diverging step. Each is off unless its environment variable is set.
//!
//! * `PTB_LM_FAILPOINT_PAUSE=setup|test|stats|save:N|step:N`: pause for a minute, after
//!   printing `ptb-lm: failpoint: paused in <where>` on stderr: in set-up (before the first
//!   step), before the final test evaluation, between the two files of a save of dynamic
//!   evaluation's gradient statistics, half-way through the checkpoint save after the first
//!   N (weights written, metadata not), or right after training step N (0-based, counted
//!   over the whole run).
//! * `PTB_LM_FAILPOINT_RELEASE=FILE`: a pause ends as soon as FILE exists (so a test can
//!   interleave two processes exactly: hold one at a point, run the other, release the first).
//! * `PTB_LM_FAILPOINT_DIVERGE=KIND@STEP` (or `KIND@STEP+` for every step from STEP on):
//!   right after training step STEP (0-based, counted over the whole run) `nan` turns a
//!   weight into NaN, `loss` adds 1e9 to the running loss (finite, but clearly diverged).
//! * `PTB_LM_FAILPOINT_DYNAMIC=nan`: every update of dynamic evaluation turns the first weight
//!   tensor into NaN (a dynamic evaluation that diverges, on every machine).
//! * `PTB_LM_FAILPOINT_AVERAGE=N`: with `train.asgd`, averaging starts after epoch N whatever
//!   the validation perplexities say.
//! * `PTB_LM_FAILPOINT_TORCH=1`: `ptb-lm eval` makes libtorch fail (a product of tensors whose
//!   shapes do not match), as an unforeseen libtorch error would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const PAUSE: &str = "PTB_LM_FAILPOINT_PAUSE";
const DIVERGE: &str = "PTB_LM_FAILPOINT_DIVERGE";
const TORCH: &str = "PTB_LM_FAILPOINT_TORCH";
const AVERAGE: &str = "PTB_LM_FAILPOINT_AVERAGE";
const RELEASE: &str = "PTB_LM_FAILPOINT_RELEASE";
const DYNAMIC: &str = "PTB_LM_FAILPOINT_DYNAMIC";

/// Every environment variable of this module (tests clear them for child processes).
pub const VARIABLES: [&str; 6] = [PAUSE, DIVERGE, TORCH, AVERAGE, RELEASE, DYNAMIC];

/// Whether dynamic evaluation's updates are to diverge (`PTB_LM_FAILPOINT_DYNAMIC=nan`).
pub fn dynamic_diverges() -> bool {
    std::env::var(DYNAMIC).is_ok_and(|v| v == "nan")
}

/// Whether averaged SGD is to start after epoch `epoch` (1-based).
pub fn average_after(epoch: usize) -> bool {
    std::env::var(AVERAGE).ok().and_then(|v| v.parse::<usize>().ok()) == Some(epoch)
}

/// Makes libtorch fail when `PTB_LM_FAILPOINT_TORCH` is set.
pub fn torch_error() {
    if std::env::var_os(TORCH).is_some() {
        let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let _ = a.matmul(&a);
    }
}

static SAVES: AtomicUsize = AtomicUsize::new(0);

/// Pauses when `PTB_LM_FAILPOINT_PAUSE` names `point`.
pub fn pause(point: &str) {
    if std::env::var(PAUSE).is_ok_and(|v| v == point) {
        hold(point);
    }
}

/// Called after every training step: pauses after global step `step` when asked to.
pub fn pause_after_step(step: usize) {
    let at = std::env::var(PAUSE).ok().and_then(|v| v.strip_prefix("step:").and_then(|n| n.parse::<usize>().ok()));
    if at == Some(step) {
        hold(&format!("step {step}"));
    }
}

/// Called once per checkpoint save, half-way: pauses in the save after the first N.
pub fn pause_in_save() {
    let n = SAVES.fetch_add(1, Ordering::SeqCst);
    let at = std::env::var(PAUSE).ok().and_then(|v| v.strip_prefix("save:").and_then(|n| n.parse::<usize>().ok()));
    if at == Some(n) {
        hold("checkpoint save");
    }
}

fn hold(point: &str) {
    eprintln!("ptb-lm: failpoint: paused in {point}");
    let release = std::env::var_os(RELEASE).map(std::path::PathBuf::from);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < until && !release.as_ref().is_some_and(|f| f.exists()) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a provoked divergence breaks the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// A weight becomes NaN.
    Nan,
    /// The running loss grows by 1e9: finite, far beyond any real loss.
    Loss,
}

static DIVERGED: AtomicBool = AtomicBool::new(false);

/// The divergence to provoke after global step `step`, if any: once per process for
/// `KIND@STEP` (training goes back to before it and passes there again), every time from
/// STEP on for `KIND@STEP+`.
pub fn diverge_after(step: usize) -> Option<Divergence> {
    let spec = std::env::var(DIVERGE).ok()?;
    let (kind, at, onwards) = parse_diverge(&spec)?;
    let fire = if onwards { step >= at } else { step == at && !DIVERGED.swap(true, Ordering::SeqCst) };
    fire.then_some(kind)
}

fn parse_diverge(spec: &str) -> Option<(Divergence, usize, bool)> {
    let (kind, at) = spec.split_once('@')?;
    let kind = match kind {
        "nan" => Divergence::Nan,
        "loss" => Divergence::Loss,
        _ => return None,
    };
    let (at, onwards) = match at.strip_suffix('+') {
        Some(a) => (a, true),
        None => (at, false),
    };
    Some((kind, at.parse().ok()?, onwards))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_specs_parse() {
        assert_eq!(parse_diverge("nan@5"), Some((Divergence::Nan, 5, false)));
        assert_eq!(parse_diverge("loss@0+"), Some((Divergence::Loss, 0, true)));
        assert_eq!(parse_diverge("inf@5"), None);
        assert_eq!(parse_diverge("nan5"), None);
    }
}
