//! A corpus: three splits of text (train, valid, test) read as token ids through the run's
//! tokenizer ([`crate::text`]; words by default, as PyTorch's word_language_model
//! `Corpus(path)` reads one), and batched as the book's `RnnlmTrainer.get_batch` /
//! `eval_perplexity` batch it. Nothing here knows one dataset.
//!
//! * Where the text is ([`Layout`]): a directory holding the three splits under one of the
//!   usual names (`ptb.{split}.txt`, `{split}.txt`, WikiText's `wiki.{split}.tokens`), three
//!   explicit files, or one text file that is split here into contiguous line ranges (the
//!   last `test_fraction` of its tokens for test, the `valid_fraction` before them for valid;
//!   for the character and BPE tokenizers, of its characters); or, with `data.split`, cut
//!   at character positions as nanoGPT's `shakespeare_char/prepare.py` cuts
//!   (`train = data[:int(n * 0.9)]`, `val = data[int(n * 0.9):]`), with no test part when
//!   two fractions are given. Such a part need not end with a line end: its tokens are then
//!   exactly its text (no `<eos>` added where the cut falls mid-line), so for characters a
//!   part of `k` characters is `k` tokens covering `k` characters, each line end one.
//! * Text: UTF-8 (a byte-order mark is not part of the first word), optionally lower-cased;
//!   words are whitespace-separated and `<eos>` closes every line, so a blank line is an empty
//!   sentence: one `<eos>`.
//! * Vocabulary (words; characters likewise, always with `<unk>`; BPE learns its tokens from
//!   the training split): from the training split alone, ids in order of first appearance; every word
//!   by default, or only those seen `min_count` times, capped to the `max_vocab` most frequent,
//!   the rest read as `<unk>`. It must hold at least 3 words (as `model.vocab_size` must): a
//!   training split that gives fewer is an error saying why. In a PTB directory (`ptb.*.txt`,
//!   whose files already map rare words to `<unk>`) a valid/test word outside an uncapped
//!   vocabulary is an error naming file and line; elsewhere, and wherever `max_vocab` or
//!   `min_count` caps the vocabulary, it is read as `<unk>` and counted.
//! * Batching: `batch_size` parallel streams, stream `i` starting at `i * jump` with
//!   `jump = (n - 1) / batch_size`; batch `k` holds steps `k*T .. (k+1)*T` of every stream, so
//!   the hidden state of stream `i` carries over from batch `k` to batch `k + 1` (truncated
//!   BPTT). There are `(n - 1) / (batch_size * T)` batches.
//! * Characters: every split keeps, beside its ids, the characters of text each token covers
//!   ([`crate::text::Encoded`]), so a score can be told in bits per character
//!   ([`Batches::chars_scored`] sums them over exactly the targets a batching scores).

use crate::config::{DataConfig, TokenizerKind};
use crate::text::{Encoded, Tokenizer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub use crate::text::word::{tokens, Vocab};
pub use crate::text::{EOS, UNK};

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Split> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .with_context(|| format!("unknown split '{s}' (train, valid or test)"))
    }
}

/// Reads a text file as UTF-8, without a leading byte-order mark; the error names the file.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!("{}: file not found", path.display()),
        _ => anyhow::anyhow!("{}: {e}", path.display()),
    })?;
    text_of(bytes, path)
}

/// A file's bytes as UTF-8 text, without a leading byte-order mark; errors name `path`.
fn text_of(bytes: Vec<u8>, path: &Path) -> Result<String> {
    if bytes.is_empty() {
        bail!("{}: file is empty", path.display());
    }
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to())
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Text as a corpus of `cfg` reads it (lower-cased when `data.lowercase`).
pub fn normalise(text: String, cfg: &DataConfig) -> String {
    if cfg.lowercase {
        text.to_lowercase()
    } else {
        text
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Bytes (a digest) as lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// When the file's directory has a `SHA256SUMS` listing it (the download scripts write one),
/// the file must match: a truncated or altered file is an error naming it.
fn verify_checksum(file: &Path, bytes: &[u8]) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let sums = dir.join("SHA256SUMS");
    let Ok(listing) = std::fs::read_to_string(&sums) else { return Ok(()) };
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let expected = listing.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (hash, fname) = (it.next()?, it.next()?);
        (fname.trim_start_matches('*') == name).then(|| hash.to_lowercase())
    });
    if let Some(expected) = expected {
        let actual = sha256_hex(bytes);
        if actual != expected {
            bail!(
                "{}: SHA-256 mismatch (got {actual}, {} says {expected}): the file is corrupt or \
                 truncated; fetch it again (scripts/download_*.sh)",
                file.display(),
                sums.display()
            );
        }
    }
    Ok(())
}

/// What one corpus file held when a run read it: enough to tell that text from any other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// What the file holds: `train`, `valid`, `test`, or `all` (a single file, split here).
    pub role: String,
    /// The path as the configuration gives it.
    pub path: PathBuf,
    /// The same path made absolute when it was read (relative paths: from the working
    /// directory of that moment), so the run can find it from anywhere.
    pub absolute: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// What a run read: its data configuration with every path absolute, and each file's
/// fingerprint. Checkpoints carry it; `eval` and `train --resume` read the corpus from these
/// paths (unless told another place) and refuse a file that is no longer the same text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorpusRecord {
    pub data: DataConfig,
    pub files: Vec<FileRecord>,
}

impl CorpusRecord {
    /// Whether the corpus was a PTB directory (`ptb.{split}.txt`: lower case, numbers as `N`,
    /// rare words already `<unk>`).
    pub fn is_ptb(&self) -> bool {
        self.data.dir.is_some()
            && self.files.iter().any(|f| f.role == "train" && f.path.file_name().is_some_and(|n| n == "ptb.train.txt"))
    }

    /// The record's fingerprint of the file holding `split`'s text, if any.
    pub fn file_of(&self, split: Split) -> Option<&FileRecord> {
        self.files.iter().find(|f| f.role == split.name() || f.role == ALL_ROLE)
    }

