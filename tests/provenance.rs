//! Never a number of something else: dynamic evaluation's gradient statistics are used only
//! with the weights, training text and recipe they were computed from, however the files
//! beside the weights came to be (weights replaced under them, a save cut between its two
//! files, two saves interleaved); and a corpus file that changed since training is never
//! scored as if it had not, in any layout, by `eval`, `eval --dynamic` or `train --resume`.

mod common;

use common::*;
use std::io::BufReader;
use std::path::Path;
use std::process::{Child, Stdio};

/// `eval --dynamic` of `ckpt` on a short text (`short.txt`: see [`short_text`]) with
/// statistics from `batches` training batches.
fn dynamic_args(ckpt: &str, batches: &str) -> Vec<String> {
    let args = ["eval", "--checkpoint", ckpt, "--device", "cpu", "--dynamic", "--dyn-stats-batches", batches];
    let mut args = args.map(String::from).to_vec();
    args.extend(["--file", "short.txt"].map(String::from));
    args
}

/// Writes `short.txt` into the sandbox: PTB's first test sentences (every word in the vocabulary).
fn short_text(s: &Sandbox) {
    let test = std::fs::read_to_string(ptb_dir().join("ptb.test.txt")).unwrap();
    std::fs::write(s.path("short.txt"), test.lines().take(15).flat_map(|l| [l, "\n"]).collect::<String>()).unwrap();
}

fn run(s: &Sandbox, args: &[String]) -> std::process::Output {
    s.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The perplexity `eval` printed (succeeding).
fn ppl(o: &std::process::Output) -> f64 {
    assert_success(o);
    number_after(&stdout(o), "perplexity: ")
}

fn copy(from: &Path, to: &Path, names: &[&str]) {
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

const STATS: [&str; 2] = ["gradstats.safetensors", "gradstats.json"];

/// Starts `args` paused where its statistics are half saved (tensors renamed into place, the
/// metadata not yet), released when `release` exists.
fn paused_in_stats_save(s: &Sandbox, args: &[String], release: &Path) -> Child {
    let mut child = s
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("PTB_LM_FAILPOINT_PAUSE", "stats")
        .env("PTB_LM_FAILPOINT_RELEASE", release)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&mut BufReader::new(child.stderr.take().unwrap()), "paused in stats");
    child
}

#[test]
fn gradient_statistics_are_never_used_with_weights_they_were_not_computed_from() {
    let s = Sandbox::new();
    short_text(&s);
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    for (out, seed) in [("a", "3"), ("b", "4")] {
        assert_success(&s.run(&["train", "--config", cfg, "--epochs", "1", "--out-dir", out, "--seed", seed]));
    }
    // Fresh statistics for b's weights: the reference.
    let fresh_b = ppl(&run(&s, &dynamic_args("b/best", "5")));
    for f in STATS {
        std::fs::remove_file(s.path("b/best").join(f)).unwrap();
    }
    let fresh_a = ppl(&run(&s, &dynamic_args("a/best", "5")));
    assert_ne!(fresh_a, fresh_b, "two models should not score alike");
    // a's statistics beside b's weights (copied), and b's weights put under a's statistics
    // (what a training run does when it improves best/ while an eval writes statistics).
    copy(&s.path("a/best"), &s.path("b/best"), &STATS);
    copy(&s.path("b/best"), &s.path("a/best"), &["model.safetensors", "checkpoint.json"]);
    for ckpt in ["b/best", "a/best"] {
        let o = run(&s, &dynamic_args(ckpt, "5"));
        assert_eq!(ppl(&o), fresh_b, "{ckpt}: statistics of other weights were used");
        assert!(stderr(&o).contains("computed with other weights"), "{ckpt}: no note: {}", stderr(&o));
        // Recomputed and saved for these weights: the next run uses them, without a note.
        let o = run(&s, &dynamic_args(ckpt, "5"));
        assert_eq!(ppl(&o), fresh_b);
        assert!(!stderr(&o).contains("gradient statistics over"), "{ckpt}: recomputed again: {}", stderr(&o));
    }
}

#[test]
fn a_statistics_save_cut_or_interleaved_with_another_is_never_read_as_whole() {
    let s = Sandbox::new();
    short_text(&s);
    let cfg = s.config("c.toml", "");
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]));
    let five = ppl(&run(&s, &dynamic_args("run/best", "5")));
    let seven = ppl(&run(&s, &dynamic_args("run/best", "7")));
    assert_ne!(five, seven, "the two recipes should give different statistics");
    // The ways a save of the 7-batch statistics can be left half done over the 5-batch ones,
    // or two saves interleave; after each, both recipes still score exactly as fresh ones.
    let release = s.path("release");
    let cases = ["killed between the files", "interleaved with another save"];
    for case in cases {
        let _ = std::fs::remove_file(&release);
        assert_success(&run(&s, &dynamic_args("run/best", "5")));
        let mut held = paused_in_stats_save(&s, &dynamic_args("run/best", "7"), &release);
        if case == cases[0] {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(held.id() as i32, libc::SIGKILL) };
            held.wait().unwrap();
        } else {
            // A whole 5-batch save lands while the 7-batch one waits between its two files;
            // then the 7-batch one writes its metadata over it.
            for f in STATS {
                std::fs::remove_file(s.path("run/best").join(f)).unwrap();
            }
            assert_success(&run(&s, &dynamic_args("run/best", "5")));
            std::fs::write(&release, "").unwrap();
            assert!(held.wait().unwrap().success());
        }
        for (batches, expect) in [("5", five), ("7", seven)] {
            let o = run(&s, &dynamic_args("run/best", batches));
            assert_eq!(ppl(&o), expect, "{case}: {batches} batches: {}", stderr(&o));
        }
    }
    // The directory is still a checkpoint of the run's own (temporary files included).
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1", "--overwrite"]));
}

