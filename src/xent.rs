//! The decoder and the loss every perplexity comes from: the mean cross-entropy of the
//! scores `h Wᵀ + b` against the next tokens.
//!
//! On the CPU in float32 it is one fused autograd node (`src/cpu.cpp`, its row kernel
//! `src/xent.c`): the vocabulary-sized scores are written once and turned into their own
//! gradient in place, row by row in the core's cache, where the decoder followed by
//! `cross_entropy` (as PyTorch eager does it, and as [`reference`] does here) writes four
//! such buffers and crosses them six times. On a word model that buffer is most of a
//! step's memory traffic (20 × 35 rows × 10,000 words = 28 MB a step). Elsewhere (CUDA,
//! other dtypes, a CPU without AVX2 and FMA) it is [`reference`]. The two agree to float32
//! rounding (tests/model.rs); `PTB_LM_FUSED_LOSS=0` (or false, off, no) in the environment
//! chooses [`reference`] everywhere, to measure one against the other.

use std::sync::OnceLock;
use tch::{Kind, Tensor};

#[cfg(ptb_cpu_kernel)]
mod ffi {
    use std::os::raw::{c_char, c_void};
    extern "C" {
        pub fn ptb_cpu_free_message(msg: *mut c_char);
        pub fn ptb_decoded_xent(
            h: *mut c_void,
            w: *mut c_void,
            b: *mut c_void,
            targets: *mut c_void,
            err: *mut *mut c_char,
        ) -> *mut c_void;
    }
}

/// Whether [`decoded_loss`] fuses on the CPU: built with the kernel, a CPU with AVX2 and
/// FMA, and not turned off by `PTB_LM_FUSED_LOSS` (0, false, off or no).
pub fn fused_available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| cfg!(ptb_cpu_kernel) && enabled_by_environment() && cpu_has_avx2_fma())
}

/// What `PTB_LM_FUSED_LOSS` asks for (on when unset); a value that is neither on nor off
/// is said once, not guessed at silently.
pub fn enabled_by_environment() -> bool {
    let Some(v) = std::env::var_os("PTB_LM_FUSED_LOSS") else { return true };
    match v.to_string_lossy().trim().to_ascii_lowercase().as_str() {
        "0" | "false" | "off" | "no" => false,
        "1" | "true" | "on" | "yes" => true,
        _ => {
            eprintln!(
                "warning: PTB_LM_FUSED_LOSS={v:?} is neither 0/false/off/no nor 1/true/on/yes; the fused loss stays on"
            );
            true
        }
    }
}

fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Mean cross-entropy (0-dim) of the decoder's scores `h Wᵀ + b` against `targets`:
/// `h` (…, H), `w` (V, H), `b` (V), `targets` (…) of ids in [0, V).
pub fn decoded_loss(h: &Tensor, w: &Tensor, b: &Tensor, targets: &Tensor) -> Tensor {
    let cpu_f32 = |t: &Tensor| t.device() == tch::Device::Cpu && t.kind() == Kind::Float;
    if fused_available() && cpu_f32(h) && cpu_f32(w) && cpu_f32(b) && targets.kind() == Kind::Int64 {
        let hidden = *h.size().last().expect("the hidden state has a last dimension");
        return fused(&h.reshape([-1, hidden]), w, b, &targets.reshape([-1]));
    }
    reference(h, w, b, targets)
}

/// The decoder as a linear layer, then `cross_entropy`: in float32 when autocast gave
/// bf16 scores, else in the scores' dtype.
pub fn reference(h: &Tensor, w: &Tensor, b: &Tensor, targets: &Tensor) -> Tensor {
    let mut logits = h.linear(w, Some(b));
    if matches!(logits.kind(), Kind::BFloat16 | Kind::Half) {
        logits = logits.to_kind(Kind::Float);
    }
    of_scores(&logits, targets)
}

/// Mean cross-entropy of scores (…, V) against `targets` (…), in the scores' dtype (tch's
/// `cross_entropy_for_logits` would force float32).
pub fn of_scores(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("scores have a last dimension");
    logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, tch::Reduction::Mean, -100, 0.0)
}

#[cfg(ptb_cpu_kernel)]
fn fused(h: &Tensor, w: &Tensor, b: &Tensor, targets: &Tensor) -> Tensor {
    let mut err = std::ptr::null_mut();
    // SAFETY: tch's tensor handles are at::Tensor*, which the shim only reads; they live
    // through the call. The result is a new at::Tensor* that the returned Tensor owns.
    let out = unsafe {
        ffi::ptb_decoded_xent(
            h.as_ptr() as *mut _,
            w.as_ptr() as *mut _,
            b.as_ptr() as *mut _,
            targets.as_ptr() as *mut _,
            &mut err,
        )
    };
    if out.is_null() {
        // As tch's own operations do with a libtorch error (e.g. a target out of range).
        panic!("the fused decoder loss: {}", crate::cuda::shim_message(err, ffi::ptb_cpu_free_message));
    }
    // SAFETY: a fresh at::Tensor* from the shim, owned by nothing else.
    unsafe { Tensor::from_ptr(out as *mut _) }
}

#[cfg(not(ptb_cpu_kernel))]
fn fused(h: &Tensor, w: &Tensor, b: &Tensor, targets: &Tensor) -> Tensor {
    reference(h, w, b, targets)
}