    /// Checks files just read against the record: each must be the text the record names
    /// for its role, byte for byte. `checkpoint` is named in the error.
    pub fn check(&self, read: &[FileRecord], checkpoint: &Path) -> Result<()> {
        for f in read {
            let Some(r) = self.files.iter().find(|r| r.role == f.role) else {
                let was = self.files.iter().map(|r| r.path.display().to_string()).collect::<Vec<_>>().join(", ");
                bail!(
                    "{}: not laid out as the corpus {} was trained on ({was}); score another text with eval --file",
                    f.path.display(),
                    checkpoint.display()
                );
            };
            if (r.bytes, &r.sha256) != (f.bytes, &f.sha256) {
                bail!(
                    "{}: not the text {} was trained on ({} bytes, SHA-256 {}…; it was {} bytes, {}…): the file \
                     changed since; restore it, or score it as a new text with eval --file",
                    f.path.display(),
                    checkpoint.display(),
                    f.bytes,
                    &f.sha256[..12],
                    r.bytes,
                    &r.sha256[..12.min(r.sha256.len())]
                );
            }
        }
        Ok(())
    }
}

/// The role of a single corpus file that is split here.
const ALL_ROLE: &str = "all";

/// `cfg` with every path made absolute (from the working directory), the default corpus
/// directory included.
pub fn absolute_paths(cfg: &DataConfig) -> Result<DataConfig> {
    let abs = |p: &Option<PathBuf>| -> Result<Option<PathBuf>> {
        p.as_ref()
            .map(|p| std::path::absolute(p).with_context(|| format!("{}: cannot resolve the path", p.display())))
            .transpose()
    };
    let mut out = cfg.clone();
    if cfg.dir.is_none() && cfg.file.is_none() && cfg.train.is_none() {
        out.dir = Some(PathBuf::from(crate::config::DEFAULT_DATA_DIR));
    }
    out.dir = abs(&out.dir)?;
    out.file = abs(&cfg.file)?;
    out.train = abs(&cfg.train)?;
    out.valid = abs(&cfg.valid)?;
    out.test = abs(&cfg.test)?;
    Ok(out)
}

/// Reads, checks and normalises one corpus file; also its fingerprint.
fn read_corpus_file(path: &Path, role: &str, cfg: &DataConfig, hint: &str) -> Result<(String, FileRecord)> {
    // Only a missing file is "not found" (a symlink loop, say, is not: it is told as it is).
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{}: file not found{hint}", path.display()),
        Err(e) => bail!("{}: cannot read ({e})", path.display()),
        Ok(_) => {}
    }
    // Read once: the fingerprint is of exactly the bytes the text comes from.
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    verify_checksum(path, &bytes)?;
    let record = FileRecord {
        role: role.to_string(),
        path: path.to_path_buf(),
        absolute: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        bytes: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
    };
    Ok((normalise(text_of(bytes, path)?, cfg), record))
}

/// Where a corpus's text is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A directory with the three splits under one naming pattern (`{}` is the split).
    Dir { dir: PathBuf, pattern: &'static str },
    /// Three files.
    Files { train: PathBuf, valid: PathBuf, test: PathBuf },
    /// One text file, split here into contiguous line ranges.
    Single { file: PathBuf, valid_fraction: f64, test_fraction: f64 },
    /// One text file cut at character positions (`data.split`): train, valid and, with three
    /// fractions, test.
    #[serde(rename = "single_chars")]
    SingleChars { file: PathBuf, split: Vec<f64> },
}

/// Naming patterns a corpus directory may use, tried in this order.
const PATTERNS: [&str; 3] = ["ptb.{}.txt", "{}.txt", "wiki.{}.tokens"];

impl Layout {
    /// The layout `cfg` describes, checked to exist.
    pub fn of(cfg: &DataConfig) -> Result<Layout> {
        let files = [&cfg.train, &cfg.valid, &cfg.test];
        let explicit = files.iter().filter(|f| f.is_some()).count();
        let given = [cfg.dir.is_some(), cfg.file.is_some(), explicit > 0].iter().filter(|&&b| b).count();
        if given > 1 {
            bail!("data: set one of data.dir, data.file or data.train/valid/test, not several");
        }
        if let Some(file) = &cfg.file {
            if let Some(split) = &cfg.split {
                return Ok(Layout::SingleChars { file: file.clone(), split: split.clone() });
            }
            return Ok(Layout::Single {
                file: file.clone(),
                valid_fraction: cfg.valid_fraction(),
                test_fraction: cfg.test_fraction(),
            });
        }
        if explicit > 0 {
            let names = ["data.train", "data.valid", "data.test"];
            let get =
                |i: usize| files[i].clone().with_context(|| format!("data: {} is missing (set all three)", names[i]));
            return Ok(Layout::Files { train: get(0)?, valid: get(1)?, test: get(2)? });
        }
        let dir = cfg.dir.clone().unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_DATA_DIR));
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{}: not a directory; data.dir names a directory, data.file one text file", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{}: no such directory{}", dir.display(), ptb_hint(&dir))
            }
            Err(e) => bail!("{}: cannot read ({e})", dir.display()),
        }
        let Some(pattern) = PATTERNS.into_iter().find(|p| dir.join(p.replace("{}", "train")).is_file()) else {
            bail!(
                "{}: no training split here (looked for ptb.train.txt, train.txt and wiki.train.tokens); \
                 name the files so, or set data.file (one text file) or data.train/valid/test",
                dir.display()
            );
        };
        Ok(Layout::Dir { dir, pattern })
    }

    /// The file holding `split` (for a single file, the file).
    pub fn file(&self, split: Split) -> PathBuf {
        match self {
            Layout::Dir { dir, pattern } => dir.join(pattern.replace("{}", split.name())),
            Layout::Files { train, valid, test } => match split {
                Split::Train => train.clone(),
                Split::Valid => valid.clone(),
                Split::Test => test.clone(),
            },
            Layout::Single { file, .. } | Layout::SingleChars { file, .. } => file.clone(),
        }
    }

    /// Whether the corpus has `split`: every one but the test split of a file cut in two.
    pub fn has(&self, split: Split) -> bool {
        !matches!(self, Layout::SingleChars { split: s, .. } if s.len() == 2 && split == Split::Test)
    }

    /// The splits the corpus has, in order.
    pub fn splits(&self) -> Vec<Split> {
        Split::ALL.into_iter().filter(|&s| self.has(s)).collect()
    }

    /// PTB's files already read rare words as `<unk>`: an unknown word there is an error
    /// (see [`unknown_as_unk`]).
    fn closed_vocabulary(&self) -> bool {
        matches!(self, Layout::Dir { pattern, .. } if pattern.starts_with("ptb."))
    }

    /// What a missing file of this layout is told: in PTB's own directory how to fetch it,
    /// in another directory which files it must hold.
    fn hint(&self) -> String {
        match self {
            Layout::Dir { dir, pattern } if pattern.starts_with("ptb.") && is_ptb_home(dir) => PTB_HINT.to_string(),
            Layout::Dir { pattern, .. } => {
                let [a, b, c] = Split::ALL.map(|s| pattern.replace("{}", s.name()));
                format!(" (the corpus directory must hold {a}, {b} and {c}; or set data.train/valid/test)")
            }
            _ => String::new(),
        }
    }
}

