//! Run configuration: one TOML file with `[data]`, `[model]`, `[train]` and `[run]` tables.
//!
//! Every key is checked: an unknown key, a value of the wrong type and an out-of-range value
//! are errors that name the file and the key (`configs/x.toml: train.lrr: unknown field ...`).
//! Single values can be overridden from the command line with `--set table.key=value`, which
//! goes through the same checks.

pub use crate::cell::Cell;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub run: RunConfig,
}

/// Where the corpus lives, how its text is read, and optional caps on each split (see
/// [`crate::data`]). One of `dir`, `file` or `train`/`valid`/`test` (default: `dir` =
/// `data/ptb`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A directory holding the three splits as ptb.{split}.txt, {split}.txt or
    /// wiki.{split}.tokens (relative paths: from the working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// One text file, split here: its last `test_fraction` of tokens are the test split, the
    /// `valid_fraction` before them the validation split (whole lines); or, with `split`, cut
    /// at character positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// With `file`, whole lines (default 0.05 each; see [`DataConfig::valid_fraction`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_fraction: Option<f64>,
    /// With `file`, instead of the fractions: `[train, valid]` or `[train, valid, test]`,
    /// fractions of the file's characters that sum to 1, cut as nanoGPT's
    /// `shakespeare_char/prepare.py` cuts (train = the first `floor(n · train)` characters,
    /// valid up to `floor(n · (train + valid))`, test the rest), wherever that falls in a line.
    /// Two parts: no test split. Only for `tokenizer = "char"` or `"bpe"` (a cut could halve
    /// a word).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<f64>>,
    /// Three files, one per split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// Keep at most this many words (the most frequent of the training split, <unk> and
    /// <eos> included); the rest are read as <unk>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vocab: Option<usize>,
    /// Keep only words seen at least this often in the training split.
    #[serde(default = "one_usize")]
    pub min_count: usize,
    /// Read the text lower-cased (training data, eval --file and prompts alike).
    #[serde(default)]
    pub lowercase: bool,
    /// How text becomes tokens (see [`crate::text`]): `word` (whitespace-separated words,
    /// the default), `char` (every character) or `bpe` (byte-level BPE learnt on the
    /// training split). Left out of a word run's files, so they read as before.
    #[serde(default, skip_serializing_if = "TokenizerKind::is_word")]
    pub tokenizer: TokenizerKind,
    /// Tokens a BPE tokenizer learns (`<eos>` and the 256 bytes included; default
    /// [`DEFAULT_BPE_VOCAB`]); only with `tokenizer = "bpe"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpe_vocab: Option<usize>,
    /// Use only the first N tokens of each split (quick experiments, tests). The vocabulary
    /// is always built from the whole training split.
    #[serde(default)]
    pub train_tokens: Option<usize>,
    #[serde(default)]
    pub valid_tokens: Option<usize>,
    #[serde(default)]
    pub test_tokens: Option<usize>,
}

impl DataConfig {
    /// The same settings with no path: how a corpus is read, wherever its files lie.
    pub fn without_paths(&self) -> DataConfig {
        DataConfig { dir: None, file: None, train: None, valid: None, test: None, ..self.clone() }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: None,
            file: None,
            valid_fraction: None,
            test_fraction: None,
            split: None,
            train: None,
            valid: None,
            test: None,
            max_vocab: None,
            min_count: 1,
            lowercase: false,
            tokenizer: TokenizerKind::Word,
            bpe_vocab: None,
            train_tokens: None,
            valid_tokens: None,
            test_tokens: None,
        }
    }
}

/// How text becomes tokens (`data.tokenizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// Whitespace-separated words, `<eos>` at each line end.
    #[default]
    Word,
    /// Every character of a line (the space too), `<eos>` at each line end.
    Char,
    /// Byte-level BPE learnt on the training split, `<eos>` at each line end.
    Bpe,
}

impl TokenizerKind {
    pub fn is_word(&self) -> bool {
        *self == TokenizerKind::Word
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Word => "word",
            TokenizerKind::Char => "char",
            TokenizerKind::Bpe => "bpe",
        }
    }
}

impl DataConfig {
    /// The fraction of a single file's tokens (whole lines) the validation split takes
    /// (`data.valid_fraction`, default 0.05).
    pub fn valid_fraction(&self) -> f64 {
        self.valid_fraction.unwrap_or_else(default_fraction)
    }

