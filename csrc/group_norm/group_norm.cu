// GroupNorm forward / backward, with an optional fused SiLU.
//
// x is [N, C, S] (S = product of the spatial dims), contiguous (strides C*S, S, 1) or
// channels-last (strides S*C, 1, C). With K = C / G channels per group and L = K * S:
//
//     mean, var = mean and biased variance of group (n, g)         (fp32)
//     rstd      = 1 / sqrt(var + eps)
//     yn        = (x - mean) * rstd * w[c] + b[c]
//     y         = round_T(yn)  or  round_T(yn * sigmoid(yn))       (silu)
//
// Backward, with xhat = (x - mean) * rstd, dyn = dL/dyn (dy, or dy * s * (1 + yn * (1 - s)),
// s = sigmoid(yn), through the SiLU) and g = dyn * w:
//
//     dx    = rstd * (g - mean_L(g) - xhat * mean_L(g * xhat))
//     dw[c] = sum_{n,s} dyn * xhat            db[c] = sum_{n,s} dyn
//
// Group (n, g) is covered by `splits` blocks along S (chunk_s positions each; grid =
// N*G*splits blocks, block b = (n*G + g)*splits + split). The statistics are Welford per
// thread, then Chan's merge over a fixed shuffle tree and the warps in order: no sum of
// squares, deterministic.
//   * splits == 1: one kernel each way. The forward block computes the statistics of its
//     group and then normalizes it (the second read hits L1 / L2); the backward block
//     reduces the per-channel sums, merges them into mean_L(g), mean_L(g * xhat), then
//     writes dx.
//   * splits > 1: stats -> combine (merges the blocks' (count, mean, M2) in order) ->
//     apply; backward: per-block, per-channel partials -> combine -> dx.
// Weight / bias gradients come from per-block, per-channel fp32 partials [N*splits, C]
// summed over dim 0 by the caller: deterministic, no atomics.
//
// Thread layout: 256 threads as a TK x TS grid over (channel in group, position): for
// channels-last, channel is the fast index (tk = t % TK), otherwise position is (ts = t % TS),
// so neighbouring threads touch neighbouring addresses. Offsets are int64.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/reduce.cuh"
#include "group_norm.h"

