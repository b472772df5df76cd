//! The run directory and its safety rule: a new run never lands on top of an old one.
//!
//! ```text
//! runs/better/
//!   config.toml     the resolved configuration of the run
//!   best/           checkpoint with the best validation perplexity
//!   last/           resumable checkpoint (end of the last epoch, or where it was interrupted)
//!   metrics.jsonl   one line per epoch
//!   perplexity.png  train/valid perplexity per epoch
//!   grad_norm.png   the gradient's norm through time (with train.log_grad_norm)
//!   summary.json    final figures, test perplexity of best/
//!   corpus.json     what was read: files, split lines, vocabulary and token counts
//!   .lock           flock(2)ed by the process training here
//! ```

use crate::checkpoint;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub root: PathBuf,
}

/// An exclusive lock on a run directory, held by the process training there and released
/// when dropped (or when the process ends, however it ends).
pub struct RunLock {
    _file: fs::File,
}

/// Names ptb-lm writes into a run directory. Only what carries ptb-lm's own markers under
/// these names counts as a run's (and only that may --overwrite remove): see [`RunDir::owned`].
const NAMES: [&str; 14] = [
    "corpus.json",
    "best",
    "last",
    "metrics.jsonl",
    "perplexity.png",
    "summary.json",
    "config.toml",
    ".best.tmp",
    ".last.tmp",
    "best.old",
    "last.old",
    "perplexity.partial.png",
    "grad_norm.png",
    "grad_norm.partial.png",
];

/// The first line of every config.toml ptb-lm writes.
const CONFIG_HEADER: &str = "# Resolved configuration of this run (written by ptb-lm).";

/// What is under one of ptb-lm's names in a run directory.
#[derive(Debug, PartialEq)]
enum Entry {
    Absent,
    /// Written by ptb-lm (it carries ptb-lm's markers).
    Ours,
    /// Something else: a user's file, never touched.
    Foreign,
}

impl RunDir {
    pub fn new(root: &Path) -> RunDir {
        RunDir { root: root.to_path_buf() }
    }
    pub fn best(&self) -> PathBuf {
        self.root.join("best")
    }
    pub fn last(&self) -> PathBuf {
        self.root.join("last")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn plot(&self) -> PathBuf {
        self.root.join("perplexity.png")
    }
    pub fn grad_norm_plot(&self) -> PathBuf {
        self.root.join("grad_norm.png")
    }
    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }
    pub fn corpus(&self) -> PathBuf {
        self.root.join("corpus.json")
    }

    /// Records what the run reads: the corpus's files, how a single file was split, the
    /// vocabulary size, tokens per split and words read as `<unk>`.
    pub fn write_corpus(&self, info: &crate::data::CorpusInfo) -> Result<()> {
        let path = self.corpus();
        crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(info)?.as_bytes())
    }

    /// Takes the directory's lock (`.lock`, flock(2)), creating the directory if needed, so
    /// two processes never train, overwrite or resume in the same run at once.
    pub fn lock(&self) -> Result<RunLock> {
        use std::os::fd::AsRawFd;
        fs::create_dir_all(&self.root).with_context(|| format!("{}: cannot create", self.root.display()))?;
        let path = self.root.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "{}: another ptb-lm process is training in this run directory; wait for it to \
                     finish (or stop it with Ctrl-C), or choose another --out-dir",
                    self.root.display()
                );
            }
            return Err(err).with_context(|| format!("{}: cannot lock", path.display()));
        }
        Ok(RunLock { _file: file })
    }

    /// Whether `name` holds what ptb-lm wrote: a checkpoint directory whose checkpoint.json
    /// is ptb-lm's format (a temporary one may hold only its tensor files so far), JSON
    /// lines that are epoch records, a summary with ptb-lm's fields, a config with ptb-lm's
    /// header, a PNG.
    fn entry(&self, name: &str) -> Entry {
        let path = self.root.join(name);
        let Ok(meta) = fs::symlink_metadata(&path) else { return Entry::Absent };
        let ours = match name {
            "best" | "last" | "best.old" | "last.old" => meta.is_dir() && is_checkpoint(&path),
            ".best.tmp" | ".last.tmp" => meta.is_dir() && only_checkpoint_files(&path),
            "metrics.jsonl" => meta.is_file() && crate::metrics::MetricsLog::new(path.clone()).read().is_ok(),
            "summary.json" => {
                meta.is_file()
                    && has_keys(&path, &["run_dir", "epochs", "best_valid_ppl"])
                    && (has_keys(&path, &["test_ppl"]) || has_keys(&path, &["final_ppl"]))
            }
            "corpus.json" => meta.is_file() && has_keys(&path, &["layout", "vocab_size", "tokens", "unk_replaced"]),
            "config.toml" => meta.is_file() && fs::read_to_string(&path).is_ok_and(|t| t.starts_with(CONFIG_HEADER)),
            _ => meta.is_file() && fs::read(&path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n")),
        };
        if ours {
            Entry::Ours
        } else {
            Entry::Foreign
        }
    }

    /// The names that hold ptb-lm's files; an error naming the first that holds something
    /// else (ptb-lm never writes over, or deletes, what it did not write).
    fn owned(&self) -> Result<Vec<&'static str>> {
        let mut ours = Vec::new();
        for name in NAMES {
            match self.entry(name) {
                Entry::Absent => {}
                Entry::Ours => ours.push(name),
                Entry::Foreign => bail!(
                    "{}: not written by ptb-lm, and a run would write there; move it away or choose \
                     another --out-dir (--overwrite deletes only what ptb-lm wrote)",
                    self.root.join(name).display()
                ),
            }
        }
        Ok(ours)
    }

    /// Makes the directory ready for a new run of `cfg`. When it already holds a run, that
    /// is an error unless `overwrite`, which deletes what ptb-lm wrote there (and nothing
    /// else: a foreign file under one of ptb-lm's names is an error either way).
    pub fn prepare_fresh(&self, cfg: &Config, overwrite: bool) -> Result<()> {
        let owned = self.owned()?;
        if !overwrite && owned.iter().any(|n| ["best", "last", "metrics.jsonl"].contains(n)) {
            let what = match self.existing_config() {
                Some(old) if &old != cfg => {
                    format!("a different run ({})", config_diff(&old, cfg))
                }
                Some(_) => "a run with this same config".to_string(),
                None => "a run".to_string(),
            };
            bail!(
                "{} already holds {what}; continue it with `ptb-lm train --resume {0}`, \
                 or pass --overwrite to delete it and start again",
                self.root.display()
            );
        }
        for name in owned {
            let p = self.root.join(name);
            if p.is_dir() {
                fs::remove_dir_all(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
            } else {
                fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
            }
        }
        fs::create_dir_all(&self.root).with_context(|| format!("{}: cannot create", self.root.display()))?;
        self.write_config(cfg)
    }

    pub fn write_config(&self, cfg: &Config) -> Result<()> {
        let path = self.root.join("config.toml");
        let text = format!("{CONFIG_HEADER}\n{}", cfg.to_toml());
        crate::fsutil::write_atomic(&path, text.as_bytes())
    }

    fn existing_config(&self) -> Option<Config> {
        [self.last(), self.best()].iter().find_map(|d| checkpoint::read_meta(d).ok().map(|m| m.config)).or_else(|| {
            let text = fs::read_to_string(self.root.join("config.toml")).ok()?;
            Config::parse(&text, &[]).ok()
        })
    }
}

