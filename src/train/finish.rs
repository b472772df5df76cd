//! How a run ends and what it leaves: its checkpoints (`best/` after a better validation,
//! `last/` after every epoch), the final score of `best/` and `summary.json`, and the error an
//! interrupted run ends with.

use super::*;

/// Training stopped early (Ctrl-C, SIGTERM or a closed stdout) after saving what it could.
#[derive(Debug)]
pub struct Interrupted {
    pub run_dir: PathBuf,
    /// 1-based epoch in progress.
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
    /// Every epoch was trained and saved; only the final test evaluation was cut short.
    pub finished: bool,
    /// What stopped it: "interrupted", or "stdout was closed".
    pub reason: &'static str,
    /// The split the final evaluation scores (valid where the corpus has no test split).
    pub final_split: Split,
}

/// An error every rank of data-parallel training reaches together, having agreed on what led
/// to it (a diverged run out of restarts): the first rank says it for the group.
#[derive(Debug)]
pub struct GroupError(pub String);

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GroupError {}

/// What a run stopped after its last epoch keeps, and how to finish it.
pub(super) fn left_to_test(run_dir: &Path, split: Split) -> String {
    let run = run_dir.display();
    format!(
        "every epoch is saved in {run}; continue with: ptb-lm train --resume {run} to score the {split} split \
         with best/ and write summary.json"
    )
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let run = self.run_dir.display();
        if self.finished {
            let (split, run) = (self.final_split, &self.run_dir);
            return write!(f, "{} before the {split} evaluation; {}", self.reason, left_to_test(run, split));
        }
        write!(
            f,
            "{} in epoch {} after batch {} of {}; progress saved in {}; continue with: ptb-lm train --resume {run}",
            self.reason,
            self.epoch,
            self.batch,
            self.batches,
            self.run_dir.join("last").display(),
        )
    }
}

impl std::error::Error for Interrupted {}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub device: String,
    pub num_parameters: i64,
    pub epochs: Vec<EpochRecord>,
    pub best_epoch: Option<usize>,
    pub best_valid_ppl: Option<f64>,
    /// Bits per character beside each perplexity (see [`eval::bits_per_char`]).
    pub best_valid_bpc: Option<f64>,
    /// The split the best checkpoint is finally scored on: `test`, or `valid` where the
    /// corpus has no test split (`data.split` of two parts); `final_*` are its numbers.
    pub final_split: Split,
    pub final_ppl: f64,
    pub final_bpc: f64,
    /// The final numbers again under their old names, only where they are of the test split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_bpc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_seconds: Option<f64>,
    pub train_seconds: f64,
    /// With `train.dynamic_eval`: the test split under dynamic evaluation, and the seconds
    /// of its gradient statistics and pass together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_ppl_dynamic: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_bpc_dynamic: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_seconds: Option<f64>,
    /// The settings that figure was computed with (η, λ, ε, segment length, statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_settings: Option<String>,
}

impl Session {
    pub(super) fn interrupted(&self, finished: bool) -> Interrupted {
        Interrupted {
            run_dir: self.run.root.clone(),
            epoch: self.pos.epoch + 1,
            batch: self.pos.batch,
            batches: self.splits.train.len(),
            finished,
            reason: self.reason(),
            final_split: self.final_split(),
        }
    }

    /// The split the best checkpoint is finally scored on: test, or valid where there is none.
    pub(super) fn final_split(&self) -> Split {
        if self.splits.test.is_some() {
            Split::Test
        } else {
            Split::Valid
        }
    }

    pub(super) fn meta(&self, valid_ppl: Option<f64>, resume: Option<Resume>) -> Meta {
        Meta {
            format: checkpoint::FORMAT,
            ptb_lm_version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.cfg.clone(),
            vocab: self.corpus.vocab.words().to_vec(),
            epoch: self.pos.epoch,
            lr: self.schedule.lr,
            valid_ppl,
            best_valid_ppl: self.schedule.best,
            resume,
            corpus: Some(self.corpus.record.clone()),
        }
    }

    /// The weights that were just validated (the averaged ones under averaged SGD).
    pub(super) fn save_best(&mut self, valid_ppl: f64) -> Result<()> {
        self.ensure_finite()?;
        if !self.leads() {
            return Ok(());
        }
        let weights = self.step.averaged_named().unwrap_or_else(|| self.step.model.named_parameters());
        let mut meta = self.meta(Some(valid_ppl), None);
        meta.epoch += 1;
        checkpoint::save_with(&self.run.best(), &meta, &weights, &[], &self.corpus.tokenizer.files())
    }

