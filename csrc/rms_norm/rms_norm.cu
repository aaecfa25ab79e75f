// RMSNorm forward / backward, with an optional fused residual add.
//
// Forward, for each row of x [M, N] (optional residual r [M, N], weight w [N]):
//
//     h    = round_T(x + r)                 (h := x without a residual)
//     rstd = 1 / sqrt(mean(h^2) + eps)      (fp32, from the rounded h)
//     y    = round_T((h * rstd) * w)        (y = h * rstd without a weight)
//
// h is stored when there is a residual, so that y == rms_norm(h) exactly as a
// reference that first adds and then normalizes.
//
// Backward, with xhat = h * rstd and g = dy * w (g = dy without a weight):
//
//     dx = rstd * (g - xhat * mean_N(g * xhat)) + dh_out
//     dw = sum_M(dy * xhat)                 (fp32 partials, see below)
//
// The weight gradient is deterministic and uses no atomics: block b of the
// backward grid handles a fixed set of rows and writes its fp32 partial sums
// to dw_partial[b, :]; the caller sums the partials over b.
//
// Kernel shapes (the problem is memory bound):
//   * `tpr` threads per row, a power of two; a block holds blockDim.x / tpr
//     rows. Small rows get a fraction of a warp or one warp, large rows a
//     whole block.
//   * Each thread owns ITEMS vectors of VEC elements of its row (16-byte loads
//     when pointers, strides and N allow it, scalar loads otherwise). The row
//     stays in registers in its storage type between the reduction and the
//     output pass.
//   * Rows too long for registers use the *_loop kernels, which re-read the
//     row (from L2) for the second pass.
//   * Rows are visited with a grid-stride loop and offsets are int64, so
//     M * N may exceed 2^31.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "rms_norm.h"

