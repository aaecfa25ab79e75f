// Vector load/store helpers: VEC elements of T moved as one aligned access
// (16 bytes when VEC * sizeof(T) == 16), converted to / from fp32 arrays.
#pragma once

#include <cstdint>

#include "dtype.cuh"

namespace fastgen {

// VEC elements of T with the alignment of the whole vector, so that a load
// compiles to a single ld.global.v4 / v2 / scalar instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* __restrict__ p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// Load VEC values of T and convert to fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* __restrict__ p, float (&out)[VEC]) {
  const Vec<T, VEC> v = load_vec<T, VEC>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(v.v[i]);
}

// Round VEC fp32 values to T and store them as one vector.
template <typename T, int VEC>
__device__ __forceinline__ void store_float(T* __restrict__ p, const float (&in)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int i = 0; i < VEC; ++i) v.v[i] = from_float<T>(in[i]);
  store_vec<T, VEC>(p, v);
}

// W elements of T at p converted to fp32 (W = 1: one scalar access; otherwise W * sizeof(T) is a
// multiple of 16 and p is 16-byte aligned: W * sizeof(T) / 16 accesses of 16 bytes). Used by the
// multi-tensor functors, whose tile width W is 1 on the scalar path and VEC on the vector path.
template <typename T, int W>
__device__ __forceinline__ void load_elems(const T* __restrict__ p, float (&out)[W]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (W == 1) {
    out[0] = to_float(*p);
  } else {
    static_assert(W % kPiece == 0, "load_elems: W elements must be whole 16-byte pieces");
#pragma unroll
    for (int j = 0; j < W; j += kPiece) {
      const Vec<T, kPiece> v = load_vec<T, kPiece>(p + j);
#pragma unroll
      for (int i = 0; i < kPiece; ++i) out[j + i] = to_float(v.v[i]);
    }
  }
}

// Store W values of T at p, with the access widths of load_elems.
template <typename T, int W>
__device__ __forceinline__ void store_elems(T* __restrict__ p, const T (&in)[W]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (W == 1) {
    *p = in[0];
  } else {
    static_assert(W % kPiece == 0, "store_elems: W elements must be whole 16-byte pieces");
#pragma unroll
    for (int j = 0; j < W; j += kPiece) {
      Vec<T, kPiece> v;
#pragma unroll
      for (int i = 0; i < kPiece; ++i) v.v[i] = in[j + i];
      store_vec<T, kPiece>(p + j, v);
    }
  }
}

// True if p is aligned to `bytes`.
inline bool is_aligned(std::uintptr_t p, int bytes) { return p % static_cast<std::uintptr_t>(bytes) == 0; }

}  // namespace fastgen