const PTB_HINT: &str = " (fetch PTB with scripts/download_ptb.sh, or set data.dir)";

/// Where PTB itself is meant to be: a directory named `ptb` (the default `data/ptb`), or one
/// whose `SHA256SUMS` lists PTB's three files (the download script writes it).
fn is_ptb_home(dir: &Path) -> bool {
    dir.ends_with("ptb")
        || std::fs::read_to_string(dir.join("SHA256SUMS")).is_ok_and(|sums| {
            let listed: Vec<&str> =
                sums.lines().filter_map(|l| l.split_whitespace().nth(1)).map(|n| n.trim_start_matches('*')).collect();
            Split::ALL.iter().all(|s| listed.contains(&format!("ptb.{s}.txt").as_str()))
        })
}

fn ptb_hint(dir: &Path) -> String {
    if is_ptb_home(dir) {
        PTB_HINT.to_string()
    } else {
        String::new()
    }
}

/// Splits one text at line ends into (train, valid, test): test gets the last
/// `test_fraction` of the tokens, valid the `valid_fraction` before them (whole lines each).
#[cfg(test)]
fn split_text(text: &str, valid_fraction: f64, test_fraction: f64, file: &Path) -> Result<[String; 3]> {
    split_text_by(text, valid_fraction, test_fraction, file, TokenizerKind::Word)
}

/// [`split_text`], the fractions taken of the tokens `kind` counts in a line: its words, or
/// (for characters and BPE) its characters, each with one for the line end.
fn split_text_by(
    text: &str,
    valid_fraction: f64,
    test_fraction: f64,
    file: &Path,
    kind: TokenizerKind,
) -> Result<[String; 3]> {
    let lines: Vec<&str> = text.lines().collect();
    let count = |l: &str| match kind {
        TokenizerKind::Word => l.split_whitespace().count() + 1,
        TokenizerKind::Char | TokenizerKind::Bpe => l.chars().count() + 1,
    };
    let counts: Vec<usize> = lines.iter().map(|l| count(l)).collect();
    let total: usize = counts.iter().sum();
    // First line of valid and of test: where the remaining tokens drop to the fraction.
    let cut = |fraction: f64| {
        let want = (total as f64 * fraction).round() as usize;
        let mut tail = 0;
        let mut i = lines.len();
        while i > 0 && tail < want {
            i -= 1;
            tail += counts[i];
        }
        i
    };
    let test_start = cut(test_fraction);
    let valid_start = cut(valid_fraction + test_fraction);
    let (name, n) = (file.display(), lines.len());
    if n < 3 {
        let lines = if n == 1 { "1 line is".to_string() } else { format!("{n} lines are") };
        bail!(
            "{name}: {lines} too few to split into train, valid and test (each takes whole lines); \
             use a longer text, or give the splits as data.dir or data.train/valid/test"
        );
    }
    if test_start >= n {
        bail!(
            "{name}: the test split would be empty: data.test_fraction = {test_fraction} of the {total} tokens \
             rounds to none; raise data.test_fraction"
        );
    }
    if valid_start >= test_start {
        let k = n - test_start;
        bail!(
            "{name}: the valid split would be empty: the test split's last {k} line{} already hold{} \
             data.valid_fraction + data.test_fraction ({valid_fraction} + {test_fraction}) of the {total} \
             tokens; raise data.valid_fraction",
            if k == 1 { "" } else { "s" },
            if k == 1 { "s" } else { "" },
        );
    }
    if valid_start == 0 {
        bail!(
            "{name}: the train split would be empty: valid and test, whole lines from the end, need all {n} \
             lines to reach data.valid_fraction + data.test_fraction ({valid_fraction} + {test_fraction}) of \
             the {total} tokens; lower data.valid_fraction or data.test_fraction"
        );
    }
    let join = |r: std::ops::Range<usize>| lines[r].iter().flat_map(|l| [*l, "\n"]).collect::<String>();
    Ok([join(0..valid_start), join(valid_start..test_start), join(test_start..lines.len())])
}

