//! Dynamic evaluation (Krause et al. 2018): with no learning it is static evaluation, each
//! segment is scored before it is learned from, it adapts to what it reads, and the
//! checkpoint on disk is never changed.

mod common;

use common::*;
use ptb_lm::dynamic::{GradStats, Settings, StatsKey, StatsRecipe};
use ptb_lm::eval::perplexity_of_stream;
use ptb_lm::model::LstmLm;
use tch::{Device, Kind, Tensor};

fn small_model() -> LstmLm {
    let cfg = config_with(
        "[model]\nvocab_size = 30\nwordvec_size = 8\nhidden_size = 8\nnum_layers = 2\ntie_weights = true\n\
         [train]\nlr = 1.0\nepochs = 1\n",
        &[],
    );
    LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap()
}

fn random_ids(n: i64, seed: i64) -> Vec<i64> {
    tch::manual_seed(seed);
    Vec::<i64>::try_from(Tensor::randint(30, [n], (Kind::Int64, Device::Cpu))).unwrap()
}

fn stats(model: &LstmLm, train: &[i64]) -> GradStats {
    let key = StatsKey {
        recipe: StatsRecipe { batch_size: 4, bptt: 5, max_batches: None },
        weights_sha256: ptb_lm::dynamic::weights_digest(model),
        train_sha256: ptb_lm::dynamic::ids_digest(train),
    };
    GradStats::collect(model, train, key).unwrap()
}

#[test]
fn with_no_learning_and_no_decay_it_is_static_evaluation_of_one_stream() {
    let _g = rng_lock();
    tch::manual_seed(1);
    let model = small_model();
    let (train, text) = (random_ids(2000, 2), random_ids(503, 3));
    let st = stats(&model, &train);
    let off = Settings { lr: 0.0, decay: 0.0, ..Settings::default() };
    let dynamic = ptb_lm::dynamic::perplexity(&model, &text, &st, &off).unwrap();
    let fixed = perplexity_of_stream(&model, &text, 5, Device::Cpu);
    assert!((dynamic - fixed).abs() / fixed < 1e-9, "{dynamic} vs {fixed}");
}

#[test]
fn each_segment_is_scored_before_it_is_learned_from_and_the_weights_come_back() {
    let _g = rng_lock();
    tch::manual_seed(4);
    let model = small_model();
    let before: Vec<Tensor> = model.parameters().iter().map(|p| p.detach().copy()).collect();
    let st = stats(&model, &random_ids(2000, 5));
    let eager = Settings { lr: 0.5, decay: 0.0, ..Settings::default() };
    // One segment (6 tokens, 5 predictions): nothing was learned before it is scored.
    let one = random_ids(6, 6);
    let dynamic = ptb_lm::dynamic::perplexity(&model, &one, &st, &eager).unwrap();
    let fixed = perplexity_of_stream(&model, &one, 5, Device::Cpu);
    assert!((dynamic - fixed).abs() / fixed < 1e-9, "the first segment saw updated weights: {dynamic} vs {fixed}");
    // Two segments: the second is scored with weights learned on the first.
    let two = random_ids(11, 7);
    let dynamic = ptb_lm::dynamic::perplexity(&model, &two, &st, &eager).unwrap();
    let fixed = perplexity_of_stream(&model, &two, 5, Device::Cpu);
    assert!((dynamic - fixed).abs() / fixed > 1e-6, "no learning happened: {dynamic} vs {fixed}");
    for (p, b) in model.parameters().iter().zip(&before) {
        assert!(bool::try_from(p.eq_tensor(b).all()).unwrap(), "the model's weights were not put back");
    }
}

#[test]
fn dynamic_evaluation_adapts_and_leaves_the_checkpoint_as_it_was() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]));
    let files = ["model.safetensors", "checkpoint.json"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(s.path("run/best").join(f)).unwrap()).collect();
    // One paragraph, forty times over: a model that learns as it reads finds it predictable.
    let paragraph = "the company said it expects to report a loss for the third quarter\n\
                     analysts had expected a profit of N cents a share\n";
    std::fs::write(s.path("repeat.txt"), paragraph.repeat(40)).unwrap();
    let args = [
        "eval",
        "--checkpoint",
        "run/best",
        "--file",
        "repeat.txt",
        "--device",
        "cpu",
        "--dynamic",
        "--dyn-lr",
        "2e-4",
        "--dyn-stats-batches",
        "30",
    ];
    let o = s.run(&args);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.starts_with("repeat.txt (dynamic: lr 2e-4, decay 0.002"), "{out}");
    assert!(stderr(&o).contains("gradient statistics over 30 training batches"), "{}", stderr(&o));
    let number = |after: &str| -> f64 {
        let rest = &out[out.find(after).unwrap() + after.len()..];
        rest.split(|c: char| c == ')' || c == ';' || c.is_whitespace()).next().unwrap().parse().unwrap()
    };
    let (dynamic, fixed) = (number("perplexity: "), number("static, one stream: "));
    assert!(dynamic < fixed / 3.0, "dynamic {dynamic} vs static {fixed}");
    // The statistics are kept beside the weights and reused; the checkpoint's files are untouched.
    let o = s.run(&args);
    assert_success(&o);
    assert!(!stderr(&o).contains("gradient statistics over"), "recomputed: {}", stderr(&o));
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(s.path("run/best").join(f)).unwrap(), b, "{f} changed");
    }
    ptb_lm::checkpoint::Checkpoint::load(&s.path("run/best")).unwrap();
    // --overwrite still recognises the directory as the run's own.
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1", "--overwrite"]));
}

