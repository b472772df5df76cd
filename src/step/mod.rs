//! One training step, on static buffers, with no host synchronisation:
//! forward → loss (+ optional AR/TAR) → backward → global-norm clipping → the optimizer's
//! update (SGD or AdamW, see [`crate::optim`]) → carried state → running loss sum, all as
//! device operations (the learning rate is a device scalar; the clipping coefficient never
//! leaves the device).
//!
//! Because the step only reads and writes fixed tensors, it can be captured once in a CUDA
//! graph and replayed for every batch ([`Mode::Graph`]); elsewhere it runs as plain calls.
//! Both paths run the same code, so they compute the same thing.
//!
//! This file holds the step itself (set-up, the learning rate, forward to update, the loss
//! sum). Beside it: [`graph`] (capture and replay), [`snapshot`] (the divergence guard's
//! copies and the resumable state of `last/`) and [`average`] (averaged SGD). The update
//! rule is [`crate::optim`]'s, the averaging of gradients over ranks [`crate::replicas`]'s.

use crate::config::{Precision, TrainConfig};
use crate::cuda::CudaGraph;
use crate::failpoint::Divergence;
use crate::model::{LstmLm, State};
use crate::optim::Optimizer;
use crate::replicas::Replicas;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::rc::Rc;
use tch::{Kind, Tensor};

mod average;
mod graph;
mod snapshot;

pub use graph::Mode;
use snapshot::*;

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
    /// The ranks of data-parallel training, or this process alone.
    replicas: Rc<Replicas>,
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
            replicas: Rc::new(Replicas::alone()),
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

    fn compute(&self) -> Result<()> {
        // On the CPU autograd hands the gradients back as new tensors (PyTorch's
        // `zero_grad(set_to_none=True)`): no pass zeroes `.grad` and none adds into it. A CUDA
        // graph reads and writes fixed addresses, so on CUDA they accumulate into `.grad`,
        // zeroed first. The values are the same either way (0 + g is g exactly).
        let in_place = self.model.device().is_cuda();
        if in_place {
            for p in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        }
        let (f, loss) = crate::cuda::autocast_bf16(self.bf16, || {
            let f = self.model.hidden(&self.x, &self.state, true);
            let loss = self.model.decoded_loss(&f.last_dropped, &self.y);
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
        let grads: Vec<Tensor> = if in_place {
            total.backward();
            self.params.iter().map(Tensor::grad).collect()
        } else {
            Tensor::f_run_backward(&[&total], &self.params, false, false)?
        };
        self.replicas.average(&grads)?;
        tch::no_grad(|| {
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

    /// Trains as one of `replicas`: gradients are averaged over the ranks every step (no
    /// CUDA graph then, unless alone).
    pub fn set_replicas(&mut self, replicas: Rc<Replicas>) {
        if !replicas.is_alone() {
            self.mode = Mode::Eager;
        }
        self.replicas = replicas;
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
}
