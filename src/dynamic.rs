//! Dynamic evaluation: the model keeps learning from the text it scores (Krause, Kahembwe,
//! Murray & Renals 2018, *Dynamic Evaluation of Neural Sequence Models*, ICML; reference
//! code: github.com/benkrause/dynamic-evaluation, `dynamiceval.py`).
//!
//! The text is read as one stream (batch 1, hidden state carried, dropout off) in segments
//! of `bptt` tokens (5). Each segment is scored with the weights as they are **before** it is
//! seen; only then is its loss back-propagated and the paper's main update (RMS-normalised
//! SGD with decay back to the trained weights θ₀) taken:
//!
//! ```text
//! θ ← θ − η · g / (MS + ε) + min(λ · MS / mean(MS), 1) · (θ₀ − θ)
//! ```
//!
//! where MS = sqrt(mean of g² over the training split), collected once (segments of `bptt`,
//! 100 parallel streams, as `gradstat()` does) and mean(MS) is the mean over the parameter
//! tensors of each tensor's mean MS. The `min(·, 1)` is the reference code's clipping of the
//! decay rate at 1/λ, so the decay never overshoots θ₀. Perplexity is exp of the mean loss
//! over every token but the first.

use crate::data::Batches;
use crate::model::LstmLm;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The update's hyperparameters. Defaults: the reference code's (η 5e-5, λ 0.002, ε 2e-5,
/// segments of 5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// η, the learning rate.
    pub lr: f64,
    /// λ, the decay back to the trained weights.
    pub decay: f64,
    /// ε, added to MS.
    pub epsilon: f64,
    /// Segment length.
    pub bptt: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { lr: 5e-5, decay: 0.002, epsilon: 2e-5, bptt: 5 }
    }
}

/// The longest segment `--dyn-bptt` may ask for.
pub const MAX_BPTT: i64 = 10_000;

impl Settings {
    /// Errors name the command-line flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("--dyn-lr must be >= 0 (got {})", self.lr);
        }
        if !(self.decay.is_finite() && (0.0..1.0).contains(&self.decay)) {
            bail!("--dyn-decay must be in [0, 1) (got {})", self.decay);
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            bail!("--dyn-epsilon must be > 0 (got {})", self.epsilon);
        }
        if !(1..=MAX_BPTT).contains(&self.bptt) {
            bail!("--dyn-bptt must be between 1 and {MAX_BPTT} (got {})", self.bptt);
        }
        Ok(())
    }

    /// "lr 5e-5, decay 0.002, segments of 5".
    pub fn describe(&self) -> String {
        // `+ 0.0` writes a -0 given on the command line as 0.
        format!(
            "lr {:e}, decay {}, epsilon {:e}, segments of {}",
            self.lr + 0.0,
            self.decay + 0.0,
            self.epsilon,
            self.bptt
        )
    }

    /// The reference code's search grid (η × λ, scaled by bptt / 5 for other segment lengths).
    pub fn grid(&self) -> Vec<Settings> {
        let scale = self.bptt as f64 / 5.0;
        let lrs = [3e-5, 5e-5, 1e-4, 2e-4, 4e-4];
        let decays = [1e-3, 2e-3, 5e-3];
        let mut out = Vec::new();
        for &decay in &decays {
            for &lr in &lrs {
                out.push(Settings { lr: lr * scale, decay: (decay * scale).min(0.5), ..*self });
            }
        }
        out
    }
}

/// How the gradient statistics are collected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsRecipe {
    pub batch_size: i64,
    pub bptt: i64,
    /// At most this many training batches (None: the whole split).
    pub max_batches: Option<usize>,
}

/// Everything the statistics are a function of: saved statistics are used only where all of
/// it is the same, so they are never applied to weights or a text they were not computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsKey {
    pub recipe: StatsRecipe,
    /// SHA-256 of the weights they were computed with ([`weights_digest`]).
    pub weights_sha256: String,
    /// SHA-256 of the training tokens they were computed on: of the corpus file that holds
    /// the training split as the checkpoint records it, together with how the split is cut
    /// and read from it and the tokenizer ([`train_digest`]); else of the split's token ids.
    pub train_sha256: String,
}

