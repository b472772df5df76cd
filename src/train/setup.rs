//! Starting and continuing a run: everything that can be checked (the corpus, every split
//! against its batch size, the memory, a resumed run's changed settings) is checked before the
//! run directory is touched; then a [`Session`] trains.

use super::*;
use crate::dist::Launch;

/// Starts a new run of `cfg`. Everything that can be checked is checked before the run
/// directory is touched: the corpus, every split against its batch size, the memory.
pub fn train(mut cfg: Config, opts: &TrainOptions, stop: &AtomicBool) -> Result<Outcome> {
    let device = device::resolve(cfg.run.device)?;
    let run = RunDir::new(&cfg.run.out_dir);
    let corpus = load_corpus(&mut cfg, None, None, None)?;
    let splits = Splits::new(&corpus, &cfg, device)?;
    check_memory(&cfg, device)?;
    let replicas = Rc::new(Replicas::join(&cfg, device)?);
    let _lock = if replicas.leads() {
        let lock = run.lock()?;
        run.prepare_fresh(&cfg, opts.overwrite)?;
        run.write_corpus(&corpus.info)?;
        Some(lock)
    } else {
        None
    };
    failpoint::pause("setup");
    tch::manual_seed(cfg.train.seed as i64);
    let model = LstmLm::new(&cfg.model, device, Kind::Float)?;
    Session::new(cfg, corpus, splits, model, device, run, opts, None, replicas)?.run(stop)
}

/// Continues the run in `run_dir` from its `last/` checkpoint. `overrides` may change only
/// keys that do not alter what is computed (epochs, device, data dir, safety settings).
pub fn resume(run_dir: &Path, overrides: &[String], opts: &TrainOptions, stop: &AtomicBool) -> Result<Outcome> {
    let run = RunDir::new(run_dir);
    let ranked = Launch::from_env()?.is_some();
    let last = run.last();
    if !last.is_dir() {
        if run_dir.file_name().is_some_and(|n| n == "last" || n == "best") && run_dir.join(checkpoint::META).is_file() {
            bail!(
                "{}: a checkpoint, not a run directory: resume the run that holds it, `ptb-lm train --resume {}`",
                run_dir.display(),
                run_dir.parent().unwrap_or(Path::new(".")).display()
            );
        }
        bail!(
            "{}: no resumable checkpoint (last/) in this directory; start a run with `ptb-lm train --config FILE`",
            run_dir.display()
        );
    }
    let _lock = if ranked { None } else { Some(run.lock()?) };
    let ckpt = Checkpoint::load(&last)?;
    let Some(position) = ckpt.meta.resume.clone() else {
        bail!("{}: this checkpoint is not resumable (no training position)", last.display());
    };
    let mut cfg = resumed_config(&ckpt.meta.config, overrides, run_dir)?;
    if position.budget_spent && summarised(&run, position.epoch) {
        bail!(
            "{}: the run already finished: its time budget (train.max_minutes = {}) ended training in epoch {}",
            run_dir.display(),
            cfg.train.max_minutes.unwrap_or(f64::NAN),
            position.epoch
        );
    }
    // Every epoch trained but no summary of them: the final test evaluation was cut short, and
    // the session below goes straight to it.
    if position.epoch > cfg.train.epochs || (position.epoch == cfg.train.epochs && summarised(&run, position.epoch)) {
        if cosine_spans_epochs(&cfg) {
            bail!(
                "{}: the run already finished its {} epoch{}; its cosine schedule spanned the run, so it cannot \
                 be trained further: start a new run with more train.epochs",
                run_dir.display(),
                position.epoch,
                if position.epoch == 1 { "" } else { "s" }
            );
        }
        bail!(
            "{}: the run already finished {} epoch{} (train.epochs = {}); train further with --epochs N, N > {}",
            run_dir.display(),
            position.epoch,
            if position.epoch == 1 { "" } else { "s" },
            cfg.train.epochs,
            position.epoch
        );
    }
    let device = device::resolve(cfg.run.device)?;
    // The corpus where training read it (absolute paths), unless the resume moves it; either
    // way it must be the same text, file for file.
    let recorded = ckpt.meta.corpus.as_ref();
    let moved = cfg.data != ckpt.meta.config.data;
    let source = recorded.filter(|_| !moved).map(|r| &r.data);
    // A BPE tokenizer is the checkpoint's (learning it again is slow, and needless: the text
    // is checked to be the same); words and characters are read again and compared.
    let tokenizer = ckpt.tokenizer()?;
    let given = matches!(tokenizer, crate::text::Tokenizer::Bpe(_)).then_some(tokenizer);
    let corpus = load_corpus(&mut cfg, source, recorded.map(|r| (r, last.as_path())), given)?;
    data::check_vocab(&corpus.vocab, &ckpt.vocab()?, &corpus.file(Split::Train), &last)?;
    let splits = Splits::new(&corpus, &cfg, device)?;
    check_memory(&cfg, device)?;
    let replicas = Rc::new(Replicas::join(&cfg, device)?);
    let _rank_lock = if ranked && replicas.leads() { Some(run.lock()?) } else { None };
    let model = ckpt.model(device)?;
    if replicas.leads() {
        run.write_config(&cfg)?;
        let t = (&cfg.train, &ckpt.meta.config.train);
        if (t.0.dynamic_lr, t.0.dynamic_decay) != (t.1.dynamic_lr, t.1.dynamic_decay) {
            checkpoint::record_dynamic_settings(&last, &cfg.train)?;
        }
    }
    Session::new(cfg, corpus, splits, model, device, run, opts, Some(ckpt), replicas)?.run(stop)
}

