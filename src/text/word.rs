//! The word tokenizer: whitespace-separated words, `<eos>` at every line end, ids from a
//! [`Vocab`] (word <-> id). A vocabulary is also how every tokenizer lists its tokens (the
//! checkpoint's `vocab`): single characters for the character tokenizer, byte-level pieces
//! for BPE.

use super::{Encoded, EOS, UNK};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Word <-> id mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    words: Vec<String>,
    ids: HashMap<String, i64>,
}

impl Vocab {
    /// Every word, ids in order of first appearance.
    pub fn build<'a>(words: impl IntoIterator<Item = &'a str>) -> Vocab {
        let mut v = Vocab { words: Vec::new(), ids: HashMap::new() };
        for w in words {
            v.add(w);
        }
        v
    }

    /// Words seen at least `min_count` times, at most `max_vocab` of them (the most frequent;
    /// ties: the first seen), ids in order of first appearance. `<eos>` is always kept; when a
    /// word is left out, or `with_unk`, `<unk>` is in the vocabulary (and counts toward
    /// `max_vocab`).
    pub fn build_capped<'a>(
        words: impl IntoIterator<Item = &'a str>,
        max_vocab: Option<usize>,
        min_count: usize,
        with_unk: bool,
    ) -> Vocab {
        let all = Vocab::build_counted(words);
        let (order, mut counts) = (&all.0.words, all.1);
        // <eos> always stays, and so does a literal <unk> of the text.
        for w in [EOS, UNK] {
            if let Some(id) = all.0.id(w) {
                counts[id as usize] = usize::MAX;
            }
        }
        let mut keep: Vec<usize> = (0..order.len()).filter(|&i| counts[i] >= min_count).collect();
        let need_unk = all.0.id(UNK).is_none()
            && (with_unk || keep.len() < order.len() || max_vocab.is_some_and(|m| keep.len() > m));
        if let Some(max) = max_vocab {
            let room = if need_unk { max.saturating_sub(1) } else { max };
            if keep.len() > room {
                keep.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
                keep.truncate(room);
                keep.sort_unstable();
            }
        }
        let mut v = Vocab { words: Vec::new(), ids: HashMap::new() };
        for &i in &keep {
            v.add(&order[i]);
        }
        if need_unk {
            v.add(UNK);
        }
        v
    }

    pub(crate) fn build_counted<'a>(words: impl IntoIterator<Item = &'a str>) -> (Vocab, Vec<usize>) {
        let mut v = Vocab { words: Vec::new(), ids: HashMap::new() };
        let mut counts = Vec::new();
        for w in words {
            let id = v.add(w) as usize;
            if id == counts.len() {
                counts.push(0);
            }
            counts[id] += 1;
        }
        (v, counts)
    }

    pub(crate) fn add(&mut self, w: &str) -> i64 {
        if let Some(&id) = self.ids.get(w) {
            return id;
        }
        let id = self.words.len() as i64;
        self.ids.insert(w.to_string(), id);
        self.words.push(w.to_string());
        id
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
        self.encode_counted(text, source, unk).map(|(ids, _)| ids)
    }

    /// [`Vocab::encode`], also giving how many words were read as `<unk>`.
    pub fn encode_counted(&self, text: &str, source: &Path, unk: bool) -> Result<(Vec<i64>, usize)> {
        self.encode_marked(text, source, unk).map(|(ids, replaced)| (ids, replaced.len()))
    }

    /// [`Vocab::encode`], also giving the positions (in the ids) of the words read as `<unk>`.
    pub fn encode_marked(&self, text: &str, source: &Path, unk: bool) -> Result<(Vec<i64>, Vec<usize>)> {
        self.encode_words(text, source, unk).map(|e| (e.ids, e.unknown))
    }

    /// [`Vocab::encode`] with each token's characters of the text as PTB's files hold it
    /// (words joined by single spaces, one line end each): a line's first word counts its
    /// characters, every other word one more (the space before it), `<eos>` one.
    pub fn encode_words(&self, text: &str, source: &Path, unk: bool) -> Result<Encoded> {
        let unk_id = self.id(UNK);
        let eos = self.id(EOS).with_context(|| format!("the vocabulary has no {EOS}"))?;
        let mut e = Encoded::with_capacity(text.len() / 5);
        for (n, line) in text.lines().enumerate() {
            for (k, w) in line.split_whitespace().enumerate() {
                let id = match (self.id(w), unk_id) {
                    (Some(id), _) => id,
                    (None, Some(u)) if unk => {
                        e.unknown.push(e.ids.len());
                        u
                    }
                    (None, None) if unk => bail!(
                        "{} line {}: word '{w}' is not in the training vocabulary, which has no {UNK} to read it as",
                        source.display(),
                        n + 1
                    ),
                    _ => bail!("{} line {}: word '{w}' is not in the training vocabulary", source.display(), n + 1),
                };
                e.push(id, w.chars().count() + usize::from(k > 0));
            }
            e.push(eos, 1);
        }
        Ok(e)
    }
}

/// Every token of `text`, with `<eos>` after each line.
pub fn tokens(text: &str) -> impl Iterator<Item = &str> {
    text.lines().flat_map(|l| l.split_whitespace().chain(std::iter::once(EOS)))
}
