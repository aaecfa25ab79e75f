// Fused per-head RMSNorm of q and k followed by RoPE, forward and backward
// (the CUDA C++ twin of kernels/qk_norm_rope.py: same math, same results up to rounding).
//
// For each head row x (D elements) of q or k, with that tensor's norm weight w (D,), in fp32
// with one rounding at the store:
//
//     rstd = 1 / sqrt(mean(x^2) + eps)
//     n    = x * rstd * w                       (never rounded)
//     y    = rope(n)                            (csrc/rope/rope.cu: pairs (a, b) of the first
//                                                R dims rotated, dims R..D-1 passed through)
//
//     forward   a' = a ca - b sa     b' = b cb + a sb
//
// with pairs (2j, 2j+1) when interleaved, (j, j + R/2) otherwise, and ca, sa / cb, sb the
// table entries at a's / b's dim. Backward, rstd recomputed from x, xhat = x * rstd:
//
//     dn = rope^T(dy)        da = dya ca + dyb sb    db = dyb cb - dya sa   (dn = dy past R)
//     g  = dn * w
//     dx = rstd * (g - xhat * mean(g * xhat))
//     dw = sum over tokens and heads of dn * xhat
//
// Thread mapping. A head row is cut into "units" of 2*VP elements: pair units (VP pairs:
// one access of 2*VP elements when interleaved, two accesses of VP at j and j + R/2 for the
// halves) cover dims 0..R-1, pass units (2*VP contiguous elements) cover R..D-1. A group of
// `tpr` threads (a power of two; whole warps when more than 32) owns one row at a time and
// thread `lane` holds units lane + i*tpr, i < ITEMS, so a thread always sees the same dims:
// its slice of the weight is loaded once, and in the backward its dw stays in registers.
// Blocks have 256 threads = 256/tpr groups and serve either q (blockIdx.x < blocks_q) or k;
// they walk the rows (token, head) of their tensor with a grid-stride loop over groups of
// rows (row = t * H + h, so neighbouring groups usually share a token and its cos / sin row).
//
// VP is 16 bytes per access for x (8 bytes when interleaved, so that a unit is one 16-byte
// access) when R, D - R, every pointer and every stride allow it; otherwise VP = 1 with
// scalar accesses and 4 units per thread (any D, any alignment, odd D - R included).
//
// Deterministic weight gradients: backward block b writes the fp32 sum of its rows'
// dn * xhat into dw_partial[b, :] (its groups added in group order through shared memory),
// and the caller sums the partials of q's blocks and of k's blocks in a fixed order.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "qk_norm_rope.h"

