//! One training step, on static buffers, with no host synchronisation:
//! forward → loss (+ optional AR/TAR) → backward → global-norm clipping → the optimizer's
//! update (SGD or AdamW, see [`crate::optim`]) → carried state → running loss sum, all as
//! device operations (the learning rate is a device scalar; the clipping coefficient never
//! leaves the device).
//!
//! Because the step only reads and writes fixed tensors, it can be captured once in a CUDA
//! graph and replayed for every batch ([`Mode::Graph`]); elsewhere it runs as plain calls.
//! Both paths run the same code, so they compute the same thing.

use crate::config::{Precision, TrainConfig};
use crate::cuda::CudaGraph;
use crate::dist::Group;
use crate::failpoint::Divergence;
use crate::model::{LstmLm, State};
use crate::optim::Optimizer;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// Eager steps run on the capture stream before capturing (as torch.cuda.graph's docs ask).
const WARMUP_STEPS: usize = 3;

pub enum Mode {
    Eager,
    Graph { graph: Option<CudaGraph>, warmed: usize },
}

/// Known-good copies of everything a step changes.
struct Snapshot {
    weights: Vec<Tensor>,
    state: State,
    /// The averaged-SGD means and count, when averaging.
    avg: Option<(Vec<Tensor>, Tensor)>,
    /// The optimizer's state (Adam's moments and step count; none for SGD).
    optim: Vec<Tensor>,
}

pub struct TrainStep {
    pub model: LstmLm,
    params: Vec<Tensor>,
    x: Tensor,
    y: Tensor,
    pub state: State,
    lr: Tensor,
    /// The value in `lr` (so setting the same one again costs nothing).
    lr_value: f64,
    loss_sum: Tensor,
    max_grad: f64,
    /// The update rule and its state (see [`crate::optim`]).
    optim: Optimizer,
    ar_alpha: f64,
    tar_beta: f64,
    /// Forward pass and loss under bf16 autocast.
    bf16: bool,
    mode: Mode,
    /// Running means of the weights (averaged SGD) and the number of iterates in them.
    avg: Option<(Vec<Tensor>, Tensor)>,
    /// Last known-good copies (see [`TrainStep::snapshot`]).
    good: Option<Snapshot>,
    /// The process group of data-parallel training, if any.
    group: Option<Rc<Group>>,
}

impl TrainStep {
    /// Sets up the step for `model`: CUDA graph when `use_graph` (CUDA only), the precision
    /// and layer fusion of `cfg` (CUDA only; the CPU computes in float32, layer by layer).
    pub fn new(mut model: LstmLm, cfg: &TrainConfig, use_graph: bool) -> Result<TrainStep> {
        let device = model.device();
        let cuda = device.is_cuda();
        model.set_fused(cfg.fused_lstm);
        if cuda {
            crate::cuda::set_matmul_tf32(cfg.precision != Precision::Fp32);
        }
        let kind = model.kind();
        let (b, t) = (cfg.batch_size, cfg.bptt);
        let params = model.parameters();
        let optim = Optimizer::new(cfg, &model.named_parameters());
        let state = model.zero_state(b);
        let mode = if use_graph && device.is_cuda() { Mode::Graph { graph: None, warmed: 0 } } else { Mode::Eager };
        Ok(TrainStep {
            params,
            x: Tensor::zeros([t, b], (Kind::Int64, device)),
            y: Tensor::zeros([t, b], (Kind::Int64, device)),
            state,
            lr: Tensor::from(cfg.lr).to_kind(kind).to_device(device),
            lr_value: cfg.lr,
            loss_sum: Tensor::zeros([], (Kind::Double, device)),
            max_grad: cfg.max_grad,
            optim,
            ar_alpha: cfg.ar_alpha,
            tar_beta: cfg.tar_beta,
            bf16: cuda && cfg.precision == Precision::Bf16,
            mode,
            avg: None,
            good: None,
            group: None,
            model,
        })
    }

