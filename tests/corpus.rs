//! Corpora that are not PTB: every accepted layout trains, text is read as users mean it, and
//! bad corpora are one-line errors naming the file or key.

mod common;

use common::*;
use std::path::Path;

/// The first `lines` lines of Tiny Shakespeare.
fn shakespeare(lines: usize) -> String {
    let text = std::fs::read_to_string(shakespeare_file()).unwrap();
    text.lines().take(lines).flat_map(|l| [l, "\n"]).collect()
}

/// (train, valid, test) of the first 6000 lines: 4800 / 600 / 600.
fn three_parts() -> [String; 3] {
    let text = shakespeare(6000);
    let lines: Vec<&str> = text.lines().collect();
    let join = |r: std::ops::Range<usize>| lines[r].iter().flat_map(|l| [*l, "\n"]).collect::<String>();
    [join(0..4800), join(4800..5400), join(5400..6000)]
}

/// A tiny config reading the corpus described by `data` (TOML lines of [data]).
fn config(s: &Sandbox, name: &str, data: &str) -> String {
    let text = format!(
        "[data]\n{data}\n\n[model]\nwordvec_size = 24\nhidden_size = 24\nnum_layers = 1\ntie_weights = true\n\n\
         [train]\nbatch_size = 10\nbptt = 20\nlr = 20.0\nmax_grad = 0.25\nepochs = 1\n\n[run]\nout_dir = \"run-{name}\"\ndevice = \"cpu\"\n"
    );
    std::fs::write(s.path(&format!("{name}.toml")), text).unwrap();
    format!("{name}.toml")
}

fn write_dir(dir: &Path, names: [&str; 3], parts: &[String; 3]) {
    std::fs::create_dir_all(dir).unwrap();
    for (n, t) in names.iter().zip(parts) {
        std::fs::write(dir.join(n), t).unwrap();
    }
}

fn corpus_json(s: &Sandbox, run: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(s.path(&format!("{run}/corpus.json"))).unwrap()).unwrap()
}

