// Rotary position embedding of q and k in one launch (forward, and the inverse
// rotation for the backward), diffusers' cos / sin convention.
//
// For each token (b, s) and head h, the first R dims form R/2 pairs (a, b):
//
//     interleaved   a = x[2j], b = x[2j + 1]           (Flux, GPT-J)
//     halves        a = x[j],  b = x[j + R/2]          (GPT-NeoX, Llama)
//
// and with ca, sa / cb, sb the table entries at a's / b's dim (fp32 math, one rounding):
//
//     forward   a' = a ca - b sa     b' = b cb + a sb
//     inverse   a' = a ca + b sb     b' = b cb - a sa      (the transpose: the backward)
//
// Dims R..D-1 are copied when copy_pass (out of place) and left alone in place.
//
// One block per token (grid-stride over B*S tokens); its threads walk the
// (head, pair-vector) items of q and then of k. Each item moves VEC pairs: one
// 16-byte access for interleaved pairs, two 8-byte (or 16-byte fp32) accesses for
// the halves, when pointers and strides are aligned; scalar otherwise. The
// cos / sin row of the token is read from L1 for every head.

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/vec.cuh"
#include "rope.h"

namespace fastgen {
namespace {

struct RopeParams {
  const void* x[2];  // q, k
  void* y[2];        // qo, ko
  std::int64_t sxb[2], sxs[2], sxh[2];
  std::int64_t syb[2], sys[2], syh[2];
  int H[2];
  const void* cos;
  const void* sin;
  std::int64_t scb, scs, ssb, sss;
  std::int64_t T, S;
  int D, R;
  bool inverse, copy_pass;
};

template <typename T, typename C, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(512) rope_kernel(const RopeParams p) {
  const int half = p.R / 2;
  const int nv = half / VEC;
  for (std::int64_t t = blockIdx.x; t < p.T; t += gridDim.x) {
    const std::int64_t b = t / p.S;
    const std::int64_t s = t - b * p.S;
    const C* crow = static_cast<const C*>(p.cos) + b * p.scb + s * p.scs;
    const C* srow = static_cast<const C*>(p.sin) + b * p.ssb + s * p.sss;
#pragma unroll 1
    for (int which = 0; which < 2; ++which) {
      const T* x = static_cast<const T*>(p.x[which]) + b * p.sxb[which] + s * p.sxs[which];
      T* y = static_cast<T*>(p.y[which]) + b * p.syb[which] + s * p.sys[which];
      const int H = p.H[which];
      const int items = H * nv;
      for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
        const int h = idx / nv;
        const int j = (idx - h * nv) * VEC;
        const T* xr = x + h * p.sxh[which];
        T* yr = y + h * p.syh[which];
        float a[VEC], bb[VEC], oa[VEC], ob[VEC];
        if constexpr (INTERLEAVED) {
          float v[2 * VEC];
          load_float<T, 2 * VEC>(xr + 2 * j, v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            a[i] = v[2 * i];
            bb[i] = v[2 * i + 1];
          }
        } else {
          load_float<T, VEC>(xr + j, a);
          load_float<T, VEC>(xr + j + half, bb);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const int ia = INTERLEAVED ? 2 * (j + i) : j + i;
          const int ib = INTERLEAVED ? ia + 1 : ia + half;
          const float ca = to_float(crow[ia]), cb = to_float(crow[ib]);
          float sa = to_float(srow[ia]), sb = to_float(srow[ib]);
          if (p.inverse) {
            const float tmp = sa;
            sa = -sb;
            sb = -tmp;
          }
          oa[i] = a[i] * ca - bb[i] * sa;
          ob[i] = bb[i] * cb + a[i] * sb;
        }
        if constexpr (INTERLEAVED) {
          float v[2 * VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            v[2 * i] = oa[i];
            v[2 * i + 1] = ob[i];
          }
          store_float<T, 2 * VEC>(yr + 2 * j, v);
        } else {
          store_float<T, VEC>(yr + j, oa);
          store_float<T, VEC>(yr + j + half, ob);
        }
      }
      if (p.copy_pass) {
        const int np = p.D - p.R;
        for (int idx = threadIdx.x; idx < H * np; idx += blockDim.x) {
          const int h = idx / np;
          const int c = p.R + (idx - h * np);
          y[h * p.syh[which] + c] = x[h * p.sxh[which] + c];
        }
      }
    }
  }
}

bool aligned(std::uintptr_t v, std::int64_t bytes) { return v % static_cast<std::uintptr_t>(bytes) == 0; }

bool strides_aligned(const RopeParams& p, std::int64_t elems) {
  for (int w = 0; w < 2; ++w) {
    for (std::int64_t st : {p.sxb[w], p.sxs[w], p.sxh[w], p.syb[w], p.sys[w], p.syh[w]}) {
      if (st % elems != 0) return false;
    }
  }
  return true;
}

template <typename T, typename C, int VEC>
void launch(const RopeParams& p, bool interleaved, cudaStream_t stream) {
  const int nv = (p.R / 2) / VEC;
  const int items = std::max(std::max(p.H[0], p.H[1]) * nv, 1);
  const int threads = std::min(512, std::max(64, (items + 31) / 32 * 32));
  const unsigned grid = static_cast<unsigned>(std::min<std::int64_t>(p.T, 1 << 20));
  if (interleaved) {
    rope_kernel<T, C, VEC, true><<<grid, threads, 0, stream>>>(p);
  } else {
    rope_kernel<T, C, VEC, false><<<grid, threads, 0, stream>>>(p);
  }
  FASTGEN_CHECK_LAUNCH("apply_rope kernel launch");
}

}  // namespace

