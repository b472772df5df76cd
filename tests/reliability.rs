//! Nothing a user did may be lost: interruption and resume, kills during a save, non-finite
//! losses, and checkpoints that are not what they claim. The signal tests send real signals
//! to a child `ptb-lm`.

mod common;

use common::*;
use ptb_lm::checkpoint::Checkpoint;
use std::io::BufReader;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tch::Device;

/// Runs `ptb-lm args`, holds it after global step `step` (a failpoint), sends it a real
/// SIGINT there and lets it go on; checks it exits 130 and returns its stderr.
fn interrupted_after_step(s: &Sandbox, args: &[&str], step: usize) -> String {
    let release = s.path("release");
    let mut child = s
        .command(args)
        .env("PTB_LM_FAILPOINT_PAUSE", format!("step:{step}"))
        .env("PTB_LM_FAILPOINT_RELEASE", &release)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_lines = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut stderr_lines, &format!("paused in step {step}"));
    signal(&child, libc::SIGINT);
    std::fs::write(&release, "").unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr_lines, &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "stderr: {err}");
    err
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn sigint_saves_a_resumable_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let s = interrupted_and_resumed_matches_uninterrupted("");

    // A finished run cannot be resumed without more epochs; with more it continues.
    let o = s.run(&["train", "--resume", "run"]);
    assert_one_line_error(&o, &["already finished 3 epochs (train.epochs = 3)", "--epochs N, N > 3"]);
    let o = s.run(&["train", "--resume", "run", "--epochs", "4", "--set", "train.lr=1"]);
    assert_one_line_error(&o, &["when resuming, only", "train.lr"]);
}

#[test]
fn a_cosine_schedule_with_warm_up_resumes_exactly_too() {
    interrupted_and_resumed_matches_uninterrupted("schedule = \"cosine\"\nwarmup_steps = 250\nmin_lr = 1.0");
}

/// Trains the tiny config with `extra` [train] lines for 3 epochs straight, and again cut
/// by SIGINT in epoch 2 and resumed: every epoch's validation perplexity must be the same.
fn interrupted_and_resumed_matches_uninterrupted(extra: &str) -> Sandbox {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", extra);
    let cfg = cfg.to_str().unwrap();
    let settings = ["--set", "data.train_tokens=40000", "--epochs", "3"];

    // Uninterrupted reference run.
    let mut args = vec!["train", "--config", cfg, "--out-dir", "straight"];
    args.extend(settings);
    assert_success(&s.run(&args));
    let straight = valid_ppls(&s.path("straight"));

    // Interrupted in epoch 2 by a real SIGINT (sent while the run is held after its 6th step
    // of epoch 2: 40000 tokens / (10 x 20) = 200 steps an epoch), then resumed.
    let mut args = vec!["train", "--config", cfg, "--out-dir", "run"];
    args.extend(settings);
    let err = interrupted_after_step(&s, &args, 205);
    assert!(err.contains("interrupted in epoch 2 after batch"), "{err}");
    assert!(err.contains("continue with: ptb-lm train --resume run"), "{err}");
    let last = Checkpoint::load(&s.path("run/last")).unwrap();
    let pos = last.meta.resume.clone().unwrap();
    assert_eq!(pos.epoch, 1, "interrupted in the second epoch");
    assert!(pos.batch > 0, "mid-epoch position expected, got {pos:?}");
    assert!(s.path("run/best").exists(), "epoch 1's best checkpoint is kept");

    let o = s.run(&["train", "--resume", "run"]);
    assert_success(&o);
    assert!(stdout(&o).contains("resuming run at epoch 2, batch"), "{}", stdout(&o));
    let resumed = valid_ppls(&s.path("run"));
    assert_eq!(resumed.len(), 3, "metrics.jsonl has each epoch once");
    for (a, b) in straight.iter().zip(&resumed) {
        assert!((a - b).abs() / a < 1e-9, "per-epoch validation perplexities differ: {straight:?} vs {resumed:?}");
    }
    s
}