/// Whether the learning rate follows a cosine over the run's epochs (not over a time
/// budget), so that the epoch count is part of every step's rate.
pub(super) fn cosine_spans_epochs(cfg: &Config) -> bool {
    cfg.train.schedule == crate::config::Schedule::Cosine && cfg.train.max_minutes.is_none()
}

/// Whether `summary.json` holds the test result of the run's first `epochs` epochs (not one
/// from before the run was trained further, nor a half-written one).
pub(super) fn summarised(run: &RunDir, epochs: usize) -> bool {
    let Ok(text) = std::fs::read_to_string(run.summary()) else { return false };
    let Ok(summary) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let last = summary["epochs"].as_array().and_then(|e| e.last()).and_then(|r| r["epoch"].as_u64());
    last == Some(epochs as u64)
}

/// The saved config with `overrides` applied, refused when they change what is computed.
pub(super) fn resumed_config(old: &Config, overrides: &[String], run_dir: &Path) -> Result<Config> {
    let cfg = if overrides.is_empty() {
        old.clone()
    } else {
        Config::parse(&toml::to_string(old)?, overrides).context("override")?
    };
    if cfg.run.out_dir != old.run.out_dir {
        bail!(
            "when resuming, run.out_dir cannot change: the run is where it is ({}); copy the directory to move it",
            run_dir.display()
        );
    }
    let allowed = [
        "train.epochs",
        "run.device",
        "data.dir/file/train/valid/test",
        "train.max_nan_restarts",
        "train.cuda_graph",
        "train.log_grad_norm",
        "train.dynamic_lr/decay",
    ];
    let mut probe = cfg.clone();
    probe.train.epochs = old.train.epochs;
    probe.run.device = old.run.device;
    probe.data.dir = old.data.dir.clone();
    probe.data.file = old.data.file.clone();
    probe.data.train = old.data.train.clone();
    probe.data.valid = old.data.valid.clone();
    probe.data.test = old.data.test.clone();
    probe.train.max_nan_restarts = old.train.max_nan_restarts;
    probe.train.cuda_graph = old.train.cuda_graph;
    probe.train.log_grad_norm = old.train.log_grad_norm;
    // Only the evaluation after training reads them (a diverged one is mended this way).
    probe.train.dynamic_lr = old.train.dynamic_lr;
    probe.train.dynamic_decay = old.train.dynamic_decay;
    if &probe != old {
        bail!("when resuming, only {} may change ({})", allowed.join(", "), crate::run::config_diff(old, &probe));
    }
    if cfg.train.epochs != old.train.epochs && cosine_spans_epochs(old) {
        bail!(
            "when resuming, train.epochs cannot change under train.schedule = \"cosine\": its curve spans the run's {} \
             epochs, and {} would be another curve, matching neither; start a new run for {} epochs",
            old.train.epochs,
            cfg.train.epochs,
            cfg.train.epochs
        );
    }
    let mut cfg = cfg;
    cfg.run.out_dir = run_dir.to_path_buf();
    Ok(cfg)
}

