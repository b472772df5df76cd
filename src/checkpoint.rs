//! A checkpoint is a directory:
//!
//! * `model.safetensors`: the weights, named as in [`crate::model`];
//! * `checkpoint.json`: config, vocabulary, epoch, lr, perplexities, ptb-lm version, the corpus
//!   it was trained on (absolute paths, each file's size and SHA-256), and for a
//!   resumable checkpoint (`last/`) the position in training;
//! * `state.safetensors` (resumable checkpoints only): the carried recurrent state and, when
//!   averaged SGD is on, the running averages;
//! * `tokenizer.json` (BPE runs only): the tokenizer, in HuggingFace `tokenizers`' standard
//!   format (see [`crate::text`]).
//!
//! Writes are atomic: everything goes into a temporary sibling directory, each file and the
//! directory are fsynced, and the temporary directory is swapped with the old one in one
//! `renameat2(RENAME_EXCHANGE)`. A process killed at any point leaves either the old or the
//! new checkpoint, whole.

use crate::config::Config;
use crate::data::{CorpusRecord, Vocab};
use crate::model::LstmLm;
use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const FORMAT: u32 = 1;
pub const WEIGHTS: &str = "model.safetensors";
pub const STATE: &str = "state.safetensors";
pub const META: &str = "checkpoint.json";
pub const TOKENIZER: &str = crate::text::TOKENIZER_FILE;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Checkpoint format version (this build writes and reads [`FORMAT`]).
    pub format: u32,
    pub ptb_lm_version: String,
    pub config: Config,
    pub vocab: Vec<String>,
    /// Epochs completed when the weights were taken.
    pub epoch: usize,
    pub lr: f64,
    /// Validation perplexity of these weights (None when not measured, e.g. mid-epoch).
    pub valid_ppl: Option<f64>,
    pub best_valid_ppl: Option<f64>,
    /// Present in resumable checkpoints.
    pub resume: Option<Resume>,
    /// What the weights were trained on: the corpus's paths (absolute) and each file's size
    /// and SHA-256. Absent in checkpoints of older ptb-lm versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus: Option<CorpusRecord>,
}

/// Where training stands, for `ptb-lm train --resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// 0-based epoch in progress.
    pub epoch: usize,
    /// Next batch of that epoch.
    pub batch: usize,
    /// Sum of the training losses of the epoch's batches so far, and their number.
    pub loss_sum: f64,
    pub loss_batches: usize,
    /// Training seconds spent in the epoch so far.
    pub seconds: f64,
    pub nan_restarts: usize,
    /// Validation perplexity of every completed epoch.
    pub valid_history: Vec<f64>,
    /// Steps averaged so far when averaged SGD is on (0: not averaging).
    pub asgd_count: u64,
    /// Wall seconds of the completed epochs, training and validation (what a time budget
    /// counts). Absent (0) in checkpoints of older ptb-lm versions.
    #[serde(default)]
    pub run_seconds: f64,
    /// Training ended because the time budget (`train.max_minutes`) was spent: no epoch
    /// follows, only the test evaluation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub budget_spent: bool,
}

impl Resume {
    /// The start of a new run.
    pub fn start() -> Resume {
        Resume {
            epoch: 0,
            batch: 0,
            loss_sum: 0.0,
            loss_batches: 0,
            seconds: 0.0,
            nan_restarts: 0,
            valid_history: Vec::new(),
            asgd_count: 0,
            run_seconds: 0.0,
            budget_spent: false,
        }
    }
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: Meta,
    pub weights: Vec<(String, Tensor)>,
    pub state: Vec<(String, Tensor)>,
}

impl Checkpoint {
    /// Reads and checks a checkpoint directory.
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        let meta = read_meta(dir)?;
        let weights = read_tensors(&dir.join(WEIGHTS))?;
        let state_path = dir.join(STATE);
        let state = if state_path.exists() { read_tensors(&state_path)? } else { Vec::new() };
        Ok(Checkpoint { dir: dir.to_path_buf(), meta, weights, state })
    }

    pub fn vocab(&self) -> Result<Vocab> {
        Vocab::from_words(self.meta.vocab.clone()).with_context(|| self.dir.join(META).display().to_string())
    }

    /// The tokenizer the checkpoint's model reads and writes text with.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::load(self.meta.config.data.tokenizer, self.meta.vocab.clone(), &self.dir)
    }

    /// Builds the model the checkpoint describes on `device` and loads its weights.
    pub fn model(&self, device: Device) -> Result<LstmLm> {
        let model = LstmLm::new(&self.meta.config.model, device, Kind::Float)?;
        model.load_named(&self.weights, &self.dir.join(WEIGHTS))?;
        Ok(model)
    }
}

