//! How a ptb-lm process stops: Ctrl-C (SIGINT), SIGTERM and a closed stdout.
//!
//! One process-wide flag says "stop". What a signal does depends on the phase:
//!
//! * inside a [`Graceful`] phase (the training loop, which can save a resumable checkpoint
//!   after its current step), the first signal sets the flag and the loop stops at its next
//!   step; a second signal ends the process at once;
//! * anywhere else (setting up, the final test evaluation, `eval`, `generate`), a signal ends
//!   the process at once: nothing is half-done there that a checkpoint could keep.
//!
//! "At once" is `_exit(130)` from the handler thread: unlike `std::process::exit` it runs no
//! atexit handlers or C++ static destructors, which would tear libtorch down under the feet
//! of the thread still computing (a crash, not an exit). Checkpoints are written atomically
//! ([`crate::checkpoint`]), so ending mid-save leaves the previous one whole.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static GRACEFUL: AtomicBool = AtomicBool::new(false);

/// The exit code of a process stopped by a signal (128 + SIGINT), as shells report it.
pub const EXIT_CODE: i32 = 130;

/// The flag a graceful phase polls.
pub fn flag() -> &'static AtomicBool {
    &STOP
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Asks the graceful phase to stop (e.g. because stdout was closed).
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM handler (once per process).
pub fn install() -> Result<()> {
    ctrlc::set_handler(on_signal).context("cannot install the Ctrl-C handler")
}

fn on_signal() {
    let second = STOP.swap(true, Ordering::SeqCst);
    if second || !GRACEFUL.load(Ordering::SeqCst) {
        eprintln!("\nstopping now");
        quit_now();
    }
    eprintln!("\nstopping after this step to save a resumable checkpoint (again to quit at once)");
}

/// Ends the process with [`EXIT_CODE`], running no destructors.
fn quit_now() -> ! {
    // SAFETY: _exit(2) is async-signal-safe and never returns.
    unsafe { libc::_exit(EXIT_CODE) }
}

/// While alive, the first signal asks to stop at the next step instead of ending the process.
pub struct Graceful(());

impl Graceful {
    pub fn enter() -> Graceful {
        GRACEFUL.store(true, Ordering::SeqCst);
        Graceful(())
    }
}

impl Drop for Graceful {
    fn drop(&mut self) {
        GRACEFUL.store(false, Ordering::SeqCst);
    }
}
