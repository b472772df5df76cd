//! Nothing a user did may be lost: interruption and resume, kills during a save, non-finite
//! losses, and checkpoints that are not what they claim. The signal tests send real signals
//! to a child `ptb-lm`.

mod common;

use common::*;
use ptb_lm::checkpoint::Checkpoint;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tch::Device;

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Reads `child`'s stream line by line until one contains `needle` (panics after 120 s).
fn wait_for_line(reader: &mut impl BufRead, needle: &str) -> String {
    let start = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "stream ended before a line with {needle:?}");
        if line.contains(needle) {
            return line;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no line with {needle:?}");
    }
}

#[test]
fn sigint_saves_a_resumable_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let extra = "";
    let s = Sandbox::new();
    let cfg = s.config("c.toml", extra);
    let cfg = cfg.to_str().unwrap();
    let settings = ["--set", "data.train_tokens=40000", "--epochs", "3"];

    // Uninterrupted reference run.
    let mut args = vec!["train", "--config", cfg, "--out-dir", "straight"];
    args.extend(settings);
    assert_success(&s.run(&args));
    let straight = valid_ppls(&s.path("straight"));

    // Interrupted in epoch 2 by a real SIGINT, then resumed.
    let mut args = vec!["train", "--config", cfg, "--out-dir", "run"];
    args.extend(settings);
    let mut child = s.command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    wait_for_line(&mut out, "epoch   1 |");
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "stderr: {err}");
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

    // A finished run cannot be resumed without more epochs; with more it continues.
    let o = s.run(&["train", "--resume", "run"]);
    assert_one_line_error(&o, &["already finished its 3 epochs", "--epochs"]);
    let o = s.run(&["train", "--resume", "run", "--epochs", "4", "--set", "train.lr=1"]);
    assert_one_line_error(&o, &["when resuming, only", "train.lr"]);
}

#[test]
fn sigkill_during_a_save_leaves_the_previous_checkpoints_loadable() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    // Saves: 0 = best (epoch 1), 1 = last (epoch 1), 2 = pauses half-written.
    let mut child = s
        .command(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "3"])
        .env("PTB_LM_FAILPOINT_SAVE_PAUSE", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for_line(&mut err, "paused in checkpoint save");
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

#[test]
fn a_non_finite_loss_restores_the_last_good_weights_and_divides_lr() {
    let s = Sandbox::new();
    // Unclipped, lr 2^100 turns the weights to inf/NaN within a few steps; one restart
    // divides it by 2^96, to 16.
    let cfg = s.config("c.toml", "lr_decay = 7.922816251426434e28\nmax_nan_restarts = 3");
    let o = s.run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.lr=1.2676506002282294e30",
        "--set",
        "train.max_grad=0",
        "--epochs",
        "1",
    ]);
    assert_success(&o);
    let err = stderr(&o);
    assert!(err.contains("warning: non-finite loss in epoch 1"), "{err}");
    assert!(err.contains("restored the weights of the last check and divided lr by"), "{err}");
    assert!(err.contains("(now 16); 1 of 3 restarts used"), "{err}");
    let ckpt = Checkpoint::load(&s.path("run/best")).unwrap();
    for (name, t) in &ckpt.weights {
        assert!(bool::try_from(t.isfinite().all()).unwrap(), "{name} has non-finite values");
    }
    let ppl = valid_ppls(&s.path("run"))[0];
    assert!(ppl.is_finite(), "{ppl}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_writes_no_nan_weights() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "max_nan_restarts = 2");
    let o = s.run(&["train", "--config", cfg.to_str().unwrap(), "--set", "train.lr=1e30", "--set", "train.max_grad=0"]);
    assert_one_line_error(
        &o,
        &[
            "training diverged: non-finite loss in epoch 1",
            "3 times",
            "train.max_nan_restarts = 2",
            "no checkpoint was written",
        ],
    );
    assert!(!s.path("run/best").exists() && !s.path("run/last").exists(), "no checkpoint of NaN weights");
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
    wait_for_line(&mut out, "epoch   1 |");
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
