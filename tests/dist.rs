//! Data-parallel training on torch.distributed (Gloo): two ranks compute what one process
//! computes, ranks can be started by hand from the launcher's variables, and a rank that dies
//! takes the others down with a clear error. Where this ptb-lm was built without gloo's
//! headers, the same commands must say in one line what to install.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A config whose training is not chaotic (lr 1, no dropout), so float rounding between one
/// process and two ranks stays at rounding size over whole epochs.
fn stable(s: &Sandbox) -> String {
    let cfg = s.config("c.toml", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("lr = 20.0", "lr = 1.0")
        .replace("dropout = 0.1", "dropout = 0.0");
    std::fs::write(&cfg, text).unwrap();
    cfg.to_str().unwrap().to_string()
}

fn records(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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
