// Warp and block reductions built on warp shuffles.
#pragma once

namespace fastgen {

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over groups of `width` consecutive lanes (width a power of two <= 32).
// Every lane of the warp must call it; every lane of a group gets the sum.
__device__ __forceinline__ float warp_reduce_sum(float v, int width = 32) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    if (offset < width) v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// Sum over groups of `group` consecutive threads of the block (group a power
// of two; groups larger than a warp are whole warps). Every thread of the
// block must call it (it may call __syncthreads); every thread of a group gets
// its group's sum. `smem` needs blockDim.x / 32 floats. The result is
// deterministic: a fixed shuffle tree, then a fixed-order sum over warps.
__device__ __forceinline__ float group_reduce_sum(float v, int group, float* smem) {
  v = warp_reduce_sum(v, group < 32 ? group : 32);
  if (group <= 32) return v;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int warps_per_group = group >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int first = (warp / warps_per_group) * warps_per_group;
  float s = 0.f;
  for (int i = 0; i < warps_per_group; ++i) s += smem[first + i];
  __syncthreads();  // smem may be reused right after
  return s;
}

}  // namespace fastgen