/// A directory holding nothing but files a checkpoint save writes (possibly not all yet), and
/// the gradient statistics dynamic evaluation keeps beside the weights (with the temporary
/// files of a save of them that was cut: `.gradstats.*.tmp`).
fn only_checkpoint_files(dir: &Path) -> bool {
    let [stats, stats_meta] = crate::dynamic::GradStats::FILES;
    let allowed = [checkpoint::WEIGHTS, checkpoint::STATE, checkpoint::META, checkpoint::TOKENIZER, stats, stats_meta];
    let ours = |name: &std::ffi::OsStr| {
        let name = name.to_string_lossy();
        allowed.iter().any(|a| name == *a) || (name.starts_with(".gradstats.") && name.ends_with(".tmp"))
    };
    fs::read_dir(dir).is_ok_and(|entries| entries.into_iter().all(|e| e.is_ok_and(|e| ours(&e.file_name()))))
}

/// A checkpoint directory: its files are a checkpoint's, and checkpoint.json carries
/// ptb-lm's format marker (of any version).
fn is_checkpoint(dir: &Path) -> bool {
    let marked = fs::read_to_string(dir.join(checkpoint::META))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("format").is_some_and(|f| f.is_u64()) && v.get("ptb_lm_version").is_some());
    marked && only_checkpoint_files(dir)
}

/// A JSON object with all of `keys` (how summary.json and corpus.json are recognised).
fn has_keys(path: &Path, keys: &[&str]) -> bool {
    let Ok(text) = fs::read_to_string(path) else { return false };
    let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    keys.iter().all(|k| v.contains_key(*k))
}

/// "train.lr: 20 there, 10 here" for the first few keys that differ.
pub fn config_diff(old: &Config, new: &Config) -> String {
    let flat = |c: &Config| -> Vec<(String, String)> {
        let v = toml::Value::try_from(c).expect("a Config always serialises");
        let mut out = Vec::new();
        if let toml::Value::Table(t) = v {
            for (table, inner) in t {
                if let toml::Value::Table(inner) = inner {
                    for (k, v) in inner {
                        out.push((format!("{table}.{k}"), v.to_string()));
                    }
                }
            }
        }
        out
    };
    let (a, b) = (flat(old), flat(new));
    let mut keys: Vec<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    let get =
        |v: &[(String, String)], k: &str| v.iter().find(|(kk, _)| kk == k).map_or("-".to_string(), |(_, v)| v.clone());
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| get(&a, k) != get(&b, k))
        .map(|k| format!("{k}: {} there, {} here", get(&a, k), get(&b, k)))
        .collect();
    match diffs.len() {
        0 => "same config".to_string(),
        n if n > 3 => format!("{}, and {} more", diffs[..3].join("; "), n - 3),
        _ => diffs.join("; "),
    }
}
