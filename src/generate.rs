//! Text generation: the stateful model reads the prompt, then samples one token (a word, a
//! character or a BPE piece, as the checkpoint's tokenizer reads text: [`crate::text`]) at a
//! time, feeding each back in (the book's `RnnlmGen.generate`, with temperature and top-k).
//!
//! The prompt is spelled as the checkpoint's corpus was ([`Spelling`]): lower-cased where the
//! corpus was (`data.lowercase`), PTB's conventions (lower case, numbers as `N`) only for PTB,
//! and a word the vocabulary lacks is read as `<unk>` and named in a warning. A character or
//! BPE model reads the prompt as raw text (spaces, capitals, punctuation kept; a line break
//! is `<eos>`) and writes decoded text: no spaces put between characters. The model reads
//! it without its decoder ([`LstmLm::read`], a piece at a time), so a prompt of any length
//! costs the memory of one piece; only its last word is scored.
//!
//! The next word is drawn from [`next_word_distribution`]: softmax(logits / T) over the
//! allowed words (all but `<unk>` unless allowed), restricted to the k likeliest with top-k
//! and renormalised; computed in f64 on a copy, so the model's logits are never changed and
//! every sample sees the same prompt distribution. Draws come from a ChaCha8 generator
//! seeded per sample, so `--seed` gives the same text everywhere. Words are written as they
//! are drawn.

use crate::config::{DataConfig, DEFAULT_DATA_DIR};
use crate::data::{Layout, Vocab, EOS, UNK};
use crate::model::{LstmLm, State};
use crate::text::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{Read, Write};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Temperatures allowed besides 0: outside, the scaled logits over- or underflow into a
/// distribution that is no longer the model's (all mass on one word, or uniform).
pub const TEMPERATURE_RANGE: (f64, f64) = (1e-3, 1e3);

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens (words, characters, BPE pieces) to generate per sample (at most, with
    /// `until_eos`).
    pub words: usize,
    /// Softmax temperature; 0 picks the most likely word every time.
    pub temperature: f64,
    /// Sample among the k most likely words only.
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Let the model emit `<unk>` (by default it is never sampled).
    pub allow_unk: bool,
    /// Stop a sample at its first `<eos>`.
    pub until_eos: bool,
    pub samples: usize,
}

impl GenerateOptions {
    /// Errors name the command-line flag.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = TEMPERATURE_RANGE;
        let t = self.temperature;
        if !(t == 0.0 || (lo..=hi).contains(&t)) {
            bail!("--temperature must be 0 (always the likeliest word) or between {lo} and {hi} (got {t})");
        }
        if self.top_k == Some(0) {
            bail!("--top-k must be at least 1");
        }
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        Ok(())
    }
}

/// How the corpus a checkpoint learned from spelled its words; a prompt is read the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spelling {
    /// The corpus was lower-cased (`data.lowercase`), and so is the prompt, as
    /// [`crate::data::normalise`] lower-cases the corpus.
    pub lowercase: bool,
    /// PTB (a directory of `ptb.{split}.txt`), whose text is lower-case with every number
    /// written `N`: a prompt word missing as written is looked up lower-cased, then a number
    /// as `N`. Elsewhere a word is looked up as written only.
    pub ptb: bool,
    /// Where the corpus directory is not here, so whether it is PTB cannot be told: a note
    /// for the warning about unknown words (they were looked up as written only).
    pub undetermined: Option<String>,
}

impl Spelling {
    /// The spelling of a checkpoint's corpus: told by its record of the files it was trained
    /// on where it has one (the corpus need not be here), else by looking at the corpus.
    pub fn of_checkpoint(meta: &crate::checkpoint::Meta) -> Spelling {
        match &meta.corpus {
            Some(record) => {
                Spelling { lowercase: meta.config.data.lowercase, ptb: record.is_ptb(), undetermined: None }
            }
            None => Spelling::of(&meta.config.data),
        }
    }

    /// The spelling of the corpus `data` (a checkpoint's `data` config) describes.
    pub fn of(data: &DataConfig) -> Spelling {
        let (ptb, undetermined) = match Layout::of(data) {
            Ok(layout) => (matches!(layout, Layout::Dir { pattern, .. } if pattern.starts_with("ptb.")), None),
            Err(_) => {
                let dir = data.dir.as_deref().unwrap_or(Path::new(DEFAULT_DATA_DIR));
                let note = format!(
                    "the training corpus at {} is not here to tell whether it is PTB, so PTB's spelling (lower \
                     case, N for numbers) was not applied",
                    dir.display()
                );
                (false, Some(note))
            }
        };
        Spelling { lowercase: data.lowercase, ptb, undetermined }
    }
}

