//! The optimizers of the training step (`train.optimizer`): the book's SGD (with optional L2
//! weight decay) and Adam (Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization")
//! with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay
//! Regularization": AdamW), as `torch.optim.AdamW` computes it (amsgrad and maximize off).
//!
//! Every update is device operations only: the learning rate is a device scalar, Adam's step
//! count a device tensor and its bias corrections are computed on the device, so nothing
//! synchronises and a CUDA graph can capture the update. Adam's moments and step count are
//! part of the resumable state (`adam.m.{param}`, `adam.v.{param}`, `adam.step`); in
//! data-parallel training every rank updates with the same summed gradient, so every rank
//! holds the same (replicated) moments.

use crate::config::{OptimizerKind, TrainConfig};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Names of Adam's state tensors in a checkpoint.
pub const ADAM_STEP: &str = "adam.step";

pub enum Optimizer {
    /// p -= lr * clip * g, after p -= lr * weight_decay * p (an L2 penalty's gradient).
    Sgd {
        weight_decay: f64,
    },
    Adam(Adam),
}

/// Adam's settings and state: the first and second moments of every parameter, and the
/// number of steps taken (float64, so the bias corrections are exact to any step count).
pub struct Adam {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    names: Vec<String>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: Tensor,
}

impl Optimizer {
    /// The optimizer `cfg` asks for, for the parameters `named` (name, tensor), with zero state.
    pub fn new(cfg: &TrainConfig, named: &[(String, Tensor)]) -> Optimizer {
        match cfg.optimizer {
            OptimizerKind::Sgd => Optimizer::Sgd { weight_decay: cfg.weight_decay },
            OptimizerKind::Adam => {
                let device = named.first().map_or(tch::Device::Cpu, |(_, p)| p.device());
                let zeros = || named.iter().map(|(_, p)| p.detach().zeros_like()).collect();
                Optimizer::Adam(Adam {
                    beta1: cfg.adam_beta1,
                    beta2: cfg.adam_beta2,
                    eps: cfg.adam_eps,
                    weight_decay: cfg.weight_decay,
                    names: named.iter().map(|(n, _)| n.clone()).collect(),
                    m: zeros(),
                    v: zeros(),
                    step: Tensor::zeros([], (Kind::Double, device)),
                })
            }
        }
    }

    /// "AdamW"-style name for what describes a run (empty for the default SGD).
    pub fn describe(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "",
            Optimizer::Adam(_) => "AdamW",
        }
    }

    /// One update of `params` with their gradients `grads` at learning rate `lr` (a device
    /// scalar), the gradients scaled by `clip` (global-norm clipping's coefficient, a device
    /// scalar) when given. Call under `no_grad`.
    pub fn step(&self, params: &[Tensor], grads: &[Tensor], clip: Option<&Tensor>, lr: &Tensor) {
        match self {
            Optimizer::Sgd { weight_decay } => {
                // −lr·clip as one device scalar: each update is then one fused pass,
                // p += g · (−lr·clip), with no gradient-sized temporary.
                let step = match clip {
                    Some(c) => -(c * lr),
                    None => -lr,
                };
                for (p, g) in params.iter().zip(grads) {
                    let mut p = p.shallow_clone();
                    if *weight_decay > 0.0 {
                        let _ = p.g_sub_(&(&p * (lr * *weight_decay)));
                    }
                    let _ = p.addcmul_(g, &step);
                }
            }
            Optimizer::Adam(a) => a.step(params, grads, clip, lr),
        }
    }

    /// The state a resumable checkpoint keeps (none for SGD).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            Optimizer::Sgd { .. } => Vec::new(),
            Optimizer::Adam(a) => {
                let mut out = Vec::with_capacity(2 * a.names.len() + 1);
                for (n, m) in a.names.iter().zip(&a.m) {
                    out.push((format!("adam.m.{n}"), m.shallow_clone()));
                }
                for (n, v) in a.names.iter().zip(&a.v) {
                    out.push((format!("adam.v.{n}"), v.shallow_clone()));
                }
                out.push((ADAM_STEP.to_string(), a.step.shallow_clone()));
                out
            }
        }
    }

    /// The state tensors themselves, in a fixed order (for the step's recovery snapshot).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.state().into_iter().map(|(_, t)| t).collect()
    }

    /// Puts back what [`Optimizer::state`] saved, in place (the tensors a CUDA graph reads
    /// keep their memory); `source` names the file in errors. Adam's state must all be there.
    pub fn load_state(&mut self, saved: &[(String, Tensor)], source: &Path) -> Result<()> {
        let Optimizer::Adam(_) = self else { return Ok(()) };
        tch::no_grad(|| {
            for (name, t) in self.state() {
                let src = saved.iter().find(|(n, _)| *n == name).map(|(_, t)| t).with_context(|| {
                    format!(
                        "{}: tensor '{name}' is missing: train.optimizer = \"adam\" resumes from Adam's moments \
                         and step count, which this checkpoint lacks; resume a checkpoint an adam run wrote, or \
                         start the run again",
                        source.display()
                    )
                })?;
                let fits = if name == ADAM_STEP { src.numel() == 1 } else { src.size() == t.size() };
                if !fits {
                    bail!("{}: '{name}' has shape {:?}, expected {:?}", source.display(), src.size(), t.size());
                }
                let src = src.reshape(t.size()).to_device(t.device()).to_kind(t.kind());
                if !bool::try_from(src.isfinite().all()).unwrap_or(false) {
                    bail!("{}: '{name}' holds non-finite values; the checkpoint is damaged", source.display());
                }
                t.shallow_clone().copy_(&src);
            }
            Ok(())
        })
    }
}