namespace fastgen {
namespace {

constexpr int kThreads = 256;

// Geometry shared by the per-chunk kernels.
struct Geo {
  std::int64_t C, S;
  int G, K;
  int splits;
  std::int64_t chunk_s;
  int TK, TS;  // thread grid: TK channels x TS positions (TK * TS <= kThreads)
  bool cl;     // channels-last strides
};

struct Pos {
  std::int64_t ng;     // n * G + g
  std::int64_t n;      // sample
  std::int64_t c0;     // first channel of the group, g * K
  int split;
  std::int64_t base;   // offset of element (n, g*K, 0)
  std::int64_t sk, ss; // strides of channel and position
  std::int64_t s_begin, s_end;
  int tk, ts;
  bool active;
};

// reverse: blocks in the opposite order (the second-pass kernels of the split path start with
// the chunks the first pass read last, which are the likeliest to still be in L2).
__device__ __forceinline__ Pos locate(const Geo& geo, bool reverse = false) {
  Pos p;
  const std::int64_t b = reverse ? static_cast<std::int64_t>(gridDim.x) - 1 - blockIdx.x : blockIdx.x;
  p.ng = b / geo.splits;
  p.split = static_cast<int>(b % geo.splits);
  p.n = p.ng / geo.G;
  p.c0 = (p.ng - p.n * geo.G) * geo.K;
  p.sk = geo.cl ? 1 : geo.S;
  p.ss = geo.cl ? geo.C : 1;
  p.base = p.n * geo.C * geo.S + p.c0 * p.sk;
  p.s_begin = static_cast<std::int64_t>(p.split) * geo.chunk_s;
  p.s_end = min(geo.S, p.s_begin + geo.chunk_s);
  const int t = threadIdx.x;
  if (geo.cl) {
    p.tk = t % geo.TK;
    p.ts = t / geo.TK;
  } else {
    p.ts = t % geo.TS;
    p.tk = t / geo.TS;
  }
  p.active = t < geo.TK * geo.TS;
  return p;
}

// Chan's merge of (nb, mb, m2b) into (n, m, m2).
__device__ __forceinline__ void welford_merge(float& n, float& m, float& m2, float nb, float mb, float m2b) {
  const float nab = n + nb;
  if (nab == 0.f) return;
  const float frac = __fdividef(nb, nab);
  const float d = mb - m;
  m += d * frac;
  m2 += m2b + d * d * n * frac;
  n = nab;
}

// Merge over the block (fixed shuffle tree, then warps in order); the result is in thread 0.
__device__ __forceinline__ void block_welford(float& n, float& m, float& m2) {
  __shared__ float sh[3][32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float nb = __shfl_down_sync(kFullMask, n, off);
    const float mb = __shfl_down_sync(kFullMask, m, off);
    const float m2b = __shfl_down_sync(kFullMask, m2, off);
    welford_merge(n, m, m2, nb, mb, m2b);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    sh[0][warp] = n;
    sh[1][warp] = m;
    sh[2][warp] = m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < static_cast<int>(blockDim.x >> 5); ++i) welford_merge(n, m, m2, sh[0][i], sh[1][i], sh[2][i]);
  }
}

template <typename W>
__device__ __forceinline__ float param(const W* p, std::int64_t c, float dflt) {
  return p != nullptr ? to_float(p[c]) : dflt;
}

// __fdividef (2 ulp, no slow-path call that would force a stack frame); 1 / inf = 0 as wanted.
__device__ __forceinline__ float sigmoidf(float v) { return __fdividef(1.f, 1.f + expf(-v)); }

// ---------------------------------------------------------------------------
// Per-thread pieces shared by the kernels (each covers this block's chunk)
// ---------------------------------------------------------------------------

// Welford over this thread's elements of the chunk.
template <typename T>
__device__ __forceinline__ void thread_welford(const T* __restrict__ x, const Pos& p, const Geo& geo, float& n,
                                               float& m, float& m2) {
  if (!p.active) return;
  for (int k = p.tk; k < geo.K; k += geo.TK) {
    const T* row = x + p.base + k * p.sk;
    for (std::int64_t s = p.s_begin + p.ts; s < p.s_end; s += geo.TS) {
      const float v = to_float(row[s * p.ss]);
      n += 1.f;
      const float d = v - m;
      m += __fdividef(d, n);  // n <= 2^24: exact enough, no division slow path
      m2 += d * (v - m);
    }
  }
}

// y = act((x - mean) * rstd * w + b) over this thread's elements of the chunk.
template <typename T, typename W>
__device__ __forceinline__ void apply_chunk(const T* __restrict__ x, const W* __restrict__ w,
                                            const W* __restrict__ b, T* __restrict__ y, const Pos& p,
                                            const Geo& geo, float mean, float rstd, bool silu) {
  if (!p.active) return;
  const std::int64_t c0 = p.c0;
  for (int k = p.tk; k < geo.K; k += geo.TK) {
    const float wk = param(w, c0 + k, 1.f) * rstd;
    const float bk = param(b, c0 + k, 0.f);
    const std::int64_t row = p.base + k * p.sk;
    for (std::int64_t s = p.s_begin + p.ts; s < p.s_end; s += geo.TS) {
      const std::int64_t i = row + s * p.ss;
      float v = (to_float(x[i]) - mean) * wk + bk;
      if (silu) v = v * sigmoidf(v);
      y[i] = from_float<T>(v);
    }
  }
}

// Per channel of the group: this chunk's sums of dyn * xhat and dyn, reduced over the TS
// threads of the channel in order (sdw / sdb: kThreads floats of shared memory each) and
// written to dw_row[k] / db_row[k]. Returns, in the threads that wrote, their share of
// sum_k w_k * (sum dyn) and sum_k w_k * (sum dyn * xhat) (0 elsewhere). Every thread of
// the block must call it.
template <typename T, typename W>
__device__ __forceinline__ void grad_sums_chunk(const T* __restrict__ dy, const T* __restrict__ x,
                                                const W* __restrict__ w, const W* __restrict__ b, float* dw_row,
                                                float* db_row, const Pos& p, const Geo& geo, float mean,
                                                float rstd, bool silu, float* sdw, float* sdb, float& a1,
                                                float& a2) {
  const std::int64_t c0 = p.c0;
  a1 = 0.f;
  a2 = 0.f;
  for (int k0 = 0; k0 < geo.K; k0 += geo.TK) {  // uniform over the block
    const int k = k0 + p.tk;
    const bool kact = p.active && k < geo.K;
    float adw = 0.f, adb = 0.f;
    float wk = 1.f;
    if (kact) {
      wk = param(w, c0 + k, 1.f);
      const float bk = param(b, c0 + k, 0.f);
      const std::int64_t row = p.base + k * p.sk;
      for (std::int64_t s = p.s_begin + p.ts; s < p.s_end; s += geo.TS) {
        const std::int64_t i = row + s * p.ss;
        const float xhat = (to_float(x[i]) - mean) * rstd;
        float d = to_float(dy[i]);
        if (silu) {
          const float yn = xhat * wk + bk;
          const float sg = sigmoidf(yn);
          d *= sg * (1.f + yn * (1.f - sg));
        }
        adw += d * xhat;
        adb += d;
      }
    }
    sdw[threadIdx.x] = adw;
    sdb[threadIdx.x] = adb;
    __syncthreads();
    if (kact && p.ts == 0) {
      float sw = 0.f, sb = 0.f;
      for (int j = 0; j < geo.TS; ++j) {
        const int idx = geo.cl ? j * geo.TK + p.tk : p.tk * geo.TS + j;
        sw += sdw[idx];
        sb += sdb[idx];
      }
      dw_row[k] = sw;
      db_row[k] = sb;
      a1 += wk * sb;
      a2 += wk * sw;
    }
    __syncthreads();
  }
}

// dx = rstd * (dyn * w - c1 - xhat * c2) over this thread's elements of the chunk.
template <typename T, typename W>
__device__ __forceinline__ void dx_chunk(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                                         const W* __restrict__ b, T* __restrict__ dx, const Pos& p, const Geo& geo,
                                         float mean, float rstd, float c1, float c2, bool silu) {
  if (!p.active) return;
  const std::int64_t c0 = p.c0;
  for (int k = p.tk; k < geo.K; k += geo.TK) {
    const float wk = param(w, c0 + k, 1.f);
    const float bk = param(b, c0 + k, 0.f);
    const std::int64_t row = p.base + k * p.sk;
    for (std::int64_t s = p.s_begin + p.ts; s < p.s_end; s += geo.TS) {
      const std::int64_t i = row + s * p.ss;
      const float xhat = (to_float(x[i]) - mean) * rstd;
      float d = to_float(dy[i]);
      if (silu) {
        const float yn = xhat * wk + bk;
        const float sg = sigmoidf(yn);
        d *= sg * (1.f + yn * (1.f - sg));
      }
      dx[i] = from_float<T>(rstd * (d * wk - c1 - xhat * c2));
    }
  }
}

// ---------------------------------------------------------------------------
// One block per group (splits == 1): statistics and output in one launch, the second
// pass re-reading the group while it is in L1 / L2.
// ---------------------------------------------------------------------------

// x, y: [N, C, S]; mean / rstd: [N*G] fp32 out.
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) group_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                                  const W* __restrict__ b, T* __restrict__ y,
                                                                  float* __restrict__ mean_out,
                                                                  float* __restrict__ rstd_out, Geo geo, float eps,
                                                                  bool silu) {
  __shared__ float stats[2];
  const Pos p = locate(geo);
  float n = 0.f, m = 0.f, m2 = 0.f;
  thread_welford(x, p, geo, n, m, m2);
  block_welford(n, m, m2);
  if (threadIdx.x == 0) {
    const float rs = rsqrtf(__fdividef(m2, fmaxf(n, 1.f)) + eps);
    stats[0] = m;
    stats[1] = rs;
    mean_out[p.ng] = m;
    rstd_out[p.ng] = rs;
  }
  __syncthreads();
  apply_chunk(x, w, b, y, p, geo, stats[0], stats[1], silu);
}

