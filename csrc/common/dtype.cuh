// Dtype codes shared with Python, fp32 conversion helpers and the dispatch
// used by every launcher.
//
//   code 0 = float32, 1 = float16, 2 = bfloat16
//
// Kernels load native values, convert to float, do all math in fp32 and
// round once when storing (see DESIGN.md "Numerics").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "check.h"

namespace fastgen {

enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline bool valid_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

// fp32 <-> storage type, round-to-nearest-even on the way down.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round a float through T and back (what a store + reload would give).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

}  // namespace fastgen

// Dispatch on (x dtype, weight dtype) for normalization-style ops. The
// weight dtype is either the input dtype or float32 (fp32 weight with a half
// input). Inside BODY, `scalar_t` is the input type and `weight_t` the weight
// type. Anything else throws std::invalid_argument.
#define FASTGEN_DISPATCH_X_W(X_CODE, W_CODE, OPNAME, ...)                                           \
  do {                                                                                             \
    const int fg_x_ = (X_CODE);                                                                    \
    const int fg_w_ = (W_CODE);                                                                    \
    if (fg_x_ == ::fastgen::kFloat32 && fg_w_ == ::fastgen::kFloat32) {                            \
      using scalar_t = float; using weight_t = float; __VA_ARGS__;                                 \
    } else if (fg_x_ == ::fastgen::kFloat16 && fg_w_ == ::fastgen::kFloat16) {                     \
      using scalar_t = __half; using weight_t = __half; __VA_ARGS__;                               \
    } else if (fg_x_ == ::fastgen::kFloat16 && fg_w_ == ::fastgen::kFloat32) {                     \
      using scalar_t = __half; using weight_t = float; __VA_ARGS__;                                \
    } else if (fg_x_ == ::fastgen::kBFloat16 && fg_w_ == ::fastgen::kBFloat16) {                   \
      using scalar_t = __nv_bfloat16; using weight_t = __nv_bfloat16; __VA_ARGS__;                 \
    } else if (fg_x_ == ::fastgen::kBFloat16 && fg_w_ == ::fastgen::kFloat32) {                    \
      using scalar_t = __nv_bfloat16; using weight_t = float; __VA_ARGS__;                         \
    } else {                                                                                       \
      throw std::invalid_argument(std::string("fastgen._C.") + (OPNAME) +                          \
                                  ": unsupported dtypes: x_dtype=" + std::to_string(fg_x_) + " (" + \
                                  ::fastgen::dtype_name(fg_x_) + "), w_dtype=" +                   \
                                  std::to_string(fg_w_) + " (" + ::fastgen::dtype_name(fg_w_) +    \
                                  "); supported: x in {0=float32, 1=float16, 2=bfloat16} with "    \
                                  "w_dtype equal to x_dtype or 0 (float32)");                      \
    }                                                                                              \
  } while (0)
