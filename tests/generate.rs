//! Generation and what a run reports (metrics.jsonl, the PNG), on one small trained run.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A run trained once for this test binary (under Cargo's per-target temp directory).
fn trained() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("generate-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, tiny_config(&ptb_dir(), &dir.join("run"), "")).unwrap();
        let o =
            command().args(["train", "--config", cfg.to_str().unwrap(), "--epochs", "3", "--quiet"]).output().unwrap();
        assert_success(&o);
        dir.join("run")
    })
}

fn generate(args: &[&str]) -> std::process::Output {
    let best = trained().join("best");
    let mut all = vec!["generate", "--checkpoint", best.to_str().unwrap()];
    all.extend_from_slice(args);
    command().args(&all).output().unwrap()
}

#[test]
fn same_seed_same_text() {
    let a = generate(&["--prompt", "the company said", "--words", "40", "--seed", "5"]);
    let b = generate(&["--prompt", "the company said", "--words", "40", "--seed", "5"]);
    let c = generate(&["--prompt", "the company said", "--words", "40", "--seed", "6"]);
    assert_success(&a);
    assert_eq!(stdout(&a), stdout(&b));
    assert_ne!(stdout(&a), stdout(&c));
    assert!(stdout(&a).starts_with("the company said "), "{}", stdout(&a));
    assert!(stdout(&a).split_whitespace().count() >= 40);
}

#[test]
fn unknown_prompt_words_are_read_as_unk_with_a_warning() {
    let o = generate(&["--prompt", "the xyzzy Company 1987 qqq", "--words", "5"]);
    assert_success(&o);
    let err = stderr(&o);
    // "Company" is found lower-cased and "1987" as N: only the two nonsense words are named.
    assert_eq!(err.trim(), "warning: not in the vocabulary, read as <unk>: xyzzy, qqq");
}

#[test]
fn unk_is_never_sampled_unless_allowed() {
    // A hot temperature makes <unk> (PTB's most frequent word) likely at every step.
    let args = ["--prompt", "", "--words", "400", "--temperature", "2.0", "--seed", "1"];
    let o = generate(&args);
    assert_success(&o);
    assert!(!stdout(&o).contains("<unk>"));
    let mut allowed = args.to_vec();
    allowed.push("--allow-unk");
    let o = generate(&allowed);
    assert!(stdout(&o).contains("<unk>"), "--allow-unk should let <unk> through");
}

#[test]
fn eos_becomes_a_line_break_and_until_eos_stops_there() {
    let o = generate(&["--words", "300", "--seed", "2"]);
    assert_success(&o);
    assert!(stdout(&o).trim_end().lines().count() > 1, "no sentence ended in 300 words");
    assert!(!stdout(&o).contains("<eos>"));
    let o = generate(&["--words", "300", "--seed", "2", "--until-eos", "--samples", "3", "--top-k", "50"]);
    assert_success(&o);
    let text = stdout(&o);
    let samples: Vec<&str> = text.trim_end().split("\n\n").collect();
    assert_eq!(samples.len(), 3);
    assert!(samples.iter().all(|s| !s.contains('\n')), "{samples:?}");
}

#[test]
fn generate_refuses_bad_arguments() {
    let o = generate(&["--top-k", "0"]);
    assert_one_line_error(&o, &["--top-k must be at least 1"]);
    let o = generate(&["--temperature", "-1"]);
    assert_one_line_error(&o, &["--temperature must be >= 0"]);
    let o = command().args(["generate", "--checkpoint", "/nonexistent/best"]).output().unwrap();
    assert_one_line_error(&o, &["/nonexistent/best: no such checkpoint directory"]);
}

#[test]
fn metrics_are_one_json_object_per_epoch() {
    let text = std::fs::read_to_string(trained().join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["epoch"].as_u64(), Some(i as u64 + 1));
        for key in ["lr", "train_ppl", "valid_ppl", "tokens_per_s", "seconds"] {
            let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"));
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        assert_eq!(r["device"].as_str(), Some("cpu"));
    }
}

#[test]
fn the_perplexity_plot_is_a_whole_png() {
    let png = std::fs::read(trained().join("perplexity.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 560));
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND", "truncated PNG");
    assert!(png.len() > 10_000, "suspiciously small plot ({} bytes)", png.len());
    assert!(!trained().join("perplexity.partial.png").exists());
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::ExitStatusExt;
    // A pipe whose reader is gone before ptb-lm writes a byte (like `ptb-lm ... | head -0`).
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is a fresh descriptor owned by nothing else.
    let writer = unsafe { std::process::Stdio::from_raw_fd(fds[1]) };
    let o = command().arg("info").stdout(writer).output().unwrap();
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{:?}", o.status);
}
