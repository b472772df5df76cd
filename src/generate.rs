//! Text generation: the stateful model reads the prompt, then samples one word at a time,
//! feeding each back in (the book's `RnnlmGen.generate`, with temperature and top-k).
//!
//! The model reads the prompt without its decoder ([`LstmLm::read`], a piece at a time), so
//! a prompt of any length costs the memory of one piece; only its last word is scored.
//!
//! The next word is drawn from [`next_word_distribution`]: softmax(logits / T) over the
//! allowed words (all but `<unk>` unless allowed), restricted to the k likeliest with top-k
//! and renormalised; computed in f64 on a copy, so the model's logits are never changed and
//! every sample sees the same prompt distribution. Draws come from a ChaCha8 generator
//! seeded per sample, so `--seed` gives the same text everywhere. Words are written as they
//! are drawn.

use crate::data::{Vocab, EOS, UNK};
use crate::model::{LstmLm, State};
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
    /// Words to generate per sample (at most, with `until_eos`).
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

/// A prompt read into word ids.
pub struct Prompt {
    ids: Vec<i64>,
    /// The prompt's words as the user wrote them.
    shown: Vec<String>,
    /// Prompt words that are not in the vocabulary (they are read as `<unk>`).
    pub unknown: Vec<String>,
}

/// Maps one prompt word to an id: as written, else lower-cased, else a number becomes PTB's
/// `N`; otherwise `<unk>` (and the word is reported).
pub fn lookup(vocab: &Vocab, word: &str) -> Option<i64> {
    vocab.id(word).or_else(|| vocab.id(&word.to_lowercase())).or_else(|| {
        let numeric = word.chars().any(|c| c.is_ascii_digit())
            && word.chars().all(|c| c.is_ascii_digit() || ",.-/:%".contains(c));
        if numeric {
            vocab.id("N")
        } else {
            None
        }
    })
}

/// Reads `prompt`; an empty prompt starts a new sentence (the model reads `<eos>`).
pub fn read_prompt(vocab: &Vocab, prompt: &str) -> Result<Prompt> {
    let eos = vocab.id(EOS).with_context(|| format!("the vocabulary has no {EOS}"))?;
    let unk = vocab.id(UNK);
    let mut p = Prompt { ids: Vec::new(), shown: Vec::new(), unknown: Vec::new() };
    for w in prompt.split_whitespace() {
        match (lookup(vocab, w), unk) {
            (Some(id), _) => p.ids.push(id),
            (None, Some(u)) => {
                p.ids.push(u);
                p.unknown.push(w.to_string());
            }
            (None, None) => bail!("prompt word '{w}' is not in the vocabulary, which has no {UNK}"),
        }
        p.shown.push(w.to_string());
    }
    if p.ids.is_empty() {
        p.ids.push(eos);
    }
    Ok(p)
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

/// Writes `opts.samples` samples to `out`, each the prompt and then the generated words,
/// separated by a blank line; `<eos>` becomes a line break (none is written at a sample's
/// end). Each word is flushed as it is drawn.
pub fn generate(
    model: &LstmLm,
    vocab: &Vocab,
    prompt: &Prompt,
    opts: &GenerateOptions,
    out: &mut impl Write,
) -> Result<()> {
    opts.validate()?;
    let eos = vocab.id(EOS).with_context(|| format!("the vocabulary has no {EOS}"))?;
    let banned = if opts.allow_unk { None } else { vocab.id(UNK) };
    let device = model.device();
    let (prompt_logits, prompt_state) = read_ids(model, &prompt.ids)?;
    for s in 0..opts.samples {
        if s > 0 {
            out.write_all(b"\n\n")?;
        }
        out.write_all(prompt.shown.join(" ").as_bytes())?;
        out.flush()?;
        let mut rng = sample_rng(opts.seed, s);
        let mut logits = prompt_logits.clone();
        let mut state: State = prompt_state.shallow_clone();
        let mut line_start = prompt.shown.is_empty();
        let mut newlines = 0;
        for _ in 0..opts.words {
            let next = draw(&next_word_distribution(&logits, opts.temperature, opts.top_k, banned), &mut rng);
            if next == eos {
                if opts.until_eos {
                    break;
                }
                newlines += 1;
                line_start = true;
            } else {
                let sep = if line_start { "" } else { " " };
                write!(out, "{}{sep}{}", "\n".repeat(newlines), vocab.word(next))?;
                out.flush()?;
                newlines = 0;
                line_start = false;
            }
            let f = tch::no_grad(|| {
                model.forward(&Tensor::from_slice(&[next]).view([1, 1]).to_device(device), &state, false)
            });
            logits = last_logits(&f.logits)?;
            state = f.state;
        }
    }
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