#[test]
fn bad_dynamic_settings_are_one_line_errors() {
    let s = Sandbox::new();
    std::fs::create_dir_all(s.path("x")).unwrap();
    for (flag, value, expect) in [
        ("--dyn-lr", "-1", "--dyn-lr must be >= 0"),
        ("--dyn-decay", "1", "--dyn-decay must be in [0, 1)"),
        ("--dyn-bptt", "0", "--dyn-bptt"),
        ("--dyn-bptt", "100000", "--dyn-bptt"),
        ("--dyn-lr", "-inf", "--dyn-lr must be >= 0"),
        ("--dyn-epsilon", "0", "--dyn-epsilon must be > 0"),
    ] {
        let o = s.run(&["eval", "--checkpoint", "x", "--dynamic", flag, value]);
        assert_one_line_error(&o, &[expect]);
    }
}

/// A tiny run on PTB (one epoch) in a fresh sandbox.
fn trained() -> Sandbox {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    assert_success(&s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]));
    std::fs::write(s.path("short.txt"), "the company said it expects to report a loss\n".repeat(4)).unwrap();
    s
}

#[test]
fn a_diverged_dynamic_evaluation_is_an_error_never_a_number() {
    let s = trained();
    let base = ["eval", "--checkpoint", "run/best", "--device", "cpu", "--dyn-stats-batches", "3"];
    let with = |extra: &[&str], failpoint: bool| {
        let mut c = s.command(&[&base[..], extra].concat());
        if failpoint {
            c.env("PTB_LM_FAILPOINT_DYNAMIC", "nan");
        }
        c.output().unwrap()
    };
    // Every update poisons the weights: the perplexity cannot be trusted.
    let o = with(&["--dynamic", "--file", "short.txt"], true);
    assert_one_line_error(&o, &["dynamic evaluation diverged", "--dyn-lr", "--dynamic-search"]);
    // A search whose every point diverges fails, and does not suggest itself.
    let o = with(&["--dynamic-search", "--dyn-search-tokens", "100", "--file", "short.txt"], true);
    assert_one_line_error(&o, &["every point of the grid diverged", "--dyn-epsilon"]);
    assert!(!stderr(&o).contains("let --dynamic-search"), "{}", stderr(&o));
    // Absurd settings without the failpoint: a finite number, or an error; never inf or NaN.
    for extra in [["--dyn-lr", "1e308"], ["--dyn-epsilon", "1e-300"]] {
        let o = with(&[&["--dynamic", "--file", "short.txt"][..], &extra[..]].concat(), false);
        if o.status.success() {
            let ppl = number_after(&stdout(&o), "perplexity: ");
            assert!(ppl.is_finite(), "{extra:?}: exit 0 with perplexity {ppl}");
        } else {
            assert_one_line_error(&o, &["diverged"]);
        }
    }
    // --dyn-lr 0 is static evaluation, and says so rather than "made it worse".
    let o = with(&["--dynamic", "--file", "short.txt", "--dyn-lr", "0"], false);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.contains("this is static evaluation") && !out.contains("worse"), "{out}");
    // Equal up to the printed precision (the two passes sum their losses apart).
    let (dynamic, fixed) = (number_after(&out, "perplexity: "), number_after(&out, "static, one stream: "));
    assert!((dynamic - fixed).abs() / fixed < 1e-6, "{out}");
}

#[test]
fn the_search_says_how_many_tokens_it_scored() {
    let s = trained();
    let o = s.run(&[
        "eval",
        "--checkpoint",
        "run/best",
        "--device",
        "cpu",
        "--file",
        "short.txt",
        "--dynamic-search",
        "--dyn-stats-batches",
        "3",
        "--dyn-search-tokens",
        "120",
    ]);
    assert_success(&o);
    assert!(stdout(&o).starts_with("validation perplexity, dynamic, first 120 tokens:"), "{}", stdout(&o));
}