    /// The fraction of a single file's tokens (whole lines) the test split takes
    /// (`data.test_fraction`, default 0.05).
    pub fn test_fraction(&self) -> f64 {
        self.test_fraction.unwrap_or_else(default_fraction)
    }

    /// Whether the corpus has a test split: all have but a file cut by a two-part `data.split`.
    pub fn has_test(&self) -> bool {
        self.split.as_ref().is_none_or(|s| s.len() != 2)
    }

    /// The BPE vocabulary size asked for (`data.bpe_vocab`, or its default).
    pub fn bpe_vocab(&self) -> usize {
        self.bpe_vocab.unwrap_or(DEFAULT_BPE_VOCAB)
    }
}

/// `data.bpe_vocab` when left out.
pub const DEFAULT_BPE_VOCAB: usize = 1024;

/// The range `data.bpe_vocab` must be in: at least the 256 bytes and `<eos>`.
pub const BPE_VOCAB_RANGE: (usize, usize) = (257, 1 << 20);

/// The corpus directory when the config names none.
pub const DEFAULT_DATA_DIR: &str = "data/ptb";

fn default_fraction() -> f64 {
    0.05
}
fn one_usize() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// The book's: embedding N(0, 0.01²), weights N(0, 1/fan_in), biases 0.
    #[default]
    Book,
    /// PyTorch's defaults for nn.LSTM, nn.GRU and nn.RNN, with the embedding and decoder
    /// drawn U(-0.1, 0.1) (as in PyTorch's word_language_model and AWD-LSTM).
    Uniform,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Words in the vocabulary: taken from the corpus when left out; when set, the corpus
    /// must give exactly this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<i64>,
    pub wordvec_size: i64,
    pub hidden_size: i64,
    #[serde(default = "one")]
    pub num_layers: i64,
    /// The recurrent cell: "lstm" (the default), "gru", "rnn_tanh" or "rnn_relu" (see
    /// [`crate::cell`]).
    #[serde(default)]
    pub cell: Cell,
    /// Dropout ratio applied, as in the book's BetterRnnlm, to the embedding output, between
    /// recurrent layers and before the decoder. The three `dropout_*` keys override it per place.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub dropout_input: Option<f64>,
    #[serde(default)]
    pub dropout_hidden: Option<f64>,
    #[serde(default)]
    pub dropout_output: Option<f64>,
    /// Share the embedding matrix with the decoder (Press & Wolf 2017; Inan et al. 2017).
    /// Needs wordvec_size == hidden_size.
    #[serde(default)]
    pub tie_weights: bool,
    #[serde(default)]
    pub init: InitScheme,
    /// Variational ("locked") dropout: one mask per sequence, shared across time steps
    /// (Gal & Ghahramani 2016). Off: a fresh mask per time step, as in the book.
    #[serde(default)]
    pub locked_dropout: bool,
    /// Embedding dropout: drop whole words from the embedding matrix (Gal & Ghahramani 2016).
    #[serde(default)]
    pub dropout_embedding: f64,
    /// DropConnect on the hidden-to-hidden weights of every cell (Wan et al. 2013, as used by
    /// Merity et al. 2018, AWD-LSTM).
    #[serde(default)]
    pub weight_drop: f64,
}

impl TrainConfig {
    /// What a non-finite loss divides lr by: lr_decay, or the book's 4 for a run whose lr
    /// never decays (lr_decay = 1, as under averaged SGD), so a retry is not the same step.
    pub fn nan_lr_divisor(&self) -> f64 {
        if self.lr_decay > 1.0 {
            self.lr_decay
        } else {
            4.0
        }
    }
}

