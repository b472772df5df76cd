//! Text generation: the stateful model reads the prompt, then samples one word at a time,
//! feeding each back in (the book's `RnnlmGen.generate`, with temperature and top-k).

use crate::data::{Vocab, EOS, UNK};
use crate::model::LstmLm;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

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

pub struct Generated {
    /// Each sample: the prompt followed by the generated words; `<eos>` as a line break.
    pub samples: Vec<String>,
    /// Prompt words that are not in the vocabulary (they were read as `<unk>`).
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

pub fn generate(model: &LstmLm, vocab: &Vocab, prompt: &str, opts: &GenerateOptions) -> Result<Generated> {
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        bail!("--temperature must be >= 0 (got {})", opts.temperature);
    }
    if opts.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    if opts.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let eos = vocab.id(EOS).ok_or_else(|| anyhow::anyhow!("the vocabulary has no {EOS}"))?;
    let unk = vocab.id(UNK);
    let mut ids = Vec::new();
    let mut unknown = Vec::new();
    let mut shown = Vec::new();
    for w in prompt.split_whitespace() {
        match lookup(vocab, w) {
            Some(id) => ids.push(id),
            None => match unk {
                Some(u) => {
                    ids.push(u);
                    unknown.push(w.to_string());
                }
                None => bail!("prompt word '{w}' is not in the vocabulary, which has no {UNK}"),
            },
        }
        shown.push(w.to_string());
    }
    if ids.is_empty() {
        ids.push(eos); // an empty prompt starts a new sentence
    }
    let device = model.device();
    let (warm_logits, warm_state) = tch::no_grad(|| {
        let x = Tensor::from_slice(&ids).view([-1, 1]).to_device(device);
        let f = model.forward(&x, &model.zero_state(1), false);
        (f.logits.get(-1).get(0), f.state)
    });
    let mut samples = Vec::with_capacity(opts.samples);
    for s in 0..opts.samples {
        tch::manual_seed(crate::train::step_seed(opts.seed, 0, s));
        let mut text = shown.join(" ");
        let mut logits = warm_logits.shallow_clone();
        let mut state = warm_state.shallow_clone();
        for _ in 0..opts.words {
            let next = tch::no_grad(|| pick(&logits, opts, if opts.allow_unk { None } else { unk }));
            if next == eos {
                if opts.until_eos {
                    break;
                }
                text.push('\n');
            } else {
                if !(text.is_empty() || text.ends_with('\n')) {
                    text.push(' ');
                }
                text.push_str(vocab.word(next));
            }
            let f = tch::no_grad(|| {
                model.forward(&Tensor::from_slice(&[next]).view([1, 1]).to_device(device), &state, false)
            });
            logits = f.logits.get(0).get(0);
            state = f.state;
        }
        samples.push(text.trim_end().to_string());
    }
    Ok(Generated { samples, unknown })
}

/// Chooses the next word from `logits` (V).
fn pick(logits: &Tensor, opts: &GenerateOptions, banned: Option<i64>) -> i64 {
    let mut l = logits.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    if let Some(b) = banned {
        let _ = l.get(b).fill_(f64::NEG_INFINITY);
    }
    if opts.temperature == 0.0 {
        return l.argmax(0, false).int64_value(&[]);
    }
    l /= opts.temperature;
    let (values, indices) = match opts.top_k {
        Some(k) if (k as i64) < l.size()[0] => l.topk(k as i64, 0, true, true),
        _ => (l.shallow_clone(), Tensor::arange(l.size()[0], (Kind::Int64, tch::Device::Cpu))),
    };
    let probs = values.softmax(0, Kind::Float);
    let choice = probs.multinomial(1, false).int64_value(&[0]);
    indices.int64_value(&[choice])
}
