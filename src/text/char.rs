//! The character tokenizer (`data.tokenizer = "char"`): every Unicode character of a line is
//! a token, the space too, and `<eos>` ends each line. The vocabulary comes from the training
//! split (in order of first appearance; `data.max_vocab` and `data.min_count` cap it as they
//! cap words) and always holds `<unk>`, which a character the training split never showed is
//! read as.

use super::{Encoded, Vocab, EOS, UNK};
use anyhow::{bail, Result};
use std::path::Path;

/// Every character of `text` (each a slice of it), with `<eos>` after each line.
pub fn tokens(text: &str) -> impl Iterator<Item = &str> {
    text.lines().flat_map(|l| chars_of(l).chain(std::iter::once(EOS)))
}

/// The characters of one line, each a slice of it.
fn chars_of(line: &str) -> impl Iterator<Item = &str> {
    line.char_indices().map(move |(i, c)| &line[i..i + c.len_utf8()])
}

/// The vocabulary of a training split: its characters and `<eos>`, capped as words are
/// (`max_vocab`, `min_count`), and `<unk>`.
pub fn vocabulary(train: &str, max_vocab: Option<usize>, min_count: usize) -> Vocab {
    Vocab::build_capped(tokens(train), max_vocab, min_count, true)
}

/// Encodes `text` with `vocab` (see [`super::Tokenizer::encode`]); every token covers one
/// character.
pub fn encode(vocab: &Vocab, text: &str, source: &Path, unk: bool) -> Result<Encoded> {
    let eos = vocab.id(EOS).ok_or_else(|| anyhow::anyhow!("the vocabulary has no {EOS}"))?;
    let unk_id = vocab.id(UNK);
    let mut e = Encoded::with_capacity(text.len() + 1);
    for (n, line) in text.lines().enumerate() {
        for c in chars_of(line) {
            let id = match (vocab.id(c), unk_id) {
                (Some(id), _) => id,
                (None, Some(u)) if unk => {
                    e.unknown.push(e.ids.len());
                    u
                }
                _ => bail!(
                    "{} line {}: the character {c:?} is not in the training vocabulary; read it as {UNK} \
                     (eval --allow-unk) or leave it out",
                    source.display(),
                    n + 1
                ),
            };
            e.push(id, 1);
        }
        e.push(eos, 1);
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_character_is_a_token_and_unseen_ones_are_unk() {
        let v = vocabulary("ab a\n", None, 1);
        assert_eq!(v.words(), ["a", "b", " ", EOS, UNK]);
        let e = encode(&v, "a é\nb\n", Path::new("x"), true).unwrap();
        assert_eq!(e.ids, [0, 2, 4, 3, 1, 3]);
        assert_eq!(e.unknown, [2]);
        assert!(e.chars.iter().all(|&c| c == 1));
        let err = encode(&v, "a\nzz\n", Path::new("v.txt"), false).unwrap_err().to_string();
        assert!(err.starts_with("v.txt line 2: the character \"z\" is not in the training vocabulary"), "{err}");
    }
}
