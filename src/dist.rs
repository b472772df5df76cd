//! Data-parallel training on libtorch's own torch.distributed engine (c10d), through the
//! C++ shim `src/dist.cpp`: a `TCPStore` rendezvous and a `ProcessGroupGloo` (CPU).
//!
//! A process is one rank of N when started with the launcher conventions torchrun sets
//! (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; `LOCAL_RANK` is read but not needed on
//! the CPU). Every collective gives up after `PTB_LM_DIST_TIMEOUT` seconds (default 120), so
//! no rank waits forever for one that died.
//!
//! Built only where gloo's headers were found (Debian's `libgloo-dev`); elsewhere
//! [`available`] is false and [`Group::from_env`] says what to install.

use anyhow::{bail, Context, Result};
use tch::Tensor;

#[cfg(ptb_gloo)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    extern "C" {
        pub fn ptb_dist_free_message(msg: *mut c_char);
        pub fn ptb_dist_new(
            host: *const c_char,
            port: i32,
            rank: i32,
            world: i32,
            timeout_ms: i64,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn ptb_dist_free(g: *mut c_void);
        pub fn ptb_dist_allreduce_sum(g: *mut c_void, tensor: *mut c_void, err: *mut *mut c_char) -> c_int;
    }
}

/// Whether this build can train across processes.
pub fn available() -> bool {
    cfg!(ptb_gloo)
}

/// What to do where [`available`] is false.
pub const INSTALL_HINT: &str = "this ptb-lm was built without gloo's headers, which multi-process training needs: \
     install them (Debian/Ubuntu: apt-get install libgloo-dev) and build again";

/// Where this process stands in a group, from the launcher's environment variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub addr: String,
    pub port: u16,
    pub timeout_s: u64,
}

impl Launch {
    /// None when `WORLD_SIZE` is unset or 1.
    pub fn from_env() -> Result<Option<Launch>> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let world: usize = world.parse().with_context(|| format!("WORLD_SIZE: not a number ({world})"))?;
        if world <= 1 {
            return Ok(None);
        }
        let rank: usize =
            var("RANK").context("WORLD_SIZE is set but RANK is not")?.parse().context("RANK: not a number")?;
        if rank >= world {
            bail!("RANK {rank} is not below WORLD_SIZE {world}");
        }
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
        let port: u16 =
            var("MASTER_PORT").context("MASTER_PORT is not set")?.parse().context("MASTER_PORT: not a port")?;
        let timeout_s = match var("PTB_LM_DIST_TIMEOUT") {
            Some(t) => t.parse().context("PTB_LM_DIST_TIMEOUT: not a number of seconds")?,
            None => 120,
        };
        Ok(Some(Launch { rank, world, addr, port, timeout_s }))
    }
}

/// A joined process group.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    #[cfg(ptb_gloo)]
    ptr: *mut std::os::raw::c_void,
}

#[cfg(ptb_gloo)]
fn check(rc: i32, err: *mut std::os::raw::c_char, what: &str, rank: usize) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let first = crate::cuda::shim_message(err, ffi::ptb_dist_free_message);
    bail!("rank {rank}: {what} failed (another rank stopped, or the group timed out): {first}")
}

impl Group {
    /// Joins the group `launch` describes (rank 0 serves the rendezvous).
    pub fn join(launch: &Launch) -> Result<Group> {
        #[cfg(ptb_gloo)]
        {
            let host = std::ffi::CString::new(launch.addr.clone())?;
            let mut err = std::ptr::null_mut();
            // SAFETY: valid C string and out-pointer; the shim returns null and sets err on failure.
            let ptr = unsafe {
                ffi::ptb_dist_new(
                    host.as_ptr(),
                    launch.port as i32,
                    launch.rank as i32,
                    launch.world as i32,
                    (launch.timeout_s * 1000) as i64,
                    &mut err,
                )
            };
            check(if ptr.is_null() { 1 } else { 0 }, err, "joining the process group", launch.rank)?;
            Ok(Group { rank: launch.rank, world: launch.world, ptr })
        }
        #[cfg(not(ptb_gloo))]
        {
            let _ = launch;
            bail!("{INSTALL_HINT}")
        }
    }