#[test]
fn an_adam_run_stopped_mid_epoch_and_resumed_ends_bit_identical_to_an_uninterrupted_one() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    // 20000 tokens / (10 x 20): about 100 steps an epoch.
    let settings = ["--set", "train.optimizer=adam", "--set", "train.lr=0.01", "--epochs", "2"];
    let mut args = vec!["train", "--config", cfg, "--out-dir", "straight"];
    args.extend(settings);
    assert_success(&s.run(&args));

    // Interrupted by a real SIGINT while held after step 105 (in epoch 2), then resumed.
    let mut args = vec!["train", "--config", cfg, "--out-dir", "run"];
    args.extend(settings);
    interrupted_after_step(&s, &args, 105);
    let last = Checkpoint::load(&s.path("run/last")).unwrap();
    let pos = last.meta.resume.clone().unwrap();
    assert_eq!(pos.epoch, 1, "interrupted in the second epoch: {pos:?}");
    assert!(pos.batch > 0, "mid-epoch position expected, got {pos:?}");
    let adam_steps =
        |c: &Checkpoint| c.state.iter().find(|(n, _)| n == "adam.step").map(|(_, t)| f64::try_from(t).unwrap());
    // The uninterrupted run took one Adam step per batch of its two epochs.
    let per_epoch = adam_steps(&Checkpoint::load(&s.path("straight/last")).unwrap()).unwrap() / 2.0;
    assert_eq!(adam_steps(&last), Some(per_epoch + pos.batch as f64), "Adam's step count is the position's");

    // Without its moments the checkpoint cannot continue an Adam run: refused by name.
    let state_file = s.path("run/last/state.safetensors");
    let whole = std::fs::read(&state_file).unwrap();
    let kept: Vec<(String, tch::Tensor)> =
        last.state.iter().filter(|(n, _)| !n.starts_with("adam.")).map(|(n, t)| (n.clone(), t.copy())).collect();
    ptb_lm::checkpoint::write_safetensors(&kept, &state_file).unwrap();
    let o = s.run(&["train", "--resume", "run"]);
    assert_one_line_error(&o, &["run/last/state.safetensors: tensor 'adam.", "is missing", "optimizer = \"adam\""]);
    std::fs::write(&state_file, whole).unwrap();

    let o = s.run(&["train", "--resume", "run"]);
    assert_success(&o);
    assert!(stdout(&o).contains("resuming run at epoch 2, batch"), "{}", stdout(&o));
    assert_eq!(valid_ppls(&s.path("run")), valid_ppls(&s.path("straight")));
    // The same process settings on the same machine: the same bits, weights and Adam's state.
    let (a, b) = (Checkpoint::load(&s.path("straight/last")).unwrap(), Checkpoint::load(&s.path("run/last")).unwrap());
    let sorted = |ts: &[(String, tch::Tensor)]| {
        let mut v: Vec<(String, tch::Tensor)> = ts.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    for (mine, theirs) in [(sorted(&a.weights), sorted(&b.weights)), (sorted(&a.state), sorted(&b.state))] {
        assert_eq!(mine.len(), theirs.len());
        for ((n, x), (m, y)) in mine.iter().zip(theirs.iter()) {
            assert_eq!(n, m);
            assert!(x.equal(y), "{n} differs between the uninterrupted and the resumed run");
        }
    }
    assert!(a.state.iter().any(|(n, _)| n.starts_with("adam.m.")));
}