#[test]
fn saved_statistics_need_no_corpus_and_missing_ones_say_why_they_need_it() {
    let s = Sandbox::new();
    shakespeare_corpus(&s);
    std::fs::write(s.path("new.txt"), "First Citizen:\nWe are accounted poor citizens.\n").unwrap();
    let cfg = single_file_config(&s, "corp/a.txt");
    assert_success(&s.run(&["train", "--config", &cfg]));
    let mut args = dynamic_args("run/best", "5");
    args.truncate(args.len() - 2);
    args.extend(["--file", "new.txt"].map(String::from));
    let with_corpus = ppl(&run(&s, &args));
    std::fs::rename(s.path("corp"), s.path("moved")).unwrap();
    let o = run(&s, &args);
    assert_eq!(ppl(&o), with_corpus, "{}", stderr(&o));
    for f in STATS {
        std::fs::remove_file(s.path("run/best").join(f)).unwrap();
    }
    let o = run(&s, &args);
    assert_one_line_error(&o, &["a.txt", "file not found", "gradient statistics on the training split"]);
}

/// `corp/a.txt` in the sandbox: the first 3000 lines of Tiny Shakespeare.
fn shakespeare_corpus(s: &Sandbox) {
    let text = std::fs::read_to_string(shakespeare_file()).unwrap();
    std::fs::create_dir(s.path("corp")).unwrap();
    std::fs::write(s.path("corp/a.txt"), text.lines().take(3000).flat_map(|l| [l, "\n"]).collect::<String>()).unwrap();
}

/// A tiny config training on the single file `file` (relative to the sandbox).
fn single_file_config(s: &Sandbox, file: &str) -> String {
    let text = format!(
        "[data]\nfile = \"{file}\"\nvalid_fraction = 0.1\ntest_fraction = 0.1\n\n[model]\nwordvec_size = 16\n\
         hidden_size = 16\nnum_layers = 1\ntie_weights = true\n\n[train]\nbatch_size = 10\nbptt = 20\nlr = 20.0\n\
         max_grad = 0.25\nepochs = 2\n\n[run]\nout_dir = \"run\"\ndevice = \"cpu\"\n"
    );
    std::fs::write(s.path("single.toml"), text).unwrap();
    "single.toml".to_string()
}

/// A run trained from `dir` with a relative path can be evaluated from anywhere; a corpus
/// that moved is found with --data-file (the same text) and refused when it changed.
#[test]
fn a_run_is_evaluated_from_any_directory_and_a_moved_corpus_is_named_by_flag() {
    let s = Sandbox::new();
    shakespeare_corpus(&s);
    let cfg = single_file_config(&s, "corp/a.txt");
    assert_success(&s.run(&["train", "--config", &cfg, "--epochs", "1"]));
    let here = ppl(&s.run(&["eval", "--checkpoint", "run/best", "--device", "cpu"]));
    let ckpt = s.path("run/best");
    let elsewhere = command()
        .args(["eval", "--checkpoint", ckpt.to_str().unwrap(), "--device", "cpu"])
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(ppl(&elsewhere), here);
    std::fs::rename(s.path("corp/a.txt"), s.path("b.txt")).unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--device", "cpu"]);
    assert_one_line_error(&o, &["a.txt", "file not found"]);
    let o = s.run(&["eval", "--checkpoint", "run/best", "--device", "cpu", "--data-file", "b.txt"]);
    assert_eq!(ppl(&o), here);
    append(&s.path("b.txt"), "one more line\n");
    let o = s.run(&["eval", "--checkpoint", "run/best", "--device", "cpu", "--data-file", "b.txt"]);
    assert_one_line_error(&o, &["b.txt", "not the text", "run/best"]);
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
}