impl ModelConfig {
    /// The vocabulary size (0 until taken from the corpus).
    pub fn vocab(&self) -> i64 {
        self.vocab_size.unwrap_or(0)
    }
    pub fn dropout_input(&self) -> f64 {
        self.dropout_input.unwrap_or(self.dropout)
    }
    pub fn dropout_hidden(&self) -> f64 {
        self.dropout_hidden.unwrap_or(self.dropout)
    }
    pub fn dropout_output(&self) -> f64 {
        self.dropout_output.unwrap_or(self.dropout)
    }
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
    /// Truncated-BPTT length (the book's `time_size`).
    #[serde(default = "default_bptt")]
    pub bptt: i64,
    pub lr: f64,
    /// Global gradient-norm clipping threshold; 0 disables clipping.
    #[serde(default)]
    pub max_grad: f64,
    pub epochs: usize,
    /// When validation perplexity does not improve, lr /= lr_decay (the book: 4).
    #[serde(default = "default_lr_decay")]
    pub lr_decay: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Batch size used for validation and test perplexity (the book's eval_perplexity: 10).
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: i64,
    /// The update rule: "sgd" (the book's, the default) or "adam" (AdamW; see
    /// [`crate::optim`]). Left out of an SGD run's files, so they read as before.
    #[serde(default, skip_serializing_if = "OptimizerKind::is_sgd")]
    pub optimizer: OptimizerKind,
    /// Adam's decay rates of the first and second moment estimates, and the term added to
    /// the denominator (Kingma & Ba 2015); only with `optimizer = "adam"`.
    #[serde(default = "default_adam_beta1", skip_serializing_if = "is_default_adam_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_adam_beta2", skip_serializing_if = "is_default_adam_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_adam_eps", skip_serializing_if = "is_default_adam_eps")]
    pub adam_eps: f64,
    /// SGD: an L2 penalty added to the update (p -= lr * weight_decay * p). Adam: decoupled
    /// weight decay (Loshchilov & Hutter 2019), the same shrinking apart from the adaptive
    /// step. Off by default.
    #[serde(default)]
    pub weight_decay: f64,
    /// Activation regularisation: alpha * mean(h²) on the last layer's dropped output
    /// (Merity, McCann & Socher 2017). Off by default.
    #[serde(default)]
    pub ar_alpha: f64,
    /// Temporal activation regularisation: beta * mean((h_t - h_{t-1})²) on the last layer's
    /// output before dropout (Merity, McCann & Socher 2017). Off by default.
    #[serde(default)]
    pub tar_beta: f64,
    /// Non-monotonically triggered averaged SGD (Merity et al. 2018; Polyak & Juditsky
    /// 1992): once validation has not beaten the best of the epochs before the last
    /// `asgd_nonmono`, keep a running mean of the weights and evaluate/save the mean. While
    /// averaging, the learning rate no longer decays.
    #[serde(default)]
    pub asgd: bool,
    #[serde(default = "default_nonmono")]
    pub asgd_nonmono: usize,
    /// Give up after this many non-finite losses (each one restores the last good weights
    /// and divides lr by lr_decay, or by 4 where lr_decay is 1).
    #[serde(default = "default_max_nan_restarts")]
    pub max_nan_restarts: usize,
    /// Capture the whole training step in a CUDA graph (CUDA only; falls back to plain
    /// execution with a warning when capture is impossible).
    #[serde(default = "yes")]
    pub cuda_graph: bool,
    /// Arithmetic of the training step on CUDA: fp32; tf32 (float32 matmuls on TF32 tensor
    /// cores); bf16 (autocast: matmuls and the LSTM in bfloat16, weights, loss and
    /// optimizer in float32). Evaluation always runs in float32 (with TF32 matmuls unless
    /// fp32). The CPU always computes in float32.
    #[serde(default)]
    pub precision: Precision,
    /// On CUDA, run all recurrent layers in one cuDNN call, whatever the cell (cuDNN
    /// pipelines the layers; dropout between layers is then drawn by cuDNN). Not possible
    /// with locked dropout or weight drop, which need the layers one by one.
    #[serde(default = "yes")]
    pub fused_lstm: bool,
    /// The learning-rate rule (see [`crate::schedule`]): `plateau` (the book's, default) or
    /// `cosine` (from `lr` down to `min_lr` over the run's steps or time budget).
    #[serde(default, skip_serializing_if = "Schedule::is_plateau")]
    pub schedule: Schedule,
    /// Steps of linear warm-up at the start of the run (0: none).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub warmup_steps: u64,
    /// Where the cosine ends (only with `schedule = "cosine"`).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub min_lr: f64,
    /// A time budget in minutes for training, validation and the final test together:
    /// training ends (mid-epoch if need be) in time to leave room for the evaluations, and
    /// the cosine schedule spans the training time. `epochs` stays an upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_minutes: Option<f64>,
    /// After the test perplexity, also score the test split with dynamic evaluation (Krause
    /// et al. 2018; the defaults of `ptb-lm eval --dynamic`), into summary.json.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dynamic_eval: bool,
    /// With `dynamic_eval`: its learning rate η, decay λ and the training batches its
    /// gradient statistics read (as `eval --dyn-lr`, `--dyn-decay`, `--dyn-stats-batches`);
    /// the paper's code's defaults (and the whole training split) where left out. Choose η
    /// and λ with `ptb-lm eval --dynamic-search` on an earlier run of the same recipe: they
    /// are chosen on validation, never on the test this run scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_decay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_stats_batches: Option<u64>,
    /// Once per epoch, after training, measure how the gradient of the loss flows back
    /// through time on one fixed validation batch (‖dL/dh_t‖ for t = T..1; see
    /// [`crate::gradflow`]) into metrics.jsonl and grad_norm.png. Training is unchanged by
    /// it. Left out of written configs when off, so they read as they always did.
    #[serde(default, skip_serializing_if = "is_false")]
    pub log_grad_norm: bool,
}

/// `train.schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Plateau,
    Cosine,
}