#[test]
fn sigkill_during_a_save_leaves_the_previous_checkpoints_loadable() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    // Saves: 0 = best (epoch 1), 1 = last (epoch 1), 2 = pauses half-written.
    let mut child = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "3"])
        .env("PTB_LM_FAILPOINT_PAUSE", "save:2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "paused in checkpoint save");
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    // A half-written temporary directory is there, the checkpoints are whole.
    let leftovers: Vec<String> = std::fs::read_dir(s.path("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert_eq!(leftovers.len(), 1, "expected the interrupted save's temp dir");
    for dir in ["best", "last"] {
        let ckpt = Checkpoint::load(&s.path(&format!("run/{dir}"))).unwrap();
        assert_eq!(ckpt.meta.epoch, 1, "{dir} must still be epoch 1's");
        ckpt.model(Device::Cpu).unwrap();
    }
    let saved = Checkpoint::load(&s.path("run/best")).unwrap().meta.valid_ppl.unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--split", "valid", "--device", "cpu"]);
    assert_success(&o);
    let printed: f64 = stdout(&o).split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((printed - saved).abs() / saved < 1e-4);
    // Resuming finishes the run and clears the leftovers.
    assert_success(&s.run(&["train", "--resume", "run"]));
    assert_eq!(valid_ppls(&s.path("run")).len(), 3);
    assert!(!s.path(&format!("run/{}", leftovers[0])).exists());
}

/// Weights of a checkpoint are all finite.
fn assert_finite_weights(dir: &std::path::Path) {
    let ckpt = Checkpoint::load(dir).unwrap();
    for (name, t) in &ckpt.weights {
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "{}: {name} has non-finite values", dir.display());
    }
}

#[test]
fn a_non_finite_loss_restores_the_last_good_weights_and_divides_lr() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "max_nan_restarts = 3");
    // A NaN weight after step 5, once: every processor sees a NaN loss at the next check.
    let o = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"])
        .env("PTB_LM_FAILPOINT_DIVERGE", "nan@5")
        .output()
        .unwrap();
    assert_success(&o);
    let err = stderr(&o);
    assert!(err.contains("warning: training diverged in epoch 1, batch"), "{err}");
    // A check that falls right after the poisoned step sees the weights before any loss: which
    // comes first depends on the processor's speed (checks are timed).
    assert!(
        err.contains("(loss not finite): went back to batch")
            || err.contains("(weights not finite): went back to batch"),
        "{err}"
    );
    assert!(err.contains("divided lr by 4 (now 5); 1 of 3 restarts used"), "{err}");
    assert_finite_weights(&s.path("run/best"));
    assert_finite_weights(&s.path("run/last"));
    let ppl = valid_ppls(&s.path("run"))[0];
    assert!(ppl.is_finite() && ppl < 5_000.0, "{ppl}");
    assert_no_null_numbers(&s.path("run"));
    // The epoch's loss counts the batches trained again after the restore, once each.
    let last = Checkpoint::load(&s.path("run/last")).unwrap();
    assert_eq!(last.meta.lr, 5.0);
    assert_eq!(last.meta.resume.unwrap().nan_restarts, 1);
}

