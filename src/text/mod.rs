//! The one seam between text and token ids: a [`Tokenizer`] encodes text (lines, `<eos>` at
//! every line end), decodes ids back to text, lists its tokens, says which are `<eos>` and
//! `<unk>`, and is saved with and loaded from a checkpoint. Corpus reading
//! ([`crate::data`]), `eval` ([`crate::eval`], [`crate::dynamic`]) and `generate`
//! ([`crate::generate`]) all go through it; nothing else splits or joins text.
//!
//! * [`word`]: whitespace-separated words (`data.tokenizer = "word"`, the default);
//! * [`char`]: every Unicode character of a line, the space too (`"char"`);
//! * [`bpe`]: byte-level BPE learnt on the training split with HuggingFace `tokenizers`
//!   (`"bpe"`), saved beside the weights as the standard `tokenizer.json`.
//!
//! Every encoding also counts the characters of the text each token covers ([`Encoded`]),
//! one per line end, so bits per character can be told for any tokenizer: for words, of the
//! text as PTB's files hold it (words joined by single spaces).

pub mod bpe;
pub mod char;
pub mod word;

use crate::config::TokenizerKind;
use anyhow::{bail, Context, Result};
use std::path::Path;
pub use word::Vocab;

pub const EOS: &str = "<eos>";
pub const UNK: &str = "<unk>";

/// A text as token ids, with what each token covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    /// Characters of the text each token covers (aligned with `ids`; `<eos>`: 1).
    pub chars: Vec<u32>,
    /// Positions (in `ids`) of the tokens read as `<unk>`.
    pub unknown: Vec<usize>,
}

impl Encoded {
    pub fn with_capacity(n: usize) -> Encoded {
        Encoded { ids: Vec::with_capacity(n), chars: Vec::with_capacity(n), unknown: Vec::new() }
    }

    pub fn push(&mut self, id: i64, chars: usize) {
        self.ids.push(id);
        self.chars.push(chars as u32);
    }

    /// The first `n` tokens only.
    pub fn truncate(&mut self, n: usize) {
        self.ids.truncate(n);
        self.chars.truncate(n);
        self.unknown.retain(|&i| i < n);
    }
}

/// Turns text into token ids and back (see the module's documentation).
#[derive(Debug, Clone)]
pub enum Tokenizer {
    Word(Vocab),
    Char(Vocab),
    Bpe(Box<bpe::Bpe>),
}

/// The name of the file a BPE checkpoint keeps its tokenizer in.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

impl Tokenizer {
    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Word(_) => TokenizerKind::Word,
            Tokenizer::Char(_) => TokenizerKind::Char,
            Tokenizer::Bpe(_) => TokenizerKind::Bpe,
        }
    }

    /// Every token, in id order (what a checkpoint's `vocab` lists).
    pub fn vocab(&self) -> &Vocab {
        match self {
            Tokenizer::Word(v) | Tokenizer::Char(v) => v,
            Tokenizer::Bpe(b) => b.vocab(),
        }
    }

    pub fn len(&self) -> usize {
        self.vocab().len()
    }

    pub fn is_empty(&self) -> bool {
        self.vocab().is_empty()
    }

    pub fn eos(&self) -> Result<i64> {
        self.vocab().id(EOS).with_context(|| format!("the vocabulary has no {EOS}"))
    }

    /// `<unk>`'s id, where the vocabulary has one (BPE has none: it reads every text).
    pub fn unk(&self) -> Option<i64> {
        match self {
            Tokenizer::Bpe(_) => None,
            _ => self.vocab().id(UNK),
        }
    }

    /// What one token is called in messages: "word", "character" or "token".
    pub fn unit(&self) -> &'static str {
        match self {
            Tokenizer::Word(_) => "word",
            Tokenizer::Char(_) => "character",
            Tokenizer::Bpe(_) => "token",
        }
    }

    /// Encodes a text (lines; `<eos>` after each). An unknown word or character is an error
    /// naming `source` and the line, unless `unk` is true, when it becomes `<unk>`.
    pub fn encode(&self, text: &str, source: &Path, unk: bool) -> Result<Encoded> {
        match self {
            Tokenizer::Word(v) => v.encode_words(text, source, unk),
            Tokenizer::Char(v) => char::encode(v, text, source, unk),
            Tokenizer::Bpe(b) => b.encode(text, source),
        }
    }

    /// The files a checkpoint keeps the tokenizer in besides its `vocab` (name, bytes): BPE's
    /// `tokenizer.json`; none for words and characters, which the vocabulary describes whole.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        match self {
            Tokenizer::Bpe(b) => vec![(TOKENIZER_FILE, b.json().as_bytes().to_vec())],
            _ => Vec::new(),
        }
    }

    /// The tokenizer a checkpoint in `dir` was trained with: `kind` from its config, `words`
    /// its vocabulary; a BPE one is read from `dir/tokenizer.json`, which must list exactly
    /// those tokens.
    pub fn load(kind: TokenizerKind, words: Vec<String>, dir: &Path) -> Result<Tokenizer> {
        let meta = dir.join(crate::checkpoint::META);
        let vocab = Vocab::from_words(words).with_context(|| meta.display().to_string())?;
        match kind {
            TokenizerKind::Word => Ok(Tokenizer::Word(vocab)),
            TokenizerKind::Char => {
                if let Some(t) = vocab.words().iter().find(|w| *w != EOS && *w != UNK && w.chars().count() != 1) {
                    bail!(
                        "{}: data.tokenizer is \"char\" but the vocabulary holds '{t}', not one character; the \
                         checkpoint is damaged: use another",
                        meta.display()
                    );
                }
                Ok(Tokenizer::Char(vocab))
            }
            TokenizerKind::Bpe => {
                let path = dir.join(TOKENIZER_FILE);
                let json = match std::fs::read_to_string(&path) {
                    Ok(j) => j,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                        "{}: file is missing; a BPE checkpoint keeps its tokenizer beside its weights: copy the \
                         whole checkpoint directory",
                        path.display()
                    ),
                    Err(e) => bail!("{}: cannot read ({})", path.display(), crate::fsutil::io_words(&e)),
                };
                let b = bpe::Bpe::from_json(json, &path)?;
                if b.vocab() != &vocab {
                    bail!(
                        "{}: its tokens are not the vocabulary of {} ({} and {} tokens); the checkpoint's files do \
                         not belong together: use a whole checkpoint",
                        path.display(),
                        meta.display(),
                        b.vocab().len(),
                        vocab.len()
                    );
                }
                Ok(Tokenizer::Bpe(Box::new(b)))
            }
        }
    }

    /// A decoder for generated ids, starting at the beginning of a line or not.
    pub fn decoder(&self, line_start: bool) -> Decoder<'_> {
        Decoder { tokenizer: self, line_start, pending: Vec::new() }
    }
}

