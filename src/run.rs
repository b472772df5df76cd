//! The run directory and its safety rule: a new run never lands on top of an old one.
//!
//! ```text
//! runs/better/
//!   config.toml     the resolved configuration of the run
//!   best/           checkpoint with the best validation perplexity
//!   last/           resumable checkpoint (end of the last epoch, or where it was interrupted)
//!   metrics.jsonl   one line per epoch
//!   perplexity.png  train/valid perplexity per epoch
//!   summary.json    final figures, test perplexity of best/
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

/// Files and directories ptb-lm writes into a run directory (and --overwrite removes).
const OWNED: [&str; 7] =
    ["best", "last", "metrics.jsonl", "perplexity.png", "summary.json", "config.toml", ".best.tmp"];

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
    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
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

    fn holds_run(&self) -> bool {
        ["best", "last", "metrics.jsonl"].iter().any(|f| self.root.join(f).exists())
    }

    /// Makes the directory ready for a new run of `cfg`. When it already holds a run, that
    /// is an error unless `overwrite`, which deletes what ptb-lm wrote there.
    pub fn prepare_fresh(&self, cfg: &Config, overwrite: bool) -> Result<()> {
        if self.holds_run() {
            if !overwrite {
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
            for name in OWNED {
                let p = self.root.join(name);
                if p.is_dir() {
                    fs::remove_dir_all(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
                } else if p.exists() {
                    fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
                }
            }
        }
        fs::create_dir_all(&self.root).with_context(|| format!("{}: cannot create", self.root.display()))?;
        self.write_config(cfg)
    }

    pub fn write_config(&self, cfg: &Config) -> Result<()> {
        let path = self.root.join("config.toml");
        let text = format!("# Resolved configuration of this run (written by ptb-lm).\n{}", cfg.to_toml());
        fs::write(&path, text).with_context(|| format!("{}: cannot write", path.display()))
    }

    fn existing_config(&self) -> Option<Config> {
        [self.last(), self.best()].iter().find_map(|d| checkpoint::read_meta(d).ok().map(|m| m.config)).or_else(|| {
            let text = fs::read_to_string(self.root.join("config.toml")).ok()?;
            Config::parse(&text, &[]).ok()
        })
    }
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
