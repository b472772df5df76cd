//! Tokenizers end to end (CPU): character and BPE models train, report bits per character
//! beside perplexity wherever a figure appears, read and write raw text in `eval --file` and
//! `generate`, and a BPE checkpoint's `tokenizer.json` is the standard one Python's
//! `tokenizers` loads and encodes to the same ids.

mod common;

use common::*;
use ptb_lm::checkpoint::Checkpoint;
use std::f64::consts::LN_2;
use std::path::Path;
use std::process::Command;

/// The first lines of Tiny Shakespeare, about 60 kB, as `text.txt` in the sandbox.
fn sandbox_with_text() -> Sandbox {
    let s = Sandbox::new();
    let all = std::fs::read_to_string(shakespeare_file()).unwrap();
    let mut text = String::new();
    for line in all.lines() {
        if text.len() > 60_000 {
            break;
        }
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(s.path("text.txt"), text).unwrap();
    s
}

/// A one-epoch config for `text.txt` read with `data` lines (the tokenizer), run in `out`.
fn config(s: &Sandbox, out: &str, data: &str) -> String {
    let path = s.path(&format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            "[data]\nfile = \"text.txt\"\nvalid_fraction = 0.1\ntest_fraction = 0.1\n{data}\n\
             [model]\nwordvec_size = 24\nhidden_size = 24\nnum_layers = 1\ntie_weights = true\n\
             [train]\nbatch_size = 10\nbptt = 20\nlr = 2.0\nmax_grad = 0.25\nepochs = 1\nseed = 1\n\
             [run]\nout_dir = \"{out}\"\ndevice = \"cpu\"\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn a_character_models_bits_per_character_are_its_mean_token_loss_over_ln_2() {
    let s = sandbox_with_text();
    let cfg = config(&s, "char", "tokenizer = \"char\"");
    let o = s.run(&["train", "--config", &cfg]);
    assert_success(&o);
    assert!(stdout(&o).contains("valid bpc"), "{}", stdout(&o));

    // Every figure: bpc = ln(ppl) / ln 2, each token being one character.
    for m in metrics(&s.path("char")) {
        for (ppl, bpc) in [("train_ppl", "train_bpc"), ("valid_ppl", "valid_bpc")] {
            let (ppl, bpc) = (m[ppl].as_f64().unwrap(), m[bpc].as_f64().unwrap());
            assert!(close(bpc, ppl.ln() / LN_2, 1e-12), "{m}");
        }
    }
    let summary = json(&s.path("char/summary.json"));
    let (test_ppl, test_bpc) = (summary["test_ppl"].as_f64().unwrap(), summary["test_bpc"].as_f64().unwrap());
    assert!(close(test_bpc, test_ppl.ln() / LN_2, 1e-12), "{summary}");
    assert!(test_bpc > 0.0 && test_bpc < 8.0, "{summary}");
    let best = summary["best_valid_bpc"].as_f64().unwrap();
    assert!(close(best, summary["best_valid_ppl"].as_f64().unwrap().ln() / LN_2, 1e-12), "{summary}");
    let o = s.run(&["eval", "--checkpoint", "char/best", "--split", "test", "--device", "cpu"]);
    assert_success(&o);
    let (ppl, bpc) = (number_after(&stdout(&o), "perplexity: "), number_after(&stdout(&o), "bits per character: "));
    assert!((bpc - ppl.ln() / LN_2).abs() < 2e-4, "{}", stdout(&o));

    // The vocabulary is the training split's characters, with <eos> and <unk>; no other file.
    let ckpt = Checkpoint::load(&s.path("char/best")).unwrap();
    assert!(ckpt.meta.vocab.iter().all(|t| t.chars().count() == 1 || t == "<eos>" || t == "<unk>"));
    assert!(ckpt.meta.vocab.iter().any(|t| t == " ") && ckpt.meta.vocab.iter().any(|t| t == "<unk>"));
    assert!(!s.path("char/best/tokenizer.json").exists());

    // A character training never saw: an error naming the file and line, or <unk> when allowed.
    std::fs::write(s.path("new.txt"), "First Citizen:\nsoft ✓\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "char/best", "--file", "new.txt", "--device", "cpu"]);
    assert_one_line_error(&o, &["new.txt line 2: the character \"✓\" is not in the training vocabulary"]);
    let o = s.run(&["eval", "--checkpoint", "char/best", "--file", "new.txt", "--allow-unk", "--device", "cpu"]);
    assert_success(&o);
    // 20 characters and two line ends, after the <eos> the text is read from (not scored).
    assert!(stdout(&o).contains("(22 tokens") && stdout(&o).contains("1 character read as <unk>"), "{}", stdout(&o));
    let (ppl, bpc) = (number_after(&stdout(&o), "perplexity: "), number_after(&stdout(&o), "bits per character: "));
    assert!((bpc - ppl.ln() / LN_2).abs() < 2e-4, "{}", stdout(&o));

    // Generation reads the prompt as written and writes characters, not words: N tokens are
    // at most N characters (an <eos> at the end is not written), each one the model knows.
    for prompt in ["ROMEO:", "First Citizen:\n"] {
        let o = s.run(&["generate", "--checkpoint", "char/best", "--prompt", prompt, "--tokens", "60", "--seed", "3"]);
        assert_success(&o);
        let out = stdout(&o);
        let generated = out.strip_prefix(prompt).unwrap_or_else(|| panic!("{out:?}")).strip_suffix('\n').unwrap();
        assert!(generated.chars().count() <= 60, "{generated:?}");
        assert!(generated.chars().all(|c| c == '\n' || ckpt.meta.vocab.contains(&c.to_string())), "{generated:?}");
    }
    let o = s.run(&["generate", "--checkpoint", "char/best", "--words", "5"]);
    assert_one_line_error(&o, &["--words: this model reads text as characters", "--tokens N"]);
}

#[test]
fn a_word_models_bits_per_character_count_its_words_joined_by_single_spaces() {
    let s = sandbox_with_text();
    let cfg = config(&s, "word", "");
    assert_success(&s.run(&["train", "--config", &cfg]));
    let m = &metrics(&s.path("word"))[0];
    // Words hold several characters each: fewer bits per character than per word.
    let (ppl, bpc) = (m["valid_ppl"].as_f64().unwrap(), m["valid_bpc"].as_f64().unwrap());
    assert!(bpc > 0.0 && bpc < ppl.ln() / LN_2 / 2.0, "{m}");

    // Scored: First, Citizen:, <eos>, <eos>, First, <eos> (6 tokens) of "First Citizen:\n\nFirst\n"
    // (15 + 1 + 6 = 22 characters), whatever spaces the file has.
    std::fs::write(s.path("hand.txt"), "  First   Citizen: \n\nFirst\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "word/best", "--file", "hand.txt", "--device", "cpu"]);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.contains("(6 tokens"), "{out}");
    let (ppl, bpc) = (number_after(&out, "perplexity: "), number_after(&out, "bits per character: "));
    assert!(close(bpc, ppl.ln() * 6.0 / (22.0 * LN_2), 1e-3), "{out}");
    // --words is --tokens for a word model.
    let words = s.run(&["generate", "--checkpoint", "word/best", "--words", "7", "--seed", "1"]);
    let tokens = s.run(&["generate", "--checkpoint", "word/best", "--tokens", "7", "--seed", "1"]);
    assert_success(&words);
    assert_eq!(stdout(&words), stdout(&tokens));
}

/// Python's ids for `text` with the tokenizer at `json`: each line encoded without special
/// tokens, then `<eos>`. None when the project venv has no `tokenizers` (the test says so).
fn python_ids(json: &Path, text: &Path) -> Option<Vec<i64>> {
    let python = repo().join(".venv/bin/python");
    let probe = Command::new(&python).args(["-c", "import tokenizers"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "skipped the Python comparison: {} cannot import tokenizers (make test's setup, \
             scripts/setup-libtorch.sh, installs it)",
            python.display()
        );
        return None;
    }
    let script = r#"
import json, sys
from tokenizers import Tokenizer
t = Tokenizer.from_file(sys.argv[1])
eos = t.token_to_id("<eos>")
lines = open(sys.argv[2], encoding="utf-8").read().split("\n")
if lines and lines[-1] == "":
    lines.pop()
ids = []
for line in lines:
    ids += t.encode(line, add_special_tokens=False).ids + [eos]
print(json.dumps(ids))
"#;
    let o = Command::new(&python).arg("-c").arg(script).arg(json).arg(text).output().unwrap();
    assert!(o.status.success(), "python failed: {}", stderr(&o));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

#[test]
fn a_bpe_checkpoint_keeps_a_tokenizer_json_that_python_encodes_to_the_same_ids() {
    let s = sandbox_with_text();
    let cfg = config(&s, "bpe", "tokenizer = \"bpe\"\nbpe_vocab = 300");
    // Two epochs, stopped after one and resumed: the resumed run reads with the saved tokenizer.
    let o = s.run(&["train", "--config", &cfg, "--epochs", "2", "--stop-after", "1"]);
    assert_success(&o);
    assert!(s.path("bpe/last/tokenizer.json").is_file() && s.path("bpe/best/tokenizer.json").is_file());
    assert_success(&s.run(&["train", "--resume", "bpe"]));
    let summary = json(&s.path("bpe/summary.json"));
    assert!(summary["test_bpc"].as_f64().unwrap() > 0.0, "{summary}");
    // The run directory, tokenizer.json included, is ptb-lm's own: --overwrite replaces it.
    assert_success(&s.run(&["train", "--config", &cfg, "--overwrite"]));

    let ckpt = Checkpoint::load(&s.path("bpe/best")).unwrap();
    let tokenizer = ckpt.tokenizer().unwrap();
    assert!(tokenizer.len() > 257 && tokenizer.len() <= 300, "{}", tokenizer.len());
    assert_eq!(ckpt.meta.config.model.vocab_size, Some(tokenizer.len() as i64));
    // Any text encodes, nothing is <unk>.
    let text = "First Citizen:\nZürich — ünseen ✓, 1987!\n\n  two  spaces\n";
    std::fs::write(s.path("new.txt"), text).unwrap();
    let ours = tokenizer.encode(text, Path::new("new.txt"), false).unwrap();
    assert!(ours.unknown.is_empty());
    let chars: usize = text.lines().map(|l| l.chars().count() + 1).sum();
    assert_eq!(ours.chars.iter().map(|&c| c as usize).sum::<usize>(), chars);
    if let Some(theirs) = python_ids(&s.path("bpe/best/tokenizer.json"), &s.path("new.txt")) {
        assert_eq!(ours.ids, theirs);
    }
    let o = s.run(&["eval", "--checkpoint", "bpe/best", "--file", "new.txt", "--device", "cpu"]);
    assert_success(&o);
    assert!(!stdout(&o).contains("<unk>"), "{}", stdout(&o));

    // Generation writes decoded text after the prompt as written, whole characters only.
    let prompt = "Zürich ✓ ";
    let o = s.run(&["generate", "--checkpoint", "bpe/best", "--prompt", prompt, "--tokens", "40", "--seed", "2"]);
    assert_success(&o);
    let out = String::from_utf8(o.stdout.clone()).expect("UTF-8");
    assert!(out.starts_with(prompt), "{out:?}");

    // A checkpoint without its tokenizer is an error naming the file.
    std::fs::remove_file(s.path("bpe/last/tokenizer.json")).unwrap();
    let o = s.run(&["eval", "--checkpoint", "bpe/last", "--file", "new.txt", "--device", "cpu"]);
    assert_one_line_error(&o, &["bpe/last/tokenizer.json: file is missing"]);
}