namespace fastgen {
namespace {

constexpr int kFwdMaxThreads = 1024;
constexpr int kBwdMaxThreads = 512;
constexpr int kMinBlock = 256;

// Most vectors a thread keeps in registers without spilling on sm_80 / sm_90 (ptxas -v,
// checked by tests/test_cuda_build.py): 8 16-byte vectors of fp32 in the forward, but
// only 4 of half types (whose fp32 upcasts double the live registers); in the backward
// 4, or 2 when a half input comes with an fp32 weight. Longer rows take the looped kernels.
template <typename T, typename W> constexpr int fwd_max_items() { return sizeof(T) == 4 ? 8 : 4; }
template <typename T, typename W> constexpr int bwd_max_items() { return sizeof(T) < sizeof(W) ? 2 : 4; }

// Launches use blocks of max(tpr, kMinBlock) threads. Only the configs with
// min(4, max_items) or 8 items per thread use more than a warp per row (see
// choose_config); the others get 256-thread bounds and more registers per thread.
constexpr int launch_bound(int items, int max_items, int max_threads) {
  return items >= (max_items < 4 ? max_items : 4) ? max_threads : kMinBlock;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// x:    [M, N] row stride stride_x          r: [M, N] row stride stride_r or null
// w:    [N] or null                         y: [M, N] contiguous
// h:    [M, N] contiguous (written iff r)   rstd: [M] fp32
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(launch_bound(ITEMS, fwd_max_items<T, W>(), kFwdMaxThreads), 1)
rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, const T* __restrict__ r, T* __restrict__ y,
                    T* __restrict__ h, float* __restrict__ rstd_out, std::int64_t M, int N, std::int64_t stride_x,
                    std::int64_t stride_r, float eps, int tpr) {
  __shared__ float red[32];
  const int rows_per_block = blockDim.x / tpr;
  const int local_row = threadIdx.x / tpr;
  const int t = threadIdx.x & (tpr - 1);
  const int nv = N / VEC;
  const bool has_w = w != nullptr;
  const bool has_r = r != nullptr;

  for (std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * rows_per_block; base < M;
       base += static_cast<std::int64_t>(gridDim.x) * rows_per_block) {
    const std::int64_t row = base + local_row;
    const bool valid = row < M;
    Vec<T, VEC> hv[ITEMS];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = t + i * tpr;
      if (valid && j < nv) {
        const std::int64_t col = static_cast<std::int64_t>(j) * VEC;
        hv[i] = load_vec<T, VEC>(x + row * stride_x + col);
        if (has_r) {
          const Vec<T, VEC> rv = load_vec<T, VEC>(r + row * stride_r + col);
#pragma unroll
          for (int k = 0; k < VEC; ++k) hv[i].v[k] = from_float<T>(to_float(hv[i].v[k]) + to_float(rv.v[k]));
          store_vec<T, VEC>(h + row * N + col, hv[i]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float f = to_float(hv[i].v[k]);
          ss += f * f;
        }
      }
    }
    ss = group_reduce_sum(ss, tpr, red);
    const float rs = rsqrtf(ss / static_cast<float>(N) + eps);
    if (valid && t == 0) rstd_out[row] = rs;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = t + i * tpr;
      if (valid && j < nv) {
        const std::int64_t col = static_cast<std::int64_t>(j) * VEC;
        float out[VEC];
        if (has_w) {
          float wv[VEC];
          load_float<W, VEC>(w + col, wv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = (to_float(hv[i].v[k]) * rs) * wv[k];
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) out[k] = to_float(hv[i].v[k]) * rs;
        }
        store_float<T, VEC>(y + row * N + col, out);
      }
    }
  }
}

// Same contract, one row per block, any N: the first pass computes (and
// stores) h and the sum of squares, the second re-reads h (x, or the h this
// thread just stored) to write y. No __restrict__: h is written then read.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kFwdMaxThreads, 1)
rms_norm_fwd_loop_kernel(const T* x, const W* w, const T* r, T* y, T* h, float* rstd_out, std::int64_t M, int N,
                         std::int64_t stride_x, std::int64_t stride_r, float eps) {
  __shared__ float red[32];
  const int tpr = blockDim.x;
  const int t = threadIdx.x;
  const int nv = N / VEC;
  const bool has_w = w != nullptr;
  const bool has_r = r != nullptr;

  for (std::int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xrow = x + row * stride_x;
    T* hrow = h + row * N;  // only dereferenced when has_r
    float ss = 0.f;
    for (int j = t; j < nv; j += tpr) {
      const int col = j * VEC;
      Vec<T, VEC> hv = load_vec<T, VEC>(xrow + col);
      if (has_r) {
        const Vec<T, VEC> rv = load_vec<T, VEC>(r + row * stride_r + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) hv.v[k] = from_float<T>(to_float(hv.v[k]) + to_float(rv.v[k]));
        store_vec<T, VEC>(hrow + col, hv);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = to_float(hv.v[k]);
        ss += f * f;
      }
    }
    ss = group_reduce_sum(ss, tpr, red);
    const float rs = rsqrtf(ss / static_cast<float>(N) + eps);
    if (t == 0) rstd_out[row] = rs;
    const T* src = has_r ? hrow : xrow;
    for (int j = t; j < nv; j += tpr) {
      const int col = j * VEC;
      float hf[VEC];
      load_float<T, VEC>(src + col, hf);
      float out[VEC];
      if (has_w) {
        float wv[VEC];
        load_float<W, VEC>(w + col, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (hf[k] * rs) * wv[k];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = hf[k] * rs;
      }
      store_float<T, VEC>(y + row * N + col, out);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// dy: [M, N] row stride stride_dy       h: [M, N] row stride stride_h
// w:  [N] or null                       rstd: [M] fp32
// dhout: [M, N] row stride stride_dhout or null
// dx: [M, N] contiguous                 dw_partial: [gridDim.x, N] fp32 (iff w)
// Block b handles rows b*rpb + k*gridDim.x*rpb (+ local row), accumulates
// dy * xhat per thread in registers and reduces its row groups in shared
// memory (N floats of dynamic shared memory when rpb > 1) in a fixed order.
template <typename T, typename W, int VEC, int ITEMS>
__global__ void __launch_bounds__(launch_bound(ITEMS, bwd_max_items<T, W>(), kBwdMaxThreads), 1)
rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ w,
                    const float* __restrict__ rstd, const T* __restrict__ dhout, T* __restrict__ dx,
                    float* __restrict__ dw_partial, std::int64_t M, int N, std::int64_t stride_dy,
                    std::int64_t stride_h, std::int64_t stride_dhout, int tpr) {
  __shared__ float red[32];
  extern __shared__ float dw_smem[];
  const int rows_per_block = blockDim.x / tpr;
  const int local_row = threadIdx.x / tpr;
  const int t = threadIdx.x & (tpr - 1);
  const int nv = N / VEC;
  const bool has_w = w != nullptr;
  const bool has_dh = dhout != nullptr;
  const float inv_n = 1.0f / static_cast<float>(N);

  float dw_acc[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw_acc[i][k] = 0.f;

  for (std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * rows_per_block; base < M;
       base += static_cast<std::int64_t>(gridDim.x) * rows_per_block) {
    const std::int64_t row = base + local_row;
    const bool valid = row < M;
    Vec<T, VEC> dyv[ITEMS];
    Vec<T, VEC> hv[ITEMS];
    const float rs = valid ? rstd[row] : 0.f;
    float dot = 0.f;  // sum(g * h); times rstd gives sum(g * xhat)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = t + i * tpr;
      if (valid && j < nv) {
        const std::int64_t col = static_cast<std::int64_t>(j) * VEC;
        dyv[i] = load_vec<T, VEC>(dy + row * stride_dy + col);
        hv[i] = load_vec<T, VEC>(h + row * stride_h + col);
        if (has_w) {
          float wv[VEC];
          load_float<W, VEC>(w + col, wv);
#pragma unroll
          for (int k = 0; k < VEC; ++k) dot += (to_float(dyv[i].v[k]) * wv[k]) * (to_float(hv[i].v[k]) * rs);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) dot += to_float(dyv[i].v[k]) * (to_float(hv[i].v[k]) * rs);
        }
      }
    }
    dot = group_reduce_sum(dot, tpr, red);
    const float c = dot * inv_n;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = t + i * tpr;
      if (valid && j < nv) {
        const std::int64_t col = static_cast<std::int64_t>(j) * VEC;
        float wv[VEC];
        if (has_w) {
          load_float<W, VEC>(w + col, wv);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) wv[k] = 1.f;
        }
        float dh[VEC];
        if (has_dh) {
          load_float<T, VEC>(dhout + row * stride_dhout + col, dh);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) dh[k] = 0.f;
        }
        float out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_float(dyv[i].v[k]);
          const float xhat = to_float(hv[i].v[k]) * rs;
          out[k] = rs * (d * wv[k] - xhat * c) + dh[k];
          dw_acc[i][k] += d * xhat;
        }
        store_float<T, VEC>(dx + row * N + col, out);
      }
    }
  }

  if (!has_w) return;
  float* part = dw_partial + static_cast<std::int64_t>(blockIdx.x) * N;
  if (rows_per_block == 1) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = t + i * tpr;
      if (j < nv) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) part[j * VEC + k] = dw_acc[i][k];
      }
    }
    return;
  }
  // Several row groups cover the same columns: add them in group order.
  for (int g = 0; g < rows_per_block; ++g) {
    if (local_row == g) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int j = t + i * tpr;
        if (j < nv) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            float* s = dw_smem + j * VEC + k;
            *s = (g == 0) ? dw_acc[i][k] : *s + dw_acc[i][k];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int col = threadIdx.x; col < N; col += blockDim.x) part[col] = dw_smem[col];
}