void apply_rope(std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t qo_ptr, std::uintptr_t ko_ptr,
                std::uintptr_t cos_ptr, std::uintptr_t sin_ptr, std::int64_t B, std::int64_t S, std::int64_t Hq,
                std::int64_t Hk, std::int64_t D, std::int64_t R, std::int64_t sqb, std::int64_t sqs,
                std::int64_t sqh, std::int64_t skb, std::int64_t sks, std::int64_t skh, std::int64_t soqb,
                std::int64_t soqs, std::int64_t soqh, std::int64_t sokb, std::int64_t soks, std::int64_t sokh,
                std::int64_t scb, std::int64_t scs, std::int64_t ssb, std::int64_t sss, int x_dtype,
                int table_dtype, bool interleaved, bool inverse, bool copy_pass, std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(B >= 0 && S >= 0 && Hq >= 0 && Hk >= 0 && D >= 0,
                    "apply_rope: sizes must be >= 0, got B=" + std::to_string(B) + ", S=" + std::to_string(S) +
                        ", Hq=" + std::to_string(Hq) + ", Hk=" + std::to_string(Hk) + ", D=" + std::to_string(D));
  FASTGEN_ARG_CHECK(R >= 2 && R % 2 == 0 && R <= D,
                    "apply_rope: the rotary dim R must be even with 2 <= R <= D, got R=" + std::to_string(R) +
                        ", D=" + std::to_string(D));
  FASTGEN_ARG_CHECK(D <= 65536 && Hq <= INT_MAX / 65536 && Hk <= INT_MAX / 65536,
                    "apply_rope: D must be <= 65536 and H * D < 2^31");
  if (B == 0 || S == 0 || Hq + Hk == 0) return;
  FASTGEN_ARG_CHECK(q_ptr && k_ptr && qo_ptr && ko_ptr && cos_ptr && sin_ptr,
                    "apply_rope: pointers must be non-null");
  RopeParams p{};
  p.x[0] = reinterpret_cast<const void*>(q_ptr);
  p.x[1] = reinterpret_cast<const void*>(k_ptr);
  p.y[0] = reinterpret_cast<void*>(qo_ptr);
  p.y[1] = reinterpret_cast<void*>(ko_ptr);
  const std::int64_t xs[2][3] = {{sqb, sqs, sqh}, {skb, sks, skh}};
  const std::int64_t ys[2][3] = {{soqb, soqs, soqh}, {sokb, soks, sokh}};
  for (int w = 0; w < 2; ++w) {
    p.sxb[w] = xs[w][0], p.sxs[w] = xs[w][1], p.sxh[w] = xs[w][2];
    p.syb[w] = ys[w][0], p.sys[w] = ys[w][1], p.syh[w] = ys[w][2];
  }
  p.H[0] = static_cast<int>(Hq);
  p.H[1] = static_cast<int>(Hk);
  p.cos = reinterpret_cast<const void*>(cos_ptr);
  p.sin = reinterpret_cast<const void*>(sin_ptr);
  p.scb = scb, p.scs = scs, p.ssb = ssb, p.sss = sss;
  p.T = B * S;
  p.S = S;
  p.D = static_cast<int>(D);
  p.R = static_cast<int>(R);
  p.inverse = inverse;
  p.copy_pass = copy_pass && D > R;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  FASTGEN_DISPATCH_X_W(x_dtype, table_dtype, "apply_rope", {
    // VEC pairs per item: a 16-byte access for interleaved pairs (two 8-byte halves
    // otherwise, 16-byte for fp32), when every address an item touches is aligned.
    constexpr int V = 8 / sizeof(scalar_t) > 1 ? 8 / sizeof(scalar_t) : 2;
    const std::int64_t unit = interleaved ? 2 * V : V;  // elements per access
    const std::int64_t bytes = unit * static_cast<std::int64_t>(sizeof(scalar_t));
    const bool vec = (R / 2) % V == 0 && strides_aligned(p, unit) && aligned(q_ptr, bytes) &&
                     aligned(k_ptr, bytes) && aligned(qo_ptr, bytes) && aligned(ko_ptr, bytes);
    if (vec) {
      launch<scalar_t, weight_t, V>(p, interleaved, st);
    } else {
      launch<scalar_t, weight_t, 1>(p, interleaved, st);
    }
  });
}

}  // namespace fastgen