#[test]
fn dynamic_flags_are_refused_without_dynamic_evaluation_and_batch_size_with_it() {
    let s = Sandbox::new();
    for (args, expect) in [
        (&["--dyn-lr", "NaN"][..], &["--dynamic"][..]),
        (&["--dynamic-search", "--dyn-lr", "1e-4"], &["--dyn-lr", "--dynamic-search"]),
        (&["--dynamic-search", "--dyn-decay", "0.01"], &["--dyn-decay", "--dynamic-search"]),
        (&["--dyn-bptt", "3"], &["--dynamic"]),
        (&["--dyn-stats-batches", "3"], &["--dynamic"]),
        (&["--dynamic", "--dyn-search-tokens", "500"], &["--dynamic-search"]),
        (&["--dynamic-search", "--batch-size", "5"], &["--dynamic-search", "--batch-size"]),
        (&["--dynamic", "--batch-size", "5"], &["--dynamic", "--batch-size"]),
        (&["--dynamic-search", "--dyn-search-tokens", "1"], &["--dyn-search-tokens"]),
        (&["--dynamic-search", "--dyn-search-tokens", "0"], &["--dyn-search-tokens"]),
    ] {
        let o = s.run(&[&["eval", "--checkpoint", "x"][..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_one_line_error(&o, expect);
    }
}

#[test]
fn training_with_dynamic_eval_reports_what_eval_dynamic_prints_and_keeps_its_statistics() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "dynamic_eval = true");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]);
    assert_success(&o);
    assert!(stdout(&o).contains("with dynamic: lr"), "{}", stdout(&o));
    assert!(stderr(&o).contains("note: gradient statistics over"), "{}", stderr(&o));
    let summary = common::summary(&s.path("run"));
    let (dynamic, fixed) = (summary["test_ppl_dynamic"].as_f64().unwrap(), summary["test_ppl"].as_f64().unwrap());
    assert!(dynamic.is_finite() && fixed.is_finite());
    // --quiet: no notes, and the one result line carries the dynamic figure beside the static.
    let o = s.run(&[
        "--threads",
        "1",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--epochs",
        "1",
        "--quiet",
        "--overwrite",
    ]);
    assert_success(&o);
    assert!(!stderr(&o).contains("note:"), "{}", stderr(&o));
    let line = stdout(&o);
    assert_eq!(line.lines().count(), 1, "{line}");
    // The figures of this run's own summary, as printed.
    let summary = common::summary(&s.path("run"));
    let (dynamic, fixed) = (summary["test_ppl_dynamic"].as_f64().unwrap(), summary["test_ppl"].as_f64().unwrap());
    assert!(
        line.contains(&format!("perplexity: {fixed:.4}")) && line.contains(&format!("perplexity {dynamic:.4}")),
        "{line}"
    );
    assert!(summary["test_bpc_dynamic"].as_f64().unwrap() > 0.0);
    // The same statistics (kept in best/, not recomputed), weights and thread count: eval
    // prints the same number, to its 4 decimals.
    let o = s.run(&["--threads", "1", "eval", "--checkpoint", "run/best", "--device", "cpu", "--dynamic"]);
    assert_success(&o);
    assert!(!stderr(&o).contains("gradient statistics over"), "recomputed: {}", stderr(&o));
    let out = stdout(&o);
    let rest = &out[out.find("perplexity: ").unwrap() + "perplexity: ".len()..];
    let printed: f64 = rest.split(|c: char| c == ';' || c.is_whitespace()).next().unwrap().parse().unwrap();
    assert!((printed - dynamic).abs() <= 0.5e-4 * printed.max(1.0), "eval {printed} vs summary {dynamic}");
}

