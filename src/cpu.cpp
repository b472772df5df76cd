// C ABI over one autograd node that tch cannot express: the decoder and its mean
// cross-entropy fused for float32 on the CPU, `loss = mean_i CE(h_i W^T + b, t_i)`.
//
// Forward: the scores (N, V) come from one addmm into a buffer of the node's own; the row
// kernel (src/xent.c) turns each row into its gradient G_i = softmax − one-hot, in place,
// gives each row's loss and sums the rows (the bias's gradient, Σ_i G_i). Backward:
// dh = G W and dW = G^T h, scaled by grad / N inside the product (addmm's alpha), and
// db. The one (N, V) buffer is all the node allocates, and nothing vocabulary-sized is
// written twice. PyTorch eager (linear, then
// cross_entropy) writes the scores, log_softmax's output, nll_loss's gradient and
// log_softmax's gradient: four (N, V) buffers, six passes over them.
//
// Compiled by build.rs against the libtorch headers without CPU-specific flags; used by
// src/xent.rs only when the CPU has AVX2 and FMA (the row kernel's instructions).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>

#include "shim.hpp"

extern "C" int ptb_xent_rows_avx2(float* x, const int64_t* t, float* loss, float* colsum, int64_t n, int64_t v);

namespace {

using ptb_shim::guarded;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

struct DecodedXent : public torch::autograd::Function<DecodedXent> {
  // h (N, H), w (V, H), b (V): float32 on the CPU; targets (N): int64 in [0, V).
  // `grad`: whether a backward pass may follow (else the bias's gradient is not summed).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w, const at::Tensor& b,
                            const at::Tensor& targets, bool grad) {
    const int64_t n = h.size(0), v = w.size(0);
    at::Tensor g = at::addmm(b, h, w.t()).contiguous();
    at::Tensor t = targets.contiguous();
    at::Tensor rows = at::empty({n}, h.options());
    // The bias's gradient is summed while the rows are in cache, when one will be wanted.
    at::Tensor colsum = grad ? at::empty({v}, h.options()) : at::Tensor();
    int rc = ptb_xent_rows_avx2(g.data_ptr<float>(), t.data_ptr<int64_t>(), rows.data_ptr<float>(),
                                grad ? colsum.data_ptr<float>() : nullptr, n, v);
    TORCH_CHECK(rc == 0, "decoded_xent: out of memory");
    ctx->save_for_backward({h, w, g, colsum});
    return rows.sum(at::kDouble).div(static_cast<double>(n)).to(at::kFloat);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &g = saved[2], &colsum = saved[3];
    const double scale = grads[0].item<double>() / static_cast<double>(g.size(0));
    at::Tensor dh = at::addmm(at::empty({g.size(0), w.size(1)}, g.options()), g, w, 0.0, scale);
    at::Tensor dw = at::addmm(at::empty({w.size(0), w.size(1)}, g.options()), g.t(), h, 0.0, scale);
    at::Tensor db = colsum.mul(scale);
    return {dh, dw, db, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void ptb_cpu_free_message(char* msg) { std::free(msg); }

// The mean loss (a 0-dim float32 tensor attached to h, w and b), as a new at::Tensor* for
// tch to own; null with *err set when the inputs are not what the node takes.
void* ptb_decoded_xent(void* h, void* w, void* b, void* targets, char** err) {
  at::Tensor* out = nullptr;
  guarded(err, [&] {
    const at::Tensor& th = *static_cast<at::Tensor*>(h);
    const at::Tensor& tw = *static_cast<at::Tensor*>(w);
    const at::Tensor& tb = *static_cast<at::Tensor*>(b);
    const at::Tensor& tt = *static_cast<at::Tensor*>(targets);
    TORCH_CHECK(th.dim() == 2 && tw.dim() == 2 && tb.dim() == 1 && tt.dim() == 1, "decoded_xent: bad ranks");
    TORCH_CHECK(th.size(1) == tw.size(1) && tb.size(0) == tw.size(0) && tt.size(0) == th.size(0),
                "decoded_xent: shapes do not match");
    for (const at::Tensor* x : {&th, &tw, &tb})
      TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kFloat, "decoded_xent: wants float32 on the CPU");
    TORCH_CHECK(tt.device().is_cpu() && tt.scalar_type() == at::kLong, "decoded_xent: targets must be int64");
    if (tt.numel() > 0) {
      auto [lo, hi] = at::aminmax(tt);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < tw.size(0), "targets from ", lo.item<int64_t>(),
                  " to ", hi.item<int64_t>(), " are out of bounds for ", tw.size(0), " classes");
    }
    // (Inside the node's forward, grad mode is off: it is asked here.)
    const bool grad = at::GradMode::is_enabled() && (th.requires_grad() || tw.requires_grad() || tb.requires_grad());
    out = new at::Tensor(DecodedXent::apply(th, tw, tb, tt, grad));
  });
  return out;
}

}  // extern "C"
