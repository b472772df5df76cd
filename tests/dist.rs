//! Data-parallel training on torch.distributed (Gloo): two ranks compute what one process
//! computes, ranks can be started by hand from the launcher's variables, a rank that dies
//! takes the others down with a clear error, and signals to the `--nproc` launcher stop its
//! ranks (the first with a resumable checkpoint, a second at once). Where this ptb-lm was built
//! without gloo's headers, the same commands must say in one line what to install.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A config whose training is not chaotic (lr 1, no dropout), so float rounding between one
/// process and two ranks stays at rounding size over whole epochs.
fn stable(s: &Sandbox) -> String {
    tiny_with(s, "", &[("lr = 20.0", "lr = 1.0"), ("dropout = 0.1", "dropout = 0.0")])
}

/// The tiny config with `extra` train keys and some of its lines replaced (`(from, to)`).
fn tiny_with(s: &Sandbox, extra: &str, replace: &[(&str, &str)]) -> String {
    let cfg = s.config("c.toml", extra);
    let text = replace.iter().fold(std::fs::read_to_string(&cfg).unwrap(), |t, (from, to)| t.replace(from, to));
    std::fs::write(&cfg, text).unwrap();
    cfg.to_str().unwrap().to_string()
}

/// Two ranks started by hand, as a launcher would (a free port, collectives time out in 20 s).
fn spawn_ranks(s: &Sandbox, cfg: &str, epochs: &str) -> Vec<std::process::Child> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    (0..2)
        .map(|r| {
            s.command(&["train", "--config", cfg, "--epochs", epochs])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("PTB_LM_DIST_TIMEOUT", "20")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_gloo_ranks_compute_what_one_process_computes() {
    let s = Sandbox::new();
    let cfg = stable(&s);
    assert_success(&s.run(&["train", "--config", &cfg, "--out-dir", "one"]));
    let o = s.run(&["train", "--config", &cfg, "--out-dir", "two", "--nproc", "2"]);
    if !ptb_lm::dist::available() {
        assert_one_line_error(&o, &["--nproc", "libgloo-dev"]);
        return;
    }
    assert_success(&o);
    let (one, two) = (records(&s.path("one")), records(&s.path("two")));
    assert_eq!(two.len(), 2, "rank 0 alone writes the metrics, once per epoch");
    for (a, b) in one.iter().zip(&two) {
        for key in ["train_ppl", "valid_ppl"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() / x < 1e-5, "epoch {}: {key} {x} (1 process) vs {y} (2 ranks)", a["epoch"]);
        }
    }
    // The checkpoint is the one a single process writes, and resumes like one.
    let last = ptb_lm::checkpoint::Checkpoint::load(&s.path("two/last")).unwrap();
    assert_eq!(last.state[0].1.size()[1], 10, "the state of all 10 streams");
    assert!(s.path("two/summary.json").exists());
}

#[test]
fn ranks_started_by_hand_from_the_launcher_variables_train_together() {
    if !ptb_lm::dist::available() {
        return;
    }
    let s = Sandbox::new();
    let cfg = stable(&s);
    let ranks = spawn_ranks(&s, &cfg, "1");
    let outs: Vec<_> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outs {
        assert_success(o);
    }
    assert!(stdout(&outs[0]).contains("epoch   1 |"), "{}", stdout(&outs[0]));
    assert!(stdout(&outs[1]).is_empty(), "only rank 0 reports: {}", stdout(&outs[1]));
    assert_eq!(records(&s.path("run")).len(), 1);
}

#[test]
fn a_killed_rank_ends_the_others_with_a_one_line_error() {
    if !ptb_lm::dist::available() {
        return;
    }
    let s = Sandbox::new();
    let cfg = stable(&s);
    let mut ranks = spawn_ranks(&s, &cfg, "1000");
    let mut out = BufReader::new(ranks[0].stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("epoch   1 |") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "rank 0 ended before its first epoch");
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(ranks[1].id() as i32, libc::SIGKILL) };
    let t = Instant::now();
    let survivor = ranks.remove(0);
    let o = survivor.wait_with_output().unwrap();
    drop(out); // kept open until now: a closed stdout would stop rank 0 for another reason
    assert!(t.elapsed() < Duration::from_secs(60), "rank 0 waited {:?}", t.elapsed());
    assert_one_line_error(&o, &["rank 0:", "failed (another rank stopped, or the group timed out)"]);
    let _ = ranks[0].wait();
}

/// Reads `reader` line by line until one contains `needle`, returning everything read.
fn read_until(reader: &mut impl BufRead, needle: &str) -> String {
    let mut text = String::new();
    while !text.lines().any(|l| l.contains(needle)) {
        assert!(reader.read_line(&mut text).unwrap() > 0, "stream ended before a line with {needle:?}:\n{text}");
    }
    text
}

