//! The CUDA graph of the step: a few eager warm-up steps on the capture stream, one capture,
//! then a replay per batch; a capture that fails falls back to eager steps for good.

use super::*;

/// Eager steps run on the capture stream before capturing (as torch.cuda.graph's docs ask).
pub(super) const WARMUP_STEPS: usize = 3;

pub enum Mode {
    Eager,
    Graph { graph: Option<CudaGraph>, warmed: usize },
}

impl TrainStep {
    pub fn uses_graph(&self) -> bool {
        matches!(self.mode, Mode::Graph { .. })
    }

    pub(super) fn run_in(&self, mode: &mut Mode, seed: i64) -> Result<()> {
        match mode {
            Mode::Eager => {
                tch::manual_seed(seed);
                self.compute()?;
            }
            Mode::Graph { graph, warmed } => {
                let device = crate::device::index(self.model.device());
                if graph.is_none() {
                    *graph = Some(CudaGraph::new(device)?);
                }
                let g = graph.as_mut().expect("set above");
                if *warmed < WARMUP_STEPS {
                    tch::manual_seed(seed);
                    g.warmup(|| self.compute())??;
                    *warmed += 1;
                    return Ok(());
                }
                if !g.is_captured() {
                    g.capture(|| self.compute())??;
                }
                // Seeded after capture, so a replay draws exactly what an eager step would.
                tch::manual_seed(seed);
                g.replay()?;
            }
        }
        Ok(())
    }

    /// Leaves CUDA graphs for plain execution (after a failed capture).
    pub fn fall_back_to_eager(&mut self) {
        self.mode = Mode::Eager;
    }

    /// Drops the captured graph so the next step captures again (after the step changed,
    /// e.g. averaging switched on).
    pub(super) fn recapture(&mut self) {
        if let Mode::Graph { graph, warmed } = &mut self.mode {
            *graph = None;
            // One warm-up step on the new graph's stream before it captures.
            *warmed = (*warmed).min(WARMUP_STEPS - 1);
        }
    }
}