/// Turns generated ids into text, piece by piece: words separated by spaces (none at a
/// line's start), characters and BPE pieces as they are (a character split between BPE
/// tokens waits for its last byte). `<eos>` is the caller's: a line end.
pub struct Decoder<'a> {
    tokenizer: &'a Tokenizer,
    line_start: bool,
    /// Bytes of a character not yet whole (BPE).
    pending: Vec<u8>,
}

impl Decoder<'_> {
    /// The text of token `id` (not `<eos>`), possibly empty while a character is incomplete.
    pub fn piece(&mut self, id: i64) -> String {
        let out = match self.tokenizer {
            Tokenizer::Word(v) => {
                let sep = if self.line_start { "" } else { " " };
                format!("{sep}{}", v.word(id))
            }
            Tokenizer::Char(v) => v.word(id).to_string(),
            Tokenizer::Bpe(b) => {
                self.pending.extend_from_slice(b.bytes_of(id));
                take_whole_chars(&mut self.pending)
            }
        };
        self.line_start = false;
        out
    }

    /// A line ends (`<eos>`): what is left of an incomplete character (as U+FFFD).
    pub fn line_end(&mut self) -> String {
        self.line_start = true;
        self.finish()
    }

    /// What is left of an incomplete character, as U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// The longest prefix of `bytes` that holds only whole characters (invalid bytes as U+FFFD),
/// removed from `bytes`; an incomplete character at the end stays.
fn take_whole_chars(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                bytes.clear();
                return out;
            }
            Err(e) => {
                let good = e.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[..good]).expect("valid up to here"));
                match e.error_len() {
                    // An incomplete character at the end: keep it for the next piece.
                    None => {
                        bytes.drain(..good);
                        return out;
                    }
                    Some(bad) => {
                        out.push('\u{fffd}');
                        bytes.drain(..good + bad);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_between_pieces_waits_for_its_last_byte() {
        let mut b = "é€".as_bytes()[..3].to_vec();
        assert_eq!(take_whole_chars(&mut b), "é");
        assert_eq!(b.len(), 1);
        b.extend_from_slice(&"€".as_bytes()[1..]);
        assert_eq!(take_whole_chars(&mut b), "€");
        assert!(b.is_empty());
        let mut bad = vec![b'a', 0xff, b'b'];
        assert_eq!(take_whole_chars(&mut bad), "a\u{fffd}b");
    }

    #[test]
    fn word_characters_are_the_text_with_words_joined_by_single_spaces() {
        let v = Vocab::build(word::tokens("the cat\n"));
        let e = Tokenizer::Word(v).encode("  the   cat \n\nthe\n", Path::new("x"), false).unwrap();
        // "the cat\n" is 8 characters, "\n" 1, "the\n" 4.
        assert_eq!(e.chars, [3, 4, 1, 1, 3, 1]);
        assert_eq!(e.chars.iter().sum::<u32>(), 13);
    }
}
