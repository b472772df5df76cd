//! Copies of what a step changes: the known-good snapshot the divergence guard rolls back
//! to (and the failpoint that provokes a divergence), and the resumable state a `last/`
//! checkpoint keeps (the carried state, gathered over data-parallel ranks, the optimizer's
//! state and the running means).

use super::*;

/// Known-good copies of everything a step changes.
pub(super) struct Snapshot {
    pub(super) weights: Vec<Tensor>,
    pub(super) state: State,
    /// The averaged-SGD means and count, when averaging.
    pub(super) avg: Option<(Vec<Tensor>, Tensor)>,
    /// The optimizer's state (Adam's moments and step count; none for SGD).
    pub(super) optim: Vec<Tensor>,
}

pub(super) fn copies(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(|t| t.detach().copy()).collect()
}

/// Copies `src` into `dst` in place (the tensors a CUDA graph reads keep their memory).
pub(super) fn copy_into(dst: &[Tensor], src: &[Tensor]) {
    for (d, s) in dst.iter().zip(src) {
        d.shallow_clone().copy_(s);
    }
}

impl TrainStep {
    /// Remembers the current weights, state, optimizer state (Adam's moments and step count)
    /// and averaged-SGD means as good (for recovery from a non-finite loss).
    pub fn snapshot(&mut self) {
        tch::no_grad(|| match &mut self.good {
            Some(g) if g.avg.is_some() == self.avg.is_some() => {
                copy_into(&g.weights, &self.params);
                g.state.copy_from(&self.state);
                copy_into(&g.optim, &self.optim.tensors());
                if let (Some((gm, gc)), Some((m, c))) = (&g.avg, &self.avg) {
                    copy_into(gm, m);
                    gc.shallow_clone().copy_(c);
                }
            }
            _ => {
                let state = self.state.detach();
                self.good = Some(Snapshot {
                    weights: copies(&self.params),
                    state: State { h: copies(&state.h), c: copies(&state.c) },
                    avg: self.avg.as_ref().map(|(m, c)| (copies(m), c.copy())),
                    optim: copies(&self.optim.tensors()),
                });
            }
        });
    }

    /// Puts the last snapshot back; false when there is none.
    pub fn restore(&mut self) -> bool {
        let Some(g) = &self.good else { return false };
        tch::no_grad(|| {
            copy_into(&self.params, &g.weights);
            self.state.copy_from(&g.state);
            copy_into(&self.optim.tensors(), &g.optim);
            if let (Some((gm, gc)), Some((m, c))) = (&g.avg, &self.avg) {
                copy_into(m, gm);
                c.shallow_clone().copy_(gc);
            }
        });
        true
    }

    /// What a resumable checkpoint keeps of the step besides the weights: the carried state
    /// (`state.h.{l}`, and `state.c.{l}` for the LSTM), the optimizer's state (Adam:
    /// `adam.m.{name}`, `adam.v.{name}`, `adam.step`) and, when averaging, the running means
    /// (`avg.{name}`).
    /// In data-parallel training each rank holds its own streams' state: it is gathered
    /// (every rank must call this) so the checkpoint is the one a single process writes.
    /// The optimizer's state is the same on every rank (every rank updates with the same
    /// summed gradients): it is taken as it is.
    pub fn resumable_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self
            .state
            .named()
            .into_iter()
            .map(|(name, t)| Ok((name, self.replicas.gather_streams(&t)?)))
            .collect::<Result<Vec<_>>>()?;
        out.extend(self.optim.state());
        if let Some(avg) = self.averaged_named() {
            out.extend(avg.into_iter().map(|(n, t)| (format!("avg.{n}"), t)));
        }
        Ok(out)
    }

    /// Puts back what [`TrainStep::resumable_state`] saved (`asgd_count` iterates averaged;
    /// 0: not averaging); `source` names the file in errors. Adam's state must be there when
    /// the step uses Adam.
    pub fn restore_resumable(&mut self, saved: &[(String, Tensor)], asgd_count: u64, source: &Path) -> Result<()> {
        let local = self.state.h[0].size()[1];
        let find = |name: &str| {
            saved
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .with_context(|| format!("{}: tensor '{name}' is missing", source.display()))
        };
        tch::no_grad(|| -> Result<()> {
            for (name, t) in self.state.named() {
                // A data-parallel rank carries only its own streams' state.
                let src = self.replicas.own_streams(find(&name)?, local);
                if src.size() != t.size() {
                    bail!("{}: '{name}' has shape {:?}, expected {:?}", source.display(), src.size(), t.size());
                }
                t.shallow_clone().copy_(&src);
            }
            Ok(())
        })?;
        self.optim.load_state(saved, source)?;
        if asgd_count > 0 {
            let avg = self
                .model
                .named_parameters()
                .iter()
                .map(|(n, p)| {
                    let src = find(&format!("avg.{n}"))?;
                    if src.size() != p.size() {
                        bail!("{}: 'avg.{n}' has shape {:?}, expected {:?}", source.display(), src.size(), p.size());
                    }
                    Ok(src.shallow_clone())
                })
                .collect::<Result<Vec<_>>>()?;
            self.start_averaging(Some((avg, asgd_count)));
        }
        Ok(())
    }

    /// Breaks the step on purpose (see [`crate::failpoint`]).
    pub fn provoke(&mut self, how: Divergence) {
        tch::no_grad(|| match how {
            Divergence::Nan => {
                let _ = self.params[0].shallow_clone().fill_(f64::NAN);
            }
            Divergence::Loss => {
                let _ = self.loss_sum.shallow_clone().g_add_scalar_(1e9);
            }
        });
    }

    /// Whether every weight is finite (synchronises).
    pub fn weights_finite(&self) -> bool {
        tch::no_grad(|| self.params.iter().all(|p| bool::try_from(p.isfinite().all()).unwrap_or(false)))
    }
}