#[test]
fn a_corpus_that_is_not_ptb_trains_through_each_layout() {
    let s = Sandbox::new();
    let parts = three_parts();
    write_dir(&s.path("plain"), ["train.txt", "valid.txt", "test.txt"], &parts);
    write_dir(&s.path("wiki"), ["wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"], &parts);
    write_dir(&s.path("files"), ["a.txt", "b.txt", "c.txt"], &parts);
    std::fs::write(s.path("one.txt"), shakespeare(6000)).unwrap();
    let layouts = [
        ("plain", "dir = \"plain\"", "dir"),
        ("wiki", "dir = \"wiki\"", "dir"),
        ("files", "train = \"files/a.txt\"\nvalid = \"files/b.txt\"\ntest = \"files/c.txt\"", "files"),
        ("single", "file = \"one.txt\"\nvalid_fraction = 0.1\ntest_fraction = 0.1", "single"),
    ];
    for (name, data, layout) in layouts {
        let cfg = config(&s, name, data);
        let o = s.run(&["train", "--config", &cfg]);
        assert_success(&o);
        let run = format!("run-{name}");
        let info = corpus_json(&s, &run);
        assert!(info["layout"].get(layout).is_some(), "{name}: {info}");
        let vocab = info["vocab_size"].as_u64().unwrap() as f64;
        let ppl = valid_ppls(&s.path(&run))[0];
        assert!(ppl.is_finite() && ppl < vocab / 4.0, "{name}: valid ppl {ppl} with {vocab} words");
        assert!(stdout(&o).contains("corpus "), "{}", stdout(&o));
        // The vocabulary comes from the corpus, and is saved with the checkpoint.
        let ckpt = ptb_lm::checkpoint::Checkpoint::load(&s.path(&format!("{run}/best"))).unwrap();
        assert_eq!(ckpt.meta.vocab.len() as f64, vocab);
        assert_eq!(ckpt.meta.config.model.vocab_size, Some(vocab as i64));
    }
    // The single file: split at line ends, test last; recorded in the run.
    let info = corpus_json(&s, "run-single");
    let [valid_line, test_line] = [info["split_lines"][0].as_u64().unwrap(), info["split_lines"][1].as_u64().unwrap()];
    assert!(4700 < valid_line && valid_line < test_line && test_line < 5500, "{info}");
    // eval and generate work on such a checkpoint unchanged.
    for split in ["test", "valid", "train"] {
        let o = s.run(&["eval", "--checkpoint", "run-single/best", "--split", split, "--device", "cpu"]);
        assert_success(&o);
        assert!(stdout(&o).starts_with(&format!("{split} perplexity: ")), "{}", stdout(&o));
    }
    std::fs::write(s.path("mine.txt"), "First Citizen:\nSpeak, speak.\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "run-single/best", "--file", "mine.txt", "--device", "cpu"]);
    assert_success(&o);
    assert!(stdout(&o).contains("(6 tokens"), "{}", stdout(&o));
    let o = s.run(&["generate", "--checkpoint", "run-single/best", "--prompt", "First Citizen:", "--words", "20"]);
    assert_success(&o);
    assert!(stdout(&o).starts_with("First Citizen:"), "{}", stdout(&o));
}

#[test]
fn text_is_read_as_users_mean_it() {
    let s = Sandbox::new();
    let mut parts = three_parts();
    parts[0].insert(0, '\u{feff}');
    write_dir(&s.path("c"), ["train.txt", "valid.txt", "test.txt"], &parts);
    let cfg = config(&s, "bom", "dir = \"c\"\nmin_count = 2");
    assert_success(&s.run(&["train", "--config", &cfg]));
    let ckpt = ptb_lm::checkpoint::Checkpoint::load(&s.path("run-bom/best")).unwrap();
    assert_eq!(ckpt.meta.vocab[0], "First", "a byte-order mark is not part of the first word");
    assert!(ckpt.meta.vocab.iter().all(|w| !w.contains('\u{feff}')));
    assert!(ckpt.meta.vocab.iter().any(|w| w == "<unk>"), "min_count 2 leaves words out");
    // A file with a BOM is scored from its first word, after <eos>, as in training.
    std::fs::write(s.path("bom.txt"), "\u{feff}First Citizen:\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "run-bom/best", "--file", "bom.txt", "--device", "cpu"]);
    assert_success(&o);
    assert!(stdout(&o).contains("(3 tokens"), "First, Citizen:, <eos>: {}", stdout(&o));
    // --allow-unk says how many words it replaced; a blank line is one <eos>.
    std::fs::write(s.path("unk.txt"), "First zyxwv Citizen: qqqq\n\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "run-bom/best", "--file", "unk.txt", "--device", "cpu", "--allow-unk"]);
    assert_success(&o);
    assert!(stdout(&o).contains("(6 tokens") && stdout(&o).contains("2 words read as <unk>"), "{}", stdout(&o));
    // Lower-casing applies to the corpus and to a scored file alike.
    let cfg = config(&s, "lower", "dir = \"c\"\nlowercase = true");
    assert_success(&s.run(&["train", "--config", &cfg]));
    let ckpt = ptb_lm::checkpoint::Checkpoint::load(&s.path("run-lower/best")).unwrap();
    assert!(ckpt.meta.vocab.iter().all(|w| w.to_lowercase() == *w));
    let o = s.run(&["eval", "--checkpoint", "run-lower/best", "--file", "bom.txt", "--device", "cpu"]);
    assert_success(&o);
}

#[test]
fn a_vocabulary_can_be_capped_and_its_size_is_checked() {
    let s = Sandbox::new();
    write_dir(&s.path("c"), ["train.txt", "valid.txt", "test.txt"], &three_parts());
    let cfg = config(&s, "cap", "dir = \"c\"\nmax_vocab = 500");
    let o = s.run(&["train", "--config", &cfg]);
    assert_success(&o);
    let info = corpus_json(&s, "run-cap");
    assert_eq!(info["vocab_size"].as_u64(), Some(500));
    assert!(info["unk_replaced"][1].as_u64().unwrap() > 0, "valid words outside the vocabulary are <unk>: {info}");
    let o = s.run(&["train", "--config", &cfg, "--overwrite", "--set", "model.vocab_size=400"]);
    assert_one_line_error(&o, &["c/train.txt gives a vocabulary of 500 words, but model.vocab_size is 400"]);
}

#[test]
fn bad_corpora_are_one_line_errors_naming_the_file_or_key() {
    let s = Sandbox::new();
    let parts = three_parts();
    write_dir(
        &s.path("empty"),
        ["train.txt", "valid.txt", "test.txt"],
        &[parts[0].clone(), String::new(), parts[2].clone()],
    );
    write_dir(
        &s.path("blank"),
        ["train.txt", "valid.txt", "test.txt"],
        &[parts[0].clone(), "\n\n\n".into(), parts[2].clone()],
    );
    write_dir(&s.path("odd"), ["a.txt", "b.txt", "c.txt"], &parts);
    write_dir(
        &s.path("short"),
        ["train.txt", "valid.txt", "test.txt"],
        &[parts[0].clone(), parts[1].clone(), "a few words\n".into()],
    );
    std::fs::write(s.path("tiny.txt"), "one line only\n").unwrap();
    std::fs::write(s.path("latin1.txt"), b"caf\xe9 au lait\n").unwrap();
    std::fs::write(s.path("lines.txt"), shakespeare(4000)).unwrap();
    std::os::unix::fs::symlink("loop", s.path("loop")).unwrap();
    // A user's directory named like PTB's files, one of them missing (and no SHA256SUMS).
    write_dir(&s.path("mine"), ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"], &parts);
    std::fs::remove_file(s.path("mine/ptb.valid.txt")).unwrap();
    let cases: [(&str, &[&str]); 14] = [
        ("dir = \"empty\"", &["empty/valid.txt: file is empty"]),
        ("dir = \"blank\"", &["blank/valid.txt: the valid split has no words"]),
        ("dir = \"odd\"", &["odd: no training split here", "data.file"]),
        ("dir = \"nowhere\"", &["nowhere: no such directory"]),
        ("dir = \"short\"", &["short/test.txt (test split, train.eval_batch_size = 10, train.bptt = 20)", "too short"]),
        ("file = \"tiny.txt\"", &["tiny.txt: 1 line is too few to split"]),
        ("file = \"lines.txt\"\ntest_fraction = 1e-9", &["lines.txt: the test split would be empty", "raise data.test_fraction"]),
        ("file = \"loop\"", &["loop: cannot read (", "(os error 40)"]),
        ("dir = \"loop\"", &["loop: cannot read (", "(os error 40)"]),
        (
            "dir = \"mine\"",
            &["mine/ptb.valid.txt: file not found (the corpus directory must hold ptb.train.txt, ptb.valid.txt and ptb.test.txt"],
        ),
        ("file = \"latin1.txt\"", &["latin1.txt: not UTF-8"]),
        ("dir = \"odd\"\nmax_vocab = 2", &["data.max_vocab must be at least 3"]),
        ("file = \"tiny.txt\"\nvalid_fraction = 1.5", &["data.valid_fraction must be in (0, 1)"]),
        ("dir = \"odd\"\nfile = \"tiny.txt\"", &["set one of data.dir, data.file or data.train/valid/test"]),
    ];
    for (i, (data, expect)) in cases.iter().enumerate() {
        let cfg = config(&s, &format!("bad{i}"), data);
        let o = s.run(&["train", "--config", &cfg]);
        assert_one_line_error(&o, expect);
        assert!(!s.path(&format!("run-bad{i}")).exists(), "{data}: a run was started");
        // Only PTB's own directory is told to fetch PTB.
        assert!(!stderr(&o).contains("download_ptb.sh"), "{data}: {}", stderr(&o));
    }
}

#[test]
fn a_vocabulary_too_small_for_a_checkpoint_is_refused_before_the_run_starts() {
    let s = Sandbox::new();
    // Every word below min_count: <eos> and <unk> are all that is left.
    std::fs::write(s.path("words.txt"), shakespeare(4000)).unwrap();
    let cfg = config(&s, "few", "file = \"words.txt\"\nmin_count = 1000000000");
    let o = s.run(&["train", "--config", &cfg]);
    assert_one_line_error(
        &o,
        &["words.txt: data.min_count = 1000000000 leaves no word of the training split", "lower data.min_count"],
    );
    assert!(!s.path("run-few").exists(), "a run was started");
    // A PTB-named directory (closed vocabulary, no <unk> added) of one word type.
    let text = |line: &str| line.repeat(3000);
    let ptb_names = ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"];
    write_dir(&s.path("one"), ptb_names, &[text("the the\n"), text("the\n"), text("the\n")]);
    let cfg = config(&s, "one", "dir = \"one\"");
    let o = s.run(&["train", "--config", &cfg]);
    assert_one_line_error(&o, &["one/ptb.train.txt: the training split has only 1 distinct word ('the')"]);
    assert!(!s.path("run-one").exists(), "a run was started");
    // Two word types and <eos>, the fewest there may be: the run trains, and its checkpoint loads.
    write_dir(&s.path("two"), ptb_names, &[text("the cat\n"), text("cat the\n"), text("the cat\n")]);
    let cfg = config(&s, "two", "dir = \"two\"");
    assert_success(&s.run(&["train", "--config", &cfg]));
    assert_eq!(corpus_json(&s, "run-two")["vocab_size"].as_u64(), Some(3));
    assert_success(&s.run(&["eval", "--checkpoint", "run-two/best", "--device", "cpu"]));
    assert_success(&s.run(&["generate", "--checkpoint", "run-two/best", "--words", "3"]));
}

/// nanoGPT's cut (`shakespeare_char/prepare.py`): `int(n * f)`, f64 as Python's float.
fn nanogpt_cut(n: usize, f: f64) -> usize {
    (n as f64 * f).floor() as usize
}

#[test]
fn a_character_split_cuts_where_nanogpt_cuts_and_its_parts_make_the_file() {
    use ptb_lm::data::split_chars;
    // Generated text with multi-byte characters and lines of every length, cut at every length.
    let text: String = (0..400).map(|i| format!("{}é{}\n", "ab".repeat(i % 7), "€".repeat(i % 3))).collect();
    let chars: Vec<char> = text.chars().collect();
    for n in [7, 10, 11, 99, 101, 997, chars.len()] {
        let t: String = chars[..n].iter().collect();
        for split in [vec![0.9, 0.1], vec![0.8, 0.1, 0.1], vec![0.5, 0.5]] {
            let (parts, cuts) = split_chars(&t, &split, Path::new("g.txt")).unwrap();
            assert_eq!(parts.concat(), t, "{n} {split:?}: the parts are the text, in order");
            assert_eq!(parts.len(), split.len());
            assert_eq!(parts[0].chars().count(), nanogpt_cut(n, split[0]), "{n} {split:?}");
            assert_eq!(cuts[0], nanogpt_cut(n, split[0]));
            if split.len() == 3 {
                assert_eq!(cuts[1], nanogpt_cut(n, split[0] + split[1]), "{n} {split:?}");
                assert_eq!(parts[1].chars().count(), cuts[1] - cuts[0]);
            }
        }
    }
    // A part that would be empty is an error naming the part and the key.
    let e = split_chars("abc", &[0.8, 0.1, 0.1], Path::new("g.txt")).unwrap_err().to_string();
    assert!(
        e.starts_with("g.txt: the valid part of data.split = [0.8, 0.1, 0.1] of the 3 characters would be empty"),
        "{e}"
    );
    // Tiny Shakespeare: 1,115,394 characters, 1,003,854 / 111,540 as nanoGPT prints them.
    let text = std::fs::read_to_string(shakespeare_file()).unwrap();
    let (parts, cuts) = split_chars(&text, &[0.9, 0.1], &shakespeare_file()).unwrap();
    let n = text.chars().count();
    assert_eq!((n, cuts[0]), (1_115_394, nanogpt_cut(n, 0.9)));
    assert_eq!([parts[0].chars().count(), parts[1].chars().count()], [1_003_854, 111_540]);
    assert_eq!(parts.concat(), text);
}

#[test]
fn a_character_split_needs_a_file_fractions_that_sum_to_one_and_a_tokenizer_that_reads_characters() {
    let base = "[data]\nfile = \"f.txt\"\ntokenizer = \"char\"\n\n[model]\nwordvec_size = 8\nhidden_size = 8\n\n\
                [train]\nlr = 1.0\nepochs = 1\n";
    let c = config_with(base, &["data.split=[0.9, 0.1]"]);
    assert!(!c.data.has_test());
    assert!(config_with(base, &["data.split=[0.8, 0.1, 0.1]"]).data.has_test());
    // A run's saved config reads back as the same config.
    assert_eq!(ptb_lm::config::Config::parse(&c.to_toml(), &[]).unwrap(), c);
    for (set, expect) in [
        ("data.split=[0.9, 0.2]", "data.split: the fractions must sum to 1"),
        ("data.split=[1.0]", "data.split must be [train, valid] or [train, valid, test]"),
        ("data.split=[1.0, 0.0]", "data.split: every fraction must be in (0, 1)"),
    ] {
        let e = ptb_lm::config::Config::parse(base, &[set.to_string()]).unwrap_err().to_string();
        assert!(e.starts_with(expect), "{set}: {e}");
    }
    let err = |o: &[&str]| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        ptb_lm::config::Config::parse(base, &o).unwrap_err().to_string()
    };
    assert!(err(&["data.split=[0.9, 0.1]", "data.valid_fraction=0.1"]).contains("not both"));
    assert!(err(&["data.split=[0.9, 0.1]", "data.tokenizer=\"word\""]).contains("can fall inside a word"));
    assert!(
        err(&["data.split=[0.9, 0.1]", "data.test_tokens=100"]).starts_with("data.test_tokens: data.split has no test")
    );
}

#[test]
fn a_run_without_a_test_split_reports_on_validation_and_eval_says_so() {
    let s = Sandbox::new();
    // Cut mid-line on purpose: the first 2000 lines of Tiny Shakespeare, then half a line.
    let text = format!("{}Second Citizen:\nWould you proceed", shakespeare(2000));
    std::fs::write(s.path("one.txt"), &text).unwrap();
    let cfg = config(&s, "cut", "file = \"one.txt\"\ntokenizer = \"char\"\nsplit = [0.9, 0.1]");
    let o = s.run(&["train", "--config", &cfg]);
    assert_success(&o);
    let last = stdout(&o).trim_end().lines().last().unwrap().to_string();
    assert!(last.contains("valid ppl") && last.contains("(no test split") && !last.contains("test ppl"), "{last}");
    // Every character is one token, the parts hold exactly nanoGPT's counts, and there is no test.
    let n = text.chars().count() as u64;
    let info = corpus_json(&s, "run-cut");
    let (train, valid) = (nanogpt_cut(n as usize, 0.9) as u64, n - nanogpt_cut(n as usize, 0.9) as u64);
    assert_eq!(info["tokens"], serde_json::json!([train, valid, 0]), "{info}");
    assert_eq!(info["chars"], serde_json::json!([train, valid, 0]), "{info}");
    assert_eq!(info["split_chars"], serde_json::json!([train]), "{info}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("run-cut/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["final_split"], "valid", "{summary}");
    assert!(summary.get("test_ppl").is_none() && summary.get("test_bpc").is_none(), "{summary}");
    let (ppl, best) = (summary["final_ppl"].as_f64().unwrap(), summary["best_valid_ppl"].as_f64().unwrap());
    assert!(
        ppl.is_finite() && (ppl - best).abs() <= 1e-4 * best,
        "the best checkpoint scored on valid again: {summary}"
    );
    // Every token is one character: bits per character is the loss in bits.
    let bpc = summary["final_bpc"].as_f64().unwrap();
    assert!((bpc - ppl.log2()).abs() <= 1e-9 * bpc, "{summary}");
    // eval scores validation by default, and says why; the test split asked for is an error.
    let o = s.run(&["eval", "--checkpoint", "run-cut/best", "--device", "cpu"]);
    assert_success(&o);
    assert!(stdout(&o).starts_with("valid perplexity: ") && stdout(&o).contains("no test split"), "{}", stdout(&o));
    let o = s.run(&["eval", "--checkpoint", "run-cut/best", "--split", "test", "--device", "cpu"]);
    assert_one_line_error(&o, &["one.txt: the corpus has no test split", "score --split valid"]);
    let o = s.run(&["eval", "--checkpoint", "run-cut/best", "--dynamic-search", "--device", "cpu"]);
    assert_one_line_error(&o, &["--dynamic-search chooses its settings on the validation split", "--split valid"]);
    // The checkpoint still knows its text: one character changed is refused.
    std::fs::write(s.path("one.txt"), text.replacen("First", "first", 1)).unwrap();
    let o = s.run(&["eval", "--checkpoint", "run-cut/best", "--split", "valid", "--device", "cpu"]);
    assert_one_line_error(&o, &["one.txt: not the text", "was trained on"]);
}