#[test]
fn a_finite_but_exploding_loss_counts_as_divergence() {
    // The loss grows by 1e9 after step 3: finite on every processor, far above ln(V) + 20.
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let o = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"])
        .env("PTB_LM_FAILPOINT_DIVERGE", "loss@3")
        .output()
        .unwrap();
    assert_success(&o);
    let err = stderr(&o);
    assert!(err.contains("warning: training diverged in epoch 1"), "{err}");
    assert!(err.contains("above the limit 29.2"), "{err}");
    let m: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(s.path("run/metrics.jsonl")).unwrap().trim()).unwrap();
    let train_ppl = m["train_ppl"].as_f64().unwrap();
    assert!(train_ppl < 10_000.0, "the diverged span is not in the epoch's loss: {train_ppl}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_resumes_from_its_last_sound_state() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "max_nan_restarts = 2");
    let o = s
        .command(&["train", "--config", cfg.to_str().unwrap()])
        .env("PTB_LM_FAILPOINT_DIVERGE", "nan@3+")
        .output()
        .unwrap();
    assert_one_line_error(
        &o,
        &[
            "training diverged in epoch 1, batch",
            // (loss not finite) or (weights not finite), as the timed checks fall.
            "not finite), 3 times (train.max_nan_restarts = 2)",
            "the last sound weights, with lr lowered to 0.3125, are in",
            "--resume",
            "--set train.max_nan_restarts=5",
        ],
    );
    assert!(!s.path("run/best").exists(), "no epoch was validated");
    assert_finite_weights(&s.path("run/last"));
    assert_no_null_numbers(&s.path("run"));
    // Without the fault, the diverged run resumes at its lowered lr and finishes.
    let o = s.run(&["train", "--resume", "run", "--set", "train.max_nan_restarts=5"]);
    assert_success(&o);
    assert!(stdout(&o).contains("resuming run at epoch 1, batch"), "{}", stdout(&o));
    let metrics = std::fs::read_to_string(s.path("run/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["lr"].as_f64(), Some(0.3125));
    assert_eq!(valid_ppls(&s.path("run")).len(), 2);
    assert_no_null_numbers(&s.path("run"));
}

#[test]
fn a_naturally_diverging_run_never_saves_or_reports_non_finite_numbers() {
    // Unclipped lr 1e30: how the weights blow up (inf, NaN or huge but finite) depends on the
    // processor. What holds everywhere: the guard fires, and nothing non-finite is written.
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "max_nan_restarts = 2");
    let args = ["train", "--config", cfg.to_str().unwrap(), "--set", "train.lr=1e30", "--set", "train.max_grad=0"];
    let o = s.run(&args);
    assert!(stderr(&o).contains("warning: training diverged in epoch 1"), "{}", stderr(&o));
    if !o.status.success() {
        assert_one_line_error(&o, &["training diverged in epoch", "train.max_nan_restarts = 2"]);
    }
    for dir in ["run/best", "run/last"] {
        if s.path(dir).exists() {
            assert_finite_weights(&s.path(dir));
        }
    }
    assert_no_null_numbers(&s.path("run"));
    if s.path("run/last").exists() && !o.status.success() {
        // It resumes (and may diverge again, which is then the same clear error).
        let o = s.run(&["train", "--resume", "run"]);
        if !o.status.success() {
            assert_one_line_error(&o, &["training diverged in epoch"]);
        }
    }
}

#[test]
fn every_float_of_a_resume_position_survives_json_exactly() {
    use ptb_lm::checkpoint::Resume;
    let awkward = [1418.3159677951421, 0.1 + 0.2, 5e-324, 1.7976931348623157e308, 2.0f64.powi(-1074), 1.0 / 3.0];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut values: Vec<f64> = awkward.to_vec();
    for _ in 0..2000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let v = f64::from_bits(rng);
        if v.is_finite() {
            values.push(v);
        }
    }
    for v in values {
        let mut r = Resume::start();
        r.loss_sum = v;
        r.seconds = v.abs();
        r.valid_history = vec![v, v / 7.0];
        let back: Resume = serde_json::from_str(&serde_json::to_string_pretty(&r).unwrap()).unwrap();
        assert_eq!(back.loss_sum.to_bits(), v.to_bits(), "{v:e}");
        assert_eq!(back, r);
    }
}

/// A trained run to break checkpoints of.
fn trained(s: &Sandbox) {
    let cfg = s.config("c.toml", "");
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]));
}

