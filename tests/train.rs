//! Training on a slice of the real PTB (CPU): perplexity falls, checkpoints reload to the
//! same numbers, and the run directory is never overwritten by accident.

mod common;

use common::*;
use ptb_lm::checkpoint::Checkpoint;
use ptb_lm::config::Config;
use ptb_lm::data::{self, Batches, Corpus};
use ptb_lm::eval::perplexity;
use ptb_lm::model::LstmLm;
use tch::{Device, Kind};

#[test]
fn perplexity_falls_far_below_the_untrained_model_and_reloads_exactly() {
    let s = Sandbox::new();
    let cfg_path = s.config("c.toml", "");
    let cfg = Config::load(&cfg_path, &[]).unwrap();

    // Untrained: about the vocabulary size.
    let ptb = Corpus::open(&ptb_dir()).unwrap();
    let valid = Batches::new(data::truncate(&ptb.valid, cfg.data.valid_tokens), 10, 20, Device::Cpu).unwrap();
    tch::manual_seed(3);
    let untrained = perplexity(&LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap(), &valid);
    assert!(untrained > 5_000.0 && untrained < 20_000.0, "untrained perplexity {untrained}");

    let o = s.run(&["train", "--config", cfg_path.to_str().unwrap(), "--epochs", "3"]);
    assert_success(&o);
    let ppls = valid_ppls(&s.path("run"));
    assert_eq!(ppls.len(), 3);
    let best = ppls.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(best < untrained / 5.0, "trained {best} vs untrained {untrained}");
    assert!(ppls[2] < ppls[0], "validation perplexity did not fall: {ppls:?}");

    // The saved checkpoint reloads and reproduces the perplexity recorded at save time.
    let ckpt = Checkpoint::load(&s.path("run/best")).unwrap();
    let saved = ckpt.meta.valid_ppl.unwrap();
    assert_eq!(saved, best);
    let o = s.run(&["eval", "--checkpoint", "run/best", "--split", "valid", "--device", "cpu"]);
    assert_success(&o);
    let out = stdout(&o);
    let printed: f64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((printed - saved).abs() / saved < 1e-4, "eval printed {printed}, saved {saved}");
    // And the library gives the same number from the loaded weights, to float32 rounding:
    // this process computes with its own thread count, the training process with one.
    let again = perplexity(&ckpt.model(Device::Cpu).unwrap(), &valid);
    assert!((again - saved).abs() / saved < 1e-5, "{again} vs {saved}");

    // Test perplexity of best/ is in the summary and on stdout.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("run/summary.json")).unwrap()).unwrap();
    let test_ppl = summary["test_ppl"].as_f64().unwrap();
    assert!(test_ppl.is_finite() && test_ppl < untrained / 5.0);
    let o = s.run(&["eval", "--checkpoint", "run/best", "--device", "cpu"]);
    assert!(stdout(&o).starts_with("test perplexity: "), "{}", stdout(&o));

    // A user's text of any length is scored whole, from the start of a sentence: one
    // sentence is 4 predicted tokens (the, company, said, <eos>), and the trained model finds
    // it likelier than uniform.
    std::fs::write(s.path("one.txt"), "the company said\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--file", "one.txt", "--device", "cpu"]);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.starts_with("one.txt perplexity: ") && out.contains("(4 tokens"), "{out}");
    let ppl: f64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(ppl.is_finite() && ppl < 10_000.0, "{out}");
    std::fs::write(s.path("empty.txt"), "\n").unwrap();
    let o = s.run(&["eval", "--checkpoint", "run/best", "--file", "empty.txt", "--device", "cpu"]);
    assert_one_line_error(&o, &["empty.txt: no words to score"]);
}

#[test]
fn a_run_directory_holding_a_run_is_not_overwritten() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    assert_success(&s.run(&["train", "--config", cfg, "--epochs", "1"]));
    let before = std::fs::read(s.path("run/best/model.safetensors")).unwrap();

    // Same config again, or a different one: refused, nothing touched.
    let o = s.run(&["train", "--config", cfg, "--epochs", "1"]);
    assert_one_line_error(&o, &["run already holds a run with this same config", "--resume", "--overwrite"]);
    let o = s.run(&["train", "--config", cfg, "--epochs", "1", "--set", "train.lr=5"]);
    assert_one_line_error(&o, &["already holds a different run", "train.lr: 20.0 there, 5.0 here"]);
    assert_eq!(std::fs::read(s.path("run/best/model.safetensors")).unwrap(), before);

    // --overwrite replaces it.
    let o = s.run(&["train", "--config", cfg, "--epochs", "1", "--set", "train.lr=5", "--overwrite"]);
    assert_success(&o);
    assert_ne!(std::fs::read(s.path("run/best/model.safetensors")).unwrap(), before);
    assert_eq!(valid_ppls(&s.path("run")).len(), 1);
}

