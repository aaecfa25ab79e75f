// multi_tensor_apply: one launch over many tensors, one functor per optimizer.
//
// The tensors are described by device tables built once on the host and cached
// (fastgen/kernels/multi_tensor.py builds the same tables for the Triton kernels):
//   lists[l][k]   address of tensor k of list l (params, grads, exp_avg, ...)
//   numels[k]     its element count
//   chunk_ids[c]  the tensor block c works on
//   chunk_offs[c] the first element of block c's chunk (chunks of `chunk` elements)
// Block c calls op(k, ptrs, begin, end) with the addresses of tensor k in every list;
// the functor walks [begin, end) with its threads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastgen {

constexpr int kMaxTensorLists = 6;

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