namespace fastgen {
namespace {

constexpr int kThreads = 256;       // threads per block, both kernels
constexpr int kMaxHeadDim = 1024;   // = fastgen.kernels.rope.MAX_HEAD_DIM
constexpr int kScalarItems = 4;     // units per thread on the scalar path
constexpr int kMaxFwdBlocksPerSide = 1 << 16;

struct QkParams {
  // Index 0 = q, 1 = k. Forward: x -> y. Backward: x (saved input), dy -> y (= dx).
  const void* x[2];
  const void* dy[2];
  void* y[2];
  const void* w[2];
  std::int64_t sxb[2], sxs[2], sxh[2];
  std::int64_t sdb[2], sds[2], sdh[2];
  std::int64_t syb[2], sys[2], syh[2];
  std::int64_t H[2];
  std::int64_t rows[2];  // B * S * H
  int w_code[2];
  int blocks[2];         // blocks [0, blocks[0]) serve q, the next blocks[1] serve k
  const void* cos;
  const void* sin;
  std::int64_t scb, scs, ssb, sss;
  std::int64_t S;
  int D, R;
  int NP;    // pair units (R / 2 / VP)
  int NU;    // all units: NP + ceil((D - R) / (2 VP))
  int tpr;   // threads per row
  float eps;
  bool rows32;  // every row index and token index fits in 32 bits
  float* partial;  // backward: [blocks[0] + blocks[1], D]
};

template <typename V>
__device__ __forceinline__ V pick(bool second, V a, V b) {
  return second ? b : a;  // selects, never a dynamic index into the parameter block
}

__device__ __forceinline__ float load_weight(const void* w, int code, int i) {
  if (code == kFloat32) return static_cast<const float*>(w)[i];
  if (code == kFloat16) return __half2float(static_cast<const __half*>(w)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
}

// Dim of member k of a / b in unit u (pair units first, then pass units).
template <int VP, bool IL>
__device__ __forceinline__ int pos_a(int u, int k, int NP, int R) {
  if (u < NP) return IL ? 2 * (u * VP + k) : u * VP + k;
  return R + (u - NP) * 2 * VP + k;
}

template <int VP, bool IL>
__device__ __forceinline__ int pos_b(int u, int k, int NP, int R) {
  if (u < NP) return IL ? 2 * (u * VP + k) + 1 : R / 2 + u * VP + k;
  return R + (u - NP) * 2 * VP + VP + k;
}

// Pair unit u of a row (x, dy, or a cos / sin row): a[k], b[k] the members of pair u*VP + k.
template <typename T, int VP, bool IL>
__device__ __forceinline__ void load_pairs(const T* __restrict__ row, int u, int half, float (&a)[VP],
                                           float (&b)[VP]) {
  if constexpr (IL) {
    if constexpr (VP == 1) {
      a[0] = to_float(row[2 * u]);
      b[0] = to_float(row[2 * u + 1]);
    } else {
      float v[2 * VP];
      load_float<T, 2 * VP>(row + 2 * u * VP, v);
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        a[k] = v[2 * k];
        b[k] = v[2 * k + 1];
      }
    }
  } else {
    load_float<T, VP>(row + u * VP, a);
    load_float<T, VP>(row + half + u * VP, b);
  }
}

template <typename T, int VP, bool IL>
__device__ __forceinline__ void store_pairs(T* __restrict__ row, int u, int half, const float (&a)[VP],
                                            const float (&b)[VP]) {
  if constexpr (IL) {
    if constexpr (VP == 1) {
      row[2 * u] = from_float<T>(a[0]);
      row[2 * u + 1] = from_float<T>(b[0]);
    } else {
      float v[2 * VP];
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        v[2 * k] = a[k];
        v[2 * k + 1] = b[k];
      }
      store_float<T, 2 * VP>(row + 2 * u * VP, v);
    }
  } else {
    store_float<T, VP>(row + u * VP, a);
    store_float<T, VP>(row + half + u * VP, b);
  }
}

// Pass unit starting at dim e: a = dims e..e+VP-1, b = dims e+VP..e+2VP-1 (b may run past D
// only on the scalar path, where it reads 0 and is not stored).
template <typename T, int VP, bool IL>
__device__ __forceinline__ void load_pass(const T* __restrict__ row, int e, int D, float (&a)[VP], float (&b)[VP]) {
  if constexpr (VP == 1) {
    a[0] = to_float(row[e]);
    b[0] = e + 1 < D ? to_float(row[e + 1]) : 0.f;
  } else if constexpr (IL) {
    float v[2 * VP];
    load_float<T, 2 * VP>(row + e, v);
#pragma unroll
    for (int k = 0; k < VP; ++k) {
      a[k] = v[k];
      b[k] = v[VP + k];
    }
  } else {
    load_float<T, VP>(row + e, a);
    load_float<T, VP>(row + e + VP, b);
  }
}

template <typename T, int VP, bool IL>
__device__ __forceinline__ void store_pass(T* __restrict__ row, int e, int D, const float (&a)[VP],
                                           const float (&b)[VP]) {
  if constexpr (VP == 1) {
    row[e] = from_float<T>(a[0]);
    if (e + 1 < D) row[e + 1] = from_float<T>(b[0]);
  } else if constexpr (IL) {
    float v[2 * VP];
#pragma unroll
    for (int k = 0; k < VP; ++k) {
      v[k] = a[k];
      v[VP + k] = b[k];
    }
    store_float<T, 2 * VP>(row + e, v);
  } else {
    store_float<T, VP>(row + e, a);
    store_float<T, VP>(row + e + VP, b);
  }
}

template <typename T, int VP, bool IL>
__device__ __forceinline__ void load_unit(const T* __restrict__ row, int u, int NP, int R, int D, float (&a)[VP],
                                          float (&b)[VP]) {
  if (u < NP) {
    load_pairs<T, VP, IL>(row, u, R / 2, a, b);
  } else {
    load_pass<T, VP, IL>(row, R + (u - NP) * 2 * VP, D, a, b);
  }
}

template <typename T, int VP, bool IL>
__device__ __forceinline__ void store_unit(T* __restrict__ row, int u, int NP, int R, int D, const float (&a)[VP],
                                           const float (&b)[VP]) {
  if (u < NP) {
    store_pairs<T, VP, IL>(row, u, R / 2, a, b);
  } else {
    store_pass<T, VP, IL>(row, R + (u - NP) * 2 * VP, D, a, b);
  }
}

// This thread's slice of the weight (0 past the row).
template <int VP, bool IL, int ITEMS>
__device__ __forceinline__ void load_weights(const void* w, int code, int lane, int tpr, int NP, int NU, int R, int D,
                                             float (&wa)[ITEMS][VP], float (&wb)[ITEMS][VP]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int u = lane + i * tpr;
#pragma unroll
    for (int k = 0; k < VP; ++k) {
      wa[i][k] = 0.f;
      wb[i][k] = 0.f;
      if (u < NU) {
        const int ia = pos_a<VP, IL>(u, k, NP, R);
        const int ib = pos_b<VP, IL>(u, k, NP, R);
        wa[i][k] = load_weight(w, code, ia);
        if (ib < D) wb[i][k] = load_weight(w, code, ib);
      }
    }
  }
}