// dwp / dbp: [N, C] fp32 out (per-channel sums of dyn * xhat and dyn over S); dx: [N, C, S].
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w, const W* __restrict__ b,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, float* __restrict__ dwp,
    float* __restrict__ dbp, T* __restrict__ dx, Geo geo, float inv_l, bool silu) {
  __shared__ float sdw[kThreads];
  __shared__ float sdb[kThreads];
  __shared__ float red[32];
  const Pos p = locate(geo);
  const float mean = mean_in[p.ng];
  const float rstd = rstd_in[p.ng];
  const std::int64_t row0 = p.ng * geo.K;  // = n * C + g * K
  float a1, a2;
  grad_sums_chunk(dy, x, w, b, dwp + row0, dbp + row0, p, geo, mean, rstd, silu, sdw, sdb, a1, a2);
  const float c1 = group_reduce_sum(a1, blockDim.x, red) * inv_l;
  const float c2 = group_reduce_sum(a2, blockDim.x, red) * inv_l;
  dx_chunk(dy, x, w, b, dx, p, geo, mean, rstd, c1, c2, silu);
}

// ---------------------------------------------------------------------------
// Split reduction (splits > 1)
// ---------------------------------------------------------------------------

// x: [N, C, S]; part: [N*G, splits, 3] fp32 out, (count, mean, M2) of this block's chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads) group_norm_stats_kernel(const T* __restrict__ x, float* __restrict__ part,
                                                                    Geo geo) {
  const Pos p = locate(geo);
  float n = 0.f, m = 0.f, m2 = 0.f;
  thread_welford(x, p, geo, n, m, m2);
  block_welford(n, m, m2);
  if (threadIdx.x == 0) {
    float* q = part + (p.ng * geo.splits + p.split) * 3;
    q[0] = n;
    q[1] = m;
    q[2] = m2;
  }
}