/// Cuts one text at character positions as nanoGPT's `shakespeare_char/prepare.py` does:
/// with `n` characters and fractions `[a, b]`, train is the first `floor(n · a)` characters
/// and valid the rest; with `[a, b, c]`, valid ends at `floor(n · (a + b))` and test is the
/// rest. Also the character offsets where valid (and test) begin. A part that would be
/// empty is an error naming `file` and `data.split`.
pub fn split_chars(text: &str, split: &[f64], file: &Path) -> Result<(Vec<String>, Vec<usize>)> {
    let n = text.chars().count();
    let mut cuts = Vec::new();
    let mut sum = 0.0;
    for f in &split[..split.len() - 1] {
        sum += f;
        cuts.push(((n as f64 * sum).floor() as usize).min(n));
    }
    let bounds: Vec<usize> = std::iter::once(0).chain(cuts.iter().copied()).chain(std::iter::once(n)).collect();
    for (i, w) in bounds.windows(2).enumerate() {
        if w[0] >= w[1] {
            bail!(
                "{}: the {} part of data.split = {split:?} of the {n} characters would be empty; give it a larger \
                 fraction, or use a longer text",
                file.display(),
                Split::ALL[i]
            );
        }
    }
    // Byte offsets of the cuts (character positions).
    let mut byte_at: Vec<usize> = Vec::with_capacity(bounds.len());
    let mut chars = text.char_indices().map(|(b, _)| b).chain(std::iter::once(text.len()));
    let mut pos = 0;
    for &c in &bounds {
        let b = chars.nth(c - pos).expect("a cut within the text");
        pos = c + 1;
        byte_at.push(b);
    }
    let parts = byte_at.windows(2).map(|w| text[w[0]..w[1]].to_string()).collect();
    Ok((parts, cuts))
}

/// What [`Corpus::texts`] read: the text of each split asked for (train, valid, test), the
/// fingerprint of every file read, and for a single file the first line of valid and test.
struct Texts {
    texts: [Option<String>; 3],
    files: Vec<FileRecord>,
    split_lines: Option<[usize; 2]>,
    split_chars: Option<Vec<usize>>,
}

/// What a corpus holds, as recorded in a run (`corpus.json`).
#[derive(Debug, Clone, Serialize)]
pub struct CorpusInfo {
    pub layout: Layout,
    /// How the text was read (`data.tokenizer`).
    pub tokenizer: TokenizerKind,
    pub vocab_size: usize,
    /// Tokens (with `<eos>`) of train, valid and test.
    pub tokens: [usize; 3],
    /// Words (characters) read as `<unk>` in train, valid and test.
    pub unk_replaced: [usize; 3],
    /// Characters of text the tokens of train, valid and test cover (one per line end).
    pub chars: [u64; 3],
    /// For a single file: the first line (1-based) of valid and of test.
    pub split_lines: Option<[usize; 2]>,
    /// For a single file cut at characters (`data.split`): the character offsets (0-based)
    /// where valid, and test if there is one, begin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_chars: Option<Vec<usize>>,
    /// Every file read, with its size and SHA-256.
    pub files: Vec<FileRecord>,
}

/// A corpus as token ids.
pub struct Corpus {
    /// How its text was read.
    pub tokenizer: Tokenizer,
    /// The tokenizer's tokens (its vocabulary), in id order.
    pub vocab: Vocab,
    pub train: Vec<i64>,
    pub valid: Vec<i64>,
    pub test: Vec<i64>,
    /// Characters each token of train, valid and test covers (aligned with the ids).
    pub chars: [Vec<u32>; 3],
    pub info: CorpusInfo,
    /// What it was read from (absolute paths, each file's fingerprint), for checkpoints.
    pub record: CorpusRecord,
}

impl Corpus {
    /// PTB (or any corpus directory) with the default reading: every word, as written.
    pub fn open(dir: &Path) -> Result<Corpus> {
        Corpus::load(&DataConfig { dir: Some(dir.to_path_buf()), ..DataConfig::default() })
    }

    /// Reads the three splits `cfg` describes, with the vocabulary of its training split.
    pub fn load(cfg: &DataConfig) -> Result<Corpus> {
        Corpus::load_recorded(cfg, None)
    }

    /// [`Corpus::load`], each file checked first against `record` (a checkpoint's, named in
    /// the error) when given: it must be the text the checkpoint was trained on.
    pub fn load_recorded(cfg: &DataConfig, record: Option<(&CorpusRecord, &Path)>) -> Result<Corpus> {
        Corpus::load_with(cfg, record, None)
    }

    /// [`Corpus::load_recorded`], read with `tokenizer` where given (a resumed BPE run's, which
    /// is not learnt again) instead of the one the training split gives.
    pub fn load_with(
        cfg: &DataConfig,
        record: Option<(&CorpusRecord, &Path)>,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Corpus> {
        let layout = Layout::of(cfg)?;
        let Texts { texts, files, split_lines, split_chars } = Corpus::texts(&layout, cfg, &Split::ALL, record)?;
        let train_text = texts[0].as_deref().expect("train was read");
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => Corpus::tokenizer(train_text, cfg, &layout)?,
        };
        if let Tokenizer::Word(vocab) = &tokenizer {
            check_vocab_size(vocab, train_text, cfg, &layout.file(Split::Train))?;
        }
        let eos = tokenizer.eos()?;
        let mut encoded: Vec<Encoded> = Vec::new();
        for (i, split) in Split::ALL.into_iter().enumerate() {
            if !layout.has(split) {
                encoded.push(Encoded::default());
                continue;
            }
            let text = texts[i].as_deref().expect("every split was read");
            let e = encode_part(&tokenizer, &layout, text, split, cfg)?;
            if e.ids.iter().all(|&t| t == eos) {
                let what = if tokenizer.kind().is_word() { "words" } else { "text" };
                bail!("{}: the {split} split has no {what}", layout.file(split).display());
            }
            encoded.push(e);
        }
        let [train, valid, test] = <[Encoded; 3]>::try_from(encoded).expect("three splits");
        let sum = |e: &Encoded| e.chars.iter().map(|&c| c as u64).sum::<u64>();
        let info = CorpusInfo {
            layout,
            tokenizer: tokenizer.kind(),
            vocab_size: tokenizer.len(),
            tokens: [train.ids.len(), valid.ids.len(), test.ids.len()],
            unk_replaced: [train.unknown.len(), valid.unknown.len(), test.unknown.len()],
            chars: [sum(&train), sum(&valid), sum(&test)],
            split_lines,
            split_chars,
            files: files.clone(),
        };
        let record = CorpusRecord { data: absolute_paths(cfg)?, files };
        Ok(Corpus {
            vocab: tokenizer.vocab().clone(),
            tokenizer,
            train: train.ids,
            valid: valid.ids,
            test: test.ids,
            chars: [train.chars, valid.chars, test.chars],
            info,
            record,
        })
    }