impl Schedule {
    pub fn is_plateau(&self) -> bool {
        *self == Schedule::Plateau
    }
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// The update rule of training (`train.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent, as in the book.
    #[default]
    Sgd,
    /// Adam with decoupled weight decay (AdamW), as torch.optim.AdamW.
    Adam,
}

impl OptimizerKind {
    pub fn is_sgd(&self) -> bool {
        *self == OptimizerKind::Sgd
    }
}

fn default_adam_beta1() -> f64 {
    0.9
}
fn default_adam_beta2() -> f64 {
    0.999
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn is_default_adam_beta1(v: &f64) -> bool {
    v.to_bits() == default_adam_beta1().to_bits()
}
fn is_default_adam_beta2(v: &f64) -> bool {
    v.to_bits() == default_adam_beta2().to_bits()
}
fn is_default_adam_eps(v: &f64) -> bool {
    v.to_bits() == default_adam_eps().to_bits()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Tf32,
    Bf16,
}

fn default_batch_size() -> i64 {
    20
}
fn default_bptt() -> i64 {
    35
}
fn default_lr_decay() -> f64 {
    4.0
}
fn default_seed() -> u64 {
    1
}
fn default_eval_batch_size() -> i64 {
    10
}
fn default_nonmono() -> usize {
    5
}
fn default_max_nan_restarts() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    Cpu,
    /// The first GPU ("gpu" is read as the same, in configs as on the command line).
    #[serde(alias = "gpu")]
    Cuda,
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(format!("unknown device '{s}' (expected auto, cpu or cuda)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory: checkpoints `best/` and `last/`, metrics.jsonl, perplexity.png.
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    #[serde(default)]
    pub device: DeviceChoice,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { out_dir: default_out_dir(), device: DeviceChoice::Auto }
    }
}

fn default_out_dir() -> PathBuf {
    PathBuf::from("runs/default")
}

impl Config {
    /// Reads `path`, applies `overrides` (`table.key=value`, value in TOML syntax; a bare word
    /// is taken as a string), then checks every key and value.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
        Config::parse(&text, overrides).with_context(|| path.display().to_string())
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            // toml's message spans lines ("invalid string\nexpected ..."): one line here.
            let msg = e.message().trim().lines().map(str::trim).collect::<Vec<_>>().join("; ");
            match line {
                Some(l) => anyhow::anyhow!("line {l}: {msg}"),
                None => anyhow::anyhow!("{msg}"),
            }
        })?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        Config::from_value(value)
    }

    pub fn from_value(value: toml::Value) -> Result<Config> {
        let config: Config = serde_path_to_error::deserialize(value)
            .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner().message()))?;
        config.validate()?;
        Ok(config)
    }

    /// Range checks that serde's types cannot express. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        let t = &self.train;
        if let Some(v) = m.vocab_size.filter(|&v| v < 3) {
            bail!("model.vocab_size must be at least 3 (got {v}); leave it out to take it from the corpus");
        }
        positive("model.wordvec_size", m.wordvec_size)?;
        positive("model.hidden_size", m.hidden_size)?;
        positive("model.num_layers", m.num_layers)?;
        for (key, p) in [
            ("model.dropout", Some(m.dropout)),
            ("model.dropout_input", m.dropout_input),
            ("model.dropout_hidden", m.dropout_hidden),
            ("model.dropout_output", m.dropout_output),
            ("model.dropout_embedding", Some(m.dropout_embedding)),
            ("model.weight_drop", Some(m.weight_drop)),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    bail!("{key} must be in [0, 1) (got {p})");
                }
            }
        }
        if m.tie_weights && m.wordvec_size != m.hidden_size {
            bail!(
                "model.tie_weights needs model.wordvec_size == model.hidden_size (got {} and {})",
                m.wordvec_size,
                m.hidden_size
            );
        }
        positive("train.batch_size", t.batch_size)?;
        positive("train.bptt", t.bptt)?;
        positive("train.eval_batch_size", t.eval_batch_size)?;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bail!("train.lr must be a positive number (got {})", t.lr);
        }
        if !(t.max_grad.is_finite() && t.max_grad >= 0.0) {
            bail!("train.max_grad must be >= 0 (0 disables clipping; got {})", t.max_grad);
        }
        if t.epochs == 0 {
            bail!("train.epochs must be at least 1");
        }
        if !(t.lr_decay.is_finite() && t.lr_decay >= 1.0) {
            bail!("train.lr_decay must be >= 1 (got {})", t.lr_decay);
        }
        for (key, v) in
            [("train.weight_decay", t.weight_decay), ("train.ar_alpha", t.ar_alpha), ("train.tar_beta", t.tar_beta)]
        {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{key} must be >= 0 (got {v})");
            }
        }
        match t.schedule {
            Schedule::Cosine if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr < t.lr) => {
                bail!("train.min_lr must be >= 0 and below train.lr = {} (got {})", t.lr, t.min_lr)
            }
            Schedule::Plateau if t.min_lr != 0.0 => {
                bail!("train.min_lr is the floor of train.schedule = \"cosine\"; this config's schedule is plateau")
            }
            _ => {}
        }
        if t.dynamic_eval && self.data.split.as_ref().is_some_and(|s| s.len() == 2) {
            bail!(
                "train.dynamic_eval scores the test split, and this corpus has none (data.split has two parts); \
                 score validation with `ptb-lm eval --checkpoint RUN/best --split valid --dynamic` instead"
            );
        }
        let dynamic_keys = [
            ("train.dynamic_lr", t.dynamic_lr.is_some()),
            ("train.dynamic_decay", t.dynamic_decay.is_some()),
            ("train.dynamic_stats_batches", t.dynamic_stats_batches.is_some()),
        ];
        if let Some((key, _)) = dynamic_keys.iter().find(|(_, set)| *set).filter(|_| !t.dynamic_eval) {
            bail!("{key} sets dynamic evaluation, which this config does not ask for: add train.dynamic_eval = true or leave it out");
        }
        if let Some(v) = t.dynamic_lr.filter(|v| !(v.is_finite() && *v > 0.0)) {
            bail!("train.dynamic_lr must be > 0 (got {v})");
        }
        if let Some(v) = t.dynamic_decay.filter(|v| !(v.is_finite() && (0.0..1.0).contains(v))) {
            bail!("train.dynamic_decay must be in [0, 1) (got {v})");
        }
        if t.dynamic_stats_batches == Some(0) {
            bail!("train.dynamic_stats_batches must be at least 1; leave it out to read the whole training split");
        }
        if let Some(m) = t.max_minutes.filter(|m| !(m.is_finite() && *m > 0.0 && *m <= 525_600.0)) {
            // Huge values in exponent form (1e308, not 309 digits).
            let m = if m.abs() >= 1e7 { format!("{m:e}") } else { m.to_string() };
            bail!(
                "train.max_minutes must be a positive number of minutes, at most 525600 (a year; got {m}); leave it \
                 out for no time limit"
            );
        }
        if t.asgd && t.asgd_nonmono == 0 {
            bail!("train.asgd_nonmono must be at least 1");
        }
        for (key, b) in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("{key} must be in [0, 1) (got {b})");
            }
        }
        if !(t.adam_eps.is_finite() && t.adam_eps > 0.0) {
            bail!("train.adam_eps must be a positive number (got {})", t.adam_eps);
        }
        match t.optimizer {
            OptimizerKind::Adam if t.asgd => bail!(
                "train.asgd = true does not go with train.optimizer = \"adam\": averaged SGD is defined for SGD; \
                 set train.asgd = false or train.optimizer = \"sgd\""
            ),
            OptimizerKind::Sgd
                if !(is_default_adam_beta1(&t.adam_beta1)
                    && is_default_adam_beta2(&t.adam_beta2)
                    && is_default_adam_eps(&t.adam_eps)) =>
            {
                bail!(
                    "train.adam_beta1, train.adam_beta2 and train.adam_eps are only for train.optimizer = \"adam\" \
                     (this config uses sgd); remove them or set train.optimizer = \"adam\""
                )
            }
            _ => {}
        }
        if self.run.out_dir.as_os_str().is_empty() {
            bail!("run.out_dir must name a directory (got an empty path)");
        }
        let d = &self.data;
        for (key, p) in [
            ("data.dir", &d.dir),
            ("data.file", &d.file),
            ("data.train", &d.train),
            ("data.valid", &d.valid),
            ("data.test", &d.test),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                bail!("{key} must name a path (got an empty one)");
            }
        }
        for (key, f) in [("data.valid_fraction", d.valid_fraction()), ("data.test_fraction", d.test_fraction())] {
            if !(f > 0.0 && f < 1.0) {
                bail!("{key} must be in (0, 1) (got {f})");
            }
        }
        if d.valid_fraction() + d.test_fraction() >= 1.0 {
            bail!(
                "data.valid_fraction + data.test_fraction must be below 1 (got {} + {}): nothing would be left to train on",
                d.valid_fraction(),
                d.test_fraction()
            );
        }
        if let Some(split) = &d.split {
            check_split(split, d)?;
        }
        if let Some(m) = d.max_vocab.filter(|&m| m < 3) {
            bail!("data.max_vocab must be at least 3 (<unk>, <eos> and a word; got {m})");
        }
        if d.min_count == 0 {
            bail!("data.min_count must be at least 1");
        }
        let (lo, hi) = BPE_VOCAB_RANGE;
        match (d.tokenizer, d.bpe_vocab) {
            (TokenizerKind::Bpe, Some(n)) if !(lo..=hi).contains(&n) => {
                bail!("data.bpe_vocab must be between {lo} (the 256 bytes and <eos>) and {hi} (got {n})")
            }
            (TokenizerKind::Bpe, _) if d.max_vocab.is_some() || d.min_count > 1 => bail!(
                "data.max_vocab and data.min_count do not apply to data.tokenizer = \"bpe\", which reads every \
                 text without <unk>; size its vocabulary with data.bpe_vocab"
            ),
            (TokenizerKind::Bpe, _) => {}
            (kind, Some(_)) => bail!(
                "data.bpe_vocab is only for data.tokenizer = \"bpe\" (this config reads {}); remove it or set \
                 data.tokenizer = \"bpe\"",
                kind.name()
            ),
            _ => {}
        }
        if d.test_tokens.is_some() && !d.has_test() {
            bail!("data.test_tokens: data.split has no test part (two fractions); remove data.test_tokens");
        }
        for (key, v) in [
            ("data.train_tokens", self.data.train_tokens),
            ("data.valid_tokens", self.data.valid_tokens),
            ("data.test_tokens", self.data.test_tokens),
        ] {
            if v.is_some_and(|n| n < 2) {
                bail!("{key} must be at least 2 (got {}); leave it out to use the whole split", v.unwrap_or(0));
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serialises")
    }
}