#[test]
fn broken_checkpoints_are_refused_by_name() {
    let s = Sandbox::new();
    trained(&s);
    let eval = |dir: &str| s.run(&["eval", "--checkpoint", dir, "--device", "cpu"]);
    let copy = |name: &str| {
        let dst = s.path(name);
        std::fs::create_dir_all(&dst).unwrap();
        for f in ["model.safetensors", "checkpoint.json"] {
            std::fs::copy(s.path("run/best").join(f), dst.join(f)).unwrap();
        }
        dst
    };

    // Not a checkpoint at all.
    std::fs::create_dir_all(s.path("empty")).unwrap();
    assert_one_line_error(&eval("empty"), &["empty: not a ptb-lm checkpoint (no checkpoint.json)"]);

    // Corrupt weights file.
    let d = copy("garbage");
    std::fs::write(d.join("model.safetensors"), b"this is not a safetensors file").unwrap();
    assert_one_line_error(&eval("garbage"), &["garbage/model.safetensors: not a readable safetensors file"]);

    // Truncated weights file.
    let d = copy("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(&eval("truncated"), &["truncated/model.safetensors: not a readable safetensors file"]);

    // Foreign safetensors: right format, other tensors.
    let d = copy("foreign");
    let t = tch::Tensor::zeros([3, 3], (tch::Kind::Float, Device::Cpu));
    tch::Tensor::write_safetensors(&[("encoder.layer.0.weight", &t)], d.join("model.safetensors")).unwrap();
    assert_one_line_error(&eval("foreign"), &["foreign/model.safetensors: unexpected tensor 'encoder.layer.0.weight'"]);

    // Wrong shapes: the weights of a bigger model under the same names.
    let d = copy("shape");
    let ckpt = Checkpoint::load(&s.path("run/best")).unwrap();
    let grown: Vec<(String, tch::Tensor)> = ckpt
        .weights
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                if n == "decoder.bias" { tch::Tensor::zeros([10_001], (t.kind(), Device::Cpu)) } else { t.copy() },
            )
        })
        .collect();
    tch::Tensor::write_safetensors(&grown, d.join("model.safetensors")).unwrap();
    assert_one_line_error(
        &eval("shape"),
        &["shape/model.safetensors: tensor 'decoder.bias' has shape [10001], the model expects [10000]"],
    );

    // Config and weights that do not match: hidden size edited in the metadata.
    let d = copy("config");
    let meta = std::fs::read_to_string(d.join("checkpoint.json")).unwrap();
    std::fs::write(
        d.join("checkpoint.json"),
        meta.replace("\"hidden_size\": 24", "\"hidden_size\": 32")
            .replace("\"wordvec_size\": 24", "\"wordvec_size\": 32"),
    )
    .unwrap();
    assert_one_line_error(&eval("config"), &["config/model.safetensors: tensor", "has shape", "the model expects"]);

    // A vocabulary that is not the corpus's.
    let d = copy("vocab");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("checkpoint.json")).unwrap()).unwrap();
    meta["vocab"].as_array_mut().unwrap().swap(0, 1);
    std::fs::write(d.join("checkpoint.json"), meta.to_string()).unwrap();
    assert_one_line_error(&eval("vocab"), &["its vocabulary differs from the checkpoint's"]);
    meta["vocab"].as_array_mut().unwrap().pop();
    std::fs::write(d.join("checkpoint.json"), meta.to_string()).unwrap();
    assert_one_line_error(
        &eval("vocab"),
        &["vocab/checkpoint.json: the vocabulary has 9999 words but model.vocab_size is 10000"],
    );

    // Invalid JSON and a future format.
    let d = copy("json");
    std::fs::write(d.join("checkpoint.json"), "{ not json").unwrap();
    assert_one_line_error(&eval("json"), &["json/checkpoint.json: not valid JSON"]);
    std::fs::write(d.join("checkpoint.json"), r#"{"format": 99}"#).unwrap();
    assert_one_line_error(&eval("json"), &["checkpoint format 99 is not the one this ptb-lm reads (1)"]);

    // A run directory given where a checkpoint is wanted.
    assert_one_line_error(&eval("run"), &["run: a run directory, not a checkpoint: use run/best"]);

    // Resuming from a directory that holds no run.
    assert_one_line_error(&s.run(&["train", "--resume", "empty"]), &["empty: no resumable checkpoint (last/)"]);
    // And a --file with a word the model has never seen.
    std::fs::write(s.path("text.txt"), "the company said\nthe zyxwv fell\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--file", "text.txt", "--device", "cpu"]);
    assert_one_line_error(&o, &["text.txt line 2: word 'zyxwv' is not in the training vocabulary"]);
}