/// Whether the command `args` reads corpus file `file`: the single file and the training
/// split always; valid with `--split valid` or to resume; test unless `--split valid`.
fn reads(args: &[&str], file: &str) -> bool {
    let resume = args.contains(&"--resume");
    let valid = args.contains(&"valid");
    file == "one.txt"
        || file.ends_with("train.txt")
        || (file.ends_with("valid.txt") && (valid || resume))
        || (file.ends_with("test.txt") && !valid)
}

/// Every way a file can stop being the text a run was trained on.
fn changes(original: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut appended = original.to_vec();
    appended.extend_from_slice(&original[..original.len() / 5]);
    let truncated = original[..original.len() * 9 / 10].to_vec();
    // Same size, one letter changed in the middle: only the hash tells.
    let mut edited = original.to_vec();
    let mid = (original.len() / 2..original.len()).find(|&i| original[i].is_ascii_lowercase()).unwrap();
    edited[mid] = if original[mid] == b'q' { b'z' } else { b'q' };
    let replaced: Vec<u8> = original.iter().rev().copied().collect::<Vec<u8>>();
    let replaced = String::from_utf8_lossy(&replaced).lines().rev().flat_map(|l| [l, "\n"]).collect::<String>();
    vec![("appended", appended), ("truncated", truncated), ("edited", edited), ("replaced", replaced.into_bytes())]
}

#[test]
fn a_corpus_file_that_changed_since_training_is_never_scored_as_if_it_had_not() {
    let s = Sandbox::new();
    let text = std::fs::read_to_string(shakespeare_file()).unwrap();
    let lines: Vec<&str> = text.lines().take(3000).collect();
    let join = |r: std::ops::Range<usize>| lines[r].iter().flat_map(|l| [*l, "\n"]).collect::<String>();
    std::fs::create_dir(s.path("dir")).unwrap();
    for (name, part) in [("train.txt", join(0..2400)), ("valid.txt", join(2400..2700)), ("test.txt", join(2700..3000))]
    {
        std::fs::write(s.path("dir").join(name), part).unwrap();
    }
    std::fs::write(s.path("one.txt"), join(0..3000)).unwrap();
    let layouts: [(&str, &str, &[&str]); 3] = [
        ("single", "file = \"one.txt\"", &["one.txt"]),
        ("dir", "dir = \"dir\"", &["dir/train.txt", "dir/test.txt"]),
        (
            "files",
            "train = \"dir/train.txt\"\nvalid = \"dir/valid.txt\"\ntest = \"dir/test.txt\"",
            &["dir/train.txt", "dir/valid.txt", "dir/test.txt"],
        ),
    ];
    for (name, data, files) in layouts {
        let cfg = format!(
            "[data]\n{data}\n\n[model]\nwordvec_size = 16\nhidden_size = 16\nnum_layers = 1\ntie_weights = true\n\n\
             [train]\nbatch_size = 10\nbptt = 20\nlr = 20.0\nepochs = 2\n\n[run]\nout_dir = \"run-{name}\"\ndevice = \"cpu\"\n"
        );
        std::fs::write(s.path(&format!("{name}.toml")), cfg).unwrap();
        // One epoch of two: last/ stays resumable.
        assert_success(&s.run(&["train", "--config", &format!("{name}.toml"), "--stop-after", "1"]));
        let best = format!("run-{name}/best");
        let run_dir = format!("run-{name}");
        let commands: [Vec<&str>; 4] = [
            vec!["eval", "--checkpoint", &best, "--device", "cpu"],
            vec!["eval", "--checkpoint", &best, "--device", "cpu", "--split", "valid"],
            vec!["eval", "--checkpoint", &best, "--device", "cpu", "--dynamic", "--dyn-stats-batches", "2"],
            vec!["train", "--resume", &run_dir],
        ];
        for (k, file) in files.iter().enumerate() {
            let path = s.path(file);
            let original = std::fs::read(&path).unwrap();
            let all = changes(&original);
            // Every change of the single file; one each (in turn) of the others.
            let some: Vec<_> = if name == "single" { all } else { all.into_iter().skip(k).take(1).collect() };
            for (change, bytes) in some {
                std::fs::write(&path, &bytes).unwrap();
                for args in &commands {
                    let o = s.run(args);
                    if reads(args, file) {
                        assert!(!o.status.success(), "{name}: {file} {change}: {args:?} used it");
                        assert_one_line_error(&o, &[file, "not the text"]);
                    } else {
                        assert_success(&o);
                    }
                }
            }
            std::fs::write(&path, &original).unwrap();
        }
        // The same text again: everything works.
        for args in &commands[..3] {
            assert_success(&s.run(args));
        }
    }
}