// One warp per group: lanes merge splits lane, lane + 32, ...; then a fixed shuffle tree.
__global__ void __launch_bounds__(32) group_norm_combine_kernel(const float* __restrict__ part,
                                                                float* __restrict__ mean_out,
                                                                float* __restrict__ rstd_out, int splits, float eps) {
  const std::int64_t ng = blockIdx.x;
  float n = 0.f, m = 0.f, m2 = 0.f;
  for (int i = threadIdx.x; i < splits; i += 32) {
    const float* q = part + (ng * splits + i) * 3;
    welford_merge(n, m, m2, q[0], q[1], q[2]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float nb = __shfl_down_sync(kFullMask, n, off);
    const float mb = __shfl_down_sync(kFullMask, m, off);
    const float m2b = __shfl_down_sync(kFullMask, m2, off);
    welford_merge(n, m, m2, nb, mb, m2b);
  }
  if (threadIdx.x == 0) {
    mean_out[ng] = m;
    rstd_out[ng] = rsqrtf(__fdividef(m2, fmaxf(n, 1.f)) + eps);
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) group_norm_apply_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                                    const W* __restrict__ b,
                                                                    const float* __restrict__ mean_in,
                                                                    const float* __restrict__ rstd_in,
                                                                    T* __restrict__ y, Geo geo, bool silu) {
  const Pos p = locate(geo, true);
  apply_chunk(x, w, b, y, p, geo, mean_in[p.ng], rstd_in[p.ng], silu);
}

// dwp / dbp: [N*splits, C] fp32 out, this block's per-channel partial sums.
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_reduce_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w, const W* __restrict__ b,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, float* __restrict__ dwp,
    float* __restrict__ dbp, Geo geo, bool silu) {
  __shared__ float sdw[kThreads];
  __shared__ float sdb[kThreads];
  const Pos p = locate(geo);
  const std::int64_t row0 = (p.n * geo.splits + p.split) * geo.C + p.c0;
  float a1, a2;
  grad_sums_chunk(dy, x, w, b, dwp + row0, dbp + row0, p, geo, mean_in[p.ng], rstd_in[p.ng], silu, sdw, sdb, a1,
                  a2);
}