#[test]
fn a_run_directory_is_trained_by_one_process_at_a_time() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    let mut child = s
        .command(&["train", "--config", cfg, "--epochs", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    wait_for(&mut out, "epoch   1 |");
    let busy = "run: another ptb-lm process is training in this run directory";
    // Neither a second start (even with --overwrite) nor a resume gets in, and nothing is deleted.
    assert_one_line_error(&s.run(&["train", "--config", cfg, "--overwrite"]), &[busy]);
    assert_one_line_error(&s.run(&["train", "--resume", "run"]), &[busy]);
    assert!(s.path("run/best/model.safetensors").exists() && s.path("run/last").exists());
    signal(&child, libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    // The lock ends with its process.
    assert_success(&s.run(&["train", "--config", cfg, "--overwrite", "--epochs", "1"]));
}

/// Starts a tiny training run (many epochs) and returns once it has begun training.
fn start_training(s: &Sandbox, epochs: &str, env: &[(&str, &str)]) -> (Child, BufReader<std::process::ChildStdout>) {
    let cfg = s.config("c.toml", "");
    let args = ["train", "--config", cfg.to_str().unwrap(), "--epochs", epochs];
    let mut cmd = s.command(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn finish(mut child: Child) -> (Option<i32>, String) {
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), None, "killed by a signal: {status:?}\n{err}");
    (status.code(), err)
}

#[test]
fn two_quick_sigints_always_exit_130_without_a_crash() {
    let s = Sandbox::new();
    for i in 0..20u64 {
        let _ = std::fs::remove_dir_all(s.path("run"));
        let (child, mut out) = start_training(&s, "100", &[]);
        wait_for(&mut out, "training ");
        // At varied points of the first steps, a second signal 0.3 s after the first (later
        // than one signal delivered twice could be).
        std::thread::sleep(Duration::from_millis(37 * (i % 8)));
        signal(&child, libc::SIGINT);
        std::thread::sleep(ptb_lm::interrupt::SAME_SIGNAL + Duration::from_millis(100));
        signal(&child, libc::SIGINT);
        let (code, err) = finish(child);
        assert_eq!(code, Some(130), "try {i}: {err}");
        assert!(!err.contains("panicked") && !err.contains("INTERNAL ASSERT"), "try {i}: {err}");
        // Whatever was saved is whole.
        for dir in ["run/best", "run/last"] {
            if s.path(dir).exists() {
                Checkpoint::load(&s.path(dir)).unwrap();
            }
        }
    }
}

#[test]
fn one_signal_delivered_twice_as_timeout_delivers_it_is_one_signal() {
    use std::os::unix::process::CommandExt;
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let release = s.path("release");
    let mut child = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "3"])
        .env("PTB_LM_FAILPOINT_PAUSE", "step:5")
        .env("PTB_LM_FAILPOINT_RELEASE", &release)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "paused in step 5");
    // GNU timeout: the signal to the process, then to its process group.
    signal(&child, libc::SIGTERM);
    // SAFETY: kill(2) on the process group our own child leads.
    assert_eq!(unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) }, 0);
    std::fs::write(&release, "").unwrap();
    let status = child.wait().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut err, &mut text).unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(!text.contains("stopping now"), "taken as a second signal: {text}");
    assert!(text.contains("continue with: ptb-lm train --resume"), "{text}");
    let pos = Checkpoint::load(&s.path("run/last")).unwrap().meta.resume.unwrap();
    assert_eq!(pos.epoch, 0, "{pos:?}");
    assert!(pos.batch >= 6, "{pos:?}");
}

#[test]
fn a_signal_during_set_up_ends_the_run_at_once() {
    let s = Sandbox::new();
    let (mut child, _out) = start_training(&s, "100", &[("PTB_LM_FAILPOINT_PAUSE", "setup")]);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "paused in setup");
    let t = Instant::now();
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(t.elapsed() < Duration::from_secs(30), "SIGTERM waited for the set-up to end");
    assert!(!s.path("run/last").exists() && !s.path("run/best").exists());
}

#[test]
fn a_signal_during_the_final_test_evaluation_exits_130_with_the_run_saved() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let mut child = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"])
        .env("PTB_LM_FAILPOINT_PAUSE", "test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "paused in test");
    signal(&child, libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!s.path("run/summary.json").exists(), "the test evaluation did not finish");
    Checkpoint::load(&s.path("run/best")).unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--device", "cpu"]);
    assert_success(&o);
}