/// SHA-256 over every parameter's name, shape and float32 values, in the model's order: the
/// same weights give the same digest wherever they are loaded, any other weights another.
pub fn weights_digest(model: &LstmLm) -> String {
    let mut h = Sha256::new();
    tch::no_grad(|| {
        for (name, p) in model.named_parameters() {
            h.update(name.as_bytes());
            h.update([0]);
            for d in p.size() {
                h.update(d.to_le_bytes());
            }
            let flat = p.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
            let values = Vec::<f32>::try_from(&flat).unwrap_or_default();
            for v in values {
                h.update(v.to_le_bytes());
            }
        }
    });
    crate::data::hex(&h.finalize())
}

/// SHA-256 of a training split known by its file's digest (`file_sha256`), the data settings
/// that choose and read the split from that file (paths left out: a file moved elsewhere is
/// the same text) and the tokenizer (its vocabulary and files): whatever changes the training ids changes this.
pub fn train_digest(file_sha256: &str, data: &crate::config::DataConfig, tokenizer: &crate::text::Tokenizer) -> String {
    let settings = data.without_paths();
    let mut h = Sha256::new();
    h.update(file_sha256.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(&settings).unwrap_or_default());
    for word in tokenizer.vocab().words() {
        h.update([0]);
        h.update(word.as_bytes());
    }
    for (name, bytes) in tokenizer.files() {
        h.update([0]);
        h.update(name.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    crate::data::hex(&h.finalize())
}

/// SHA-256 of token ids (a training split read from a checkpoint that records no corpus).
pub fn ids_digest(ids: &[i64]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    crate::data::hex(&h.finalize())
}

/// MS = sqrt(mean g²) of every parameter, in the order of [`LstmLm::named_parameters`].
pub struct GradStats {
    pub key: StatsKey,
    pub ms: Vec<(String, Tensor)>,
    /// Batches they were averaged over.
    pub batches: usize,
}

const STATS_FILE: &str = "gradstats.safetensors";
const STATS_META: &str = "gradstats.json";

/// `gradstats.json`: what the statistics are of, and the SHA-256 of the tensor file they were
/// saved with. It is renamed into place last, so it is the commit point of a save: tensors
/// that are not the ones it names (a save cut between the two files, two saves interleaved)
/// are never read as its statistics.
#[derive(Serialize, Deserialize)]
struct StatsMeta {
    key: StatsKey,
    batches: usize,
    tensors_sha256: String,
}

/// What [`GradStats::load`] found in a checkpoint directory.
pub enum Saved {
    /// Statistics for exactly this key.
    Found(GradStats),
    /// None there.
    Missing,
    /// Statistics there, but not usable for this key: why.
    Stale(String),
}

impl GradStats {
    /// Collects the statistics over `train` (dropout off, hidden state carried across
    /// batches): for each batch, the gradient of its mean loss; MS = sqrt(mean of g²).
    /// `key` says what they are of: its weights digest must be the model's.
    pub fn collect(model: &LstmLm, train: &[i64], key: StatsKey) -> Result<GradStats> {
        let recipe = &key.recipe;
        let batches = Batches::new(train, recipe.batch_size, recipe.bptt, model.device())
            .context("gradient statistics on the training split")?;
        let n = recipe.max_batches.map_or(batches.len(), |m| m.min(batches.len()));
        let named = model.named_parameters();
        let mut sq: Vec<Tensor> = named.iter().map(|(_, p)| p.zeros_like()).collect();
        let mut state = model.zero_state(recipe.batch_size);
        for k in 0..n {
            zero_grads(&named);
            let (x, y) = batches.get(k);
            let f = model.hidden(&x, &state, false);
            model.decoded_loss(&f.last_dropped, &y).backward();
            tch::no_grad(|| {
                for (s, (_, p)) in sq.iter_mut().zip(&named) {
                    let g = p.grad();
                    let _ = s.addcmul_(&g, &g);
                }
            });
            state = f.state.detach();
        }
        zero_grads(&named);
        let ms =
            tch::no_grad(|| named.iter().zip(sq).map(|((name, _), s)| (name.clone(), (s / n as f64).sqrt())).collect());
        Ok(GradStats { key, ms, batches: n })
    }

    /// The statistics saved in checkpoint directory `dir`, if they are exactly those of `key`
    /// (and whole: the tensor file is the one their metadata names).
    pub fn load(dir: &Path, key: &StatsKey, model: &LstmLm) -> Saved {
        let meta_path = dir.join(STATS_META);
        let text = match std::fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Saved::Missing,
            Err(e) => return Saved::Stale(format!("{}: {e}", meta_path.display())),
        };
        let Ok(meta) = serde_json::from_str::<StatsMeta>(&text) else {
            return Saved::Stale(format!("{}: not statistics this ptb-lm wrote", meta_path.display()));
        };
        if meta.key.weights_sha256 != key.weights_sha256 {
            return Saved::Stale("they were computed with other weights".to_string());
        }
        if meta.key.train_sha256 != key.train_sha256 {
            return Saved::Stale("they were computed on another training text".to_string());
        }
        if meta.key.recipe != key.recipe {
            return Saved::Stale(format!("they were collected differently ({})", describe_recipe(&meta.key.recipe)));
        }
        let tensors_path = dir.join(STATS_FILE);
        let bytes = match std::fs::read(&tensors_path) {
            Ok(b) => b,
            Err(e) => return Saved::Stale(format!("{}: {e}", tensors_path.display())),
        };
        if crate::data::sha256_hex(&bytes) != meta.tensors_sha256 {
            return Saved::Stale(format!("{} is not the file {STATS_META} names (a save was cut)", STATS_FILE));
        }
        // Parsed from exactly the bytes just hashed: the file may be replaced meanwhile.
        let Ok(tensors) = safetensors::SafeTensors::deserialize(&bytes) else {
            return Saved::Stale(format!("{}: not a readable safetensors file", tensors_path.display()));
        };
        let device = model.device();
        let ms = model
            .named_parameters()
            .into_iter()
            .map(|(name, p)| {
                let view = tensors.tensor(&format!("ms.{name}")).ok()?;
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let fits = view.dtype() == safetensors::Dtype::F32 && shape == p.size();
                fits.then(|| (name, Tensor::from_data_size(view.data(), &shape, Kind::Float).to_device(device)))
            })
            .collect::<Option<Vec<_>>>();
        match ms {
            Some(ms) => Saved::Found(GradStats { key: meta.key, ms, batches: meta.batches }),
            None => Saved::Stale("their tensors do not match the model's parameters".to_string()),
        }
    }

    /// Saves them beside the weights in checkpoint directory `dir`: the tensors, then the
    /// metadata naming the tensors' SHA-256, each written to a temporary name and renamed
    /// into place. The checkpoint's own files are not touched, and a new save of the
    /// checkpoint drops them.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let named: Vec<(String, Tensor)> =
            self.ms.iter().map(|(n, t)| (format!("ms.{n}"), t.to_device(Device::Cpu))).collect();
        let tmp = crate::fsutil::temp_sibling(&dir.join(STATS_FILE));
        // Created here first, so an unwritable directory is an I/O error in words.
        if let Err(e) = std::fs::File::create(&tmp) {
            bail!("{}: cannot write ({})", dir.join(STATS_FILE).display(), crate::fsutil::io_words(&e));
        }
        let written = crate::checkpoint::write_safetensors(&named, &tmp)
            .and_then(|()| Ok(std::fs::read(&tmp)?))
            .and_then(|bytes| {
                std::fs::File::open(&tmp)?.sync_all()?;
                Ok(bytes)
            });
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let final_name = dir.join(STATS_FILE).display().to_string();
                bail!("{}", first_line(&e.to_string()).replace(&tmp.display().to_string(), &final_name));
            }
        };
        let meta =
            StatsMeta { key: self.key.clone(), batches: self.batches, tensors_sha256: crate::data::sha256_hex(&bytes) };
        crate::fsutil::rename_into_place(&tmp, &dir.join(STATS_FILE))?;
        crate::failpoint::pause("stats");
        crate::fsutil::write_atomic(&dir.join(STATS_META), serde_json::to_string_pretty(&meta)?.as_bytes())
    }

    /// The files [`GradStats::save`] writes into a checkpoint directory.
    pub const FILES: [&'static str; 2] = [STATS_FILE, STATS_META];
}

