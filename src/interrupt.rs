//! How a ptb-lm process stops: Ctrl-C (SIGINT), SIGTERM and a closed stdout.
//!
//! One process-wide flag says "stop". What a signal does depends on the phase:
//!
//! * inside a [`Graceful`] phase (the training loop, which can save a resumable checkpoint
//!   after its current step), the first signal sets the flag and the loop stops at its next
//!   step; a second signal ends the process at once;
//! * anywhere else (setting up, the final test evaluation, `eval`, `generate`), a signal ends
//!   the process at once: nothing is half-done there that a checkpoint could keep (a [`Note`]
//!   then says what the cut left and how to go on);
//! * in the `--nproc` launcher ([`Forwarding`]), a signal ends nothing: it is counted, and the
//!   launcher passes it on to its ranks (the first) or kills them (the second).
//!
//! In data-parallel training rank 0 speaks for the group: the other ranks stop silently.
//!
//! One signal can arrive twice: GNU `timeout` (and some supervisors) signal the process and
//! then its whole process group, which holds the process too. A signal within
//! [`SAME_SIGNAL`] of the first is therefore taken as the same one; a person's second Ctrl-C
//! comes later than that.
//!
//! "At once" is `_exit(130)` from the handler thread: unlike `std::process::exit` it runs no
//! atexit handlers or C++ static destructors, which would tear libtorch down under the feet
//! of the thread still computing (a crash, not an exit). Checkpoints are written atomically
//! ([`crate::checkpoint`]), so ending mid-save leaves the previous one whole.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Signals this close to the first are one signal delivered twice (see the module comment).
pub const SAME_SIGNAL: Duration = Duration::from_millis(200);
static FIRST: Mutex<Option<Instant>> = Mutex::new(None);

static STOP: AtomicBool = AtomicBool::new(false);
static GRACEFUL: AtomicBool = AtomicBool::new(false);
static FORWARDING: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);
static SILENT: AtomicBool = AtomicBool::new(false);
static NOTE: Mutex<Option<String>> = Mutex::new(None);

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
    SILENT.store(std::env::var("RANK").is_ok_and(|r| r != "0"), Ordering::SeqCst);
    ctrlc::set_handler(on_signal).context("cannot install the Ctrl-C handler")
}

fn on_signal() {
    {
        let mut first = FIRST.lock().unwrap_or_else(|e| e.into_inner());
        match *first {
            Some(t) if t.elapsed() < SAME_SIGNAL => return,
            Some(_) => {}
            None => *first = Some(Instant::now()),
        }
    }
    let count = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
    if FORWARDING.load(Ordering::SeqCst) {
        // The launcher's loop acts on the count; its first signal reaches rank 0, which says
        // what it does.
        if count == 2 {
            say("\nstopping now: ending every rank");
        }
        return;
    }
    let second = STOP.swap(true, Ordering::SeqCst);
    if second || !GRACEFUL.load(Ordering::SeqCst) {
        let note = NOTE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        say(&match note {
            Some(note) => format!("\nstopping now\n{note}"),
            None => "\nstopping now".to_string(),
        });
        quit_now();
    }
    say("\nstopping after this step to save a resumable checkpoint (again to quit at once)");
}

fn say(msg: &str) {
    if !SILENT.load(Ordering::SeqCst) {
        eprintln!("{msg}");
    }
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

/// While alive, a signal that ends the process at once also prints this note (what the cut
/// leaves, and how to go on).
pub struct Note(());

impl Note {
    pub fn enter(note: String) -> Note {
        *NOTE.lock().unwrap_or_else(|e| e.into_inner()) = Some(note);
        Note(())
    }
}

impl Drop for Note {
    fn drop(&mut self) {
        *NOTE.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// While alive (in the `--nproc` launcher), signals end nothing here: they are only counted,
/// for the launcher to pass on to the processes it started.
pub struct Forwarding(());

impl Forwarding {
    pub fn enter() -> Forwarding {
        FORWARDING.store(true, Ordering::SeqCst);
        Forwarding(())
    }

    /// SIGINT/SIGTERM received by this process so far.
    pub fn signals(&self) -> usize {
        SIGNALS.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        FORWARDING.store(false, Ordering::SeqCst);
    }
}