/// Reads the corpus of `cfg` and settles `model.vocab_size`: taken from the corpus when left
/// out, checked against it when set. The settled config is checked again, as loading a
/// checkpoint checks it, so that no run trains to write checkpoints nothing can load.
///
/// `source` reads the corpus from other paths than `cfg.data`'s (a resumed run's recorded
/// absolute paths); with `recorded`, every file read must be the text that record names.
pub(super) fn load_corpus(
    cfg: &mut Config,
    source: Option<&crate::config::DataConfig>,
    recorded: Option<(&data::CorpusRecord, &Path)>,
    tokenizer: Option<crate::text::Tokenizer>,
) -> Result<Corpus> {
    let corpus = Corpus::load_with(source.unwrap_or(&cfg.data), recorded, tokenizer)?;
    let n = corpus.vocab.len() as i64;
    match cfg.model.vocab_size {
        None => cfg.model.vocab_size = Some(n),
        Some(v) if v != n => bail!(
            "{} gives a vocabulary of {n} words, but model.vocab_size is {v} (leave it out to take the corpus's)",
            corpus.file(Split::Train).display(),
        ),
        Some(_) => {}
    }
    cfg.validate().with_context(|| format!("{}: config with its vocabulary", corpus.file(Split::Train).display()))?;
    Ok(corpus)
}

/// Refuses, before anything is allocated, a model whose training cannot fit the device.
pub(super) fn check_memory(cfg: &Config, device: Device) -> Result<()> {
    let need = crate::model::training_bytes(cfg);
    let Some(have) = device::memory_available(device) else { return Ok(()) };
    if need > have as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        bail!(
            "model: training it needs about {:.1} GiB ({} parameters, their gradients, recovery copy and \
             averages, and one batch of activations) but {} has {:.1} GiB available; make model.hidden_size, \
             model.num_layers or train.batch_size smaller",
            gib(need),
            crate::model::parameter_count(&cfg.model),
            device::name(device),
            gib(have as f64)
        );
    }
    Ok(())
}

/// The three splits cut into batches. Built before the first step, so a split too short for
/// its batch size is an error at the start, not after the last epoch.
pub(super) struct Splits {
    pub(super) train: Batches,
    pub(super) valid: Batches,
    /// None where the corpus has no test split.
    pub(super) test: Option<Batches>,
    /// (tokens, characters) the batches of train (all ranks'), valid and test score.
    pub(super) scored: [(u64, u64); 3],
}

impl Splits {
    /// Bits per character of a mean loss over split `i`'s batches (0 train, 1 valid, 2 test).
    pub(super) fn bpc(&self, i: usize, mean_loss: f64) -> f64 {
        let (tokens, chars) = self.scored[i];
        eval::bits_per_char(mean_loss, tokens, chars)
    }
}

impl Splits {
    pub(super) fn new(corpus: &Corpus, cfg: &Config, device: Device) -> Result<Splits> {
        let t = &cfg.train;
        let (train, eval) = ((t.batch_size, "train.batch_size"), (t.eval_batch_size, "train.eval_batch_size"));
        let [train, valid, test] =
            [(Split::Train, train), (Split::Valid, eval), (Split::Test, eval)].map(|(split, batch)| {
                corpus
                    .info
                    .layout
                    .has(split)
                    .then(|| corpus.batches(split, &cfg.data, batch, t.bptt, device))
                    .transpose()
            });
        let (train, valid, test) =
            (train?.expect("every corpus has a train split"), valid?.expect("every corpus has a valid split"), test?);
        let scored = [(Some(&train), Split::Train), (Some(&valid), Split::Valid), (test.as_ref(), Split::Test)].map(
            |(b, split)| {
                b.map_or((0, 0), |b| {
                    ((b.len() as i64 * b.tokens_per_batch()) as u64, b.chars_scored(corpus.chars(split)))
                })
            },
        );
        Ok(Splits { train, valid, test, scored })
    }
}