// One block per group: c[0][ng] = sum_{split,k} w_k dbp / L = mean_L(g),
// c[1][ng] = sum_{split,k} w_k dwp / L = mean_L(g * xhat).
template <typename W>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_combine_kernel(const float* __restrict__ dwp,
                                                                          const float* __restrict__ dbp,
                                                                          const W* __restrict__ w,
                                                                          float* __restrict__ c, Geo geo,
                                                                          std::int64_t NG, float inv_l) {
  __shared__ float red[32];
  const std::int64_t ng = blockIdx.x;
  const std::int64_t n = ng / geo.G;
  const std::int64_t c0 = (ng % geo.G) * geo.K;
  const std::int64_t total = static_cast<std::int64_t>(geo.splits) * geo.K;
  float a1 = 0.f, a2 = 0.f;
  for (std::int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const std::int64_t sp = i / geo.K;
    const int k = static_cast<int>(i % geo.K);
    const std::int64_t off = (n * geo.splits + sp) * geo.C + c0 + k;
    const float wk = param(w, c0 + k, 1.f);
    a1 += wk * dbp[off];
    a2 += wk * dwp[off];
  }
  a1 = group_reduce_sum(a1, blockDim.x, red);
  a2 = group_reduce_sum(a2, blockDim.x, red);
  if (threadIdx.x == 0) {
    c[ng] = a1 * inv_l;
    c[NG + ng] = a2 * inv_l;
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) group_norm_bwd_dx_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w, const W* __restrict__ b,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, const float* __restrict__ c,
    T* __restrict__ dx, Geo geo, std::int64_t NG, bool silu) {
  const Pos p = locate(geo, true);
  dx_chunk(dy, x, w, b, dx, p, geo, mean_in[p.ng], rstd_in[p.ng], c[p.ng], c[NG + p.ng], silu);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int next_pow2(std::int64_t v) {
  int q = 1;
  while (q < v && q < (1 << 30)) q <<= 1;
  return q;
}

Geo make_geo(std::int64_t C, std::int64_t S, std::int64_t G, bool cl, std::int64_t splits, std::int64_t chunk_s) {
  Geo geo{};
  geo.C = C;
  geo.S = S;
  geo.G = static_cast<int>(G);
  geo.K = static_cast<int>(C / G);
  geo.splits = static_cast<int>(splits);
  geo.chunk_s = chunk_s;
  geo.cl = cl;
  const std::int64_t len = std::min<std::int64_t>(chunk_s, S);
  if (cl) {
    geo.TK = std::min(geo.K, kThreads);
    geo.TS = static_cast<int>(std::min<std::int64_t>(kThreads / geo.TK, next_pow2(len)));
  } else {
    geo.TS = std::min(kThreads, next_pow2(len));
    geo.TK = std::min(geo.K, kThreads / geo.TS);
  }
  return geo;
}

void check_args(const char* op, std::int64_t N, std::int64_t C, std::int64_t S, std::int64_t G,
                std::int64_t splits, std::int64_t chunk_s, int x_dtype, int w_dtype) {
  const std::string o(op);
  FASTGEN_ARG_CHECK(N >= 0 && C >= 0 && S >= 0, o + ": N, C and S must be >= 0");
  FASTGEN_ARG_CHECK(G >= 1 && C % G == 0, o + ": C=" + std::to_string(C) + " must be divisible by G=" +
                                              std::to_string(G) + " >= 1");
  FASTGEN_ARG_CHECK(C / G <= INT_MAX && G <= INT_MAX, o + ": too many channels");
  FASTGEN_ARG_CHECK(valid_dtype(x_dtype) && (w_dtype == x_dtype || w_dtype == kFloat32),
                    o + ": unsupported dtypes x_dtype=" + std::to_string(x_dtype) + " (" + dtype_name(x_dtype) +
                        "), w_dtype=" + std::to_string(w_dtype) + " (" + dtype_name(w_dtype) +
                        "); supported: x_dtype in {0=float32, 1=float16, 2=bfloat16}, w_dtype equal to x_dtype or "
                        "0 (float32)");
  if (N * C * S == 0) return;
  FASTGEN_ARG_CHECK(splits >= 1 && splits <= INT_MAX && chunk_s >= 1 && (splits - 1) * chunk_s < S &&
                        splits * chunk_s >= S,
                    o + ": splits * chunk_s must cover S with no empty split, got splits=" + std::to_string(splits) +
                        ", chunk_s=" + std::to_string(chunk_s) + ", S=" + std::to_string(S));
  FASTGEN_ARG_CHECK(N * G * splits <= INT_MAX, o + ": N * G * splits must be < 2^31");
}

}  // namespace