// (batch, sequence, head) of a row index t * H + h, t = b * S + s.
__device__ __forceinline__ void split_row(std::int64_t row, std::int64_t H, std::int64_t S, bool rows32,
                                          std::int64_t& b, std::int64_t& s, std::int64_t& h) {
  if (rows32) {
    const unsigned r = static_cast<unsigned>(row), hh = static_cast<unsigned>(H), ss = static_cast<unsigned>(S);
    const unsigned t = r / hh;
    const unsigned bb = t / ss;
    h = r - t * hh;
    b = bb;
    s = t - bb * ss;
  } else {
    const std::int64_t t = row / H;
    h = row - t * H;
    b = t / S;
    s = t - b * S;
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename T, typename C, int VP, bool IL, int ITEMS>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_fwd_kernel(const QkParams p) {
  __shared__ float red[32];
  const bool is_k = blockIdx.x >= static_cast<unsigned>(p.blocks[0]);
  const T* __restrict__ x = static_cast<const T*>(pick(is_k, p.x[0], p.x[1]));
  T* __restrict__ y = static_cast<T*>(pick(is_k, p.y[0], p.y[1]));
  const std::int64_t sxb = pick(is_k, p.sxb[0], p.sxb[1]), sxs = pick(is_k, p.sxs[0], p.sxs[1]),
                     sxh = pick(is_k, p.sxh[0], p.sxh[1]);
  const std::int64_t syb = pick(is_k, p.syb[0], p.syb[1]), sys = pick(is_k, p.sys[0], p.sys[1]),
                     syh = pick(is_k, p.syh[0], p.syh[1]);
  const std::int64_t H = pick(is_k, p.H[0], p.H[1]);
  const std::int64_t M = pick(is_k, p.rows[0], p.rows[1]);
  const std::int64_t nblk = is_k ? p.blocks[1] : p.blocks[0];
  const std::int64_t lb = is_k ? blockIdx.x - p.blocks[0] : blockIdx.x;
  const C* __restrict__ cosp = static_cast<const C*>(p.cos);
  const C* __restrict__ sinp = static_cast<const C*>(p.sin);

  const int tpr = p.tpr;
  const int rpb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int NP = p.NP, NU = p.NU, R = p.R, D = p.D, half = p.R / 2;
  const float inv_d = 1.0f / static_cast<float>(D);

  float wa[ITEMS][VP], wb[ITEMS][VP];
  load_weights<VP, IL, ITEMS>(pick(is_k, p.w[0], p.w[1]), pick(is_k, p.w_code[0], p.w_code[1]), lane, tpr, NP, NU,
                              R, D, wa, wb);

  for (std::int64_t base = lb * rpb; base < M; base += nblk * rpb) {
    const std::int64_t row = base + grp;
    const bool valid = row < M;  // uniform over the group
    std::int64_t b = 0, s = 0, h = 0;
    if (valid) split_row(row, H, p.S, p.rows32, b, s, h);
    const T* xr = x + b * sxb + s * sxs + h * sxh;

    float va[ITEMS][VP], vb[ITEMS][VP];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int u = lane + i * tpr;
      if (valid && u < NU) {
        load_unit<T, VP, IL>(xr, u, NP, R, D, va[i], vb[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VP; ++k) va[i][k] = vb[i][k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VP; ++k) ss += va[i][k] * va[i][k] + vb[i][k] * vb[i][k];
    }
    ss = group_reduce_sum(ss, tpr, red);  // every thread of the block takes part
    const float rstd = rsqrtf(ss * inv_d + p.eps);
    if (!valid) continue;

    T* yr = y + b * syb + s * sys + h * syh;
    const C* cr = cosp + b * p.scb + s * p.scs;
    const C* sr = sinp + b * p.ssb + s * p.sss;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int u = lane + i * tpr;
      if (u >= NU) continue;
      float na[VP], nb[VP];
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        na[k] = va[i][k] * rstd * wa[i][k];
        nb[k] = vb[i][k] * rstd * wb[i][k];
      }
      if (u < NP) {
        float ca[VP], cb[VP], sa[VP], sb[VP], oa[VP], ob[VP];
        load_pairs<C, VP, IL>(cr, u, half, ca, cb);
        load_pairs<C, VP, IL>(sr, u, half, sa, sb);
#pragma unroll
        for (int k = 0; k < VP; ++k) {
          oa[k] = na[k] * ca[k] - nb[k] * sa[k];
          ob[k] = nb[k] * cb[k] + na[k] * sb[k];
        }
        store_pairs<T, VP, IL>(yr, u, half, oa, ob);
      } else {
        store_pass<T, VP, IL>(yr, R + (u - NP) * 2 * VP, D, na, nb);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// Dynamic shared memory: (256 / tpr) * D floats, the per-group dw rows added in group order.
template <typename T, typename C, int VP, bool IL, int ITEMS>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_bwd_kernel(const QkParams p) {
  __shared__ float red[32];
  extern __shared__ float dw_smem[];
  const bool is_k = blockIdx.x >= static_cast<unsigned>(p.blocks[0]);
  const T* __restrict__ x = static_cast<const T*>(pick(is_k, p.x[0], p.x[1]));
  const T* __restrict__ dy = static_cast<const T*>(pick(is_k, p.dy[0], p.dy[1]));
  T* __restrict__ dx = static_cast<T*>(pick(is_k, p.y[0], p.y[1]));
  const std::int64_t sxb = pick(is_k, p.sxb[0], p.sxb[1]), sxs = pick(is_k, p.sxs[0], p.sxs[1]),
                     sxh = pick(is_k, p.sxh[0], p.sxh[1]);
  const std::int64_t sdb = pick(is_k, p.sdb[0], p.sdb[1]), sds = pick(is_k, p.sds[0], p.sds[1]),
                     sdh = pick(is_k, p.sdh[0], p.sdh[1]);
  const std::int64_t syb = pick(is_k, p.syb[0], p.syb[1]), sys = pick(is_k, p.sys[0], p.sys[1]),
                     syh = pick(is_k, p.syh[0], p.syh[1]);
  const std::int64_t H = pick(is_k, p.H[0], p.H[1]);
  const std::int64_t M = pick(is_k, p.rows[0], p.rows[1]);
  const std::int64_t nblk = is_k ? p.blocks[1] : p.blocks[0];
  const std::int64_t lb = is_k ? blockIdx.x - p.blocks[0] : blockIdx.x;
  const C* __restrict__ cosp = static_cast<const C*>(p.cos);
  const C* __restrict__ sinp = static_cast<const C*>(p.sin);

  const int tpr = p.tpr;
  const int rpb = blockDim.x / tpr;
  const int grp = threadIdx.x / tpr;
  const int lane = threadIdx.x & (tpr - 1);
  const int NP = p.NP, NU = p.NU, R = p.R, D = p.D, half = p.R / 2;
  const float inv_d = 1.0f / static_cast<float>(D);

  float wa[ITEMS][VP], wb[ITEMS][VP];
  load_weights<VP, IL, ITEMS>(pick(is_k, p.w[0], p.w[1]), pick(is_k, p.w_code[0], p.w_code[1]), lane, tpr, NP, NU,
                              R, D, wa, wb);
  float dwa[ITEMS][VP], dwb[ITEMS][VP];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int k = 0; k < VP; ++k) dwa[i][k] = dwb[i][k] = 0.f;

  for (std::int64_t base = lb * rpb; base < M; base += nblk * rpb) {
    const std::int64_t row = base + grp;
    const bool valid = row < M;  // uniform over the group
    std::int64_t b = 0, s = 0, h = 0;
    if (valid) split_row(row, H, p.S, p.rows32, b, s, h);
    const T* xr = x + b * sxb + s * sxs + h * sxh;

    float xa[ITEMS][VP], xb[ITEMS][VP];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int u = lane + i * tpr;
      if (valid && u < NU) {
        load_unit<T, VP, IL>(xr, u, NP, R, D, xa[i], xb[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VP; ++k) xa[i][k] = xb[i][k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < VP; ++k) ss += xa[i][k] * xa[i][k] + xb[i][k] * xb[i][k];
    }
    ss = group_reduce_sum(ss, tpr, red);
    const float rstd = rsqrtf(ss * inv_d + p.eps);

    // dn = rope^T(dy) (dy past R), kept in ga / gb until g = dn * w.
    float ga[ITEMS][VP], gb[ITEMS][VP];
    float dot = 0.f;  // sum(g * xhat)
    const T* dr = dy + b * sdb + s * sds + h * sdh;
    const C* cr = cosp + b * p.scb + s * p.scs;
    const C* sr = sinp + b * p.ssb + s * p.sss;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int u = lane + i * tpr;
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        xa[i][k] *= rstd;  // xhat from here on
        xb[i][k] *= rstd;
        ga[i][k] = gb[i][k] = 0.f;
      }
      if (!valid || u >= NU) continue;
      float da[VP], db[VP];
      load_unit<T, VP, IL>(dr, u, NP, R, D, da, db);
      if (u < NP) {
        float ca[VP], cb[VP], sa[VP], sb[VP];
        load_pairs<C, VP, IL>(cr, u, half, ca, cb);
        load_pairs<C, VP, IL>(sr, u, half, sa, sb);
#pragma unroll
        for (int k = 0; k < VP; ++k) {
          const float ya = da[k], yb = db[k];
          da[k] = ya * ca[k] + yb * sb[k];
          db[k] = yb * cb[k] - ya * sa[k];
        }
      }
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        dwa[i][k] += da[k] * xa[i][k];
        dwb[i][k] += db[k] * xb[i][k];
        ga[i][k] = da[k] * wa[i][k];
        gb[i][k] = db[k] * wb[i][k];
        dot += ga[i][k] * xa[i][k] + gb[i][k] * xb[i][k];
      }
    }
    dot = group_reduce_sum(dot, tpr, red);
    if (!valid) continue;
    const float c = dot * inv_d;
    T* dxr = dx + b * syb + s * sys + h * syh;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int u = lane + i * tpr;
      if (u >= NU) continue;
      float oa[VP], ob[VP];
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        oa[k] = rstd * (ga[i][k] - xa[i][k] * c);
        ob[k] = rstd * (gb[i][k] - xb[i][k] * c);
      }
      store_unit<T, VP, IL>(dxr, u, NP, R, D, oa, ob);
    }
  }

  // This block's weight-gradient partial: each group's dims into its smem row, then the
  // groups added in order (every dim of every group row is written: the units tile 0..D-1).
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int u = lane + i * tpr;
    if (u >= NU) continue;
#pragma unroll
    for (int k = 0; k < VP; ++k) {
      dw_smem[grp * D + pos_a<VP, IL>(u, k, NP, R)] = dwa[i][k];
      const int ib = pos_b<VP, IL>(u, k, NP, R);
      if (ib < D) dw_smem[grp * D + ib] = dwb[i][k];
    }
  }
  __syncthreads();
  float* part = p.partial + static_cast<std::int64_t>(blockIdx.x) * D;
  for (int col = threadIdx.x; col < D; col += blockDim.x) {
    float acc = 0.f;
    for (int g = 0; g < rpb; ++g) acc += dw_smem[g * D + col];
    part[col] = acc;
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

struct RowsDesc {
  std::uintptr_t ptr;
  std::int64_t sb, ss, sh;
};

bool rows_aligned(std::initializer_list<RowsDesc> rows, std::int64_t elems, std::int64_t elem_bytes) {
  const auto bytes = static_cast<std::uintptr_t>(elems * elem_bytes);
  for (const RowsDesc& r : rows) {
    if (r.ptr % bytes != 0 || r.sb % elems != 0 || r.ss % elems != 0 || r.sh % elems != 0) return false;
  }
  return true;
}

// The vector path (VP pairs per pair unit, 2*VP dims per pass unit) needs every access of
// `elems` = interleaved ? 2*VP : VP elements aligned: R, D - R, pointers and strides.
template <typename T, typename C>
bool vector_ok(const QkParams& p, int vp, bool interleaved, std::initializer_list<RowsDesc> xs) {
  const std::int64_t elems = interleaved ? 2 * vp : vp;
  const bool dims = (interleaved ? p.R % (2 * vp) == 0 : (p.R / 2) % vp == 0) && (p.D - p.R) % (2 * vp) == 0;
  return dims && rows_aligned(xs, elems, sizeof(T)) &&
         rows_aligned({{reinterpret_cast<std::uintptr_t>(p.cos), p.scb, p.scs, 0},
                       {reinterpret_cast<std::uintptr_t>(p.sin), p.ssb, p.sss, 0}},
                      elems, sizeof(C));
}

int next_pow2(int v) {
  int r = 1;
  while (r < v) r <<= 1;
  return r;
}

template <int VP, int ITEMS>
void set_units(QkParams& p) {
  p.NP = (p.R / 2) / VP;
  p.NU = p.NP + (p.D - p.R + 2 * VP - 1) / (2 * VP);
  p.tpr = next_pow2((p.NU + ITEMS - 1) / ITEMS);
  FASTGEN_ARG_CHECK(p.tpr <= kThreads, "qk_norm_rope: internal error: head dim too wide for one block");
}

template <typename T, typename C, int VP, bool IL, int ITEMS>
void run_fwd(QkParams p, cudaStream_t stream) {
  set_units<VP, ITEMS>(p);
  const std::int64_t rpb = kThreads / p.tpr;
  for (int w = 0; w < 2; ++w) {
    p.blocks[w] = static_cast<int>(std::min<std::int64_t>((p.rows[w] + rpb - 1) / rpb, kMaxFwdBlocksPerSide));
  }
  const unsigned grid = static_cast<unsigned>(p.blocks[0] + p.blocks[1]);
  if (grid == 0) return;
  qk_norm_rope_fwd_kernel<T, C, VP, IL, ITEMS><<<grid, kThreads, 0, stream>>>(p);
  FASTGEN_CHECK_LAUNCH("qk_norm_rope_fwd kernel launch");
}

template <typename T, typename C, int VP, bool IL, int ITEMS>
void run_bwd(QkParams p, cudaStream_t stream) {
  set_units<VP, ITEMS>(p);
  const unsigned grid = static_cast<unsigned>(p.blocks[0] + p.blocks[1]);
  if (grid == 0) return;
  const std::size_t smem = static_cast<std::size_t>(kThreads / p.tpr) * p.D * sizeof(float);  // <= 16 KiB
  qk_norm_rope_bwd_kernel<T, C, VP, IL, ITEMS><<<grid, kThreads, smem, stream>>>(p);
  FASTGEN_CHECK_LAUNCH("qk_norm_rope_bwd kernel launch");
}

// Checks shared by both directions; fills sizes, tables, weights and eps.
void check_and_fill(const char* op, QkParams& p, std::int64_t B, std::int64_t S, std::int64_t Hq, std::int64_t Hk,
                    std::int64_t D, std::int64_t R, int wq_dtype, int wk_dtype, double eps) {
  const std::string name(op);
  FASTGEN_ARG_CHECK(B >= 0 && S >= 0 && Hq >= 0 && Hk >= 0 && D >= 0,
                    name + ": sizes must be >= 0, got B=" + std::to_string(B) + ", S=" + std::to_string(S) +
                        ", Hq=" + std::to_string(Hq) + ", Hk=" + std::to_string(Hk) + ", D=" + std::to_string(D));
  FASTGEN_ARG_CHECK(R >= 2 && R % 2 == 0 && R <= D,
                    name + ": the rotary dim R must be even with 2 <= R <= D, got R=" + std::to_string(R) +
                        ", D=" + std::to_string(D));
  FASTGEN_ARG_CHECK(D <= kMaxHeadDim, name + ": the head dim D must be <= " + std::to_string(kMaxHeadDim) +
                                          ", got D=" + std::to_string(D));
  FASTGEN_ARG_CHECK(valid_dtype(wq_dtype) && valid_dtype(wk_dtype),
                    name + ": unsupported weight dtypes: wq_dtype=" + std::to_string(wq_dtype) + ", wk_dtype=" +
                        std::to_string(wk_dtype) + "; supported: 0=float32, 1=float16, 2=bfloat16");
  FASTGEN_ARG_CHECK(std::isfinite(eps) && eps >= 0, name + ": eps must be finite and >= 0");
  FASTGEN_ARG_CHECK(S == 0 || B <= LLONG_MAX / S, name + ": B * S overflows");
  const std::int64_t T = B * S;
  FASTGEN_ARG_CHECK(T == 0 || (Hq <= LLONG_MAX / T && Hk <= LLONG_MAX / T), name + ": B * S * H overflows");
  p.H[0] = Hq;
  p.H[1] = Hk;
  p.rows[0] = T * Hq;
  p.rows[1] = T * Hk;
  p.S = S;
  p.D = static_cast<int>(D);
  p.R = static_cast<int>(R);
  p.w_code[0] = wq_dtype;
  p.w_code[1] = wk_dtype;
  p.eps = static_cast<float>(eps);
  const std::int64_t lim = (std::int64_t{1} << 32) - 2 * kThreads;  // row + group offset stay below 2^32
  p.rows32 = p.rows[0] < lim && p.rows[1] < lim;
}

}  // namespace

