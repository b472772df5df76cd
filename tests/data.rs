//! The corpus as the book reads it, on the real PTB files, and how bad data is refused.

mod common;

use common::*;
use ptb_lm::data::{Batches, Corpus, EOS};
use std::process::Command;
use tch::Device;

#[test]
fn real_ptb_has_the_books_sizes_and_order() {
    let ptb = Corpus::open(&ptb_dir()).unwrap();
    assert_eq!(ptb.vocab.len(), 10_000);
    assert_eq!(ptb.train.len(), 929_589);
    assert_eq!(ptb.valid.len(), 73_760);
    assert_eq!(ptb.test.len(), 82_430);
    // ch02/show_ptb.py: corpus[:30] is 0..29, then these ids.
    assert_eq!(ptb.train[..30], (0..30).collect::<Vec<i64>>()[..]);
    assert_eq!(&ptb.vocab.words()[..3], ["aer", "banknote", "berlitz"]);
    assert_eq!(ptb.vocab.id("car"), Some(3856));
    assert_eq!(ptb.vocab.id("happy"), Some(4428));
    assert_eq!(ptb.vocab.id("lexus"), Some(7426));
    // <eos> closes every line.
    let lines = std::fs::read_to_string(ptb_dir().join("ptb.valid.txt")).unwrap().lines().count();
    let eos = ptb.vocab.id(EOS).unwrap();
    assert_eq!(ptb.valid.iter().filter(|&&t| t == eos).count(), lines);
    assert_eq!(*ptb.test.last().unwrap(), eos);
}

#[test]
fn training_batches_cover_the_corpus_like_the_book() {
    let ptb = Corpus::open(&ptb_dir()).unwrap();
    let b = Batches::new(&ptb.train, 20, 35, Device::Cpu).unwrap();
    // max_iters = (929589 - 1) // (20 * 35)
    assert_eq!(b.len(), 1327);
    let jump = (929_589 - 1) / 20;
    let (x, y) = b.get(5);
    for i in [0i64, 7, 19] {
        for t in [0i64, 34] {
            let pos = (i * jump + 5 * 35 + t) as usize;
            assert_eq!(x.int64_value(&[t, i]), ptb.train[pos]);
            assert_eq!(y.int64_value(&[t, i]), ptb.train[pos + 1]);
        }
    }
}

#[test]
fn a_capped_vocabulary_reads_the_ptb_words_it_left_out_as_unk() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cap = ["--set", "data.max_vocab=5000", "--set", "model.vocab_size=5000"];
    let mut args = vec!["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"];
    args.extend(cap);
    assert_success(&s.run(&args));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("run/corpus.json")).unwrap()).unwrap();
    assert_eq!(info["vocab_size"].as_u64(), Some(5000));
    let unk = |i: usize| info["unk_replaced"][i].as_u64().unwrap();
    assert!(unk(1) > 0 && unk(2) > 0, "valid and test words the cap left out are <unk>: {info}");
    // eval reads the split by the same rule, and counts the words among the tokens it scores
    // (the config's first 6000 of valid).
    let vocab = ptb_lm::checkpoint::Checkpoint::load(&s.path("run/best")).unwrap().vocab().unwrap();
    let valid = ptb_dir().join("ptb.valid.txt");
    let (_, marked) = vocab.encode_marked(&std::fs::read_to_string(&valid).unwrap(), &valid, true).unwrap();
    assert_eq!(marked.len() as u64, unk(1));
    let scored = marked.iter().filter(|&&i| i < 6000).count();
    assert!(0 < scored && (scored as u64) < unk(1));
    let o = s.run(&["eval", "--checkpoint", "run/best", "--split", "valid", "--device", "cpu"]);
    assert_success(&o);
    assert!(stdout(&o).contains(&format!("; {scored} words read as <unk>")), "{}", stdout(&o));

    // A word never seen in training: an error in PTB's closed vocabulary when uncapped, one
    // more <unk> when capped.
    copy_ptb(&s.path("odd"));
    std::fs::remove_file(s.path("odd/SHA256SUMS")).unwrap();
    let valid = s.path("odd/ptb.valid.txt");
    let mut text = std::fs::read_to_string(&valid).unwrap();
    let line = text.lines().count() + 1;
    text.push_str("qqzzxxyy\n");
    std::fs::write(&valid, text).unwrap();
    let plain = ptb_lm::config::DataConfig { dir: Some(s.path("odd")), ..Default::default() };
    let err = Corpus::load(&plain).err().expect("an unseen word in PTB's valid split").to_string();
    assert!(err.ends_with(&format!("ptb.valid.txt line {line}: word 'qqzzxxyy' is not in the training vocabulary")));
    let capped = ptb_lm::config::DataConfig { max_vocab: Some(5000), ..plain };
    let corpus = Corpus::load(&capped).unwrap();
    assert_eq!(corpus.info.unk_replaced[1] as u64, unk(1) + 1);
}

fn train_args<'a>(cfg: &'a str, data: &'a str) -> Vec<&'a str> {
    vec!["train", "--config", cfg, "--data-dir", data, "--epochs", "1"]
}