/// A prompt read into word ids.
#[derive(Debug)]
pub struct Prompt {
    ids: Vec<i64>,
    /// The prompt's words as the user wrote them.
    shown: Vec<String>,
    /// A character or BPE model's prompt: the text as the user wrote it (shown as it is).
    raw: Option<String>,
    /// Prompt words that are not in the vocabulary (they are read as `<unk>`).
    pub unknown: Vec<String>,
    /// Why unknown words may be spelled otherwise in the corpus (see [`Spelling`]).
    note: Option<String>,
}

impl Prompt {
    /// The word ids the model reads (`<eos>` alone for an empty prompt).
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// The one-line warning naming the words read as `<unk>`, each quoted, if any.
    pub fn warning(&self) -> Option<String> {
        if self.unknown.is_empty() {
            return None;
        }
        let words: Vec<String> = self.unknown.iter().map(|w| format!("'{w}'")).collect();
        let note = self.note.as_ref().map(|n| format!("; {n}")).unwrap_or_default();
        Some(format!("warning: not in the vocabulary, read as {UNK}: {}{note}", words.join(", ")))
    }
}

/// Maps one prompt word, lower-cased already where the corpus was, to an id: as written;
/// on PTB, else lower-cased, else a number as PTB's `N`. None: not in the vocabulary.
pub fn lookup(vocab: &Vocab, word: &str, spelling: &Spelling) -> Option<i64> {
    vocab.id(word).or_else(|| {
        if !spelling.ptb {
            return None;
        }
        let numeric = word.chars().any(|c| c.is_ascii_digit())
            && word.chars().all(|c| c.is_ascii_digit() || ",.-/:%".contains(c));
        vocab.id(&word.to_lowercase()).or_else(|| if numeric { vocab.id("N") } else { None })
    })
}

/// Reads `prompt` (words separated by any whitespace, line breaks included) as the corpus
/// `spelling` describes; an empty prompt starts a new sentence (the model reads `<eos>`).
/// `source` (the flag or file it came from) names it in errors.
pub fn read_prompt(vocab: &Vocab, prompt: &str, spelling: &Spelling, source: &str) -> Result<Prompt> {
    let eos = vocab.id(EOS).with_context(|| format!("the vocabulary has no {EOS}"))?;
    let unk = vocab.id(UNK);
    let note = spelling.undetermined.clone();
    let mut p = Prompt { ids: Vec::new(), shown: Vec::new(), raw: None, unknown: Vec::new(), note };
    for w in prompt.split_whitespace() {
        let spelled = if spelling.lowercase { w.to_lowercase() } else { w.to_string() };
        match (lookup(vocab, &spelled, spelling), unk) {
            (Some(id), _) => p.ids.push(id),
            (None, Some(u)) => {
                p.ids.push(u);
                p.unknown.push(w.to_string());
            }
            (None, None) => {
                let note = p.note.as_ref().map(|n| format!("; {n}")).unwrap_or_default();
                bail!(
                    "{source}: the word '{w}' is not in the checkpoint's vocabulary, which has no {UNK} to read \
                     it as{note}; leave it out or spell it as the training text does"
                )
            }
        }
        p.shown.push(w.to_string());
    }
    if p.ids.is_empty() {
        p.ids.push(eos);
    }
    Ok(p)
}

/// Reads `prompt` with the checkpoint's tokenizer: words as [`read_prompt`] reads them; for a
/// character or BPE model, the raw text, each line break `<eos>` (an empty prompt: `<eos>`
/// alone), a character the vocabulary lacks read as `<unk>` and named in the warning.
pub fn read_prompt_with(tokenizer: &Tokenizer, prompt: &str, spelling: &Spelling, source: &str) -> Result<Prompt> {
    if let Tokenizer::Word(vocab) = tokenizer {
        return read_prompt(vocab, prompt, spelling, source);
    }
    let spelled = if spelling.lowercase { prompt.to_lowercase() } else { prompt.to_string() };
    let mut e = tokenizer.encode(&spelled, Path::new(source), true)?;
    let eos = tokenizer.eos()?;
    // encode ends every line with <eos>; the prompt's last line ends only where it is ended.
    if !spelled.ends_with('\n') && e.ids.last() == Some(&eos) {
        e.ids.pop();
    }
    let pieces: Vec<&str> = crate::text::char::tokens(&spelled).collect();
    let unknown = e.unknown.iter().map(|&i| pieces.get(i).copied().unwrap_or("?").to_string()).collect();
    if e.ids.is_empty() {
        e.ids.push(eos);
    }
    Ok(Prompt { ids: e.ids, shown: Vec::new(), raw: Some(prompt.to_string()), unknown, note: None })
}