#[test]
fn bad_config_values_are_one_line_errors_naming_the_key() {
    let s = Sandbox::new();
    let base = s.config("c.toml", "");
    let text = std::fs::read_to_string(&base).unwrap();
    // (file, key whose line is replaced, replacement, what the error must say)
    let cases: [(&str, &str, &str, &[&str]); 6] = [
        ("unknown.toml", "lr", "lr = 20.0\nlrr = 3", &["unknown.toml", "train.lrr", "unknown field"]),
        ("typed.toml", "batch_size", "batch_size = \"ten\"", &["typed.toml", "train.batch_size", "invalid type"]),
        ("bptt.toml", "bptt", "bptt = 0", &["train.bptt must be at least 1"]),
        ("clip.toml", "max_grad", "max_grad = -1.0", &["train.max_grad"]),
        ("neg.toml", "lr", "lr = -20.0", &["train.lr must be a positive number"]),
        ("table.toml", "seed", "seed = 3\n[model2]", &["model2", "unknown field"]),
    ];
    for (name, key, replacement, expect) in cases {
        let line = text.lines().find(|l| l.starts_with(&format!("{key} ="))).unwrap();
        std::fs::write(s.path(name), text.replace(line, replacement)).unwrap();
        let o = s.run(&["train", "--config", name]);
        assert_one_line_error(&o, expect);
    }
    // Dropout >= 1 and batch 0 through --set.
    let o = s.run(&["train", "--config", "c.toml", "--set", "model.dropout=1.0"]);
    assert_one_line_error(&o, &["model.dropout must be in [0, 1)"]);
    let o = s.run(&["train", "--config", "c.toml", "--set", "train.batch_size=0"]);
    assert_one_line_error(&o, &["train.batch_size must be at least 1"]);
    let o = s.run(&["train", "--config", "missing.toml"]);
    assert_one_line_error(&o, &["missing.toml: cannot read config"]);
    assert!(!s.path("run").exists());
}

#[test]
fn cuda_is_refused_cleanly_where_there_is_none() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let o = s.run(&["train", "--config", cfg.to_str().unwrap(), "--device", "cuda", "--epochs", "1"]);
    if tch::Cuda::is_available() {
        assert_success(&o);
    } else {
        assert_one_line_error(&o, &["device cuda requested, but CUDA is not available", "--device cpu"]);
        assert!(!s.path("run").exists());
    }
}

#[test]
fn stop_after_trains_a_few_epochs_and_projects_the_whole_run() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let o = s.run(&["train", "--config", cfg.to_str().unwrap(), "--epochs", "5", "--stop-after", "2"]);
    assert_success(&o);
    let out = stdout(&o);
    let last = out.trim_end().lines().last().unwrap();
    assert!(last.starts_with("stopped after 2 epochs as asked (2 of 5 done): "), "{out}");
    assert!(last.contains("all 5 epochs would take about") && last.contains("the 3 left about"), "{out}");
    assert!(last.ends_with("continue with: ptb-lm train --resume ") || last.contains("--resume"), "{out}");
    assert_eq!(valid_ppls(&s.path("run")).len(), 2);
    assert!(!s.path("run/summary.json").exists());
    let o = s.run(&["train", "--resume", "run"]);
    assert_success(&o);
    assert_eq!(valid_ppls(&s.path("run")).len(), 5);
}

#[test]
fn adam_trains_a_tiny_config_and_keeps_its_moments_in_last() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "");
    let cfg = cfg.to_str().unwrap();
    let o = s.run(&["train", "--config", cfg, "--set", "train.optimizer=adam", "--set", "train.lr=0.01"]);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.contains("AdamW"), "the run says it trains with AdamW: {out}");
    // Far below a uniform guess over the 10000 words after two epochs, and falling.
    let ppls = valid_ppls(&s.path("run"));
    assert_eq!(ppls.len(), 2);
    assert!(ppls[1] < ppls[0] && ppls[1] < 10_000.0 / 4.0, "validation perplexities {ppls:?}");

    // last/ holds both moments of every weight and the number of steps taken.
    let last = Checkpoint::load(&s.path("run/last")).unwrap();
    let state = |name: &str| last.state.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    for (name, w) in &last.weights {
        for moment in ["m", "v"] {
            let t = state(&format!("adam.{moment}.{name}")).unwrap_or_else(|| panic!("no adam.{moment}.{name}"));
            assert_eq!(t.size(), w.size(), "adam.{moment}.{name}");
        }
    }
    let batches: f64 = out.split(" batches of ").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    let steps = f64::try_from(state("adam.step").expect("adam.step")).unwrap();
    assert_eq!(steps, 2.0 * batches, "one Adam step per batch of both epochs");
    assert_eq!(last.meta.config.train.optimizer, ptb_lm::config::OptimizerKind::Adam);
}
