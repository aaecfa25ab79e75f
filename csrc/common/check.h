// Error checking shared by all host launchers of fastgen._C.
//
// Host code throws C++ exceptions; pybind11 turns std::invalid_argument into
// ValueError and std::runtime_error into RuntimeError.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace fastgen {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  std::string msg = std::string("fastgen._C: CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                    "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  throw std::runtime_error(msg);
}

}  // namespace fastgen

// Check the result of a CUDA runtime call.
#define FASTGEN_CUDA_CHECK(expr)                                               \
  do {                                                                         \
    cudaError_t fastgen_err_ = (expr);                                         \
    if (fastgen_err_ != cudaSuccess) {                                         \
      ::fastgen::throw_cuda_error(fastgen_err_, #expr, __FILE__, __LINE__);    \
    }                                                                          \
  } while (0)

// Check for an error from the kernel launch that just happened.
#define FASTGEN_CHECK_LAUNCH(name)                                             \
  do {                                                                         \
    cudaError_t fastgen_err_ = cudaGetLastError();                             \
    if (fastgen_err_ != cudaSuccess) {                                         \
      ::fastgen::throw_cuda_error(fastgen_err_, (name), __FILE__, __LINE__);   \
    }                                                                          \
  } while (0)

// Argument check: throws std::invalid_argument (-> ValueError in Python).
#define FASTGEN_ARG_CHECK(cond, msg)                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      throw std::invalid_argument(std::string("fastgen._C: ") + (msg));        \
    }                                                                          \
  } while (0)