void qk_norm_rope_fwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t wq_ptr, std::uintptr_t wk_ptr,
                      std::uintptr_t qo_ptr, std::uintptr_t ko_ptr, std::uintptr_t cos_ptr, std::uintptr_t sin_ptr,
                      std::int64_t B, std::int64_t S, std::int64_t Hq, std::int64_t Hk, std::int64_t D,
                      std::int64_t R, std::int64_t sqb, std::int64_t sqs, std::int64_t sqh, std::int64_t skb,
                      std::int64_t sks, std::int64_t skh, std::int64_t soqb, std::int64_t soqs, std::int64_t soqh,
                      std::int64_t sokb, std::int64_t soks, std::int64_t sokh, std::int64_t scb, std::int64_t scs,
                      std::int64_t ssb, std::int64_t sss, int x_dtype, int wq_dtype, int wk_dtype, int table_dtype,
                      double eps, bool interleaved, std::uintptr_t stream) {
  QkParams p{};
  check_and_fill("qk_norm_rope_fwd", p, B, S, Hq, Hk, D, R, wq_dtype, wk_dtype, eps);
  if (p.rows[0] + p.rows[1] == 0) return;
  FASTGEN_ARG_CHECK(cos_ptr && sin_ptr, "qk_norm_rope_fwd: cos / sin pointers must be non-null");
  FASTGEN_ARG_CHECK(p.rows[0] == 0 || (q_ptr && wq_ptr && qo_ptr), "qk_norm_rope_fwd: q, wq, qo must be non-null");
  FASTGEN_ARG_CHECK(p.rows[1] == 0 || (k_ptr && wk_ptr && ko_ptr), "qk_norm_rope_fwd: k, wk, ko must be non-null");
  p.x[0] = reinterpret_cast<const void*>(q_ptr);
  p.x[1] = reinterpret_cast<const void*>(k_ptr);
  p.y[0] = reinterpret_cast<void*>(qo_ptr);
  p.y[1] = reinterpret_cast<void*>(ko_ptr);
  p.w[0] = reinterpret_cast<const void*>(wq_ptr);
  p.w[1] = reinterpret_cast<const void*>(wk_ptr);
  const std::int64_t xs[2][3] = {{sqb, sqs, sqh}, {skb, sks, skh}};
  const std::int64_t ys[2][3] = {{soqb, soqs, soqh}, {sokb, soks, sokh}};
  for (int w = 0; w < 2; ++w) {
    p.sxb[w] = xs[w][0], p.sxs[w] = xs[w][1], p.sxh[w] = xs[w][2];
    p.syb[w] = ys[w][0], p.sys[w] = ys[w][1], p.syh[w] = ys[w][2];
  }
  p.cos = reinterpret_cast<const void*>(cos_ptr);
  p.sin = reinterpret_cast<const void*>(sin_ptr);
  p.scb = scb, p.scs = scs, p.ssb = ssb, p.sss = sss;
  const RowsDesc none{0, 0, 0, 0};  // a tensor without rows constrains nothing
  const RowsDesc rq = p.rows[0] ? RowsDesc{q_ptr, sqb, sqs, sqh} : none;
  const RowsDesc rk = p.rows[1] ? RowsDesc{k_ptr, skb, sks, skh} : none;
  const RowsDesc rqo = p.rows[0] ? RowsDesc{qo_ptr, soqb, soqs, soqh} : none;
  const RowsDesc rko = p.rows[1] ? RowsDesc{ko_ptr, sokb, soks, sokh} : none;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  FASTGEN_DISPATCH_X_W(x_dtype, table_dtype, "qk_norm_rope_fwd", {
    // interleaved: a pair unit is one 16-byte access of 2*VP elements; halves: two of VP.
    constexpr int VI = 8 / static_cast<int>(sizeof(scalar_t));
    constexpr int VH = 16 / static_cast<int>(sizeof(scalar_t));
    if (interleaved) {
      if (vector_ok<scalar_t, weight_t>(p, VI, true, {rq, rk, rqo, rko})) {
        run_fwd<scalar_t, weight_t, VI, true, 1>(p, st);
      } else {
        run_fwd<scalar_t, weight_t, 1, true, kScalarItems>(p, st);
      }
    } else {
      if (vector_ok<scalar_t, weight_t>(p, VH, false, {rq, rk, rqo, rko})) {
        run_fwd<scalar_t, weight_t, VH, false, 1>(p, st);
      } else {
        run_fwd<scalar_t, weight_t, 1, false, kScalarItems>(p, st);
      }
    }
  });
}