    /// The tokenizer the training split gives under `cfg.tokenizer`: its words or characters,
    /// or BPE learnt on it.
    fn tokenizer(train: &str, cfg: &DataConfig, layout: &Layout) -> Result<Tokenizer> {
        Ok(match cfg.tokenizer {
            TokenizerKind::Word => Tokenizer::Word(Corpus::vocabulary(train, cfg, layout)),
            TokenizerKind::Char => {
                let v = crate::text::char::vocabulary(train, cfg.max_vocab, cfg.min_count);
                if v.len() < MIN_VOCAB {
                    bail!("{}: the training split has no characters", layout.file(Split::Train).display());
                }
                Tokenizer::Char(v)
            }
            TokenizerKind::Bpe => Tokenizer::Bpe(Box::new(crate::text::bpe::Bpe::train(
                train,
                cfg.bpe_vocab(),
                &layout.file(Split::Train),
            )?)),
        })
    }

    /// One split of the corpus `cfg` describes, read with a checkpoint's vocabulary: only the
    /// files needed are read (the training split too where it is there, to check that the
    /// vocabulary is the one it gives), each checked against the checkpoint's `record` of
    /// what it was trained on when it has one. Also returns the positions of the words read
    /// as `<unk>`.
    ///
    /// A BPE tokenizer is not learnt again to check it: the checkpoint's record of the text
    /// says whether it is the same.
    pub fn load_split(
        cfg: &DataConfig,
        split: Split,
        tokenizer: &Tokenizer,
        checkpoint: &Path,
        record: Option<&CorpusRecord>,
    ) -> Result<Encoded> {
        let layout = Layout::of(cfg)?;
        if !layout.has(split) {
            bail!(
                "{}: the corpus has no {split} split (data.split = {:?} cuts it into train and valid only); \
                 score --split valid",
                layout.file(split).display(),
                cfg.split.as_deref().unwrap_or_default()
            );
        }
        let train_there = layout.file(Split::Train).is_file() && !matches!(tokenizer, Tokenizer::Bpe(_));
        let want: Vec<Split> =
            if train_there && split != Split::Train { vec![Split::Train, split] } else { vec![split] };
        let Texts { texts, .. } = Corpus::texts(&layout, cfg, &want, record.map(|r| (r, checkpoint)))?;
        if let Some(train) = texts[0].as_deref().filter(|_| train_there) {
            let built = Corpus::tokenizer(train, cfg, &layout)?;
            check_vocab(built.vocab(), tokenizer.vocab(), &layout.file(Split::Train), checkpoint)?;
        }
        let i = Split::ALL.iter().position(|&s| s == split).expect("a split");
        let text = texts[i].as_deref().expect("the split was read");
        encode_part(tokenizer, &layout, text, split, cfg)
    }

    /// The texts of `want` (others None), the fingerprints of the files read, and for a
    /// single file where it was split. With `recorded`, each file is checked against that
    /// record as soon as it is read, before anything is made of it.
    fn texts(
        layout: &Layout,
        cfg: &DataConfig,
        want: &[Split],
        recorded: Option<(&CorpusRecord, &Path)>,
    ) -> Result<Texts> {
        let hint = layout.hint();
        let read = |path: &Path, role: &str| -> Result<(String, FileRecord)> {
            let (text, record) = read_corpus_file(path, role, cfg, &hint)?;
            if let Some((r, checkpoint)) = recorded {
                r.check(std::slice::from_ref(&record), checkpoint)?;
            }
            Ok((text, record))
        };
        match layout {
            Layout::Single { file, valid_fraction, test_fraction } => {
                let (text, record) = read(file, ALL_ROLE)?;
                let [a, b, c] = split_text_by(&text, *valid_fraction, *test_fraction, file, cfg.tokenizer)?;
                let lines = [a.lines().count() + 1, a.lines().count() + b.lines().count() + 1];
                Ok(Texts {
                    texts: [Some(a), Some(b), Some(c)],
                    files: vec![record],
                    split_lines: Some(lines),
                    split_chars: None,
                })
            }
            Layout::SingleChars { file, split } => {
                let (text, record) = read(file, ALL_ROLE)?;
                let (parts, cuts) = split_chars(&text, split, file)?;
                let mut parts = parts.into_iter();
                let texts = [parts.next(), parts.next(), parts.next()];
                Ok(Texts { texts, files: vec![record], split_lines: None, split_chars: Some(cuts) })
            }
            _ => {
                let mut out =
                    Texts { texts: [None, None, None], files: Vec::new(), split_lines: None, split_chars: None };
                for (i, split) in Split::ALL.into_iter().enumerate() {
                    if want.contains(&split) {
                        let (text, record) = read(&layout.file(split), split.name())?;
                        out.texts[i] = Some(text);
                        out.files.push(record);
                    }
                }
                Ok(out)
            }
        }
    }

    /// The vocabulary of the training split. Outside a closed (PTB) vocabulary it always has
    /// `<unk>`, which valid and test words the training split lacks are read as.
    fn vocabulary(train: &str, cfg: &DataConfig, layout: &Layout) -> Vocab {
        let open = !layout.closed_vocabulary();
        if !capped(cfg) {
            let mut v = Vocab::build(tokens(train));
            if open {
                v.add(UNK);
            }
            v
        } else {
            Vocab::build_capped(tokens(train), cfg.max_vocab, cfg.min_count, open)
        }
    }

    /// Characters each token of `split` covers (aligned with [`Corpus::split`]).
    pub fn chars(&self, split: Split) -> &[u32] {
        &self.chars[Split::ALL.iter().position(|&s| s == split).expect("a split")]
    }

    pub fn split(&self, split: Split) -> &[i64] {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }

    /// The file that holds `split`, for messages.
    pub fn file(&self, split: Split) -> PathBuf {
        self.info.layout.file(split)
    }