/// `data.split`: two or three fractions in (0, 1) that sum to 1, of one file read as
/// characters or BPE, not beside the line-wise fractions.
fn check_split(split: &[f64], d: &DataConfig) -> Result<()> {
    let shown = format!("{split:?}");
    if !(2..=3).contains(&split.len()) {
        bail!("data.split must be [train, valid] or [train, valid, test] fractions (got {shown})");
    }
    if let Some(f) = split.iter().find(|f| !(**f > 0.0 && **f < 1.0)) {
        bail!("data.split: every fraction must be in (0, 1) (got {f} in {shown})");
    }
    let sum: f64 = split.iter().sum();
    if (sum - 1.0).abs() > 1e-9 {
        bail!("data.split: the fractions must sum to 1 (got {shown}, which sums to {sum})");
    }
    if d.file.is_none() {
        bail!("data.split cuts one text file; set data.file (data.dir and data.train/valid/test are split already)");
    }
    if d.valid_fraction.is_some() || d.test_fraction.is_some() {
        bail!(
            "data.split: set either data.split (cut at characters) or data.valid_fraction/test_fraction (whole \
             lines), not both; remove one"
        );
    }
    if d.tokenizer.is_word() {
        bail!(
            "data.split cuts at a character, which can fall inside a word; use it with data.tokenizer = \"char\" \
             or \"bpe\", or split words at line ends with data.valid_fraction/test_fraction"
        );
    }
    Ok(())
}

