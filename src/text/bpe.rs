//! The byte-level BPE tokenizer (`data.tokenizer = "bpe"`): learnt on the training split with
//! HuggingFace `tokenizers` (a BPE model, GPT-2's byte-level pre-tokenizer without an added
//! prefix space, the byte-level decoder, `<eos>` the one special token, id 0), to
//! `data.bpe_vocab` tokens. Its alphabet is all 256 bytes, so every text encodes and nothing
//! is `<unk>`.
//!
//! A line is encoded as the tokenizer encodes it (without special tokens), then `<eos>`
//! follows: so Python's `tokenizers.Tokenizer.from_file("tokenizer.json")`, encoding each
//! line with `add_special_tokens=False` and appending `<eos>`'s id, gives the same ids. A
//! token covers the characters whose first byte it holds.

use super::{Encoded, Vocab, EOS};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
    TokenizerImpl,
};

/// A loaded byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Bpe {
    hf: tokenizers::Tokenizer,
    /// Its `tokenizer.json`, as saved and loaded.
    json: String,
    vocab: Vocab,
    /// The bytes each token stands for (`<eos>`: none).
    bytes: Vec<Vec<u8>>,
    eos: i64,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bpe({} tokens)", self.vocab.len())
    }
}

/// `tokenizers`' errors as one line.
fn words(e: tokenizers::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

impl Bpe {
    /// Learns `vocab_size` tokens (fewer when the text has no more pairs to merge) from the
    /// lines of `train`; `file` (the training split's) names it in errors.
    pub fn train(train: &str, vocab_size: usize, file: &Path) -> Result<Bpe> {
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let mut tk: TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
            TokenizerBuilder::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
                .with_post_processor(None)
                .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
                .build()
                .map_err(|e| anyhow::anyhow!("{}: cannot set up BPE ({})", file.display(), words(e)))?;
        tk.train(&mut trainer, train.lines())
            .map_err(|e| anyhow::anyhow!("{}: BPE training failed ({})", file.display(), words(e)))?;
        let json = tk.to_string(true).map_err(|e| anyhow::anyhow!("BPE tokenizer: cannot serialise ({})", words(e)))?;
        Bpe::from_json(json, file)
    }

    /// A `tokenizer.json` (`source` names it in errors): it must be a byte-level tokenizer
    /// holding `<eos>` and every byte, its ids `0..n` without gaps.
    pub fn from_json(json: String, source: &Path) -> Result<Bpe> {
        let hf: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: not a tokenizers tokenizer.json ({})", source.display(), words(e)))?;
        let map = hf.get_vocab(true);
        let mut tokens = vec![None; map.len()];
        for (t, &id) in &map {
            match tokens.get_mut(id as usize) {
                Some(slot) => *slot = Some(t.clone()),
                None => bail!("{}: token ids are not 0..{} (found {id})", source.display(), map.len()),
            }
        }
        let tokens: Vec<String> = tokens.into_iter().map(|t| t.expect("every id 0..n is taken once")).collect();
        let vocab = Vocab::from_words(tokens).map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
        let Some(eos) = vocab.id(EOS) else { bail!("{}: the tokenizer has no {EOS}", source.display()) };
        let table = byte_of_char();
        let mut bytes = Vec::with_capacity(vocab.len());
        for (id, t) in vocab.words().iter().enumerate() {
            if id as i64 == eos {
                bytes.push(Vec::new());
                continue;
            }
            let b: Option<Vec<u8>> = t.chars().map(|c| table.get(&c).copied()).collect();
            match b {
                Some(b) => bytes.push(b),
                None => bail!("{}: token {t:?} is not byte-level; ptb-lm reads byte-level BPE only", source.display()),
            }
        }
        for b in 0..=255u8 {
            if !bytes.iter().any(|x| x.as_slice() == [b]) {
                bail!("{}: byte {b:#04x} has no token, so not every text can be read", source.display());
            }
        }
        Ok(Bpe { hf, json, vocab, bytes, eos })
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    pub fn json(&self) -> &str {
        &self.json
    }

    /// The bytes token `id` stands for (none for `<eos>`).
    pub fn bytes_of(&self, id: i64) -> &[u8] {
        &self.bytes[id as usize]
    }

    /// Encodes `text`: each line as the tokenizer encodes it, then `<eos>`.
    pub fn encode(&self, text: &str, source: &Path) -> Result<Encoded> {
        let lines: Vec<&str> = text.lines().collect();
        let encodings = self
            .hf
            .encode_batch(lines.clone(), false)
            .map_err(|e| anyhow::anyhow!("{}: BPE encoding failed ({})", source.display(), words(e)))?;
        let mut e = Encoded::with_capacity(text.len() / 3);
        for enc in &encodings {
            for &id in enc.get_ids() {
                let id = id as i64;
                // A literal "<eos>" in a line is the special token, and covers its 5 characters.
                let chars = if id == self.eos {
                    EOS.chars().count()
                } else {
                    self.bytes[id as usize].iter().filter(|&&b| (b as i8) >= -0x40).count()
                };
                e.push(id, chars);
            }
            e.push(self.eos, 1);
        }
        Ok(e)
    }
}

/// GPT-2's byte-level alphabet, read backwards: the byte each printable stand-in character
/// means (`bytes_to_unicode` of GPT-2's encoder.py).
fn byte_of_char() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut n = 0u32;
    let mut map = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("a valid character")
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_is_gpt2s() {
        let t = byte_of_char();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'!'], b'!');
        assert_eq!(
            t.keys().copied().collect::<std::collections::HashSet<_>>(),
            ByteLevel::alphabet().into_iter().collect()
        );
    }

    #[test]
    fn any_text_encodes_without_unk_and_its_tokens_cover_its_characters() {
        let train = "the cat sat on the mat\nthe dog sat on the log\n".repeat(20);
        let b = Bpe::train(&train, 300, Path::new("t.txt")).unwrap();
        assert!(b.vocab().len() > 257 && b.vocab().len() <= 300, "{}", b.vocab().len());
        assert_eq!(b.vocab().id(EOS), Some(0));
        let text = "the cat\nZürich — ünseen ✓ <eos>\n\n";
        let e = b.encode(text, Path::new("x")).unwrap();
        // Characters: each line's, and one per line end.
        let want: usize = text.lines().map(|l| l.chars().count() + 1).sum();
        assert_eq!(e.chars.iter().map(|&c| c as usize).sum::<usize>(), want);
        // Decoded, the ids give the text back.
        let mut bytes = Vec::new();
        for &id in &e.ids {
            if id == 0 {
                bytes.push(b'\n');
            } else {
                bytes.extend_from_slice(b.bytes_of(id));
            }
        }
        assert_eq!(String::from_utf8(bytes).unwrap(), text.replace("<eos>", "\n"));
    }
}