    /// One line on what was read: "data/ptb (ptb.{}.txt): 10000 words; tokens 929589 / ...".
    pub fn describe(&self) -> String {
        let i = &self.info;
        let place = match &i.layout {
            Layout::Dir { dir, pattern } => format!("{} ({pattern})", dir.display()),
            Layout::Files { train, .. } => format!("{} and its valid/test files", train.display()),
            Layout::Single { file, .. } => {
                let [v, t] = i.split_lines.unwrap_or_default();
                format!("{} (valid from line {v}, test from line {t})", file.display())
            }
            Layout::SingleChars { file, split } => {
                let at = i.split_chars.clone().unwrap_or_default();
                let at = at.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" and ");
                let parts = if split.len() == 2 { "train and valid, no test" } else { "train, valid and test" };
                format!("{} ({parts}: cut at character {at})", file.display())
            }
        };
        let unit = self.tokenizer.unit();
        let unk = i.unk_replaced;
        let unk = if unk.iter().any(|&n| n > 0) {
            format!("; read as <unk>: {} / {} / {} {unit}s", unk[0], unk[1], unk[2])
        } else {
            String::new()
        };
        let how = match i.tokenizer {
            TokenizerKind::Word => String::new(),
            TokenizerKind::Char => String::new(),
            TokenizerKind::Bpe => " (byte-level BPE)".to_string(),
        };
        if !i.layout.has(Split::Test) {
            return format!(
                "corpus {place}: vocabulary {} {unit}s{how}; train / valid {} / {} tokens{unk}",
                i.vocab_size, i.tokens[0], i.tokens[1]
            );
        }
        format!(
            "corpus {place}: vocabulary {} {unit}s{how}; train / valid / test {} / {} / {} tokens{unk}",
            i.vocab_size, i.tokens[0], i.tokens[1], i.tokens[2]
        )
    }

    /// The batches of `split`, cut to `data.{split}_tokens`; errors name the file and keys
    /// (`batch_key` is the config key `batch` comes from).
    pub fn batches(
        &self,
        split: Split,
        cfg: &DataConfig,
        batch: (i64, &str),
        bptt: i64,
        device: Device,
    ) -> Result<Batches> {
        let limit = token_limit(cfg, split);
        batches_of(truncate(self.split(split), limit), split, &self.file(split), limit, batch, bptt, device)
    }
}

/// Encodes one split's text. A part of a file cut at characters (`data.split`) that does not
/// end with a line end is its characters alone: the tokenizer's `<eos>` after its last
/// (unfinished) line is not part of the text, and is dropped.
fn encode_part(tokenizer: &Tokenizer, layout: &Layout, text: &str, split: Split, cfg: &DataConfig) -> Result<Encoded> {
    let mut e = tokenizer.encode(text, &layout.file(split), unknown_as_unk(layout, cfg, split))?;
    if matches!(layout, Layout::SingleChars { .. }) && !text.ends_with('\n') && !text.is_empty() {
        let eos = tokenizer.eos()?;
        if e.ids.last() == Some(&eos) {
            let n = e.ids.len() - 1;
            e.truncate(n);
        }
    }
    Ok(e)
}

/// Whether `cfg` caps the vocabulary (`data.max_vocab`, or `data.min_count` above 1).
fn capped(cfg: &DataConfig) -> bool {
    cfg.max_vocab.is_some() || cfg.min_count > 1
}

/// The one rule for a word of `split` that the vocabulary lacks: read as `<unk>` (and
/// counted), or an error naming file and line. It is an error only in valid/test of an
/// uncapped PTB directory, whose files already map rare words to `<unk>` (so a word unseen
/// in training means the files do not belong together); training words left out of a capped
/// vocabulary, and valid/test words a cap left out, are `<unk>` by design.
fn unknown_as_unk(layout: &Layout, cfg: &DataConfig, split: Split) -> bool {
    split == Split::Train || !layout.closed_vocabulary() || capped(cfg) || !cfg.tokenizer.is_word()
}

/// Fewest words a vocabulary may hold: as `model.vocab_size` (see `Config::validate`), or
/// no checkpoint of the model could be loaded.
const MIN_VOCAB: usize = 3;

/// Refuses a vocabulary of fewer than [`MIN_VOCAB`] words, saying why the training split
/// gives so few: it has no words, `data.min_count` leaves none of them, or it has one.
fn check_vocab_size(vocab: &Vocab, train: &str, cfg: &DataConfig, file: &Path) -> Result<()> {
    if vocab.len() >= MIN_VOCAB {
        return Ok(());
    }
    let (words, counts) = Vocab::build_counted(tokens(train).filter(|&w| w != EOS));
    let name = file.display();
    if words.is_empty() {
        bail!("{name}: the training split has no words");
    }
    let kept = vocab.words().iter().filter(|w| words.id(w).is_some()).count();
    if kept == 0 {
        let most = counts.iter().max().copied().unwrap_or(0);
        bail!(
            "{name}: data.min_count = {} leaves no word of the training split (its most frequent word is seen \
             {most} time{}); lower data.min_count",
            cfg.min_count,
            if most == 1 { "" } else { "s" }
        );
    }
    if kept < words.len() {
        bail!(
            "{name}: data.max_vocab = {} and data.min_count = {} leave {} word{} of the training split, too few \
             with {EOS}; raise data.max_vocab or lower data.min_count",
            cfg.max_vocab.map_or("(none)".to_string(), |m| m.to_string()),
            cfg.min_count,
            kept,
            if kept == 1 { "" } else { "s" }
        );
    }
    bail!(
        "{name}: the training split has only {} distinct word{} ({}), and with {EOS} that is {} of the {MIN_VOCAB} \
         words a vocabulary needs at least; train on a text with more words",
        words.len(),
        if words.len() == 1 { "" } else { "s" },
        words.words().iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(", "),
        vocab.len()
    );
}

/// The cap `cfg` puts on `split` (`data.{split}_tokens`), if any.
pub fn token_limit(cfg: &DataConfig, split: Split) -> Option<usize> {
    match split {
        Split::Train => cfg.train_tokens,
        Split::Valid => cfg.valid_tokens,
        Split::Test => cfg.test_tokens,
    }
}