fn positive(key: &str, v: i64) -> Result<()> {
    if v < 1 {
        bail!("{key} must be at least 1 (got {v})");
    }
    Ok(())
}

/// `table.key=value`: sets one value in the parsed TOML document.
fn apply_override(doc: &mut toml::Value, spec: &str) -> Result<()> {
    let (key, raw) = spec.split_once('=').with_context(|| format!("--set {spec}: expected table.key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    // Parse the value as TOML; a bare word (e.g. cpu, runs/x) is a string.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        bail!("--set {spec}: the key must be table.key, e.g. train.epochs");
    }
    let root = doc.as_table_mut().context("config is not a TOML table")?;
    let table = root
        .entry(parts[0])
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .with_context(|| format!("--set {spec}: {} is not a table", parts[0]))?;
    table.insert(parts[1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\nwordvec_size = 8\nhidden_size = 8\n[train]\nlr = 1.0\nepochs = 1\n";

    #[test]
    fn a_non_finite_loss_always_lowers_lr() {
        let lr_decay = |v: &str| Config::parse(MIN, &[format!("train.lr_decay={v}")]).unwrap().train;
        assert_eq!(lr_decay("4.0").nan_lr_divisor(), 4.0);
        assert_eq!(lr_decay("2.0").nan_lr_divisor(), 2.0);
        assert_eq!(lr_decay("1.0").nan_lr_divisor(), 4.0);
    }

    #[test]
    fn every_shipped_config_reads_and_passes_its_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut read = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path, &[]).unwrap_or_else(|e| panic!("{e:#}"));
                read += 1;
            }
        }
        assert!(read >= 9, "only {read} configs in {}", dir.display());
    }

    #[test]
    fn defaults_follow_the_book() {
        let c = Config::parse(MIN, &[]).unwrap();
        assert_eq!(c.model.vocab_size, None, "taken from the corpus");
        assert_eq!(c.train.batch_size, 20);
        assert_eq!(c.train.bptt, 35);
        assert_eq!(c.train.lr_decay, 4.0);
        assert_eq!(c.train.eval_batch_size, 10);
        assert_eq!(c.run.device, DeviceChoice::Auto);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MIN}lrr = 3\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("train.lrr") && err.contains("unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = MIN.replace("epochs = 1", "epochs = \"two\"");
        let err = Config::parse(&text, &[]).unwrap_err().to_string();
        assert!(err.starts_with("train.epochs: invalid type"), "{err}");
    }

    #[test]
    fn absurd_values_are_refused() {
        for (set, key) in [
            ("train.batch_size=0", "train.batch_size"),
            ("train.lr=-1", "train.lr"),
            ("model.dropout=1.0", "model.dropout"),
            ("train.epochs=0", "train.epochs"),
            ("model.hidden_size=9", "model.tie_weights"),
        ] {
            let mut o = vec![set.to_string()];
            if key == "model.tie_weights" {
                o.push("model.tie_weights=true".into());
            }
            let err = Config::parse(MIN, &o).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn a_time_budget_out_of_range_is_named_and_quoted_short() {
        for (set, shown) in [("1e308", "got 1e308)"), ("-2", "got -2)"), ("0", "got 0)")] {
            let err = Config::parse(MIN, &[format!("train.max_minutes={set}")]).unwrap_err().to_string();
            assert!(err.contains("train.max_minutes") && err.contains(shown) && err.len() < 200, "{set}: {err}");
        }
    }

    #[test]
    fn dynamic_settings_need_dynamic_evaluation_and_sane_values() {
        let err = Config::parse(MIN, &["train.dynamic_lr=1e-4".into()]).unwrap_err().to_string();
        assert!(err.contains("train.dynamic_lr") && err.contains("train.dynamic_eval = true"), "{err}");
        for (set, key) in [
            ("train.dynamic_lr=0", "train.dynamic_lr"),
            ("train.dynamic_lr=-1e-4", "train.dynamic_lr"),
            ("train.dynamic_decay=1", "train.dynamic_decay"),
            ("train.dynamic_stats_batches=0", "train.dynamic_stats_batches"),
        ] {
            let err = Config::parse(MIN, &["train.dynamic_eval=true".into(), set.into()]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
        let ok = ["train.dynamic_eval=true", "train.dynamic_lr=2e-4", "train.dynamic_decay=0.005"];
        let cfg = Config::parse(MIN, &ok.map(String::from)).unwrap();
        assert_eq!((cfg.train.dynamic_lr, cfg.train.dynamic_decay), (Some(2e-4), Some(0.005)));
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let c = Config::parse(MIN, &["train.epochs=7".into(), "run.device=cpu".into()]).unwrap();
        assert_eq!(c.train.epochs, 7);
        assert_eq!(c.run.device, DeviceChoice::Cpu);
        let err = Config::parse(MIN, &["train.epoch=7".into()]).unwrap_err().to_string();
        assert!(err.contains("train.epoch"), "{err}");
    }

    #[test]
    fn bpe_vocab_is_checked_and_only_for_bpe() {
        let c = Config::parse(MIN, &["data.tokenizer=\"bpe\"".into()]).unwrap();
        assert_eq!((c.data.tokenizer, c.data.bpe_vocab()), (TokenizerKind::Bpe, DEFAULT_BPE_VOCAB));
        let err = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            Config::parse(MIN, &o).unwrap_err().to_string()
        };
        assert!(
            err(&["data.tokenizer=\"bpe\"", "data.bpe_vocab=256"]).starts_with("data.bpe_vocab must be between 257")
        );
        assert!(err(&["data.bpe_vocab=500"]).starts_with("data.bpe_vocab is only for data.tokenizer = \"bpe\""));
        assert!(err(&["data.tokenizer=\"bpe\"", "data.min_count=2"]).contains("do not apply to data.tokenizer"));
        assert!(err(&["data.tokenizer=\"bytes\""]).starts_with("data.tokenizer: unknown variant"));
        // A word config's text leaves the new keys out, so it reads as it always did.
        assert!(!Config::parse(MIN, &[]).unwrap().to_toml().contains("tokenizer"));
    }

    #[test]
    fn log_grad_norm_is_off_unless_asked_and_a_config_without_it_reads_as_it_always_did() {
        let off = Config::parse(MIN, &[]).unwrap();
        assert!(!off.train.log_grad_norm);
        assert!(!off.to_toml().contains("log_grad_norm"));
        let on = Config::parse(MIN, &["train.log_grad_norm=true".into()]).unwrap();
        assert!(on.train.log_grad_norm);
        assert_eq!(Config::parse(&on.to_toml(), &[]).unwrap(), on);
        let err = Config::parse(MIN, &["train.log_grad_norm=1".into()]).unwrap_err().to_string();
        assert!(err.starts_with("train.log_grad_norm: invalid type"), "{err}");
    }

    #[test]
    fn adam_keys_are_checked_and_an_sgd_config_reads_and_writes_as_before() {
        let c = Config::parse(MIN, &[]).unwrap();
        assert_eq!(c.train.optimizer, OptimizerKind::Sgd, "the default");
        assert!(!c.to_toml().contains("optimizer") && !c.to_toml().contains("adam"), "{}", c.to_toml());
        let adam = Config::parse(MIN, &["train.optimizer=\"adam\"".into()]).unwrap();
        assert_eq!(adam.train.optimizer, OptimizerKind::Adam);
        assert_eq!((adam.train.adam_beta1, adam.train.adam_beta2, adam.train.adam_eps), (0.9, 0.999, 1e-8));
        assert_eq!(Config::parse(&adam.to_toml(), &[]).unwrap(), adam, "an adam config reads back as written");
        let err = |extra: &[&str]| {
            // Adam first, so a test's own train.optimizer overrides it.
            let mut o = vec!["train.optimizer=\"adam\"".to_string()];
            o.extend(extra.iter().map(|s| s.to_string()));
            Config::parse(MIN, &o).unwrap_err().to_string()
        };
        assert!(err(&["train.adam_beta1=1.0"]).starts_with("train.adam_beta1 must be in [0, 1) (got 1)"));
        assert!(err(&["train.adam_beta2=-0.1"]).starts_with("train.adam_beta2 must be in [0, 1)"));
        assert!(err(&["train.adam_eps=0"]).starts_with("train.adam_eps must be a positive number"));
        let asgd = err(&["train.asgd=true"]);
        assert!(asgd.contains("train.asgd") && asgd.contains("averaged SGD is defined for SGD"), "{asgd}");
        assert!(err(&["train.optimizer=\"adamw\""]).starts_with("train.optimizer: unknown variant"));
        let sgd = Config::parse(MIN, &["train.adam_beta1=0.5".into()]).unwrap_err().to_string();
        assert!(sgd.contains("only for train.optimizer = \"adam\""), "{sgd}");
    }

    #[test]
    fn syntax_error_gives_line() {
        let err = Config::parse("[model]\nwordvec_size = = 3\n", &[]).unwrap_err().to_string();
        assert!(err.starts_with("line 2:"), "{err}");
    }
}