void group_norm_fwd(std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t b_ptr, std::uintptr_t y_ptr,
                    std::uintptr_t mean_ptr, std::uintptr_t rstd_ptr, std::uintptr_t part_ptr, std::int64_t N,
                    std::int64_t C, std::int64_t S, std::int64_t G, int channels_last, std::int64_t splits,
                    std::int64_t chunk_s, int x_dtype, int w_dtype, double eps, int silu, std::uintptr_t stream) {
  check_args("group_norm_fwd", N, C, S, G, splits, chunk_s, x_dtype, w_dtype);
  if (N * C * S == 0) return;
  FASTGEN_ARG_CHECK(x_ptr != 0 && y_ptr != 0 && mean_ptr != 0 && rstd_ptr != 0,
                    "group_norm_fwd: x, y, mean and rstd pointers must be non-null");
  FASTGEN_ARG_CHECK(splits == 1 || part_ptr != 0, "group_norm_fwd: part must be non-null when splits > 1");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const Geo geo = make_geo(C, S, G, channels_last != 0, splits, chunk_s);
  const std::int64_t NG = N * G;
  const unsigned blocks = static_cast<unsigned>(NG * splits);
  float* mean = reinterpret_cast<float*>(mean_ptr);
  float* rstd = reinterpret_cast<float*>(rstd_ptr);
  float* part = reinterpret_cast<float*>(part_ptr);
  const float feps = static_cast<float>(eps);
  FASTGEN_DISPATCH_X_W(x_dtype, w_dtype, "group_norm_fwd", {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(x_ptr);
    const weight_t* w = reinterpret_cast<const weight_t*>(w_ptr);
    const weight_t* b = reinterpret_cast<const weight_t*>(b_ptr);
    scalar_t* y = reinterpret_cast<scalar_t*>(y_ptr);
    if (splits == 1) {
      group_norm_fwd_kernel<scalar_t, weight_t><<<blocks, kThreads, 0, st>>>(x, w, b, y, mean, rstd, geo, feps,
                                                                            silu != 0);
      FASTGEN_CHECK_LAUNCH("group_norm_fwd kernel launch");
    } else {
      group_norm_stats_kernel<scalar_t><<<blocks, kThreads, 0, st>>>(x, part, geo);
      FASTGEN_CHECK_LAUNCH("group_norm_fwd stats kernel launch");
      group_norm_combine_kernel<<<static_cast<unsigned>(NG), 32, 0, st>>>(part, mean, rstd, geo.splits, feps);
      FASTGEN_CHECK_LAUNCH("group_norm_fwd combine kernel launch");
      group_norm_apply_kernel<scalar_t, weight_t><<<blocks, kThreads, 0, st>>>(x, w, b, mean, rstd, y, geo,
                                                                              silu != 0);
      FASTGEN_CHECK_LAUNCH("group_norm_fwd apply kernel launch");
    }
  });
}