#[test]
fn a_missing_file_is_named() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    copy_ptb(&s.path("ptb"));
    std::fs::remove_file(s.path("ptb/ptb.test.txt")).unwrap();
    let o = s.run(&train_args(cfg.to_str().unwrap(), "ptb"));
    assert_one_line_error(&o, &["ptb/ptb.test.txt: file not found", "download_ptb.sh"]);
    assert!(!s.path("run").exists(), "nothing may be created before the data is known good");
}

#[test]
fn a_truncated_file_fails_its_checksum() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    copy_ptb(&s.path("ptb"));
    let train = s.path("ptb/ptb.train.txt");
    let text = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, &text[..text.len() / 2]).unwrap();
    let o = s.run(&train_args(cfg.to_str().unwrap(), "ptb"));
    assert_one_line_error(&o, &["ptb/ptb.train.txt: SHA-256 mismatch", "truncated"]);
}

#[test]
fn without_checksums_a_truncated_train_file_still_fails_on_the_vocabulary() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    copy_ptb(&s.path("ptb"));
    std::fs::remove_file(s.path("ptb/SHA256SUMS")).unwrap();
    let train = s.path("ptb/ptb.train.txt");
    let text = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, &text[..text.len() / 50]).unwrap();
    let o = s.run(&train_args(cfg.to_str().unwrap(), "ptb"));
    // Either an unknown valid word or a short vocabulary: both name the file.
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("ptb/ptb.valid.txt line") || err.contains("ptb/ptb.train.txt gives a vocabulary"), "{err}");
}

#[test]
fn non_utf8_data_is_refused() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    copy_ptb(&s.path("ptb"));
    std::fs::remove_file(s.path("ptb/SHA256SUMS")).unwrap();
    std::fs::write(s.path("ptb/ptb.valid.txt"), b"the \xff\xfe cat\n").unwrap();
    let o = s.run(&train_args(cfg.to_str().unwrap(), "ptb"));
    assert_one_line_error(&o, &["ptb/ptb.valid.txt: not UTF-8"]);
}

fn download(args: &[&str]) -> std::process::Output {
    Command::new(repo().join("scripts/download_ptb.sh")).args(args).output().unwrap()
}

#[test]
fn download_script_copies_verifies_and_is_idempotent() {
    let s = Sandbox::new();
    let dest = s.path("data");
    let src = ptb_dir();
    let o = download(&["--from", src.to_str().unwrap(), "--dest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt", "SHA256SUMS"] {
        assert!(dest.join(f).exists(), "{f} missing");
    }
    // Second run: nothing to do, nothing printed.
    let o = download(&["--from", src.to_str().unwrap(), "--dest", dest.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "");
    assert_eq!(Corpus::open(&dest).unwrap().train.len(), 929_589);
}

#[test]
fn download_script_refuses_a_bad_checksum() {
    let s = Sandbox::new();
    copy_ptb(&s.path("src"));
    let f = s.path("src/ptb.valid.txt");
    let mut text = std::fs::read_to_string(&f).unwrap();
    text.push_str(" extra\n");
    std::fs::write(&f, text).unwrap();
    let dest = s.path("data");
    let o = download(&["--from", s.path("src").to_str().unwrap(), "--dest", dest.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("ptb.valid.txt") && err.contains("SHA-256") && err.contains("refusing"), "{err}");
    assert!(!dest.join("ptb.valid.txt").exists(), "a bad file must not be installed");
    assert!(!dest.join("ptb.valid.txt.partial").exists());
}

#[test]
fn download_script_names_a_missing_source_file() {
    let s = Sandbox::new();
    std::fs::create_dir_all(s.path("empty")).unwrap();
    let o = download(&["--from", s.path("empty").to_str().unwrap(), "--dest", s.path("d").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ptb.train.txt: no such file"), "{}", stderr(&o));
}

#[test]
fn eval_of_one_split_needs_only_that_file_and_the_training_one() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]));
    copy_ptb(&s.path("two"));
    std::fs::remove_file(s.path("two/ptb.test.txt")).unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--split", "valid", "--data-dir", "two", "--device", "cpu"]);
    assert_success(&o);
    // The checkpoint's caps apply, and the output says so.
    assert!(
        stdout(&o).contains("its first 6000 tokens, as data.valid_tokens of the checkpoint's config"),
        "{}",
        stdout(&o)
    );
    let o = s.run(&["eval", "--checkpoint", "run/best", "--split", "test", "--data-dir", "two", "--device", "cpu"]);
    assert_one_line_error(&o, &["two/ptb.test.txt: file not found", "download_ptb.sh"]);
    // A --file that is not there is not a corpus problem.
    let o = s.run(&["eval", "--checkpoint", "run/best", "--file", "nope.txt", "--device", "cpu"]);
    assert_one_line_error(&o, &["nope.txt: file not found"]);
    assert!(!stderr(&o).contains("download"), "{}", stderr(&o));
}
