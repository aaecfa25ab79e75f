// Per-element pieces shared by the multi-tensor optimizer functors (csrc/optim/*.cu), and their
// host-side table and dtype plumbing.
//
//   lerp_like_torch(a, b, w)  torch.lerp as PyTorch evaluates it: a + w (b - a) for w < 0.5, else
//                             b - (b - a)(1 - w) (exact at w = 1, which matters for beta1 <= 0.5)
//   store_param<P>(x, ...)    fp32 -> P, round to nearest even; bf16 with stochastic rounding adds
//                             16 hashed random bits (hash3 of seed, tensor, index) below the bf16
//                             mantissa, then truncates
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "dtype.cuh"
#include "multi_tensor.cuh"
#include "vec.cuh"

namespace fastgen {

// The shadow type of a functor without the one-pass EMA fold.
struct NoShadow {};

// EMA fold of the one-pass step: s <- s + weight * (p_stored - s) for W elements, 16-byte pieces when
// W > 1 (the functors' vector path), as EmaOp computes it.
template <typename SH, typename P, int W>
__device__ __forceinline__ void ema_fold(SH* s, const P (&stored)[W], float weight) {
  float sv[W];
  load_elems<SH, W>(s, sv);
  SH so[W];
#pragma unroll
  for (int j = 0; j < W; ++j) so[j] = from_float<SH>(sv[j] + weight * (to_float(stored[j]) - sv[j]));
  store_elems<SH, W>(s, so);
}

__device__ __forceinline__ float lerp_like_torch(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.f - w);
}

template <typename P>
__device__ __forceinline__ P store_param(float x, bool stochastic, std::uint32_t seed, std::int32_t k,
                                         std::int64_t i) {
  if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (stochastic) {
      const std::uint32_t bits = __float_as_uint(x) + (hash3(seed, static_cast<std::uint32_t>(k),
                                                             static_cast<std::uint64_t>(i)) & 0xFFFFu);
      return __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
    }
  }
  return from_float<P>(x);
}

// The TensorTables of device table addresses (lists in order, then the chunk tables).
inline TensorTables make_tables(std::initializer_list<std::uintptr_t> lists, std::uintptr_t numels,
                                std::uintptr_t ids, std::uintptr_t offs, std::int64_t chunk) {
  TensorTables t{};
  int l = 0;
  for (std::uintptr_t list : lists) t.lists[l++] = reinterpret_cast<const std::uint64_t*>(list);
  t.numels = reinterpret_cast<const std::int64_t*>(numels);
  t.chunk_ids = reinterpret_cast<const std::int32_t*>(ids);
  t.chunk_offs = reinterpret_cast<const std::int64_t*>(offs);
  t.chunk = chunk;
  return t;
}

// Calls body(T{}) for the runtime dtype code (valid_dtype checked by the caller).
template <typename Body>
void dispatch_one(int dtype, const Body& body) {
  if (dtype == kFloat32) {
    body(float{});
  } else if (dtype == kFloat16) {
    body(__half{});
  } else {
    body(__nv_bfloat16{});
  }
}

}  // namespace fastgen