/// "batches of 100 x 5, at most 150 batches".
pub fn describe_recipe(r: &StatsRecipe) -> String {
    let cap = r.max_batches.map_or("every batch".to_string(), |n| format!("at most {n} batches"));
    format!("batches of {} x {}, {cap}", r.batch_size, r.bptt)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

fn zero_grads(named: &[(String, Tensor)]) {
    for (_, p) in named {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Perplexity of the stream `ids` under dynamic evaluation with `s`. The model's weights are
/// changed while it runs and put back at the end.
pub fn perplexity(model: &LstmLm, ids: &[i64], stats: &GradStats, s: &Settings) -> Result<f64> {
    mean_loss(model, ids, stats, s).map(f64::exp)
}

/// The mean loss (nats per token) whose exp is [`perplexity`].
pub fn mean_loss(model: &LstmLm, ids: &[i64], stats: &GradStats, s: &Settings) -> Result<f64> {
    s.validate()?;
    let n = ids.len() as i64 - 1;
    if n < 1 {
        bail!("dynamic evaluation needs at least two tokens");
    }
    let named = model.named_parameters();
    let device = model.device();
    // The update as three in-place passes per tensor: θ ← θ·(1 − r) + r·θ₀ − (η/(MS+ε))·g,
    // with r = min(λ·MS/mean(MS), 1) (the decay rate clipped at 1/λ, times λ).
    let (theta0, keep, pull, step) = tch::no_grad(|| {
        let theta0: Vec<Tensor> = named.iter().map(|(_, p)| p.detach().copy()).collect();
        let means: Vec<Tensor> = stats.ms.iter().map(|(_, m)| m.mean(Kind::Float)).collect();
        let mean_ms = Tensor::stack(&means, 0).mean(Kind::Float);
        let rate: Vec<Tensor> = stats.ms.iter().map(|(_, m)| (m * s.decay / &mean_ms).clamp_max(1.0)).collect();
        let keep: Vec<Tensor> = rate.iter().map(|r| 1.0 - r).collect();
        let pull: Vec<Tensor> = rate.iter().zip(&theta0).map(|(r, t0)| r * t0).collect();
        let step: Vec<Tensor> = stats.ms.iter().map(|(_, m)| (m + s.epsilon).reciprocal() * -s.lr).collect();
        (theta0, keep, pull, step)
    });
    let poison = crate::failpoint::dynamic_diverges();
    // Each segment is scored first, with the weights as they were before it, then learnt from.
    let mut learn = |loss: &Tensor| -> Result<()> {
        loss.backward();
        tch::no_grad(|| {
            for (i, (_, p)) in named.iter().enumerate() {
                let mut p = p.shallow_clone();
                let _ = p.g_mul_(&keep[i]);
                let _ = p.g_add_(&pull[i]);
                let _ = p.addcmul_(&step[i], &p.grad());
            }
            if poison {
                let _ = named[0].1.shallow_clone().fill_(f64::NAN);
            }
        });
        zero_grads(&named);
        Ok(())
    };
    zero_grads(&named);
    let scored = crate::eval::score(model, 1, crate::eval::stream_segments(ids, s.bptt, device), Some(&mut learn));
    zero_grads(&named);
    tch::no_grad(|| {
        for ((_, p), t0) in named.iter().zip(&theta0) {
            p.shallow_clone().copy_(t0);
        }
    });
    let (sum, tokens) = scored?;
    Ok(sum / tokens as f64)
}

/// Whether a dynamic evaluation's perplexity says the adaptation blew up: not finite, or
/// worse than a uniform guess over the vocabulary (perplexity V), which the trained weights
/// it starts from never are: such a number measures broken updates, not the model.
pub fn diverged(ppl: f64, vocab_size: i64) -> bool {
    !(ppl.is_finite() && ppl <= vocab_size as f64)
}