/// The batches of one split's ids (see [`Corpus::batches`]).
pub fn batches_of(
    ids: &[i64],
    split: Split,
    file: &Path,
    limit: Option<usize>,
    (batch, batch_key): (i64, &str),
    bptt: i64,
    device: Device,
) -> Result<Batches> {
    let limit_note = limit.map_or(String::new(), |n| format!(", data.{split}_tokens = {n}"));
    Batches::new(ids, batch, bptt, device).with_context(|| {
        format!("{} ({split} split, {batch_key} = {batch}, train.bptt = {bptt}{limit_note})", file.display())
    })
}

/// The one check that a checkpoint's vocabulary (of any tokenizer) is the one a corpus gives.
pub fn check_vocab(corpus: &Vocab, checkpoint_vocab: &Vocab, train_file: &Path, checkpoint: &Path) -> Result<()> {
    if corpus != checkpoint_vocab {
        bail!(
            "{}: its vocabulary differs from the checkpoint's ({}): not the corpus it was trained on",
            train_file.display(),
            checkpoint.display()
        );
    }
    Ok(())
}

/// A corpus cut into the book's parallel streams, time-major, ready on a device.
pub struct Batches {
    /// (jump, batch_size): column i is stream i; inputs[t, i] = corpus[i * jump + t].
    inputs: Tensor,
    /// Same layout, shifted by one token.
    targets: Tensor,
    bptt: i64,
    len: usize,
    /// Tokens between the starts of two streams, and the first stream held (a shard's).
    jump: i64,
    first_stream: i64,
}

impl Batches {
    pub fn new(corpus: &[i64], batch_size: i64, bptt: i64, device: Device) -> Result<Batches> {
        if batch_size < 1 || bptt < 1 {
            bail!("batch size and bptt must be at least 1 (got {batch_size} and {bptt})");
        }
        let n = corpus.len() as i64 - 1;
        let jump = n / batch_size;
        let len = jump / bptt;
        if len < 1 {
            bail!(
                "a corpus of {} tokens is too short for batch size {batch_size} x bptt {bptt} \
                 (it needs at least {} tokens)",
                corpus.len(),
                batch_size.saturating_mul(bptt).saturating_add(1)
            );
        }
        let streams = |offset: usize| {
            Tensor::from_slice(&corpus[offset..offset + (batch_size * jump) as usize])
                .view([batch_size, jump])
                .transpose(0, 1)
                .contiguous()
                .to_device(device)
        };
        Ok(Batches { inputs: streams(0), targets: streams(1), bptt, len: len as usize, jump, first_stream: 0 })
    }

    /// The streams `[start, start + len)` only (a data-parallel rank's share).
    pub fn shard(&self, start: i64, len: i64) -> Batches {
        Batches {
            inputs: self.inputs.narrow(1, start, len).contiguous(),
            targets: self.targets.narrow(1, start, len).contiguous(),
            bptt: self.bptt,
            len: self.len,
            jump: self.jump,
            first_stream: self.first_stream + start,
        }
    }

    /// The characters the targets of every batch cover, `chars` being the count of each
    /// token of the corpus the batches were cut from: stream `i`'s targets are tokens
    /// `i * jump + 1 ..= i * jump + len * bptt`.
    pub fn chars_scored(&self, chars: &[u32]) -> u64 {
        let steps = self.len as i64 * self.bptt;
        (self.first_stream..self.first_stream + self.batch_size())
            .map(|i| {
                let start = (i * self.jump + 1) as usize;
                chars[start..start + steps as usize].iter().map(|&c| c as u64).sum::<u64>()
            })
            .sum()
    }

    /// Number of batches (the book's `max_iters`).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> i64 {
        self.inputs.size()[1]
    }

    /// Tokens predicted per batch.
    pub fn tokens_per_batch(&self) -> i64 {
        self.bptt * self.batch_size()
    }

    /// Batch `k` as (inputs, targets), each (bptt, batch_size) of int64.
    pub fn get(&self, k: usize) -> (Tensor, Tensor) {
        assert!(k < self.len, "batch {k} out of {}", self.len);
        let start = k as i64 * self.bptt;
        (self.inputs.narrow(0, start, self.bptt), self.targets.narrow(0, start, self.bptt))
    }

    pub fn device(&self) -> Device {
        self.inputs.device()
    }
}