#[test]
fn training_with_chosen_dynamic_settings_uses_them_and_eval_with_the_same_flags_reuses_its_statistics() {
    let s = Sandbox::new();
    let cfg =
        s.config("c.toml", "dynamic_eval = true\ndynamic_lr = 1e-4\ndynamic_decay = 0.005\ndynamic_stats_batches = 2");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]);
    assert_success(&o);
    assert!(stdout(&o).contains("with dynamic: lr 1e-4, decay 0.005"), "{}", stdout(&o));
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("run/best/gradstats.json")).unwrap()).unwrap();
    assert_eq!(stats["key"]["recipe"]["max_batches"], 2, "{stats}");
    assert_eq!(stats["batches"], 2, "{stats}");
    let summary = common::summary(&s.path("run"));
    let dynamic = summary["test_ppl_dynamic"].as_f64().unwrap();
    let settings = summary["dynamic_settings"].as_str().unwrap();
    assert!(settings.contains("lr 1e-4, decay 0.005") && settings.contains("at most 2 training batches"), "{settings}");
    let eval = |extra: &[&str]| {
        let args = [&["--threads", "1", "eval", "--checkpoint", "run/best", "--device", "cpu", "--dynamic"][..], extra];
        let o = s.run(&args.concat());
        assert_success(&o);
        let out = stdout(&o);
        let rest = &out[out.find("perplexity: ").unwrap() + "perplexity: ".len()..];
        let printed: f64 = rest.split(|c: char| c == ';' || c.is_whitespace()).next().unwrap().parse().unwrap();
        (printed, stderr(&o))
    };
    // The run's own settings: its statistics are reused and the number is the summary's.
    let (printed, err) = eval(&["--dyn-lr", "1e-4", "--dyn-decay", "0.005", "--dyn-stats-batches", "2"]);
    assert!(!err.contains("gradient statistics over"), "recomputed: {err}");
    assert!((printed - dynamic).abs() <= 0.5e-4 * printed.max(1.0), "eval {printed} vs summary {dynamic}");
    // Statistics over the whole split are another recipe: recomputed, never the capped ones.
    let (_, err) = eval(&["--dyn-lr", "1e-4", "--dyn-decay", "0.005"]);
    assert!(err.contains("gradient statistics over"), "reused statistics of 2 batches: {err}");
}

#[test]
fn a_dynamic_evaluation_that_diverges_after_training_fails_and_a_resume_with_a_smaller_rate_finishes_the_run() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "dynamic_eval = true\ndynamic_lr = 1e3\ndynamic_stats_batches = 2");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_one_line_error(&o, &["dynamic evaluation diverged", "train.dynamic_lr", "--resume"]);
    assert!(!s.path("run/summary.json").exists(), "a summary without the figure the config asks for");
    let o = s.run(&["--threads", "1", "train", "--resume", "run", "--set", "train.dynamic_lr=1e-4"]);
    assert_success(&o);
    let summary = common::summary(&s.path("run"));
    let (dynamic, fixed) = (summary["test_ppl_dynamic"].as_f64().unwrap(), summary["test_ppl"].as_f64().unwrap());
    assert!(dynamic.is_finite() && dynamic > 1.0 && fixed.is_finite(), "{summary}");
    assert!(summary["dynamic_settings"].as_str().unwrap().starts_with("lr 1e-4"), "{summary}");
    // The mended rate is the run's from then on: trained further, it is not the diverging one.
    let o = s.run(&["--threads", "1", "train", "--resume", "run", "--epochs", "2"]);
    assert_success(&o);
    let summary = common::summary(&s.path("run"));
    assert_eq!(summary["epochs"].as_array().unwrap().len(), 2, "{summary}");
    assert!(summary["dynamic_settings"].as_str().unwrap().starts_with("lr 1e-4"), "{summary}");
}

#[test]
fn the_statistics_key_names_the_split_and_tokenizer_not_where_the_file_lies() {
    use ptb_lm::config::DataConfig;
    use ptb_lm::dynamic::train_digest;
    use ptb_lm::text::{Tokenizer, Vocab};
    let chars = |s: &[&str]| Tokenizer::Char(Vocab::from_words(s.iter().map(|w| w.to_string()).collect()).unwrap());
    let tok = chars(&["<unk>", "<eos>", "a", "b"]);
    let data = DataConfig { file: Some("one/input.txt".into()), split: Some(vec![0.9, 0.1]), ..DataConfig::default() };
    let base = train_digest("f00d", &data, &tok);
    let moved = DataConfig { file: Some("/elsewhere/input.txt".into()), ..data.clone() };
    assert_eq!(train_digest("f00d", &moved, &tok), base, "the same file elsewhere is the same text");
    let recut = DataConfig { split: Some(vec![0.8, 0.2]), ..data.clone() };
    let capped = DataConfig { train_tokens: Some(1000), ..data.clone() };
    let other_vocab = chars(&["<unk>", "<eos>", "b", "a"]);
    for (what, digest) in [
        ("another file", train_digest("beef", &data, &tok)),
        ("another cut", train_digest("f00d", &recut, &tok)),
        ("a token cap", train_digest("f00d", &capped, &tok)),
        ("another vocabulary", train_digest("f00d", &data, &other_vocab)),
    ] {
        assert_ne!(digest, base, "{what} must change the key");
    }
}
