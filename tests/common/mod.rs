//! Shared test helpers: where the real PTB is, a scratch directory with a tiny config, and
//! running the `ptb-lm` binary.
#![allow(dead_code)]

use ptb_lm::config::Config;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// The real PTB files: $PTB_DIR, else data/ptb in the repository (`make test` and `.ci/run`
/// put them there with scripts/download_ptb.sh).
pub fn ptb_dir() -> PathBuf {
    let dir = std::env::var_os("PTB_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("data/ptb"));
    assert!(
        dir.join("ptb.train.txt").exists(),
        "the real PTB is needed at {} (run scripts/download_ptb.sh, or set PTB_DIR)",
        dir.display()
    );
    // Absolute: the tests' ptb-lm processes run in scratch directories.
    dir.canonicalize().unwrap()
}

/// Tiny Shakespeare's one raw file: $SHAKESPEARE_DIR/input.txt, else
/// data/tinyshakespeare/input.txt in the repository (`make test` and `.ci/run` put it there with
/// scripts/download_shakespeare.sh).
pub fn shakespeare_file() -> PathBuf {
    let dir =
        std::env::var_os("SHAKESPEARE_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("data/tinyshakespeare"));
    let file = dir.join("input.txt");
    assert!(
        file.exists(),
        "Tiny Shakespeare is needed at {} (run scripts/download_shakespeare.sh, or set SHAKESPEARE_DIR)",
        file.display()
    );
    file.canonicalize().unwrap()
}

/// The checkout under test. Read when the test runs (cargo sets it then too), not baked in at
/// compile time: with a shared CARGO_TARGET_DIR, a test binary may have been compiled in
/// another clone.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ptb-lm"))
}

/// `ptb-lm` with one intra-op thread: tests run in parallel, and several libtorch processes
/// whose OpenMP threads busy-wait on two cores slow each other down many times over.
pub fn command() -> Command {
    let mut c = Command::new(bin());
    c.env("OMP_NUM_THREADS", "1");
    for var in ptb_lm::failpoint::VARIABLES {
        c.env_remove(var);
    }
    c
}

/// A tiny but real run: a slice of PTB, a small tied 2-layer LSTM, CPU.
pub fn tiny_config(data: &Path, out: &Path, extra: &str) -> String {
    format!(
        r#"[data]
dir = "{}"
train_tokens = 20000
valid_tokens = 6000
test_tokens = 6000

[model]
vocab_size = 10000
wordvec_size = 24
hidden_size = 24
num_layers = 2
dropout = 0.1
tie_weights = true

[train]
batch_size = 10
bptt = 20
lr = 20.0
max_grad = 0.25
epochs = 2
seed = 3
{extra}
[run]
out_dir = "{}"
device = "cpu"
"#,
        data.display(),
        out.display()
    )
}

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `name` with the tiny config (extra lines go into [train]); the run directory
    /// is `run` inside the sandbox.
    pub fn config(&self, name: &str, extra_train: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, tiny_config(&ptb_dir(), &self.path("run"), extra_train)).unwrap();
        path
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ptb-lm")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = command();
        c.args(args).current_dir(self.dir.path());
        c
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with a one-line `error: ...` as the last line of stderr (after
/// nothing but `warning: ...` and `note: ...` lines), containing every fragment of `expect`.
pub fn assert_one_line_error(o: &Output, expect: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stdout:\n{}", stdout(o));
    let lines: Vec<&str> = err.trim_end().lines().collect();
    let (last, before) = lines.split_last().unwrap_or_else(|| panic!("no error message"));
    assert!(last.starts_with("error: "), "expected a one-line error, got:\n{err}");
    assert!(
        before.iter().all(|l| l.starts_with("warning: ") || l.starts_with("note: ")),
        "expected a one-line error, got:\n{err}"
    );
    for e in expect {
        assert!(last.contains(e), "error should mention {e:?}: {err}");
    }
}

pub fn assert_success(o: &Output) {
    assert!(o.status.success(), "ptb-lm failed ({:?}):\n{}\n{}", o.status, stdout(o), stderr(o));
}

/// Validation perplexities of metrics.jsonl, in epoch order.
pub fn valid_ppls(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["valid_ppl"].as_f64().unwrap())
        .collect()
}

/// Copies the PTB files (and checksums) into `dst`.
pub fn copy_ptb(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", "SHA256SUMS"] {
        let src = ptb_dir().join(f);
        if src.exists() {
            let text = std::fs::read(&src).unwrap();
            std::fs::write(dst.join(f), text).unwrap();
        }
    }
}

/// libtorch's random generator is global and tests run on parallel threads: every test that
/// seeds it holds this lock.
pub fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config from TOML text with `--set`-style overrides (`table.key=value`).
pub fn config_with(toml: &str, overrides: &[&str]) -> Config {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::parse(toml, &overrides).unwrap()
}

/// Every JSON file under `dir` (checkpoint.json, summary.json, metrics.jsonl lines) holds
/// real numbers where it holds numbers: JSON has no inf or NaN, and serde writes them as
/// null, which nothing can read back as a number.
pub fn assert_no_null_numbers(dir: &Path) {
    // Fields that are numbers whenever present (valid_ppl of a checkpoint may be null: not measured).
    const NUMBERS: [&str; 8] =
        ["train_ppl", "test_ppl", "lr", "loss_sum", "seconds", "tokens_per_s", "valid_history", "epoch"];
    fn check(v: &serde_json::Value, file: &Path, in_metrics: bool) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, x) in map {
                    let must = NUMBERS.contains(&k.as_str()) || (in_metrics && k == "valid_ppl");
                    assert!(!(must && x.is_null()), "{}: {k} is null", file.display());
                    if k == "valid_history" {
                        assert!(x.as_array().unwrap().iter().all(|h| h.is_number()), "{}: {x}", file.display());
                    }
                    check(x, file, in_metrics);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| check(x, file, in_metrics)),
            _ => {}
        }
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            assert_no_null_numbers(&p);
        } else if p.extension().is_some_and(|x| x == "jsonl") {
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                check(&serde_json::from_str(line).unwrap(), &p, true);
            }
        } else if p.extension().is_some_and(|x| x == "json") {
            check(&serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(), &p, false);
        }
    }
}

/// Reads a child's stream line by line until one contains `needle` (panics after 120 s, or
/// when the stream ends first).
pub fn wait_for(reader: &mut impl std::io::BufRead, needle: &str) -> String {
    let start = std::time::Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "stream ended before a line with {needle:?}");
        if line.contains(needle) {
            return line;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "no line with {needle:?}");
    }
}

/// The number after `label` in `text` ("perplexity: 123.4567 (..." -> 123.4567).
pub fn number_after(text: &str, label: &str) -> f64 {
    let at = text.find(label).unwrap_or_else(|| panic!("no {label:?} in {text}")) + label.len();
    let rest = &text[at..];
    let end = rest.find(|c: char| c == ')' || c == ';' || c == ',' || c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|_| panic!("no number after {label:?} in {text}"))
}

/// The epoch records of a run's metrics.jsonl.
pub fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A run's summary.json.
pub fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// Runs `ptb-lm args` in the sandbox, cut by SIGINT while its final evaluation is held by
/// a failpoint; checks it exits 130 and returns its stderr.
pub fn cut_in_the_final_evaluation(s: &Sandbox, args: &[&str]) -> String {
    let mut child = s
        .command(args)
        .env("PTB_LM_FAILPOINT_PAUSE", "test")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut text = wait_for(&mut err, "paused in test");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut err, &mut text).unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    text
}
