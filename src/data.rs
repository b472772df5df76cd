//! The Penn Treebank corpus, read as the book's `dataset/ptb.py` reads it, and batched as
//! its `RnnlmTrainer.get_batch` / `eval_perplexity` batch it.
//!
//! * Words are whitespace-separated; `<eos>` is appended at the end of every line.
//! * Word ids are given in order of first appearance over the training file; the validation
//!   and test files use the training vocabulary (an unknown word there is an error naming the
//!   file and line).
//! * Batching: `batch_size` parallel streams, stream `i` starting at `i * jump` with
//!   `jump = (n - 1) / batch_size`; batch `k` holds steps `k*T .. (k+1)*T` of every stream, so
//!   the hidden state of stream `i` carries over from batch `k` to batch `k + 1` (truncated
//!   BPTT). There are `(n - 1) / (batch_size * T)` batches.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub const EOS: &str = "<eos>";
pub const UNK: &str = "<unk>";

/// The three files of Mikolov's PTB split.
pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

pub fn split_file(dir: &Path, split: &str) -> PathBuf {
    dir.join(format!("ptb.{split}.txt"))
}

/// Word <-> id mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    words: Vec<String>,
    ids: HashMap<String, i64>,
}

impl Vocab {
    /// Ids in order of first appearance.
    pub fn build<'a>(words: impl IntoIterator<Item = &'a str>) -> Vocab {
        let mut v = Vocab { words: Vec::new(), ids: HashMap::new() };
        for w in words {
            if !v.ids.contains_key(w) {
                v.ids.insert(w.to_string(), v.words.len() as i64);
                v.words.push(w.to_string());
            }
        }
        v
    }

    /// From a stored word list (a checkpoint's), which must not repeat a word.
    pub fn from_words(words: Vec<String>) -> Result<Vocab> {
        let mut ids = HashMap::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if ids.insert(w.clone(), i as i64).is_some() {
                bail!("the vocabulary lists '{w}' twice");
            }
        }
        Ok(Vocab { words, ids })
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    pub fn id(&self, word: &str) -> Option<i64> {
        self.ids.get(word).copied()
    }

    pub fn word(&self, id: i64) -> &str {
        &self.words[id as usize]
    }

    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// Encodes a text (lines of words; `<eos>` after each line). An unknown word is an error
    /// naming `source` and the line, unless `unk` is true, when it becomes `<unk>`.
    pub fn encode(&self, text: &str, source: &Path, unk: bool) -> Result<Vec<i64>> {
        let unk_id = self.id(UNK);
        let eos = self.id(EOS).with_context(|| format!("the vocabulary has no {EOS}"))?;
        let mut out = Vec::with_capacity(text.len() / 5);
        for (n, line) in text.lines().enumerate() {
            for w in line.split_whitespace() {
                match (self.id(w), unk_id) {
                    (Some(id), _) => out.push(id),
                    (None, Some(u)) if unk => out.push(u),
                    _ => bail!("{} line {}: word '{w}' is not in the training vocabulary", source.display(), n + 1),
                }
            }
            out.push(eos);
        }
        Ok(out)
    }
}

/// Every token of `text`, with `<eos>` after each line.
pub fn tokens(text: &str) -> impl Iterator<Item = &str> {
    text.lines().flat_map(|l| l.split_whitespace().chain(std::iter::once(EOS)))
}

/// Reads a corpus file as UTF-8 text; the error names the file and says what to do.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "{}: file not found (fetch the corpus with scripts/download_ptb.sh, or set data.dir)",
            path.display()
        ),
        _ => anyhow::anyhow!("{}: {e}", path.display()),
    })?;
    if bytes.is_empty() {
        bail!("{}: file is empty", path.display());
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to())
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// When `dir/SHA256SUMS` exists (scripts/download_ptb.sh writes it), the split file must
/// match its line: a truncated or altered file is an error naming it.
fn verify_checksum(dir: &Path, file: &Path, text: &str) -> Result<()> {
    let sums = dir.join("SHA256SUMS");
    let Ok(listing) = std::fs::read_to_string(&sums) else { return Ok(()) };
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let expected = listing.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (hash, fname) = (it.next()?, it.next()?);
        (fname.trim_start_matches('*') == name).then(|| hash.to_lowercase())
    });
    if let Some(expected) = expected {
        let actual = sha256_hex(text.as_bytes());
        if actual != expected {
            bail!(
                "{}: SHA-256 mismatch (got {actual}, {} says {expected}): the file is corrupt or \
                 truncated; fetch it again with scripts/download_ptb.sh",
                file.display(),
                sums.display()
            );
        }
    }
    Ok(())
}

/// The PTB corpus as word ids.
pub struct Ptb {
    pub vocab: Vocab,
    pub train: Vec<i64>,
    pub valid: Vec<i64>,
    pub test: Vec<i64>,
}

impl Ptb {
    /// Loads the three splits from `dir`, building the vocabulary from the whole train file.
    pub fn load(dir: &Path) -> Result<Ptb> {
        let read = |split: &str| -> Result<(PathBuf, String)> {
            let path = split_file(dir, split);
            let text = read_text(&path)?;
            verify_checksum(dir, &path, &text)?;
            Ok((path, text))
        };
        let (train_path, train_text) = read("train")?;
        let vocab = Vocab::build(tokens(&train_text));
        let train = vocab.encode(&train_text, &train_path, false)?;
        let (valid_path, valid_text) = read("valid")?;
        let valid = vocab.encode(&valid_text, &valid_path, false)?;
        let (test_path, test_text) = read("test")?;
        let test = vocab.encode(&test_text, &test_path, false)?;
        Ok(Ptb { vocab, train, valid, test })
    }

    pub fn split(&self, name: &str) -> Option<&[i64]> {
        match name {
            "train" => Some(&self.train),
            "valid" => Some(&self.valid),
            "test" => Some(&self.test),
            _ => None,
        }
    }
}

/// A corpus cut into the book's parallel streams, time-major, ready on a device.
pub struct Batches {
    /// (jump, batch_size): column i is stream i; inputs[t, i] = corpus[i * jump + t].
    inputs: Tensor,
    /// Same layout, shifted by one token.
    targets: Tensor,
    bptt: i64,
    len: usize,
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
        Ok(Batches { inputs: streams(0), targets: streams(1), bptt, len: len as usize })
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

    pub fn bptt(&self) -> i64 {
        self.bptt
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
    fn unknown_word_names_file_and_line() {
        let v = Vocab::build(tokens("a b\n"));
        let err = v.encode("a\nb zz\n", Path::new("dir/ptb.valid.txt"), false).unwrap_err();
        assert_eq!(err.to_string(), "dir/ptb.valid.txt line 2: word 'zz' is not in the training vocabulary");
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