pub fn read_meta(dir: &Path) -> Result<Meta> {
    if !dir.is_dir() {
        bail!("{}: no such checkpoint directory", dir.display());
    }
    let path = dir.join(META);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("best").join(META).is_file() {
                bail!(
                    "{}: a run directory, not a checkpoint: use {} (or its last/)",
                    dir.display(),
                    dir.join("best").display()
                )
            }
            bail!("{}: not a ptb-lm checkpoint (no {META})", dir.display())
        }
        Err(e) => bail!("{}: {e}", path.display()),
    };
    let probe: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON ({e})", path.display()))?;
    let format = probe.get("format").and_then(|f| f.as_u64());
    if format != Some(FORMAT as u64) {
        bail!(
            "{}: checkpoint format {} is not the one this ptb-lm reads ({FORMAT})",
            path.display(),
            format.map_or("(none)".to_string(), |f| f.to_string())
        );
    }
    let meta: Meta = serde_path_to_error::deserialize(probe)
        .map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
    meta.config.validate().with_context(|| format!("{}: config", path.display()))?;
    if meta.config.model.vocab_size != Some(meta.vocab.len() as i64) {
        bail!(
            "{}: the vocabulary has {} words but model.vocab_size is {}",
            path.display(),
            meta.vocab.len(),
            meta.config.model.vocab_size.map_or("not set".to_string(), |v| v.to_string())
        );
    }
    Ok(meta)
}

/// Records in the checkpoint `dir` the dynamic-evaluation settings of `train` (its
/// checkpoint.json rewritten whole; weights and state untouched): a resume that changes them
/// only for the evaluation after training keeps them for every later resume too.
pub fn record_dynamic_settings(dir: &Path, train: &crate::config::TrainConfig) -> Result<()> {
    let mut meta = read_meta(dir)?;
    meta.config.train.dynamic_lr = train.dynamic_lr;
    meta.config.train.dynamic_decay = train.dynamic_decay;
    crate::fsutil::write_atomic(&dir.join(META), serde_json::to_string_pretty(&meta)?.as_bytes())
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        bail!("{}: file is missing", path.display());
    }
    Tensor::read_safetensors(path).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.lines().next().unwrap_or_default().to_string();
        anyhow::anyhow!("{}: not a readable safetensors file ({msg})", path.display())
    })
}

/// Writes a checkpoint atomically into `dir` (replacing what was there).
pub fn save(dir: &Path, meta: &Meta, weights: &[(String, Tensor)], state: &[(String, Tensor)]) -> Result<()> {
    save_with(dir, meta, weights, state, &[])
}

/// [`save`], with further files (name, bytes) written into the checkpoint with the rest, as
/// the tokenizer's `tokenizer.json`.
pub fn save_with(
    dir: &Path,
    meta: &Meta,
    weights: &[(String, Tensor)],
    state: &[(String, Tensor)],
    files: &[(&str, Vec<u8>)],
) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().with_context(|| format!("{}: not a directory name", dir.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = parent.join(format!(".{}.tmp", name.to_string_lossy()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;

    write_tensors(&tmp.join(WEIGHTS), weights)?;
    crate::failpoint::pause_in_save();
    if !state.is_empty() {
        write_tensors(&tmp.join(STATE), state)?;
    }
    for (name, bytes) in files {
        let path = tmp.join(name);
        let mut f = File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        f.write_all(bytes).with_context(|| format!("{}: cannot write", path.display()))?;
        f.sync_all()?;
    }
    let json = serde_json::to_string_pretty(meta)?;
    let meta_path = tmp.join(META);
    let mut f = File::create(&meta_path).with_context(|| format!("{}: cannot create", meta_path.display()))?;
    f.write_all(json.as_bytes())?;
    f.sync_all()?;
    sync_dir(&tmp)?;

    if dir.exists() {
        exchange(&tmp, dir)?;
        fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    } else {
        fs::rename(&tmp, dir).with_context(|| format!("{}: cannot rename to {}", tmp.display(), dir.display()))?;
    }
    sync_dir(parent)
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(&str, Tensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t.detach().to_device(Device::Cpu).contiguous())).collect();
    write_safetensors(&cpu, path)?;
    File::open(path)?.sync_all().with_context(|| format!("{}: fsync", path.display()))
}

/// Writes `tensors` to a safetensors file. A failure is one line in words, "PATH: cannot
/// write (permission denied); ...", not the safetensors crate's debug text
/// (`IoError(Os { code: 13, ... })`).
pub fn write_safetensors<S: AsRef<str>, T: AsRef<Tensor>>(tensors: &[(S, T)], path: &Path) -> Result<()> {
    Tensor::write_safetensors(tensors, path).map_err(|e| {
        let why = match &e {
            tch::TchError::Io(io)
            | tch::TchError::SafeTensorError { err: safetensors::SafeTensorError::IoError(io), .. } => {
                crate::fsutil::io_words(io)
            }
            other => other.to_string(),
        };
        anyhow::anyhow!(
            "{}: cannot write ({why}); check that its directory is writable and its disk has room",
            path.display()
        )
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("{}: fsync", dir.display()))
}

/// Atomically swaps two directories (Linux renameat2); elsewhere, or on a file system
/// without it, falls back to two renames (a crash between them leaves `b` under a `.old`
/// name beside it).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes())?;
        let cb = CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: both paths are valid NUL-terminated strings for the duration of the call.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(err).with_context(|| format!("{}: cannot replace with {}", b.display(), a.display()));
        }
    }
    let old = b.with_extension("old");
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    fs::rename(b, &old)?;
    fs::rename(a, b)?;
    fs::rename(&old, a)?;
    Ok(())
}