// Same contract, one row per block, any N. dw partials are accumulated in
// place in this block's row of dw_partial (same thread, same addresses each
// row, so no races), in row order.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kBwdMaxThreads, 1)
rms_norm_bwd_loop_kernel(const T* __restrict__ dy, const T* __restrict__ h, const W* __restrict__ w,
                         const float* __restrict__ rstd, const T* __restrict__ dhout, T* __restrict__ dx,
                         float* dw_partial, std::int64_t M, int N, std::int64_t stride_dy, std::int64_t stride_h,
                         std::int64_t stride_dhout) {
  __shared__ float red[32];
  const int tpr = blockDim.x;
  const int t = threadIdx.x;
  const int nv = N / VEC;
  const bool has_w = w != nullptr;
  const bool has_dh = dhout != nullptr;
  const float inv_n = 1.0f / static_cast<float>(N);
  float* part = has_w ? dw_partial + static_cast<std::int64_t>(blockIdx.x) * N : nullptr;
  bool first = true;

  for (std::int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* dyrow = dy + row * stride_dy;
    const T* hrow = h + row * stride_h;
    const float rs = rstd[row];
    float dot = 0.f;
    for (int j = t; j < nv; j += tpr) {
      const int col = j * VEC;
      float d[VEC], hf[VEC];
      load_float<T, VEC>(dyrow + col, d);
      load_float<T, VEC>(hrow + col, hf);
      if (has_w) {
        float wv[VEC];
        load_float<W, VEC>(w + col, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += (d[k] * wv[k]) * (hf[k] * rs);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += d[k] * (hf[k] * rs);
      }
    }
    dot = group_reduce_sum(dot, tpr, red);
    const float c = dot * inv_n;
    for (int j = t; j < nv; j += tpr) {
      const int col = j * VEC;
      float d[VEC], hf[VEC], wv[VEC], dh[VEC], out[VEC];
      load_float<T, VEC>(dyrow + col, d);
      load_float<T, VEC>(hrow + col, hf);
      if (has_w) {
        load_float<W, VEC>(w + col, wv);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) wv[k] = 1.f;
      }
      if (has_dh) {
        load_float<T, VEC>(dhout + row * stride_dhout + col, dh);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) dh[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = hf[k] * rs;
        out[k] = rs * (d[k] * wv[k] - xhat * c) + dh[k];
        hf[k] = d[k] * xhat;  // reuse: this row's dw contribution
      }
      store_float<T, VEC>(dx + row * N + col, out);
      if (has_w) {
        if (first) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) part[col + k] = hf[k];
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) part[col + k] += hf[k];
        }
      }
    }
    first = false;
  }
  if (has_w && first) {  // no rows for this block: its partial is zero
    for (int col = t; col < N; col += tpr) part[col] = 0.f;
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int next_pow2(std::int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

struct LaunchConfig {
  int tpr;    // threads per row (power of two)
  int items;  // vectors per thread; 0 = looped kernel
  int block;  // threads per block
};

// nv = vectors per row, max_threads = most threads per row, max_items = most vectors a
// thread keeps in registers (1, 2, 4 or 8). Rows that do not fit get items = 0: the looped kernel.
LaunchConfig choose_config(std::int64_t nv, int max_threads, int max_items) {
  LaunchConfig c{};
  const int mid = std::min(4, max_items);  // items per thread past one warp's worth of 2
  if (nv <= 32) {
    c.tpr = next_pow2(nv);
    c.items = 1;
  } else if (nv <= 64) {
    c.tpr = 32;
    c.items = 2;
  } else if (nv <= static_cast<std::int64_t>(max_threads) * mid) {
    c.items = mid;
    c.tpr = std::max(32, next_pow2((nv + mid - 1) / mid));
  } else if (max_items >= 8 && nv <= static_cast<std::int64_t>(max_threads) * 8) {
    c.items = 8;
    c.tpr = max_threads;
  } else {
    c.items = 0;
    c.tpr = max_threads;
  }
  c.block = std::max(c.tpr, kMinBlock);
  return c;
}

unsigned grid_for(std::int64_t rows, int rows_per_block) {
  const std::int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(std::min<std::int64_t>(blocks, INT_MAX));
}

template <typename P> bool aligned16(P p) { return is_aligned(static_cast<std::uintptr_t>(p), 16); }

template <typename T, typename W, int VEC>
void launch_fwd(const LaunchConfig& c, std::uintptr_t x, std::uintptr_t w, std::uintptr_t r, std::uintptr_t y,
                std::uintptr_t h, std::uintptr_t rstd, std::int64_t M, int N, std::int64_t sx, std::int64_t sr,
                float eps, cudaStream_t stream) {
  const T* xp = reinterpret_cast<const T*>(x);
  const W* wp = reinterpret_cast<const W*>(w);
  const T* rp = reinterpret_cast<const T*>(r);
  T* yp = reinterpret_cast<T*>(y);
  T* hp = reinterpret_cast<T*>(h);
  float* sp = reinterpret_cast<float*>(rstd);
  const int rpb = c.block / c.tpr;
  const unsigned grid = grid_for(M, rpb);
  switch (c.items) {
#define FASTGEN_FWD_CASE(ITEMS)                                                                   \
  case ITEMS:                                                                                     \
    rms_norm_fwd_kernel<T, W, VEC, ITEMS><<<grid, c.block, 0, stream>>>(xp, wp, rp, yp, hp, sp, M, N, sx, sr, \
                                                                        eps, c.tpr);              \
    break;
    FASTGEN_FWD_CASE(1)
    FASTGEN_FWD_CASE(2)
#undef FASTGEN_FWD_CASE
    case 4:
      if constexpr (fwd_max_items<T, W>() >= 4) {
        rms_norm_fwd_kernel<T, W, VEC, 4><<<grid, c.block, 0, stream>>>(xp, wp, rp, yp, hp, sp, M, N, sx, sr, eps,
                                                                        c.tpr);
      }
      break;
    case 8:
      if constexpr (fwd_max_items<T, W>() >= 8) {
        rms_norm_fwd_kernel<T, W, VEC, 8><<<grid, c.block, 0, stream>>>(xp, wp, rp, yp, hp, sp, M, N, sx, sr, eps,
                                                                        c.tpr);
      }
      break;
    default:
      rms_norm_fwd_loop_kernel<T, W, VEC><<<grid, c.block, 0, stream>>>(xp, wp, rp, yp, hp, sp, M, N, sx, sr, eps);
      break;
  }
  FASTGEN_CHECK_LAUNCH("rms_norm_fwd kernel launch");
}

template <typename T, typename W, int VEC>
void launch_bwd(const LaunchConfig& c, std::uintptr_t dy, std::uintptr_t h, std::uintptr_t w, std::uintptr_t rstd,
                std::uintptr_t dhout, std::uintptr_t dx, std::uintptr_t dwp, std::int64_t M, int N, std::int64_t sdy,
                std::int64_t sh, std::int64_t sdh, std::int64_t num_partials, cudaStream_t stream) {
  const T* dyp = reinterpret_cast<const T*>(dy);
  const T* hp = reinterpret_cast<const T*>(h);
  const W* wp = reinterpret_cast<const W*>(w);
  const float* sp = reinterpret_cast<const float*>(rstd);
  const T* dhp = reinterpret_cast<const T*>(dhout);
  T* dxp = reinterpret_cast<T*>(dx);
  float* dwpp = reinterpret_cast<float*>(dwp);
  const int rpb = c.block / c.tpr;
  // With a weight, block b owns dw_partial[b]: exactly num_partials blocks.
  const unsigned grid = w != 0 ? static_cast<unsigned>(num_partials) : grid_for(M, rpb);
  const std::size_t smem = (w != 0 && rpb > 1) ? static_cast<std::size_t>(N) * sizeof(float) : 0;
  switch (c.items) {
#define FASTGEN_BWD_CASE(ITEMS)                                                                          \
  case ITEMS:                                                                                            \
    rms_norm_bwd_kernel<T, W, VEC, ITEMS><<<grid, c.block, smem, stream>>>(dyp, hp, wp, sp, dhp, dxp, dwpp, M, N, \
                                                                           sdy, sh, sdh, c.tpr);         \
    break;
    FASTGEN_BWD_CASE(1)
    FASTGEN_BWD_CASE(2)
#undef FASTGEN_BWD_CASE
    case 4:
      if constexpr (bwd_max_items<T, W>() >= 4) {
        rms_norm_bwd_kernel<T, W, VEC, 4><<<grid, c.block, smem, stream>>>(dyp, hp, wp, sp, dhp, dxp, dwpp, M, N, sdy,
                                                                           sh, sdh, c.tpr);
      }
      break;
    default:
      rms_norm_bwd_loop_kernel<T, W, VEC><<<grid, c.block, 0, stream>>>(dyp, hp, wp, sp, dhp, dxp, dwpp, M, N, sdy,
                                                                        sh, sdh);
      break;
  }
  FASTGEN_CHECK_LAUNCH("rms_norm_bwd kernel launch");
}

void check_common(const char* op, std::int64_t M, std::int64_t N, int x_dtype, int w_dtype) {
  FASTGEN_ARG_CHECK(M >= 0 && N >= 0, std::string(op) + ": M and N must be >= 0, got M=" + std::to_string(M) +
                                          ", N=" + std::to_string(N));
  FASTGEN_ARG_CHECK(N <= INT_MAX, std::string(op) + ": N must be < 2^31, got " + std::to_string(N));
  FASTGEN_ARG_CHECK(valid_dtype(x_dtype) && (w_dtype == x_dtype || w_dtype == kFloat32),
                    std::string(op) + ": unsupported dtypes x_dtype=" + std::to_string(x_dtype) + " (" +
                        dtype_name(x_dtype) + "), w_dtype=" + std::to_string(w_dtype) + " (" + dtype_name(w_dtype) +
                        "); supported: x_dtype in {0=float32, 1=float16, 2=bfloat16}, w_dtype equal to x_dtype or "
                        "0 (float32)");
}

}  // namespace

void rms_norm_fwd(std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t r_ptr, std::uintptr_t y_ptr,
                  std::uintptr_t h_ptr, std::uintptr_t rstd_ptr, std::int64_t M, std::int64_t N,
                  std::int64_t stride_x, std::int64_t stride_r, int x_dtype, int w_dtype, double eps,
                  std::uintptr_t stream) {
  check_common("rms_norm_fwd", M, N, x_dtype, w_dtype);
  if (M == 0 || N == 0) return;
  FASTGEN_ARG_CHECK(x_ptr != 0 && y_ptr != 0 && rstd_ptr != 0, "rms_norm_fwd: x, y and rstd pointers must be non-null");
  FASTGEN_ARG_CHECK(r_ptr == 0 || h_ptr != 0, "rms_norm_fwd: h pointer must be non-null when a residual is given");
  FASTGEN_ARG_CHECK(M == 1 || stride_x >= N, "rms_norm_fwd: stride_x must be >= N");
  FASTGEN_ARG_CHECK(r_ptr == 0 || M == 1 || stride_r >= N, "rms_norm_fwd: stride_r must be >= N");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float feps = static_cast<float>(eps);
  const int n = static_cast<int>(N);
  FASTGEN_DISPATCH_X_W(x_dtype, w_dtype, "rms_norm_fwd", {
    constexpr int V = 16 / sizeof(scalar_t);
    const std::int64_t bytes_x = static_cast<std::int64_t>(sizeof(scalar_t));
    const bool vec = N % V == 0 && aligned16(x_ptr) && aligned16(y_ptr) && (stride_x * bytes_x) % 16 == 0 &&
                     (r_ptr == 0 || (aligned16(r_ptr) && aligned16(h_ptr) && (stride_r * bytes_x) % 16 == 0)) &&
                     (w_ptr == 0 || is_aligned(w_ptr, static_cast<int>(sizeof(Vec<weight_t, V>))));
    if (vec) {
      launch_fwd<scalar_t, weight_t, V>(choose_config(N / V, kFwdMaxThreads, fwd_max_items<scalar_t, weight_t>()), x_ptr, w_ptr, r_ptr, y_ptr, h_ptr,
                                        rstd_ptr, M, n, stride_x, stride_r, feps, s);
    } else {
      launch_fwd<scalar_t, weight_t, 1>(choose_config(N, kFwdMaxThreads, fwd_max_items<scalar_t, weight_t>()), x_ptr, w_ptr, r_ptr, y_ptr, h_ptr,
                                        rstd_ptr, M, n, stride_x, stride_r, feps, s);
    }
  });
}

void rms_norm_bwd(std::uintptr_t dy_ptr, std::uintptr_t h_ptr, std::uintptr_t w_ptr, std::uintptr_t rstd_ptr,
                  std::uintptr_t dhout_ptr, std::uintptr_t dx_ptr, std::uintptr_t dw_partial_ptr, std::int64_t M,
                  std::int64_t N, std::int64_t stride_dy, std::int64_t stride_h, std::int64_t stride_dhout,
                  int x_dtype, int w_dtype, std::int64_t num_partials, std::uintptr_t stream) {
  check_common("rms_norm_bwd", M, N, x_dtype, w_dtype);
  if (M == 0 || N == 0) return;
  FASTGEN_ARG_CHECK(dy_ptr != 0 && h_ptr != 0 && rstd_ptr != 0 && dx_ptr != 0,
                    "rms_norm_bwd: dy, h, rstd and dx pointers must be non-null");
  FASTGEN_ARG_CHECK(w_ptr == 0 || dw_partial_ptr != 0, "rms_norm_bwd: dw_partial must be non-null when w is given");
  FASTGEN_ARG_CHECK(w_ptr == 0 || (num_partials >= 1 && num_partials <= INT_MAX),
                    "rms_norm_bwd: num_partials must be in [1, 2^31), got " + std::to_string(num_partials));
  FASTGEN_ARG_CHECK(M == 1 || (stride_dy >= N && stride_h >= N), "rms_norm_bwd: stride_dy and stride_h must be >= N");
  FASTGEN_ARG_CHECK(dhout_ptr == 0 || M == 1 || stride_dhout >= N, "rms_norm_bwd: stride_dhout must be >= N");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int n = static_cast<int>(N);
  FASTGEN_DISPATCH_X_W(x_dtype, w_dtype, "rms_norm_bwd", {
    constexpr int V = 16 / sizeof(scalar_t);
    const std::int64_t bytes_x = static_cast<std::int64_t>(sizeof(scalar_t));
    const bool vec = N % V == 0 && aligned16(dy_ptr) && aligned16(h_ptr) && aligned16(dx_ptr) &&
                     (stride_dy * bytes_x) % 16 == 0 && (stride_h * bytes_x) % 16 == 0 &&
                     (dhout_ptr == 0 || (aligned16(dhout_ptr) && (stride_dhout * bytes_x) % 16 == 0)) &&
                     (w_ptr == 0 || is_aligned(w_ptr, static_cast<int>(sizeof(Vec<weight_t, V>))));
    if (vec) {
      launch_bwd<scalar_t, weight_t, V>(choose_config(N / V, kBwdMaxThreads, bwd_max_items<scalar_t, weight_t>()), dy_ptr, h_ptr, w_ptr, rstd_ptr,
                                        dhout_ptr, dx_ptr, dw_partial_ptr, M, n, stride_dy, stride_h, stride_dhout,
                                        num_partials, s);
    } else {
      launch_bwd<scalar_t, weight_t, 1>(choose_config(N, kBwdMaxThreads, bwd_max_items<scalar_t, weight_t>()), dy_ptr, h_ptr, w_ptr, rstd_ptr,
                                        dhout_ptr, dx_ptr, dw_partial_ptr, M, n, stride_dy, stride_h, stride_dhout,
                                        num_partials, s);
    }
  });
}

}  // namespace fastgen