    /// "CUDA graph, bf16, fused layers"-style description of how steps run.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.optim.describe().is_empty() {
            parts.push(self.optim.describe().to_string());
        }
        if self.uses_graph() {
            parts.push("CUDA graph".to_string());
        }
        if self.bf16 {
            parts.push("bf16 autocast".to_string());
        }
        if self.model.is_fused() {
            parts.push(format!("fused {} layers", self.model.cell()));
        }
        parts.join(", ")
    }

    pub fn uses_graph(&self) -> bool {
        matches!(self.mode, Mode::Graph { .. })
    }

    /// Sets the learning rate the next steps use (a device scalar; unchanged: no work).
    pub fn set_lr(&mut self, lr: f64) {
        if lr.to_bits() != self.lr_value.to_bits() {
            tch::no_grad(|| {
                let _ = self.lr.fill_(lr);
            });
            self.lr_value = lr;
        }
    }

    /// Runs one step on `(x, y)` (each (T, B)). Dropout draws come from libtorch's global
    /// generator, seeded with `seed` right before the step's work.
    pub fn run(&mut self, x: &Tensor, y: &Tensor, seed: i64) -> Result<()> {
        self.x.copy_(x);
        self.y.copy_(y);
        let mut mode = std::mem::replace(&mut self.mode, Mode::Eager);
        let result = self.run_in(&mut mode, seed);
        self.mode = mode;
        result
    }

    fn run_in(&self, mode: &mut Mode, seed: i64) -> Result<()> {
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
    fn recapture(&mut self) {
        if let Mode::Graph { graph, warmed } = &mut self.mode {
            *graph = None;
            // One warm-up step on the new graph's stream before it captures.
            *warmed = (*warmed).min(WARMUP_STEPS - 1);
        }
    }

    fn compute(&self) -> Result<()> {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let (f, loss) = crate::cuda::autocast_bf16(self.bf16, || {
            let f = self.model.forward(&self.x, &self.state, true);
            let loss = LstmLm::loss(&f.logits.to_kind(Kind::Float), &self.y);
            (f, loss)
        });
        let t = f.last_raw.size()[0];
        let ar = (self.ar_alpha > 0.0).then(|| f.last_dropped.to_kind(Kind::Float).square().mean(None) * self.ar_alpha);
        let tar = (self.tar_beta > 0.0 && t > 1).then(|| {
            let raw = f.last_raw.to_kind(Kind::Float);
            (raw.narrow(0, 1, t - 1) - raw.narrow(0, 0, t - 1)).square().mean(None) * self.tar_beta
        });
        // The regularisers are differentiated but not reported: summed into a new tensor,
        // since tch's `loss += r` would change `loss` itself.
        let total = [ar, tar].into_iter().flatten().fold(loss.shallow_clone(), |sum, r| sum + r);
        total.backward();
        if let Some(group) = &self.group {
            self.sum_gradients(group)?;
        }
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
            let clip = (self.max_grad > 0.0).then(|| {
                let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
                let total_norm = Tensor::stack(&norms, 0).norm();
                // The book's clip_grads: rate = max / (norm + 1e-6), applied when < 1.
                ((total_norm + 1e-6).reciprocal() * self.max_grad).clamp_max(1.0)
            });
            self.optim.step(&self.params, &grads, clip.as_ref(), &self.lr);
            let mut state = self.state.shallow_clone();
            state.copy_from(&f.state);
            let mut sum = self.loss_sum.shallow_clone();
            let _ = sum.g_add_(&loss.detach().to_kind(Kind::Double));
            if let Some((avg, count)) = &self.avg {
                let mut count = count.shallow_clone();
                let _ = count.g_add_scalar_(1.0);
                for (a, p) in avg.iter().zip(&self.params) {
                    let mut a = a.shallow_clone();
                    let _ = a.g_add_(&((p - &a) / &count));
                }
            }
        });
        Ok(())
    }

    /// Data-parallel training: every rank's gradient of its own streams' mean loss, summed
    /// over the group in one all-reduce of one flat buffer, then divided by the number of
    /// ranks: with equal shards, the gradient of the whole batch's mean loss, so the clipping
    /// and the update see what one process would.
    fn sum_gradients(&self, group: &Group) -> Result<()> {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
            let flat = Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
            group.allreduce_sum(&flat)?;
            let flat = flat / group.world as f64;
            let mut offset = 0;
            for g in &grads {
                let n = g.numel() as i64;
                g.shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(g));
                offset += n;
            }
            Ok(())
        })
    }

    /// Joins a process group: gradients are summed over it every step (no CUDA graph then).
    pub fn set_group(&mut self, group: Rc<Group>) {
        self.mode = Mode::Eager;
        self.group = Some(group);
    }

    /// Sum of the training losses since the last [`TrainStep::reset_loss_sum`] (synchronises).
    pub fn loss_sum(&self) -> f64 {
        f64::try_from(&self.loss_sum).unwrap_or(f64::NAN)
    }

    pub fn reset_loss_sum(&mut self, value: f64) {
        tch::no_grad(|| {
            let _ = self.loss_sum.fill_(value);
        });
    }

    pub fn reset_state(&mut self) {
        tch::no_grad(|| self.state.zero_());
    }

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
        let mut out = match &self.group {
            None => self.state.named(),
            Some(g) => tch::no_grad(|| {
                self.state
                    .named()
                    .into_iter()
                    .map(|(name, t)| {
                        let s = t.size();
                        let full = Tensor::zeros([s[0], s[1] * g.world as i64, s[2]], (t.kind(), t.device()));
                        let (start, len) = g.shard(s[1] * g.world as i64);
                        full.narrow(1, start, len).copy_(&t);
                        g.allreduce_sum(&full)?;
                        Ok((name, full))
                    })
                    .collect::<Result<Vec<_>>>()
            })?,
        };
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
        let shard = self.group.as_ref().map(|g| g.shard(self.state.h[0].size()[1] * g.world as i64));
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
                let src = match shard {
                    Some((start, len)) if find(&name)?.size().get(1).is_some_and(|&b| b >= start + len) => {
                        find(&name)?.narrow(1, start, len)
                    }
                    _ => find(&name)?.shallow_clone(),
                };
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

    /// Starts averaged SGD from the current weights (`count` iterates already averaged,
    /// with `values` their mean, when resuming).
    pub fn start_averaging(&mut self, resumed: Option<(Vec<Tensor>, u64)>) {
        let device = self.model.device();
        let kind = self.model.kind();
        let (avg, n) = match resumed {
            Some((values, n)) => (values.iter().map(|v| v.to_device(device).to_kind(kind)).collect(), n),
            None => (self.params.iter().map(|p| p.detach().copy()).collect(), 1),
        };
        self.avg = Some((avg, Tensor::from(n as f64).to_kind(kind).to_device(device)));
        self.recapture();
    }

    pub fn averaging(&self) -> bool {
        self.avg.is_some()
    }

    /// Number of iterates in the running mean (0 when not averaging).
    pub fn averaged_count(&self) -> u64 {
        self.avg.as_ref().map_or(0, |(_, c)| f64::try_from(c).unwrap_or(0.0) as u64)
    }

    /// The averaged weights, named like the model's.
    pub fn averaged_named(&self) -> Option<Vec<(String, Tensor)>> {
        let (avg, _) = self.avg.as_ref()?;
        let names = self.model.named_parameters().into_iter().map(|(n, _)| n);
        Some(names.zip(avg.iter().map(Tensor::shallow_clone)).collect())
    }

    /// Runs `f` with the averaged weights in the model (when averaging), then puts the
    /// trained weights back.
    pub fn with_averaged<T>(&mut self, f: impl FnOnce(&LstmLm) -> T) -> T {
        let Some((avg, _)) = &self.avg else { return f(&self.model) };
        let saved: Vec<Tensor> = tch::no_grad(|| {
            self.params
                .iter()
                .zip(avg)
                .map(|(p, a)| {
                    let keep = p.detach().copy();
                    p.shallow_clone().copy_(a);
                    keep
                })
                .collect()
        });
        let out = f(&self.model);
        tch::no_grad(|| {
            for (p, s) in self.params.iter().zip(&saved) {
                p.shallow_clone().copy_(s);
            }
        });
        out
    }
}

fn copies(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(|t| t.detach().copy()).collect()
}

/// Copies `src` into `dst` in place (the tensors a CUDA graph reads keep their memory).
fn copy_into(dst: &[Tensor], src: &[Tensor]) {
    for (d, s) in dst.iter().zip(src) {
        d.shallow_clone().copy_(s);
    }
}