/// The test perplexity `ptb-lm eval` prints for `run/best` (4 decimals).
fn eval_test_ppl(s: &Sandbox) -> f64 {
    let o = s.run(&["--threads", "1", "eval", "--checkpoint", "run/best", "--split", "test", "--device", "cpu"]);
    assert_success(&o);
    stdout(&o).split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn a_run_cut_in_its_final_test_evaluation_is_completed_by_resume() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let err = cut_in_the_final_evaluation(
        &s,
        &["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "1"],
    );
    let run = s.path("run");
    let hint = format!(
        "continue with: ptb-lm train --resume {} to score the test split with best/ and write summary.json",
        run.display()
    );
    assert!(err.contains(&hint), "{err}");
    assert!(!s.path("run/summary.json").exists());

    // The resume trains nothing, scores the test split with best/ and writes the summary the
    // uninterrupted run would have.
    let o = s.run(&["--threads", "1", "train", "--resume", "run"]);
    assert_success(&o);
    let resuming = "resuming run after its last epoch (1 of 1): scoring the test split";
    assert!(stdout(&o).contains(resuming), "{}", stdout(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("run/summary.json")).unwrap()).unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(s.path("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(summary["epochs"].as_array().unwrap(), &metrics, "the summary's epochs are metrics.jsonl's");
    assert_eq!(summary["best_epoch"], 1);
    let test_ppl = summary["test_ppl"].as_f64().unwrap();
    assert!(test_ppl.is_finite());
    // Same weights, batches and thread count as eval: the same number, to eval's 4 decimals.
    let printed = eval_test_ppl(&s);
    assert!((test_ppl - printed).abs() <= 0.5e-4 + 1e-9, "summary {test_ppl} vs eval {printed}");
    assert_no_null_numbers(&s.path("run"));

    // Now finished: resuming it again without more epochs is refused as before.
    let o = s.run(&["train", "--resume", "run"]);
    assert_one_line_error(&o, &["already finished 1 epoch (train.epochs = 1)", "--epochs N, N > 1"]);

    // Trained further and cut in the test evaluation again: the earlier summary (of epoch 1)
    // does not count as this one.
    cut_in_the_final_evaluation(&s, &["--threads", "1", "train", "--resume", "run", "--epochs", "2"]);
    assert_success(&s.run(&["--threads", "1", "train", "--resume", "run"]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("run/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs"].as_array().unwrap().len(), 2);
    let printed = eval_test_ppl(&s);
    assert!((summary["test_ppl"].as_f64().unwrap() - printed).abs() <= 0.5e-4 + 1e-9, "{summary}");
}

#[test]
fn a_closed_stdout_stops_training_with_a_resumable_checkpoint() {
    let s = Sandbox::new();
    // Like `ptb-lm train ... | head -1`: the reader takes one line and goes away.
    let (child, mut out) = start_training(&s, "3", &[]);
    wait_for(&mut out, "training ");
    drop(out);
    let (code, err) = finish(child);
    assert_eq!(code, Some(130), "{err}");
    // The first write after the reader left finds it gone: the end of epoch 1's line, or
    // the projection line where epoch 1 takes longer than its delay (a slow or busy machine).
    assert!(err.contains("stdout was closed in epoch "), "{err}");
    assert!(err.contains("continue with: ptb-lm train --resume"), "{err}");
    let o = s.run(&["train", "--resume", "run"]);
    assert_success(&o);
    assert_eq!(valid_ppls(&s.path("run")).len(), 3);
}

#[test]
fn a_foreign_file_under_a_run_name_survives_with_or_without_overwrite() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    std::fs::create_dir_all(s.path("run/best")).unwrap();
    std::fs::write(s.path("run/best/thesis.txt"), "four years of work").unwrap();
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec!["train", "--config", cfg, "--epochs", "1"];
        args.extend_from_slice(extra);
        let o = s.run(&args);
        assert_one_line_error(&o, &["run/best: not written by ptb-lm", "move it away or choose another --out-dir"]);
        assert_eq!(std::fs::read_to_string(s.path("run/best/thesis.txt")).unwrap(), "four years of work");
    }
    // A user's config.toml in the run directory is not ptb-lm's either.
    std::fs::remove_dir_all(s.path("run/best")).unwrap();
    std::fs::write(s.path("run/config.toml"), "[my]\nsettings = 1\n").unwrap();
    let o = s.run(&["train", "--config", cfg, "--epochs", "1", "--overwrite"]);
    assert_one_line_error(&o, &["run/config.toml: not written by ptb-lm"]);
    std::fs::remove_file(s.path("run/config.toml")).unwrap();
    // ptb-lm's own leftovers (a half-written save) are its to clean.
    assert_success(&s.run(&["train", "--config", cfg, "--epochs", "1"]));
    std::fs::create_dir_all(s.path("run/.last.tmp")).unwrap();
    std::fs::copy(s.path("run/last/model.safetensors"), s.path("run/.last.tmp/model.safetensors")).unwrap();
    assert_success(&s.run(&["train", "--config", cfg, "--epochs", "1", "--overwrite"]));
    assert!(!s.path("run/.last.tmp").exists());
    // An empty output directory would train into the working directory.
    let o = s.run(&["train", "--config", cfg, "--set", "run.out_dir=\"\""]);
    assert_one_line_error(&o, &["run.out_dir must name a directory"]);
    let o = s.run(&["train", "--config", cfg, "--out-dir", ""]);
    assert_one_line_error(&o, &["--out-dir"]);
}

#[test]
fn what_cannot_work_is_refused_before_the_first_step() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    // A test split too short for eval_batch_size x bptt (10 x 20).
    let o = s.run(&["train", "--config", cfg, "--set", "data.test_tokens=150"]);
    assert_one_line_error(
        &o,
        &[
            "ptb.test.txt (test split, train.eval_batch_size = 10, train.bptt = 20, data.test_tokens = 150)",
            "too short",
        ],
    );
    assert!(!s.path("run").exists(), "nothing was started");
    // A model that cannot fit in memory, with the estimate.
    let t = Instant::now();
    let o = s.run(&[
        "train",
        "--config",
        cfg,
        "--set",
        "model.num_layers=100000",
        "--set",
        "model.hidden_size=650",
        "--set",
        "model.wordvec_size=650",
    ]);
    assert_one_line_error(&o, &["model: training it needs about", "GiB", "available"]);
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(!s.path("run").exists());
}

#[test]
fn resume_refuses_what_it_cannot_honour_and_points_at_the_run() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]));
    let o = s.run(&["train", "--resume", "run/last", "--epochs", "2"]);
    assert_one_line_error(&o, &["run/last: a checkpoint, not a run directory", "ptb-lm train --resume run"]);
    let o = s.run(&["train", "--resume", "run", "--epochs", "2", "--set", "run.out_dir=elsewhere"]);
    assert_one_line_error(&o, &["when resuming, run.out_dir cannot change"]);
}

