//! The learning-rate schedules and the time budget, end to end: a cosine run's rates in
//! metrics.jsonl, and `train.max_minutes` ending training in time with the run complete,
//! resumable when cut, and finished when done.

mod common;

use common::*;
use ptb_lm::checkpoint::Checkpoint;

#[test]
fn a_cosine_run_warms_up_then_decays_to_its_floor_by_the_last_step() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "schedule = \"cosine\"\nwarmup_steps = 30\nmin_lr = 0.5");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "3"]);
    assert_success(&o);
    let lrs: Vec<f64> = records(&s.path("run")).iter().map(|r| r["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs.len(), 3);
    // "training N parameters on cpu (...), B batches of 10x20 per epoch"
    let out = stdout(&o);
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "batches").unwrap();
    let n: f64 = words[at - 1].parse().unwrap();
    // Each record holds the rate of its epoch's last step; the cosine spans steps 30..3n.
    let expect = |step: f64| 0.5 + 19.5 * 0.5 * (1.0 + (std::f64::consts::PI * (step - 30.0) / (3.0 * n - 30.0)).cos());
    for (i, lr) in lrs.iter().enumerate() {
        let want = expect(n * (i + 1) as f64 - 1.0);
        assert!((lr - want).abs() < 1e-9, "epoch {}: lr {lr}, the schedule says {want}", i + 1);
    }
    // The plateau rule is off: a worse validation never divides the rate.
    let config = std::fs::read_to_string(s.path("run/config.toml")).unwrap();
    assert!(config.contains("schedule = \"cosine\""), "{config}");
}

#[test]
fn a_time_budget_ends_training_in_time_and_the_run_is_complete() {
    let s = Sandbox::new();
    // Far more epochs than 6 seconds hold on any machine: the budget ends the run.
    let cfg = s.config("c.toml", "max_minutes = 0.1\nschedule = \"cosine\"");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "10000"]);
    assert_success(&o);
    let out = stdout(&o);
    assert!(out.contains("time budget spent: testing"), "{out}");
    let run = s.path("run");
    let sum = summary(&run);
    let epochs = sum["epochs"].as_array().unwrap();
    assert!(!epochs.is_empty() && epochs.len() < 10000);
    assert!(sum["test_ppl"].as_f64().unwrap().is_finite());
    // The check that ends training comes at most a fraction of a second late; the evaluations
    // of this tiny model take well under a second. 30 s of slack is for a crowded machine.
    let spent = sum["train_seconds"].as_f64().unwrap() + sum["test_seconds"].as_f64().unwrap();
    assert!(spent <= 6.0 + 30.0, "the run took {spent} s of a 6 s budget");
    let pos = Checkpoint::load(&run.join("last")).unwrap().meta.resume.unwrap();
    assert!(pos.budget_spent);
    assert_eq!(pos.epoch, epochs.len());
    // Only the last epoch can be cut by the budget, and a record says where: inside it, after
    // at least one batch (an epoch the budget left no batch of is not recorded at all).
    let (last, whole) = epochs.split_last().unwrap();
    assert!(whole.iter().all(|r| r.get("cut_at_batch").is_none()), "{whole:?}");
    if let Some(cut) = last.get("cut_at_batch") {
        let (k, n) = (cut[0].as_u64().unwrap(), cut[1].as_u64().unwrap());
        assert!(0 < k && k < n, "{cut}");
    }
    // Under a cosine spanning the budget the rate only falls.
    let lrs: Vec<f64> = epochs.iter().map(|r| r["lr"].as_f64().unwrap()).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{lrs:?}");

    // Done is done: resuming says so, and the budget cannot be changed on resume.
    let o = s.run(&["train", "--resume", "run"]);
    assert_one_line_error(&o, &["the run already finished: its time budget (train.max_minutes = 0.1)"]);
    let o = s.run(&["train", "--resume", "run", "--set", "train.max_minutes=5"]);
    assert_one_line_error(&o, &["when resuming, only", "train.max_minutes"]);
}

#[test]
fn a_budget_run_cut_in_its_final_test_is_completed_by_resume_without_training_more() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "max_minutes = 0.05");
    cut_in_the_final_evaluation(
        &s,
        &["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "10000"],
    );
    let trained = records(&s.path("run")).len();
    assert!(!s.path("run/summary.json").exists());

    let o = s.run(&["--threads", "1", "train", "--resume", "run"]);
    assert_success(&o);
    assert!(stdout(&o).contains("scoring the test split with best/"), "{}", stdout(&o));
    assert_eq!(records(&s.path("run")).len(), trained, "no epoch trained after the budget was spent");
    assert_eq!(summary(&s.path("run"))["epochs"].as_array().unwrap().len(), trained);
}

#[test]
fn schedule_and_budget_keys_are_checked_by_name() {
    let s = Sandbox::new();
    for (extra, expect) in [
        ("max_minutes = 0", "train.max_minutes must be a positive number of minutes"),
        ("max_minutes = -3", "train.max_minutes must be a positive number of minutes"),
        ("schedule = \"linear\"", "unknown variant `linear`"),
        ("min_lr = 1.0", "train.min_lr is the floor of train.schedule = \"cosine\""),
        ("schedule = \"cosine\"\nmin_lr = 30.0", "train.min_lr must be >= 0 and below train.lr = 20"),
    ] {
        let cfg = s.config("c.toml", extra);
        let o = s.run(&["train", "--config", cfg.to_str().unwrap()]);
        assert_one_line_error(&o, &[expect]);
        assert!(!s.path("run").exists(), "{extra}: nothing may be written");
    }
}

#[test]
fn a_warm_up_as_long_as_the_run_still_trains_and_a_cosine_run_is_not_stretched_on_resume() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "schedule = \"cosine\"\nwarmup_steps = 100000");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "1"]);
    assert_success(&o);
    let lr = records(&s.path("run"))[0]["lr"].as_f64().unwrap();
    assert!(lr > 0.0, "the warm-up climbs even when the run ends inside it: lr {lr}");
    // The cosine spans the run's epochs: another count would be another curve.
    let o = s.run(&["train", "--resume", "run", "--epochs", "3"]);
    assert_one_line_error(&o, &["train.epochs cannot change under train.schedule = \"cosine\""]);
    let o = s.run(&["train", "--resume", "run"]);
    assert_one_line_error(&o, &["its cosine schedule spanned the run, so it cannot be trained further"]);
}

#[test]
fn a_budget_that_keeps_room_for_dynamic_evaluation_still_trains_before_it_judges_the_speed() {
    let s = Sandbox::new();
    let cfg = s.config("c.toml", "max_minutes = 0.5\ndynamic_eval = true");
    let o = s.run(&["--threads", "1", "train", "--config", cfg.to_str().unwrap(), "--epochs", "10000"]);
    assert_success(&o);
    let sum = summary(&s.path("run"));
    // The first moments of a process are slow (allocation, warm-up): no speed measured in
    // them may end training, so it trains at least that long whatever the machine.
    let trained: f64 = sum["epochs"].as_array().unwrap().iter().map(|r| r["seconds"].as_f64().unwrap()).sum();
    assert!(trained >= ptb_lm::schedule::MIN_MEASURED_S, "trained only {trained} s of a 30 s budget");
    assert!(sum["test_ppl_dynamic"].as_f64().unwrap().is_finite());
}
