// C ABI over libtorch's torch.distributed engine (c10d), for src/dist.rs: a TCPStore for the
// rendezvous and a ProcessGroupGloo over it, and the sum all-reduce ptb-lm needs. Compiled by
// build.rs only where gloo's headers are found (Debian's libgloo-dev), with USE_C10D_GLOO
// defined (without it ProcessGroupGloo.hpp is empty). Every function catches C++ exceptions
// and returns them as a malloc'ed message.

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>

#include "shim.hpp"
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using ptb_shim::guarded;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

}  // namespace

extern "C" {

void ptb_dist_free_message(char* msg) { std::free(msg); }

// Joins the group: rank 0 serves the TCPStore at host:port, the others connect to it; every
// collective gives up after timeout_ms. Returns null and sets err on failure.
void* ptb_dist_new(const char* host, int32_t port, int32_t rank, int32_t world, int64_t timeout_ms, char** err) {
  Group* group = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    auto opts = c10d::ProcessGroupGloo::Options::create();
    opts->timeout = timeout;
    std::string h(host);
    if (h == "127.0.0.1" || h == "localhost") {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    group = new Group{store, pg};
  });
  return group;
}

void ptb_dist_free(void* g) { delete static_cast<Group*>(g); }

// Sums `tensor` (an at::Tensor*, as tch holds it) over the group, in place.
int ptb_dist_allreduce_sum(void* g, void* tensor, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    auto work = static_cast<Group*>(g)->pg->allreduce(tensors);
    work->wait();
  });
}

}  // extern "C"