/// The pids of `parent`'s child processes (from /proc).
fn children_of(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

/// `train --nproc 2` whose rank 0 pauses half-way through its save of epoch 1's `last/` (in
/// training, where a signal asks for a resumable stop), until `release` exists or 60 s pass.
/// The launcher leads a process group of its own, as under `timeout` or a supervisor.
fn launch_paused(s: &Sandbox, cfg: &str, release: Option<&std::path::Path>) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut c = s.command(&["train", "--config", cfg, "--epochs", "2", "--nproc", "2"]);
    c.env("PTB_LM_FAILPOINT_PAUSE", "save:1").stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    if let Some(f) = release {
        c.env("PTB_LM_FAILPOINT_RELEASE", f);
    }
    c.spawn().unwrap()
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn sigterm_to_the_launcher_stops_every_rank_with_a_resumable_checkpoint() {
    if !ptb_lm::dist::available() {
        return;
    }
    let s = Sandbox::new();
    let cfg = stable(&s);
    let release = s.path("release");
    let mut launcher = launch_paused(&s, &cfg, Some(&release));
    let mut err = BufReader::new(launcher.stderr.take().unwrap());
    let mut text = read_until(&mut err, "paused in checkpoint save");
    // What a scheduler, `timeout` or a supervisor sends to the process it started (the ranks
    // are not signalled by the test), delivered twice as GNU `timeout` does: to the process,
    // then to its process group. It is one signal.
    signal(&launcher, libc::SIGTERM);
    // SAFETY: kill(2) on the process group our own child leads.
    assert_eq!(unsafe { libc::kill(-(launcher.id() as i32), libc::SIGTERM) }, 0);
    // Rank 0 got it, forwarded, while its save is held; rank 1 waits for it at the epoch's end.
    text += &read_until(&mut err, "stopping after this step");
    std::fs::write(&release, "").unwrap();
    let status = launcher.wait().unwrap();
    std::io::Read::read_to_string(&mut err, &mut text).unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("interrupted in epoch 2 after batch 0 of"), "{text}");
    let resume = format!("continue with: ptb-lm train --resume {}", s.path("run").display());
    assert!(text.contains(&resume), "{text}");
    // Each rank saw the signal once and stopped after the same epoch: no rank quit at once, and
    // none was left waiting for the other.
    assert!(!text.contains("stopping now") && !text.contains("error:"), "{text}");
    let pos = ptb_lm::checkpoint::Checkpoint::load(&s.path("run/last")).unwrap().meta.resume.unwrap();
    assert_eq!((pos.epoch, pos.batch), (1, 0), "epoch 1 saved whole");
    let o = s.run(&["train", "--resume", "run", "--nproc", "2"]);
    assert_success(&o);
    assert_eq!(records(&s.path("run")).len(), 2);
    assert!(s.path("run/summary.json").exists());
}

#[test]
fn a_second_signal_to_the_launcher_ends_every_rank_at_once() {
    if !ptb_lm::dist::available() {
        return;
    }
    let s = Sandbox::new();
    let cfg = stable(&s);
    // No release: rank 0 holds its save for 60 s unless it is killed.
    let mut launcher = launch_paused(&s, &cfg, None);
    let mut err = BufReader::new(launcher.stderr.take().unwrap());
    let mut text = read_until(&mut err, "paused in checkpoint save");
    let ranks = children_of(launcher.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    signal(&launcher, libc::SIGINT);
    text += &read_until(&mut err, "stopping after this step");
    // A second signal, later than one signal delivered twice could be.
    std::thread::sleep(ptb_lm::interrupt::SAME_SIGNAL * 2);
    let t = Instant::now();
    signal(&launcher, libc::SIGTERM);
    let status = launcher.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "the launcher waited {:?} for its ranks", t.elapsed());
    // Checked before reading the rest of stderr, which a surviving rank would hold open.
    let survivors: Vec<i32> = ranks.into_iter().filter(|&pid| alive(pid)).collect();
    for &pid in &survivors {
        // SAFETY: kill(2) on a rank this test started (through the launcher), not left running.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(survivors.is_empty(), "rank processes {survivors:?} outlived the launcher");
    std::io::Read::read_to_string(&mut err, &mut text).unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("stopping now: ending every rank"), "{text}");
    assert!(!s.path("run/last").exists(), "rank 0 was ended in its save, not let finish it");
    ptb_lm::checkpoint::Checkpoint::load(&s.path("run/best")).unwrap();
}

#[test]
fn a_data_parallel_run_that_diverges_says_so_once_not_once_per_rank() {
    let s = Sandbox::new();
    let cfg =
        tiny_with(&s, "max_nan_restarts = 2", &[("lr = 20.0", "lr = 1e6"), ("max_grad = 0.25", "max_grad = 0.0")]);
    let o = s.run(&["--threads", "1", "train", "--config", &cfg, "--nproc", "2"]);
    if !ptb_lm::dist::available() {
        assert_one_line_error(&o, &["--nproc", "libgloo-dev"]);
        return;
    }
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.matches("error: training diverged").count(), 1, "{err}");
    assert_eq!(err.matches("warning: training diverged").count(), 2, "one per restart: {err}");
    assert!(s.path("run/last").exists(), "the last sound state is kept: {err}");
}
