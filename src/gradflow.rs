//! The gradient's norm through time (`train.log_grad_norm`): how much of the loss's gradient
//! reaches the top layer's hidden state h_t after flowing back T−t steps, the figure with
//! which Saito, "Deep Learning from Scratch 2", §6.1, shows why the plain RNN gave way to
//! gated cells: repeated multiplication by W_hhᵀ (and the nonlinearity's derivative) makes
//! the gradient vanish or explode with the distance it travels (Bengio, Simard & Frasconi
//! 1994, "Learning long-term dependencies with gradient descent is difficult"; Pascanu,
//! Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks").
//!
//! The model runs one time step at a time through the cell seam ([`crate::cell::Cell::run`]),
//! from a zero state, without dropout, keeping each step's top-layer h_t (the very tensor
//! the next step reads, so the gradient reaching it is all that flows back through it); the
//! loss is that of the last step alone, and ‖dL/dh_t‖ (Frobenius, over the batch) is read
//! for t = T..1. The gradients are taken with autograd's `grad` (tch's
//! [`Tensor::f_run_backward`] with inputs), which returns them without accumulating into
//! any parameter's `.grad`, and nothing draws from the random generator, so training goes
//! on exactly as without it. On CUDA, cuDNN is off while it runs (libtorch's own CUDA
//! kernels compute the same cells): cuDNN wants each call's weights in one buffer of its
//! own, which a step-by-step call on fused layers' weights is not (it would copy them, and
//! warn, at every step).

use crate::model::LstmLm;
use anyhow::{Context, Result};
use tch::{Kind, Tensor};

/// ‖dL/dh_t‖ of the top layer for `x`, `y` ((T, B) word ids and targets), with L the mean
/// cross-entropy of the last step only: element k is the norm k steps back from the loss
/// (k = 0 is h_T, k = T−1 is h_1). T values, each in float64 (computed from the model's
/// dtype); a value overflows to infinity only when the gradient does.
pub fn norms_through_time(model: &LstmLm, x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
    let _cudnn = model.device().is_cuda().then(CudnnOff::new);
    tch::with_grad(|| {
        let (steps, batch) = (x.size()[0], x.size()[1]);
        let cell = model.cell();
        let layers = model.layer_weights();
        let mut state = model.zero_state(batch);
        let emb = Tensor::embedding(model.embedding_weight(), x, -1, false, false);
        let mut tops: Vec<Tensor> = Vec::with_capacity(steps as usize);
        for t in 0..steps {
            let mut input = emb.narrow(0, t, 1);
            for (l, weights) in layers.iter().enumerate() {
                // Training mode (some backends differentiate no other), dropout 0: no draws.
                let (_, hn, cn) = cell.run(&input, (&state.h[l], state.c.get(l)), weights, 1, 0.0, true);
                if let Some(c) = cn {
                    state.c[l] = c;
                }
                state.h[l] = hn.shallow_clone();
                input = hn;
            }
            tops.push(input);
        }
        let last = tops.last().context("train.bptt: at least one time step is needed")?;
        let logits = last.linear(model.decoder_weight(), Some(model.decoder_bias()));
        let loss = LstmLm::loss(&logits, &y.narrow(0, steps - 1, 1));
        let grads = Tensor::f_run_backward(&[&loss], &tops, false, false).context(
            "train.log_grad_norm: cannot compute the gradient through time; set it to false to train without it",
        )?;
        grads.iter().rev().map(|g| Ok(f64::try_from(g.to_kind(Kind::Double).norm())?)).collect()
    })
}

/// cuDNN off until dropped, then as it was.
struct CudnnOff {
    was: bool,
}

impl CudnnOff {
    fn new() -> CudnnOff {
        let was = tch::Cuda::user_enabled_cudnn();
        tch::Cuda::set_user_enabled_cudnn(false);
        CudnnOff { was }
    }
}

impl Drop for CudnnOff {
    fn drop(&mut self) {
        tch::Cuda::set_user_enabled_cudnn(self.was);
    }
}