    /// Sums `t` over the group, in place (a contiguous CPU tensor).
    pub fn allreduce_sum(&self, t: &Tensor) -> Result<()> {
        #[cfg(ptb_gloo)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: tch's tensor handle is an at::Tensor*, which the shim reads; it lives
            // for the whole call.
            let rc = unsafe { ffi::ptb_dist_allreduce_sum(self.ptr, t.as_ptr() as *mut _, &mut err) };
            check(rc, err, "all-reduce", self.rank)
        }
        #[cfg(not(ptb_gloo))]
        {
            let _ = t;
            bail!("{INSTALL_HINT}")
        }
    }

    /// The columns `[start, start + len)` of a batch of `batch` streams that this rank owns.
    pub fn shard(&self, batch: i64) -> (i64, i64) {
        let len = batch / self.world as i64;
        (self.rank as i64 * len, len)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(ptb_gloo)]
        // SAFETY: the handle came from ptb_dist_new and is freed once.
        unsafe {
            ffi::ptb_dist_free(self.ptr)
        };
    }
}

/// `ptb-lm train --nproc N`: starts N ranks of this program on this machine (with `args`, the
/// command line less `--nproc`), with the launcher's environment variables and a free port,
/// and waits for them. Rank 0 writes to stdout; every rank's errors reach stderr. Returns the
/// exit code to end with: 0 when every rank ended with 0, the code of a rank that failed, or
/// [`crate::interrupt::EXIT_CODE`] when the group was stopped.
///
/// Signals, as torchrun handles them: each rank runs in a process group of its own, so a
/// terminal's Ctrl-C reaches this launcher alone (not the ranks too, which would then count
/// the launcher's copy as a second signal and quit without saving). The first SIGINT/SIGTERM
/// here is passed on to every rank, once, as SIGINT: the group stops together with a
/// resumable `last/` (or at once, in set-up or the final test evaluation, as one process
/// does). A second one kills every rank (SIGKILL) and ends the launcher. A rank that fails
/// takes the others down (SIGTERM); one that stopped on a signal does not (its group agrees
/// on stopping, and rank 0 may still be saving).
pub fn launch_local(n: usize, args: &[std::ffi::OsString]) -> Result<i32> {
    use crate::interrupt::EXIT_CODE;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Child, Command, Stdio};
    if !available() {
        bail!("--nproc: {INSTALL_HINT}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("--nproc: no free local port for the rendezvous")?
        .port();
    let exe = std::env::current_exe().context("--nproc: cannot find this program")?;
    // Sends `sig` to every rank that has not ended yet (a rank ended but not yet waited for
    // keeps its pid, so no other process is hit).
    fn signal_running(children: &[Child], done: &[Option<i32>], sig: i32) {
        for (child, d) in children.iter().zip(done) {
            if d.is_none() {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(child.id() as i32, sig) };
            }
        }
    }
    let signals = crate::interrupt::Forwarding::enter();
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..n {
        let mut c = Command::new(&exe);
        c.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .process_group(0)
            // Out of the terminal's foreground group, a rank must not read it.
            .stdin(Stdio::null());
        if rank > 0 {
            c.stdout(Stdio::null());
        }
        match c.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                // No rank is left behind, waiting for the one that did not start.
                signal_running(&children, &vec![None; children.len()], libc::SIGKILL);
                for child in &mut children {
                    let _ = child.wait();
                }
                return Err(e).with_context(|| format!("--nproc: cannot start rank {rank}"));
            }
        }
    }
    let code = |s: std::process::ExitStatus| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
    let mut done: Vec<Option<i32>> = vec![None; n];
    let mut forwarded = false;
    let mut failed = None;
    loop {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank].is_none() {
                done[rank] = child.try_wait()?.map(code);
            }
        }
        let received = signals.signals();
        if received >= 2 {
            signal_running(&children, &done, libc::SIGKILL);
            for child in &mut children {
                let _ = child.wait();
            }
            return Ok(EXIT_CODE);
        }
        if received == 1 && !forwarded {
            forwarded = true;
            signal_running(&children, &done, libc::SIGINT);
        }
        if failed.is_none() && !forwarded {
            failed = done.iter().flatten().copied().find(|&c| c != 0 && c != EXIT_CODE);
            if failed.is_some() {
                signal_running(&children, &done, libc::SIGTERM);
            }
        }
        if done.iter().all(Option::is_some) {
            let stopped = if done.iter().all(|&d| d == Some(0)) { 0 } else { EXIT_CODE };
            return Ok(failed.unwrap_or(stopped));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