void qk_norm_rope_bwd(std::uintptr_t dqo_ptr, std::uintptr_t dko_ptr, std::uintptr_t q_ptr, std::uintptr_t k_ptr,
                      std::uintptr_t wq_ptr, std::uintptr_t wk_ptr, std::uintptr_t dq_ptr, std::uintptr_t dk_ptr,
                      std::uintptr_t dw_partial_ptr, std::uintptr_t cos_ptr, std::uintptr_t sin_ptr, std::int64_t B,
                      std::int64_t S, std::int64_t Hq, std::int64_t Hk, std::int64_t D, std::int64_t R,
                      std::int64_t sdqb, std::int64_t sdqs, std::int64_t sdqh, std::int64_t sdkb, std::int64_t sdks,
                      std::int64_t sdkh, std::int64_t sqb, std::int64_t sqs, std::int64_t sqh, std::int64_t skb,
                      std::int64_t sks, std::int64_t skh, std::int64_t soqb, std::int64_t soqs, std::int64_t soqh,
                      std::int64_t sokb, std::int64_t soks, std::int64_t sokh, std::int64_t scb, std::int64_t scs,
                      std::int64_t ssb, std::int64_t sss, int x_dtype, int wq_dtype, int wk_dtype, int table_dtype,
                      double eps, bool interleaved, std::int64_t num_partials_q, std::int64_t num_partials_k,
                      std::uintptr_t stream) {
  QkParams p{};
  check_and_fill("qk_norm_rope_bwd", p, B, S, Hq, Hk, D, R, wq_dtype, wk_dtype, eps);
  FASTGEN_ARG_CHECK(num_partials_q >= 0 && num_partials_k >= 0 && num_partials_q + num_partials_k <= INT_MAX,
                    "qk_norm_rope_bwd: num_partials_q / num_partials_k must be >= 0 and sum below 2^31");
  FASTGEN_ARG_CHECK((p.rows[0] == 0 || num_partials_q >= 1) && (p.rows[1] == 0 || num_partials_k >= 1),
                    "qk_norm_rope_bwd: num_partials_q (num_partials_k) must be >= 1 when q (k) has rows, got " +
                        std::to_string(num_partials_q) + ", " + std::to_string(num_partials_k));
  if (p.rows[0] + p.rows[1] == 0) return;
  FASTGEN_ARG_CHECK(cos_ptr && sin_ptr && dw_partial_ptr,
                    "qk_norm_rope_bwd: cos / sin / dw_partial pointers must be non-null");
  FASTGEN_ARG_CHECK(p.rows[0] == 0 || (dqo_ptr && q_ptr && wq_ptr && dq_ptr),
                    "qk_norm_rope_bwd: dq_out, q, wq, dq must be non-null");
  FASTGEN_ARG_CHECK(p.rows[1] == 0 || (dko_ptr && k_ptr && wk_ptr && dk_ptr),
                    "qk_norm_rope_bwd: dk_out, k, wk, dk must be non-null");
  p.x[0] = reinterpret_cast<const void*>(q_ptr);
  p.x[1] = reinterpret_cast<const void*>(k_ptr);
  p.dy[0] = reinterpret_cast<const void*>(dqo_ptr);
  p.dy[1] = reinterpret_cast<const void*>(dko_ptr);
  p.y[0] = reinterpret_cast<void*>(dq_ptr);
  p.y[1] = reinterpret_cast<void*>(dk_ptr);
  p.w[0] = reinterpret_cast<const void*>(wq_ptr);
  p.w[1] = reinterpret_cast<const void*>(wk_ptr);
  const std::int64_t xs[2][3] = {{sqb, sqs, sqh}, {skb, sks, skh}};
  const std::int64_t ds[2][3] = {{sdqb, sdqs, sdqh}, {sdkb, sdks, sdkh}};
  const std::int64_t ys[2][3] = {{soqb, soqs, soqh}, {sokb, soks, sokh}};
  for (int w = 0; w < 2; ++w) {
    p.sxb[w] = xs[w][0], p.sxs[w] = xs[w][1], p.sxh[w] = xs[w][2];
    p.sdb[w] = ds[w][0], p.sds[w] = ds[w][1], p.sdh[w] = ds[w][2];
    p.syb[w] = ys[w][0], p.sys[w] = ys[w][1], p.syh[w] = ys[w][2];
  }
  p.cos = reinterpret_cast<const void*>(cos_ptr);
  p.sin = reinterpret_cast<const void*>(sin_ptr);
  p.scb = scb, p.scs = scs, p.ssb = ssb, p.sss = sss;
  p.blocks[0] = static_cast<int>(num_partials_q);
  p.blocks[1] = static_cast<int>(num_partials_k);
  p.partial = reinterpret_cast<float*>(dw_partial_ptr);
  const RowsDesc none{0, 0, 0, 0};
  const RowsDesc rq = p.rows[0] ? RowsDesc{q_ptr, sqb, sqs, sqh} : none;
  const RowsDesc rk = p.rows[1] ? RowsDesc{k_ptr, skb, sks, skh} : none;
  const RowsDesc rdq = p.rows[0] ? RowsDesc{dqo_ptr, sdqb, sdqs, sdqh} : none;
  const RowsDesc rdk = p.rows[1] ? RowsDesc{dko_ptr, sdkb, sdks, sdkh} : none;
  const RowsDesc roq = p.rows[0] ? RowsDesc{dq_ptr, soqb, soqs, soqh} : none;
  const RowsDesc rok = p.rows[1] ? RowsDesc{dk_ptr, sokb, soks, sokh} : none;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  FASTGEN_DISPATCH_X_W(x_dtype, table_dtype, "qk_norm_rope_bwd", {
    constexpr int VI = 8 / static_cast<int>(sizeof(scalar_t));
    constexpr int VH = 16 / static_cast<int>(sizeof(scalar_t));
    if (interleaved) {
      if (vector_ok<scalar_t, weight_t>(p, VI, true, {rq, rk, rdq, rdk, roq, rok})) {
        run_bwd<scalar_t, weight_t, VI, true, 1>(p, st);
      } else {
        run_bwd<scalar_t, weight_t, 1, true, kScalarItems>(p, st);
      }
    } else {
      if (vector_ok<scalar_t, weight_t>(p, VH, false, {rq, rk, rdq, rdk, roq, rok})) {
        run_bwd<scalar_t, weight_t, VH, false, 1>(p, st);
      } else {
        run_bwd<scalar_t, weight_t, 1, false, kScalarItems>(p, st);
      }
    }
  });
}

}  // namespace fastgen