#[test]
fn last_describes_its_own_weights_under_averaged_sgd() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "asgd = true");
    let o = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "3"])
        .env("PTB_LM_FAILPOINT_AVERAGE", "1")
        .output()
        .unwrap();
    assert_success(&o);
    assert!(stdout(&o).contains("averaging from now on"), "{}", stdout(&o));
    // last/ holds the raw weights, which were never validated: no number claims to be theirs.
    let last = Checkpoint::load(&s.path("run/last")).unwrap();
    assert_eq!(last.meta.valid_ppl, None);
    assert!(last.meta.resume.unwrap().asgd_count > 0);
    // best/ holds the averaged weights that were validated, and eval finds that number again.
    let best = Checkpoint::load(&s.path("run/best")).unwrap();
    let saved = best.meta.valid_ppl.unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--split", "valid", "--device", "cpu"]);
    let printed: f64 = stdout(&o).split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((printed - saved).abs() / saved < 1e-4, "{printed} vs {saved}");
}

#[test]
fn a_newcomer_on_a_cpu_is_told_how_long_the_run_will_take() {
    let s = Sandbox::new();
    let (child, mut out) = start_training(&s, "100000", &[]);
    let line = wait_for(&mut out, "projected: ");
    assert!(line.contains("for the 100000 epochs left"), "{line}");
    assert!(line.contains("configs/rnnlm.toml") && line.contains("CPU-sized run"), "{line}");
    let epoch = wait_for(&mut out, "epoch   1 |");
    assert!(epoch.contains("| ETA ") && epoch.contains(" h "), "the whole run's ETA: {epoch}");
    signal(&child, libc::SIGINT);
    let (code, _) = finish(child);
    assert_eq!(code, Some(130));
}

#[test]
fn a_tensor_file_that_cannot_be_written_is_told_in_words() {
    let s = Sandbox::new();
    // Its directory is a file: the write fails on any machine, as any user.
    std::fs::write(s.path("plain"), "a file").unwrap();
    let path = s.path("plain/model.safetensors");
    let t = tch::Tensor::zeros([2], (tch::Kind::Float, Device::Cpu));
    let err = ptb_lm::checkpoint::write_safetensors(&[("w", &t)], &path).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: cannot write (not a directory); ", path.display())), "{err}");
    assert!(!err.contains("Os {") && !err.contains("IoError"), "debug text: {err}");
}