/// Caps a split to its first `limit` tokens (None: all).
pub fn truncate(corpus: &[i64], limit: Option<usize>) -> &[i64] {
    match limit {
        Some(n) if n < corpus.len() => &corpus[..n],
        _ => corpus,
    }
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batches({} x {}x{})", self.len, self.bptt, self.batch_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_in_order_of_first_appearance() {
        let text = "a b c\n b d\n";
        let v = Vocab::build(tokens(text));
        assert_eq!(v.words(), ["a", "b", "c", EOS, "d"]);
        let ids = v.encode(text, Path::new("x"), false).unwrap();
        assert_eq!(ids, [0, 1, 2, 3, 1, 4, 3]);
    }

    #[test]
    fn a_capped_vocabulary_keeps_the_most_frequent_words_and_adds_unk() {
        let text = "a b b c c c\nd d d d\n";
        let v = Vocab::build_capped(tokens(text), Some(4), 1, false);
        // <eos> twice, d 4, c 3, b 2, a 1: keep d, c, <eos> (3 = 4 - 1 for <unk>), in order of first appearance.
        assert_eq!(v.words(), ["c", EOS, "d", UNK]);
        // min_count 3 keeps c and d, and <eos> always.
        let v = Vocab::build_capped(tokens(text), None, 3, false);
        assert_eq!(v.words(), ["c", EOS, "d", UNK]);
        let (ids, replaced) = v.encode_counted("a c\nzz\n", Path::new("x"), true).unwrap();
        assert_eq!((ids, replaced), (vec![3, 0, 1, 3, 1], 2));
        // Nothing left out: no <unk> added.
        assert_eq!(Vocab::build_capped(tokens("a b\n"), Some(10), 1, false).words(), ["a", "b", EOS]);
        // Asked for <unk>, a full vocabulary makes room for it.
        assert_eq!(Vocab::build_capped(tokens("a b b\n"), Some(3), 1, true).words(), ["b", EOS, UNK]);
    }

    #[test]
    fn unknown_word_names_file_and_line() {
        let v = Vocab::build(tokens("a b\n"));
        let err = v.encode("a\nb zz\n", Path::new("dir/ptb.valid.txt"), false).unwrap_err();
        assert_eq!(err.to_string(), "dir/ptb.valid.txt line 2: word 'zz' is not in the training vocabulary");
    }

    #[test]
    fn one_text_splits_at_line_ends_into_tail_slices() {
        let text: String = (0..100).map(|i| format!("w{i} x\n")).collect();
        let [a, b, c] = split_text(&text, 0.1, 0.2, Path::new("f")).unwrap();
        assert_eq!((a.lines().count(), b.lines().count(), c.lines().count()), (70, 10, 20));
        assert!(b.starts_with("w70 x\n") && c.starts_with("w80 x\n"));
        assert!(split_text("one line\n", 0.1, 0.1, Path::new("f")).unwrap_err().to_string().contains("too few"));
    }

    #[test]
    fn an_empty_split_is_named_with_the_key_that_empties_it() {
        let err = |text: &str, v: f64, t: f64| split_text(text, v, t, Path::new("f")).unwrap_err().to_string();
        let text: String = (0..4000).map(|i| format!("w{i} x\n")).collect();
        // 1e-9 of 12000 tokens rounds to none.
        let e = err(&text, 0.05, 1e-9);
        assert!(e.starts_with("f: the test split would be empty") && e.ends_with("raise data.test_fraction"), "{e}");
        assert!(!e.contains("too few"), "{e}");
        // The last line alone holds more than both fractions ask for: valid gets nothing.
        let text = format!("a\nb\nc\n{}\n", "w ".repeat(100));
        let e = err(&text, 0.05, 0.05);
        assert!(e.starts_with("f: the valid split would be empty") && e.ends_with("raise data.valid_fraction"), "{e}");
        // The first line holds nearly everything, and valid and test need more than the rest.
        let text = format!("{}\nb\nc\nd\n", "w ".repeat(100));
        let e = err(&text, 0.09, 0.01);
        assert!(e.starts_with("f: the train split would be empty"), "{e}");
        assert!(e.ends_with("lower data.valid_fraction or data.test_fraction"), "{e}");
        assert!(err("a\nb\n", 0.3, 0.3).starts_with("f: 2 lines are too few to split"));
    }

    fn dir_layout(pattern: &'static str) -> Layout {
        Layout::Dir { dir: PathBuf::from("mine"), pattern }
    }

    #[test]
    fn a_vocabulary_of_fewer_than_three_words_is_refused_with_its_reason() {
        let too_small = |train: &str, cfg: &DataConfig, layout: &Layout| {
            let vocab = Corpus::vocabulary(train, cfg, layout);
            assert!(vocab.len() < MIN_VOCAB, "{:?}", vocab.words());
            check_vocab_size(&vocab, train, cfg, Path::new("t.txt")).unwrap_err().to_string()
        };
        let plain = DataConfig::default();
        let e =
            too_small("a b a\nb\n", &DataConfig { min_count: 1_000_000_000, ..plain.clone() }, &dir_layout("{}.txt"));
        assert_eq!(
            e,
            "t.txt: data.min_count = 1000000000 leaves no word of the training split (its most frequent word is \
             seen 2 times); lower data.min_count"
        );
        let e = too_small("a a\na\n", &plain, &dir_layout("ptb.{}.txt"));
        assert!(e.starts_with("t.txt: the training split has only 1 distinct word ('a')"), "{e}");
        let e = too_small("\n\n", &plain, &dir_layout("{}.txt"));
        assert_eq!(e, "t.txt: the training split has no words");
        // Three words pass, in either kind of directory.
        for layout in [dir_layout("ptb.{}.txt"), dir_layout("{}.txt")] {
            let vocab = Corpus::vocabulary("a b\n", &plain, &layout);
            check_vocab_size(&vocab, "a b\n", &plain, Path::new("t.txt")).unwrap();
        }
    }

    #[test]
    fn an_unknown_word_is_an_error_only_in_valid_or_test_of_an_uncapped_ptb_directory() {
        let plain = DataConfig::default();
        let capped =
            [DataConfig { max_vocab: Some(5000), ..plain.clone() }, DataConfig { min_count: 2, ..plain.clone() }];
        let ptb = dir_layout("ptb.{}.txt");
        for split in Split::ALL {
            assert_eq!(unknown_as_unk(&ptb, &plain, split), split == Split::Train, "{split}");
            for cfg in &capped {
                assert!(unknown_as_unk(&ptb, cfg, split), "{split}: a capped word is <unk>");
            }
            assert!(unknown_as_unk(&dir_layout("{}.txt"), &plain, split), "{split}: an open vocabulary");
        }
    }

    #[test]
    fn batches_match_the_book_by_hand() {
        // corpus 0..=20: xs = 0..19, ts = 1..20; batch 2, T 3: jump 10, 20 // 6 = 3 batches.
        let corpus: Vec<i64> = (0..=20).collect();
        let b = Batches::new(&corpus, 2, 3, Device::Cpu).unwrap();
        assert_eq!(b.len(), 3);
        let rows = |t: &Tensor| -> Vec<Vec<i64>> {
            let t = t.transpose(0, 1).contiguous();
            (0..t.size()[0]).map(|i| Vec::<i64>::try_from(t.get(i)).unwrap()).collect()
        };
        let (x0, y0) = b.get(0);
        assert_eq!(rows(&x0), [[0, 1, 2], [10, 11, 12]]);
        assert_eq!(rows(&y0), [[1, 2, 3], [11, 12, 13]]);
        let (x2, y2) = b.get(2);
        assert_eq!(rows(&x2), [[6, 7, 8], [16, 17, 18]]);
        assert_eq!(rows(&y2), [[7, 8, 9], [17, 18, 19]]);
    }

    #[test]
    fn too_short_corpus_is_an_error() {
        let err = Batches::new(&[1, 2, 3], 2, 3, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
    }
}