    pub(super) fn save_last(&mut self, valid_ppl: Option<f64>) -> Result<()> {
        self.ensure_finite()?;
        self.pos.asgd_count = self.step.averaged_count();
        let state = self.step.resumable_state()?;
        if !self.leads() {
            return Ok(());
        }
        let meta = self.meta(valid_ppl, Some(self.pos.clone()));
        let files = self.corpus.tokenizer.files();
        checkpoint::save_with(&self.run.last(), &meta, &self.step.model.named_parameters(), &state, &files)
    }

    pub(super) fn finish(self) -> Result<Summary> {
        if !self.run.best().exists() {
            bail!(
                "no epoch reached a finite validation perplexity, so there is no best checkpoint to test \
                 (see {}); try a smaller train.lr",
                self.run.metrics().display()
            );
        }
        let best = Checkpoint::load(&self.run.best())?;
        let model = best.model(self.device)?;
        let t = Instant::now();
        // With no test split, the best checkpoint is scored on validation, and says so.
        let (final_split, batches, i) = match &self.splits.test {
            Some(test) => (Split::Test, test, 2),
            None => (Split::Valid, &self.splits.valid, 1),
        };
        let final_loss = eval::mean_loss(&model, batches);
        let (final_ppl, final_bpc, seconds) =
            (final_loss.exp(), self.splits.bpc(i, final_loss), t.elapsed().as_secs_f64());
        let is_test = final_split == Split::Test;
        let summary = Summary {
            run_dir: self.run.root.clone(),
            device: device::name(self.device),
            num_parameters: model.num_parameters(),
            epochs: self.records.clone(),
            best_epoch: Some(best.meta.epoch),
            best_valid_ppl: self.schedule.best,
            best_valid_bpc: self.schedule.best.map(|p| self.splits.bpc(1, p.ln())),
            final_split,
            final_ppl,
            final_bpc,
            test_ppl: is_test.then_some(final_ppl),
            test_bpc: is_test.then_some(final_bpc),
            test_seconds: is_test.then_some(seconds),
            train_seconds: self.records.iter().map(|r| r.seconds + r.valid_seconds).sum(),
            test_ppl_dynamic: None,
            test_bpc_dynamic: None,
            dynamic_seconds: None,
            dynamic_settings: None,
        };
        let no_test = if is_test { "" } else { " (no test split: the best checkpoint scored on validation)" };
        self.reporter.line(&format!(
            "best valid ppl {:.2} (epoch {}) | {final_split} ppl {final_ppl:.2} | {final_split} bpc {final_bpc:.4}{no_test} \
             | checkpoint {}",
            summary.best_valid_ppl.unwrap_or(f64::NAN),
            best.meta.epoch,
            self.run.best().display()
        ));
        let mut summary = summary;
        if self.cfg.train.dynamic_eval {
            let t = Instant::now();
            let opts = eval::DynamicOptions::of_training(&self.cfg.train, self.reporter.is_quiet());
            let report = self.dynamic_test(&opts).map_err(|e| {
                let root = self.run.root.display();
                // A smaller rate is the cure only for a divergence; anything else (a full disk,
                // a Ctrl-C) needs the plain resume.
                let smaller =
                    if e.chain().any(|c| c.is::<eval::Diverged>()) { " --set train.dynamic_lr=..." } else { "" };
                e.context(format!(
                    "{root}: trained and saved, but its dynamic evaluation failed; finish the run with \
                     `ptb-lm train --resume {root}{smaller}` (or score best/ with `ptb-lm eval`)"
                ))
            })?;
            summary.test_ppl_dynamic = Some(report.ppl);
            summary.test_bpc_dynamic = Some(report.bpc);
            summary.dynamic_seconds = Some(t.elapsed().as_secs_f64());
            summary.dynamic_settings = Some(opts.describe());
            self.reporter.line(&format!(
                "test ppl {:.2} | test bpc {:.4} with {} ({:.0} s)",
                report.ppl,
                report.bpc,
                report.name.trim_start_matches("test (").trim_end_matches(')'),
                t.elapsed().as_secs_f64()
            ));
        }
        // The summary is the run's commit point: written whole, after every evaluation.
        crate::fsutil::write_atomic(&self.run.summary(), serde_json::to_string_pretty(&summary)?.as_bytes())?;
        Ok(summary)
    }

    /// `train.dynamic_eval`: the test split of best/ under dynamic evaluation, exactly as
    /// `ptb-lm eval --checkpoint RUN/best --dynamic` scores it (statistics kept in best/).
    pub(super) fn dynamic_test(&self, opts: &eval::DynamicOptions) -> Result<eval::EvalReport> {
        let target = eval::Target::Split(Split::Test);
        eval::run(&self.run.best(), &target, &eval::CorpusPlace::default(), self.cfg.run.device, None, Some(opts))
    }
}