/// The text of `--prompt-file`: the file `path`, or standard input for `-`; UTF-8, a leading
/// byte-order mark dropped. Errors name the file (or standard input).
pub fn read_prompt_file(path: &Path) -> Result<String> {
    let stdin = path.as_os_str() == "-";
    let name = if stdin { "standard input".to_string() } else { path.display().to_string() };
    let mut bytes = Vec::new();
    let read = if stdin {
        std::io::stdin().lock().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::read(path).map(|b| bytes = b)
    };
    read.map_err(|e| {
        anyhow::anyhow!("{name}: cannot read the prompt ({e}); give a readable file, or - for standard input")
    })?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{name}: not UTF-8 text (invalid byte at offset {}); save the prompt as UTF-8",
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Prompt words read per call of [`LstmLm::read`]: a long prompt is read in pieces, the
/// state carried from one to the next, so it takes the memory of one piece.
pub const PROMPT_PIECE: usize = 1024;

/// The model's next-word logits (floats, on the CPU) and its state after reading `ids` from
/// a zero state: every word but the last goes through the embedding and LSTM alone
/// ([`LstmLm::read`], [`PROMPT_PIECE`] at a time), the last through the whole model. The
/// same numbers, up to rounding, as one [`LstmLm::forward`] over `ids`, without its logits at
/// every position (V floats per word).
pub fn read_ids(model: &LstmLm, ids: &[i64]) -> Result<(Vec<f32>, State)> {
    let (last, prefix) = ids.split_last().context("the model has no word to read")?;
    let device = model.device();
    tch::no_grad(|| {
        let mut state = model.zero_state(1);
        for piece in prefix.chunks(PROMPT_PIECE) {
            state = model.read(&Tensor::from_slice(piece).view([-1, 1]).to_device(device), &state);
        }
        let f = model.forward(&Tensor::from_slice(&[*last]).view([1, 1]).to_device(device), &state, false);
        Ok((last_logits(&f.logits)?, f.state))
    })
}

/// The distribution the next word is drawn from, as (word id, probability) pairs summing to
/// 1: softmax(logits / temperature) over every word but `banned`, cut to the `top_k`
/// likeliest (ties: the lower id first) and renormalised. Temperature 0: the likeliest word.
pub fn next_word_distribution(
    logits: &[f32],
    temperature: f64,
    top_k: Option<usize>,
    banned: Option<i64>,
) -> Vec<(i64, f64)> {
    let mut cand: Vec<(i64, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as i64, l as f64))
        .filter(|&(i, l)| Some(i) != banned && !l.is_nan())
        .collect();
    let by_score = |a: &(i64, f64), b: &(i64, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if temperature == 0.0 || cand.len() <= 1 {
        return cand.into_iter().min_by(by_score).map(|(i, _)| vec![(i, 1.0)]).unwrap_or_default();
    }
    if let Some(k) = top_k.filter(|&k| k < cand.len()) {
        cand.select_nth_unstable_by(k - 1, by_score);
        cand.truncate(k);
        cand.sort_by(by_score);
    }
    let max = cand.iter().map(|&(_, l)| l).fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for (_, l) in cand.iter_mut() {
        *l = ((*l - max) / temperature).exp();
        total += *l;
    }
    for (_, p) in cand.iter_mut() {
        *p /= total;
    }
    cand
}

/// One draw from `dist` (as given by [`next_word_distribution`]).
pub fn draw(dist: &[(i64, f64)], rng: &mut impl Rng) -> i64 {
    let u: f64 = rng.gen();
    let mut acc = 0.0;
    for &(id, p) in dist {
        acc += p;
        if u < acc {
            return id;
        }
    }
    dist.last().map_or(0, |&(id, _)| id)
}

/// The generator of sample `s`: a SplitMix64 mix of (seed, s).
fn sample_rng(seed: u64, s: usize) -> ChaCha8Rng {
    let mut z = seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// Logits of the last position of `f_logits` (T, 1, V), on the CPU, as floats.
fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    let last = logits.get(-1).get(0).to_kind(Kind::Float).to_device(Device::Cpu);
    Vec::<f32>::try_from(&last).context("reading the model's output")
}

/// Writes `opts.samples` samples to `out`, each the prompt and then the generated text,
/// separated by a blank line; `<eos>` becomes a line break (none is written at a sample's
/// end). Each token is flushed as it is drawn (a BPE piece that ends inside a character,
/// with the piece that completes it).
pub fn generate(
    model: &LstmLm,
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    opts: &GenerateOptions,
    out: &mut impl Write,
) -> Result<()> {
    opts.validate()?;
    let eos = tokenizer.eos()?;
    let banned = if opts.allow_unk { None } else { tokenizer.unk() };
    let device = model.device();
    let (prompt_logits, prompt_state) = read_ids(model, &prompt.ids)?;
    for s in 0..opts.samples {
        if s > 0 {
            out.write_all(b"\n\n")?;
        }
        let line_start = match &prompt.raw {
            Some(raw) => {
                out.write_all(raw.as_bytes())?;
                raw.is_empty() || raw.ends_with('\n')
            }
            None => {
                out.write_all(prompt.shown.join(" ").as_bytes())?;
                prompt.shown.is_empty()
            }
        };
        out.flush()?;
        let mut rng = sample_rng(opts.seed, s);
        let mut logits = prompt_logits.clone();
        let mut state: State = prompt_state.shallow_clone();
        let mut decoder = tokenizer.decoder(line_start);
        let mut newlines = 0;
        let mut write = |text: String, newlines: &mut usize| -> Result<()> {
            if !text.is_empty() {
                write!(out, "{}{text}", "\n".repeat(*newlines))?;
                out.flush()?;
                *newlines = 0;
            }
            Ok(())
        };
        for _ in 0..opts.words {
            let next = draw(&next_word_distribution(&logits, opts.temperature, opts.top_k, banned), &mut rng);
            if next == eos {
                write(decoder.line_end(), &mut newlines)?;
                if opts.until_eos {
                    break;
                }
                newlines += 1;
            } else {
                write(decoder.piece(next), &mut newlines)?;
            }
            let f = tch::no_grad(|| {
                model.forward(&Tensor::from_slice(&[next]).view([1, 1]).to_device(device), &state, false)
            });
            logits = last_logits(&f.logits)?;
            state = f.state;
        }
        write(decoder.finish(), &mut newlines)?;
    }
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(unk: bool) -> Vocab {
        let mut words = vec!["first", "First", "N", "said", EOS];
        if unk {
            words.push(UNK);
        }
        Vocab::from_words(words.into_iter().map(String::from).collect()).unwrap()
    }

    fn ids_of(v: &Vocab, words: &[&str]) -> Vec<i64> {
        words.iter().map(|w| v.id(w).unwrap()).collect()
    }

    #[test]
    fn outside_ptb_a_prompt_word_is_read_as_written_or_as_unk_with_a_warning() {
        let v = vocab(true);
        let p = read_prompt(&v, "FIRST said 1987 First", &Spelling::default(), "--prompt").unwrap();
        assert_eq!(p.ids(), ids_of(&v, &[UNK, "said", UNK, "First"]));
        assert_eq!(p.warning().unwrap(), "warning: not in the vocabulary, read as <unk>: 'FIRST', '1987'");
    }

    #[test]
    fn on_ptb_a_missing_word_is_found_lower_cased_and_a_number_as_n() {
        let v = vocab(true);
        let ptb = Spelling { ptb: true, ..Spelling::default() };
        let p = read_prompt(&v, "FIRST said 1,987.5 First", &ptb, "--prompt").unwrap();
        assert_eq!(p.ids(), ids_of(&v, &["first", "said", "N", "First"]));
        assert_eq!(p.warning(), None);
    }

    #[test]
    fn a_lower_cased_corpus_lower_cases_the_prompt() {
        let v = vocab(true);
        let lower = Spelling { lowercase: true, ..Spelling::default() };
        let p = read_prompt(&v, "FIRST First SAID 1987", &lower, "--prompt").unwrap();
        assert_eq!(p.ids(), ids_of(&v, &["first", "first", "said", UNK]));
        // Shown as written.
        assert_eq!(p.shown, ["FIRST", "First", "SAID", "1987"]);
    }

    #[test]
    fn the_warning_quotes_each_word_and_says_when_the_corpus_could_not_be_told() {
        let v = vocab(true);
        let p = read_prompt(&v, "Xyzzy, frobnicate\nsaid", &Spelling::default(), "--prompt").unwrap();
        assert_eq!(p.warning().unwrap(), "warning: not in the vocabulary, read as <unk>: 'Xyzzy,', 'frobnicate'");
        let unsure = Spelling::of(&DataConfig { dir: Some("/nonexistent/ptb".into()), ..DataConfig::default() });
        assert!(!unsure.ptb);
        let p = read_prompt(&v, "Said", &unsure, "--prompt").unwrap();
        let w = p.warning().unwrap();
        assert!(w.starts_with("warning: not in the vocabulary, read as <unk>: 'Said'; the training corpus at"), "{w}");
        assert!(w.contains("/nonexistent/ptb") && !w.contains('\n'), "{w}");
    }

    #[test]
    fn a_word_that_cannot_be_read_is_an_error_naming_it_and_its_source() {
        let err = read_prompt(&vocab(false), "said FIRST", &Spelling::default(), "prompt.txt").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("prompt.txt: the word 'FIRST' is not in the checkpoint's vocabulary"), "{msg}");
        assert!(msg.contains("which has no <unk>") && !msg.contains('\n'), "{msg}");
    }

    #[test]
    fn only_a_directory_of_ptb_files_has_ptbs_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let (ptb, plain) = (dir.path().join("ptb"), dir.path().join("plain"));
        for (d, name) in [(&ptb, "ptb.train.txt"), (&plain, "train.txt")] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(name), "a b\n").unwrap();
        }
        let of = |data: DataConfig| Spelling::of(&data);
        assert_eq!(
            of(DataConfig { dir: Some(ptb.clone()), ..DataConfig::default() }),
            Spelling { ptb: true, ..Spelling::default() }
        );
        assert_eq!(of(DataConfig { dir: Some(plain), ..DataConfig::default() }), Spelling::default());
        // Three files named like PTB's are not a PTB directory (as for the corpus's own checks).
        let t = ptb.join("ptb.train.txt");
        let files =
            of(DataConfig { train: Some(t.clone()), valid: Some(t.clone()), test: Some(t), ..DataConfig::default() });
        assert_eq!(files, Spelling::default());
        let single = of(DataConfig { file: Some("any.txt".into()), lowercase: true, ..DataConfig::default() });
        assert_eq!(single, Spelling { lowercase: true, ..Spelling::default() });
    }

    #[test]
    fn the_distribution_is_the_tempered_softmax_over_allowed_words() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let d = next_word_distribution(&logits, 0.5, None, Some(3));
        assert_eq!(d.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1, 2]);
        let z: f64 = [2.0f64, 4.0, 6.0].iter().map(|x| x.exp()).sum();
        for (id, p) in d {
            assert!((p - (2.0 * logits[id as usize] as f64).exp() / z).abs() < 1e-12);
        }
    }

    #[test]
    fn top_k_keeps_the_likeliest_and_renormalises() {
        let d = next_word_distribution(&[0.0, 5.0, 1.0, 5.0, 4.0], 1.0, Some(2), None);
        assert_eq!(d.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 3]);
        assert!((d[0].1 - 0.5).abs() < 1e-12 && (d[1].1 - 0.5).abs() < 1e-12);
        let greedy = next_word_distribution(&[0.0, 5.0, 1.0, 5.0], 0.0, None, Some(1));
        assert_eq!(greedy, [(3, 1.0)]);
    }

    #[test]
    fn extreme_temperatures_stay_distributions() {
        let logits = [100.0f32, -100.0, 0.0];
        for t in [TEMPERATURE_RANGE.0, TEMPERATURE_RANGE.1] {
            let d = next_word_distribution(&logits, t, None, None);
            let total: f64 = d.iter().map(|p| p.1).sum();
            assert!((total - 1.0).abs() < 1e-12 && d.iter().all(|p| p.1.is_finite()), "{t}: {d:?}");
        }
    }

    #[test]
    fn draws_follow_the_distribution() {
        let d = [(7, 0.2), (8, 0.5), (9, 0.3)];
        let mut rng = sample_rng(1, 0);
        let mut counts = [0usize; 3];
        let n = 100_000;
        for _ in 0..n {
            counts[(draw(&d, &mut rng) - 7) as usize] += 1;
        }
        for (c, (_, p)) in counts.iter().zip(d) {
            let z = (*c as f64 - n as f64 * p) / (n as f64 * p * (1.0 - p)).sqrt();
            assert!(z.abs() < 5.0, "{counts:?}");
        }
    }
}