impl Adam {
    /// torch.optim.AdamW's update (amsgrad and maximize off), all on the device:
    /// p *= 1 - lr·wd; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²; t += 1;
    /// p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps).
    fn step(&self, params: &[Tensor], grads: &[Tensor], clip: Option<&Tensor>, lr: &Tensor) {
        let mut step = self.step.shallow_clone();
        let _ = step.g_add_scalar_(1.0);
        let kind = lr.kind();
        // Bias corrections in float64 on the device, then in the parameters' precision.
        let bias1: Tensor = 1.0 - Tensor::pow_scalar(self.beta1, &step);
        let bias2: Tensor = 1.0 - Tensor::pow_scalar(self.beta2, &step);
        let bias2_sqrt = bias2.sqrt().to_kind(kind);
        let step_size = (lr.to_kind(Kind::Double) / bias1).to_kind(kind);
        let decay = (self.weight_decay > 0.0).then(|| (lr * -self.weight_decay) + 1.0);
        for (((p, g), m), v) in params.iter().zip(grads).zip(&self.m).zip(&self.v) {
            let g = match clip {
                Some(c) => g * c,
                None => g.shallow_clone(),
            };
            let mut p = p.shallow_clone();
            if let Some(d) = &decay {
                let _ = p.g_mul_(d);
            }
            let _ = m.shallow_clone().lerp_(&g, 1.0 - self.beta1);
            let mut v = v.shallow_clone();
            let _ = v.g_mul_scalar_(self.beta2);
            let _ = v.addcmul_(&(&g * (1.0 - self.beta2)), &g);
            let denom = v.sqrt() / &bias2_sqrt + self.eps;
            let _ = p.g_sub_(&(m * &step_size / denom));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tch::Device;

    fn adam(extra: &[&str], named: &[(String, Tensor)]) -> Optimizer {
        let mut o: Vec<String> = vec!["train.optimizer=\"adam\"".into()];
        o.extend(extra.iter().map(|s| s.to_string()));
        let cfg =
            Config::parse("[model]\nwordvec_size = 8\nhidden_size = 8\n[train]\nlr = 0.01\nepochs = 1\n", &o).unwrap();
        Optimizer::new(&cfg.train, named)
    }

    fn param(seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([4, 5], (Kind::Float, Device::Cpu))
    }

    fn scalar(x: f64) -> Tensor {
        Tensor::from(x).to_kind(Kind::Float)
    }

    fn max_abs(t: &Tensor) -> f64 {
        f64::try_from(t.abs().max()).unwrap()
    }

    #[test]
    fn the_first_adam_step_moves_every_coordinate_by_lr_times_the_sign_of_its_gradient() {
        let p = param(1);
        let p0 = p.copy();
        // Gradients well away from zero, so eps is negligible (but still counted below).
        let g = param(2).sign() * (param(3).abs() + 0.5);
        let opt = adam(&[], &[("w".into(), p.shallow_clone())]);
        tch::no_grad(|| opt.step(&[p.shallow_clone()], &[g.shallow_clone()], None, &scalar(0.01)));
        // With the bias corrections, m̂ = g and sqrt(v̂) = |g| after one step: Δp = -lr·g/(|g|+eps).
        let expect = &g / (g.abs() + 1e-8) * -0.01;
        let diff = max_abs(&(&p - &p0 - &expect));
        assert!(diff < 1e-7, "first step off by {diff}");
        assert_eq!(f64::try_from(&opt.state().last().unwrap().1).unwrap(), 1.0, "one step counted");
    }

    #[test]
    fn adam_matches_the_adamw_formula_over_several_steps_with_clipping_and_decoupled_decay() {
        let (b1, b2, eps, wd, lr) = (0.8, 0.95, 1e-6, 0.1, 0.05);
        let p = param(4);
        let opt = adam(
            &["train.adam_beta1=0.8", "train.adam_beta2=0.95", "train.adam_eps=1e-6", "train.weight_decay=0.1"],
            &[("w".into(), p.shallow_clone())],
        );
        // The reference: the same formula in float64, step by step.
        let mut rp = p.to_kind(Kind::Double);
        let mut rm = rp.zeros_like();
        let mut rv = rp.zeros_like();
        for t in 1..=5 {
            let g = param(10 + t) * 3.0;
            let clip = scalar(0.5);
            tch::no_grad(|| opt.step(&[p.shallow_clone()], &[g.shallow_clone()], Some(&clip), &scalar(lr)));
            let g = g.to_kind(Kind::Double) * 0.5;
            rp = &rp * (1.0 - lr * wd);
            rm = &rm * b1 + &g * (1.0 - b1);
            rv = &rv * b2 + &g * &g * (1.0 - b2);
            let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
            rp = &rp - (&rm / c1) / ((&rv / c2).sqrt() + eps) * lr;
            let diff = max_abs(&(p.to_kind(Kind::Double) - &rp));
            assert!(diff < 1e-5, "step {t}: off the formula by {diff}");
        }
    }

    #[test]
    fn with_a_zero_gradient_adam_only_decays_the_weights() {
        let p = param(5);
        let p0 = p.copy();
        let opt = adam(&["train.weight_decay=0.5"], &[("w".into(), p.shallow_clone())]);
        tch::no_grad(|| opt.step(&[p.shallow_clone()], &[p.zeros_like()], None, &scalar(0.1)));
        // m = v = 0: the adaptive step is exactly zero; the decay is p·(1 - lr·wd).
        let diff = max_abs(&(&p - &p0 * 0.95));
        assert!(diff < 1e-6, "decoupled decay off by {diff}");
    }

    #[test]
    fn adam_state_round_trips_and_a_missing_moment_is_named() {
        let p = param(6);
        let opt = adam(&[], &[("w".into(), p.shallow_clone())]);
        tch::no_grad(|| opt.step(&[p.shallow_clone()], &[param(7)], None, &scalar(0.01)));
        let saved: Vec<(String, Tensor)> = opt.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["adam.m.w", "adam.v.w", "adam.step"]);
        let mut fresh = adam(&[], &[("w".into(), p.zeros_like())]);
        fresh.load_state(&saved, Path::new("x/state.safetensors")).unwrap();
        for ((_, a), (_, b)) in fresh.state().iter().zip(&saved) {
            assert!(a.equal(b));
        }
        let err = fresh.load_state(&saved[1..], Path::new("x/state.safetensors")).unwrap_err().to_string();
        assert!(err.starts_with("x/state.safetensors: tensor 'adam.m.w' is missing"), "{err}");
        // SGD keeps no state and needs none.
        assert!(Optimizer::Sgd { weight_decay: 0.0 }.state().is_empty());
    }
}
