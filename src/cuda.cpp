// C ABI over what libtorch offers for CUDA and tch does not wrap: CUDA graphs, the CUDA
// caching allocator's statistics, TF32 matmuls and the autocast dtype. Compiled by build.rs
// against the same libtorch headers; used by src/cuda.rs.
//
// Capture follows torch.cuda.graph(): the work runs on a side stream that first waits for
// the caller's stream; afterwards the caller's stream waits for the side stream. Every
// function catches C++ exceptions and returns them as a malloc'ed message.

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "shim.hpp"
#include <cstdlib>
#include <cstring>
#include <exception>

namespace {

using ptb_shim::guarded;

// `waiter` will not run work queued after this call before `waited`'s current work is done.
void stream_wait(const c10::cuda::CUDAStream& waiter, const c10::cuda::CUDAStream& waited) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(waited.unwrap());
  ev.block(waiter.unwrap());
}

struct Graph {
  explicit Graph(c10::DeviceIndex device)
      : device(device), side(c10::cuda::getStreamFromPool(false, device)),
        outer(c10::cuda::getCurrentCUDAStream(device)) {}
  c10::DeviceIndex device;
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream side;
  c10::cuda::CUDAStream outer;
};

}  // namespace

extern "C" {

void ptb_free_message(char* msg) { std::free(msg); }

void* ptb_graph_new(int64_t device, char** err) {
  Graph* g = nullptr;
  guarded(err, [&] { g = new Graph(static_cast<c10::DeviceIndex>(device)); });
  return g;
}

void ptb_graph_free(void* g) { delete static_cast<Graph*>(g); }

// Make the side stream current (after it waits for the caller's stream); with capture != 0,
// begin capturing into the graph.
int ptb_graph_enter(void* handle, int capture, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Graph*>(handle);
    g->outer = c10::cuda::getCurrentCUDAStream(g->device);
    c10::cuda::device_synchronize();
    stream_wait(g->side, g->outer);
    c10::cuda::setCurrentCUDAStream(g->side);
    if (capture != 0) {
      c10::cuda::CUDACachingAllocator::emptyCache();
      g->graph.capture_begin();
    }
  });
}

// End capture (when capturing), restore the caller's stream and make it wait for the side
// stream. Always restores the stream, even when ending the capture fails.
int ptb_graph_exit(void* handle, int capture, char** err) {
  auto* g = static_cast<Graph*>(handle);
  int rc = 0;
  if (capture != 0) rc = guarded(err, [&] { g->graph.capture_end(); });
  guarded(rc == 0 ? err : nullptr, [&] { c10::cuda::setCurrentCUDAStream(g->outer); });
  int rc2 = guarded(rc == 0 ? err : nullptr, [&] { stream_wait(g->outer, g->side); });
  return rc != 0 ? rc : rc2;
}

int ptb_graph_replay(void* handle, char** err) {
  return guarded(err, [&] { static_cast<Graph*>(handle)->graph.replay(); });
}

int64_t ptb_cuda_peak_allocated(int64_t device) {
  int64_t out = -1;
  guarded(nullptr, [&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  });
  return out;
}

void ptb_cuda_reset_peak(int64_t device) {
  guarded(nullptr, [&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// TF32 tensor cores for float32 matmuls on CUDA (cuDNN already allows them by default).
void ptb_set_matmul_tf32(int on) {
  guarded(nullptr, [&] { at::globalContext().setAllowTF32CuBLAS(on != 0); });
}

// Enter a CUDA autocast region computing in bfloat16; returns whether autocast was on.
// (tch's own autocast() goes through deprecated libtorch calls that warn at every use.)
int ptb_autocast_bf16_enter() {
  int was = 0;
  guarded(nullptr, [&] {
    was = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::autocast::increment_nesting();
  });
  return was;
}

// Leave the region entered by ptb_autocast_bf16_enter (`was`: what it returned).
void ptb_autocast_exit(int was) {
  guarded(nullptr, [&] {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCUDA, was != 0);
  });
}

}  // extern "C"
