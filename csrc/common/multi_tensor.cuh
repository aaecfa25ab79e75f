// multi_tensor_apply: one launch over many tensors, one functor per optimizer.
//
// The tensors are described by device tables built once on the host and cached
// (fastgen/kernels/multi_tensor.py builds the same tables for the Triton kernels):
//   lists[l][k]   address of tensor k of list l (params, grads, exp_avg, ...)
//   numels[k]     its element count
//   chunk_ids[c]  the tensor block c works on
//   chunk_offs[c] the first element of block c's chunk (chunks of `chunk` elements)
// Block c calls op(k, ptrs, begin, end) with the addresses of tensor k in every list;
// the functor walks [begin, end) with its threads, usually through chunk_rounds:
//
//   vector path (every operand's base 16-byte aligned, `begin` a multiple of VEC; chunk starts
//   are multiples of `chunk`, itself a multiple of 16 bytes of every dtype): each thread takes
//   UNROLL groups of VEC contiguous elements per round, VEC = 16 bytes of the narrowest operand
//   (8 bf16 / fp16, 4 fp32), and issues every load of the round before any math (apex's ILP
//   pattern: 16 elements per thread, 16-byte accesses, several in flight per operand);
//   scalar path: the elements past the last whole vector of a tensor, and every element of a
//   tensor with an unaligned operand (an odd view), one at a time. Never a wrong-width read.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace fastgen {

constexpr int kMaxTensorLists = 8;

struct TensorTables {
  const std::uint64_t* lists[kMaxTensorLists];
  const std::int64_t* numels;
  const std::int32_t* chunk_ids;
  const std::int64_t* chunk_offs;
  std::int64_t chunk;
};

template <int N_LISTS, typename Op>
__global__ void __launch_bounds__(256) multi_tensor_apply_kernel(TensorTables t, Op op) {
  const std::int32_t k = t.chunk_ids[blockIdx.x];
  const std::int64_t begin = t.chunk_offs[blockIdx.x];
  const std::int64_t n = t.numels[k];
  const std::int64_t end = begin + t.chunk < n ? begin + t.chunk : n;
  void* ptrs[N_LISTS];
#pragma unroll
  for (int l = 0; l < N_LISTS; ++l) ptrs[l] = reinterpret_cast<void*>(t.lists[l][k]);
  op(k, ptrs, begin, end);
}

template <int N_LISTS, typename Op>
void multi_tensor_apply(const TensorTables& t, std::int64_t num_chunks, const Op& op, cudaStream_t stream) {
  if (num_chunks == 0) return;
  multi_tensor_apply_kernel<N_LISTS, Op><<<static_cast<unsigned>(num_chunks), 256, 0, stream>>>(t, op);
}

// Elements per thread per round of the functors' vector path (16 fp32 = 4 x 16 bytes in flight per
// operand; 256 threads x 16 = 4096, the launchers' chunk, so a chunk is one round).
constexpr int kElemsPerThread = 16;

// False only in the static width check's build (-DFASTGEN_VECTOR_PATH_ONLY, tests/cuda_widths.py),
// which leaves every scalar fallback out to look at the vector path alone; never in a real build.
#ifdef FASTGEN_VECTOR_PATH_ONLY
inline constexpr bool kScalarPath = false;
#else
inline constexpr bool kScalarPath = true;
#endif

// VEC of chunk_rounds: 16 bytes of the narrowest of the operand types.
template <typename T, typename... More>
struct MinSize {
  static constexpr std::size_t value = sizeof(T);
};
template <typename T, typename U, typename... More>
struct MinSize<T, U, More...> {
  static constexpr std::size_t rest = MinSize<U, More...>::value;
  static constexpr std::size_t value = sizeof(T) < rest ? sizeof(T) : rest;
};
template <typename... T>
inline constexpr int vec_width = static_cast<int>(16 / MinSize<T...>::value);

// The pointer of a table entry, known to the compiler as a global address (ld.global / st.global
// instead of generic ld / st, and read-only loads may take the non-coherent path).
template <typename T>
__device__ __forceinline__ T* global_ptr(void* p) {
  __builtin_assume(__isGlobal(p));
  return static_cast<T*>(p);
}

// True when every address is a multiple of 16 bytes.
template <typename... P>
__device__ __forceinline__ bool aligned16(const P*... ptrs) {
  return ((reinterpret_cast<std::uintptr_t>(ptrs) | ...) & 15u) == 0;
}

// Walks [begin, end) of one chunk: tile(w, idx, ok) per round, w a std::integral_constant<int, W>,
// idx[u] the first of the W contiguous elements of group u (u < UNROLL) and ok[u] whether that
// group is in range. W = VEC (16-byte accesses) while whole vectors remain and `vec_ok`; W = 1 for
// the rest (the tail of a tensor whose size is not a multiple of VEC, or the whole chunk when an
// operand is unaligned). Every thread of the block returns from it (no early exit), so a block
// reduction may follow.
template <int VEC, int UNROLL, typename Tile>
__device__ __forceinline__ void chunk_rounds(std::int64_t begin, std::int64_t end, bool vec_ok, Tile&& tile) {
  const std::int64_t threads = static_cast<std::int64_t>(blockDim.x);
  const std::int64_t tid = static_cast<std::int64_t>(threadIdx.x);
  if (vec_ok && begin % VEC == 0) {
    const std::int64_t vend = begin + (end - begin) / VEC * VEC;
    const std::int64_t stride = threads * VEC;
    for (std::int64_t base = begin + tid * VEC; base < vend; base += UNROLL * stride) {
      std::int64_t idx[UNROLL];
      bool ok[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        idx[u] = base + u * stride;
        ok[u] = idx[u] < vend;
      }
      tile(std::integral_constant<int, VEC>{}, idx, ok);
    }
    begin = vend;
  }
  if constexpr (kScalarPath) {
    for (std::int64_t base = begin + tid; base < end; base += UNROLL * threads) {
      std::int64_t idx[UNROLL];
      bool ok[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        idx[u] = base + u * threads;
        ok[u] = idx[u] < end;
      }
      tile(std::integral_constant<int, 1>{}, idx, ok);
    }
  }
}

// A 32-bit hash of (seed, tensor, index) for stochastic rounding: cheap, stateless and
// different for every element of every step (the seed changes each step).
__device__ __forceinline__ std::uint32_t hash3(std::uint32_t seed, std::uint32_t k, std::uint64_t i) {
  std::uint64_t x = i ^ (static_cast<std::uint64_t>(k) << 40) ^ (static_cast<std::uint64_t>(seed) * 0x9E3779B97F4A7C15ull);
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<std::uint32_t>(x);
}

}  // namespace fastgen