void group_norm_bwd(std::uintptr_t dy_ptr, std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t b_ptr,
                    std::uintptr_t mean_ptr, std::uintptr_t rstd_ptr, std::uintptr_t dwp_ptr, std::uintptr_t dbp_ptr,
                    std::uintptr_t c_ptr, std::uintptr_t dx_ptr, std::int64_t N, std::int64_t C, std::int64_t S,
                    std::int64_t G, int channels_last, std::int64_t splits, std::int64_t chunk_s, int x_dtype,
                    int w_dtype, int silu, std::uintptr_t stream) {
  check_args("group_norm_bwd", N, C, S, G, splits, chunk_s, x_dtype, w_dtype);
  if (N * C * S == 0) return;
  FASTGEN_ARG_CHECK(dy_ptr != 0 && x_ptr != 0 && mean_ptr != 0 && rstd_ptr != 0 && dwp_ptr != 0 && dbp_ptr != 0 &&
                        c_ptr != 0 && dx_ptr != 0,
                    "group_norm_bwd: dy, x, mean, rstd, dwp, dbp, c and dx pointers must be non-null");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const Geo geo = make_geo(C, S, G, channels_last != 0, splits, chunk_s);
  const std::int64_t NG = N * G;
  const unsigned blocks = static_cast<unsigned>(NG * splits);
  const float* mean = reinterpret_cast<const float*>(mean_ptr);
  const float* rstd = reinterpret_cast<const float*>(rstd_ptr);
  float* dwp = reinterpret_cast<float*>(dwp_ptr);
  float* dbp = reinterpret_cast<float*>(dbp_ptr);
  float* c = reinterpret_cast<float*>(c_ptr);
  const float inv_l = static_cast<float>(1.0 / (static_cast<double>(C / G) * static_cast<double>(S)));
  FASTGEN_DISPATCH_X_W(x_dtype, w_dtype, "group_norm_bwd", {
    const scalar_t* dy = reinterpret_cast<const scalar_t*>(dy_ptr);
    const scalar_t* x = reinterpret_cast<const scalar_t*>(x_ptr);
    const weight_t* w = reinterpret_cast<const weight_t*>(w_ptr);
    const weight_t* b = reinterpret_cast<const weight_t*>(b_ptr);
    if (splits == 1) {
      group_norm_bwd_kernel<scalar_t, weight_t><<<blocks, kThreads, 0, st>>>(
          dy, x, w, b, mean, rstd, dwp, dbp, reinterpret_cast<scalar_t*>(dx_ptr), geo, inv_l, silu != 0);
      FASTGEN_CHECK_LAUNCH("group_norm_bwd kernel launch");
      return;
    }
    group_norm_bwd_reduce_kernel<scalar_t, weight_t><<<blocks, kThreads, 0, st>>>(dy, x, w, b, mean, rstd, dwp, dbp,
                                                                                 geo, silu != 0);
    FASTGEN_CHECK_LAUNCH("group_norm_bwd reduce kernel launch");
    group_norm_bwd_combine_kernel<weight_t><<<static_cast<unsigned>(NG), kThreads, 0, st>>>(dwp, dbp, w, c, geo, NG,
                                                                                           inv_l);
    FASTGEN_CHECK_LAUNCH("group_norm_bwd combine kernel launch");
    group_norm_bwd_dx_kernel<scalar_t, weight_t><<<blocks, kThreads, 0, st>>>(
        dy, x, w, b, mean, rstd, c, reinterpret_cast<scalar_t*>(dx_ptr), geo, NG, silu != 0);
    FASTGEN_CHECK_LAUNCH("group_norm_bwd dx kernel launch");
  });
}

}  // namespace fastgen
