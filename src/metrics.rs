//! `metrics.jsonl`: one JSON object per epoch, appended as each epoch ends.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Learning rate used during the epoch.
    pub lr: f64,
    /// exp(mean training loss over the epoch's batches), dropout on.
    pub train_ppl: f64,
    pub valid_ppl: f64,
    /// Bits per character beside each perplexity (see [`crate::eval::bits_per_char`]);
    /// absent in the records of older ptb-lm versions.
    #[serde(default)]
    pub train_bpc: Option<f64>,
    #[serde(default)]
    pub valid_bpc: Option<f64>,
    /// Training tokens per second (evaluation excluded).
    pub tokens_per_s: f64,
    /// Training seconds (evaluation excluded).
    pub seconds: f64,
    pub valid_seconds: f64,
    pub device: String,
    /// Validation improved on the best so far (a new best checkpoint was written).
    pub improved: bool,
    pub cuda_graph: bool,
    /// Averaged SGD active (validation measured with the averaged weights).
    pub averaging: bool,
    pub peak_gpu_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// With `train.log_grad_norm`: ‖dL/dh_t‖ on one fixed validation batch, from 0 to T−1
    /// steps back in time (see [`crate::gradflow`]); absent otherwise and in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm_through_time: Option<Vec<f64>>,
    /// Where the time budget (`train.max_minutes`) ended training inside this epoch: the
    /// batches it trained, of how many. Absent for a whole epoch and in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_at_batch: Option<[usize; 2]>,
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    pub fn new(path: PathBuf) -> MetricsLog {
        MetricsLog { path }
    }

    pub fn append(&self, record: &EpochRecord) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("{}: cannot open", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(record)?)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// All records (none when the file does not exist).
    pub fn read(&self) -> Result<Vec<EpochRecord>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| self.path.display().to_string()),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{} line {}: not a metrics record", self.path.display(), i + 1))
            })
            .collect()
    }

    /// Keeps only the records of epochs before `epoch` (1-based), for a resumed run.
    pub fn keep_before(&self, epoch: usize) -> Result<Vec<EpochRecord>> {
        let kept: Vec<EpochRecord> = self.read()?.into_iter().filter(|r| r.epoch < epoch).collect();
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        crate::fsutil::write_atomic(&self.path, text.as_bytes())?;
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_the_gradient_norm_reads_and_writes_as_before() {
        let old = r#"{"epoch":1,"lr":20.0,"train_ppl":900.0,"valid_ppl":800.0,"tokens_per_s":1.0,"seconds":2.0,"valid_seconds":0.5,"device":"cpu","improved":true,"cuda_graph":false,"averaging":false,"peak_gpu_mib":null,"peak_rss_mib":null}"#;
        let mut r: EpochRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.grad_norm_through_time, None);
        assert!(!serde_json::to_string(&r).unwrap().contains("grad_norm"));
        r.grad_norm_through_time = Some(vec![0.5, 0.25]);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""grad_norm_through_time":[0.5,0.25]"#), "{text}");
        assert_eq!(serde_json::from_str::<EpochRecord>(&text).unwrap(), r);
    }
}
