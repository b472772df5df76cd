// What ptb-lm's C++ shims (src/cuda.cpp, src/dist.cpp) share: C++ exceptions never cross the
// C ABI; they come back as a malloc'ed message that the Rust side frees with the shim's
// ptb_*_free_message, which is std::free.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <exception>

namespace ptb_shim {

inline char* copy_message(const char* msg) {
  size_t n = std::strlen(msg) + 1;
  char* out = static_cast<char*>(std::malloc(n));
  if (out != nullptr) std::memcpy(out, msg, n);
  return out;
}

// Runs `body`; 0 when it returned, 1 with `*err` set (when err is not null) when it threw.
template <typename F>
int guarded(char** err, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr) *err = copy_message(e.what());
  } catch (...) {
    if (err != nullptr) *err = copy_message("unknown C++ exception");
  }
  return 1;
}

}  // namespace ptb_shim
