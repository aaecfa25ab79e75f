// Multi-tensor 8-bit AdamW, CUDA C++: dequantize -> AdamW update in fp32 -> requantize, one pass
// (the scheme of fastgen/optim/quant8.py; the Triton kernel is kernels/adamw8bit.py).
//
// Per 256-element quantization block of each parameter, t = the parameter's step count:
//   m = SMAP[cm] * am          v = UMAP[cv] * av                 (dequantize, fp32)
//   g = g * coef (clip; coef_ptr set)   g = -g (maximize)
//   p = p * (1 - lr * wd)
//   m = lerp(m, g, 1 - beta1)  v = beta2 * v + (1 - beta2) * g^2
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//   am = max |m| over the block,  cm = #{i : SBOUND[i] < m / am}   (0 if am = 0)
//   av = max  v  over the block,  cv = #{i : UBOUND[i] < v / av}
//   s = s + ema_weight * (p_stored - s)                          (EMA shadow; sh_list set)
// The code is an 8-step binary search of the 256-entry boundary table, as the Triton kernel's.
//
// Layout: a block of 256 threads owns one chunk of 4096 elements = 16 quantization blocks; thread i
// owns elements [16 i, 16 i + 16) of it, so the 16 lanes of a half warp own one quantization block
// and its absmax is a 4-step shuffle max. The four 256-entry tables sit in shared memory (4 KiB).
// With every operand 16-byte aligned a thread moves its 16 elements as whole 16-byte accesses
// (codes: one ld/st.global.v4 each; bf16 p / g: two; fp32: four); a thread whose 16 elements pass
// the tensor's end, or a tensor with an unaligned operand, goes element by element (same math).
// Bytes per element: p and g read (2P), p written (P), 1 + 1 code bytes read and written, the
// shadow read and written with EMA; absmax 2 x 4 bytes per 256 elements read and written.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/multi_tensor.cuh"
#include "../common/optim_math.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "optim.h"

namespace fastgen {
namespace {

constexpr int kQBlock = 256;       // elements per quantization block
constexpr int kPerThread = 16;     // elements per thread: a quantization block is 16 lanes
constexpr int kThreads = 256;      // multi_tensor_apply's block size
constexpr int kChunk8 = kThreads * kPerThread;  // 4096 elements, 16 quantization blocks

struct AdamW8bitArgs {
  const float* lr_ptr;  // null: use lr
  float lr, beta1, beta2, eps, weight_decay;
  float ln_beta1, ln_beta2;  // ln(beta); -inf for beta = 0
  bool maximize, stochastic;
  std::uint32_t seed;
  const float* coef;  // null: no clipping
  float ema_weight;   // 1 - EMA decay (read with a shadow list)
  const float* maps;  // [4][256] fp32: SMAP, SBOUND, UMAP, UBOUND
};

// #{i : bound[i] < x} for x in [-1, 1] (bound sorted, +inf last): 8 halvings.
__device__ __forceinline__ std::uint8_t quantize(float x, const float* bound) {
  int code = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int half = 128 >> k;
    if (bound[code + half - 1] < x) code += half;
  }
  return static_cast<std::uint8_t>(code);
}

// 16 values of T at p into fp32: 16-byte accesses when `vec`, else one by one, zero past `n`.
template <typename T>
__device__ __forceinline__ void load16(const T* p, bool vec, int n, float (&out)[kPerThread]) {
  if (vec || !kScalarPath) {
    load_elems<T, kPerThread>(p, out);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = j < n ? to_float(p[j]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store16(T* p, bool vec, int n, const T (&in)[kPerThread]) {
  if (vec || !kScalarPath) {
    store_elems<T, kPerThread>(p, in);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (j < n) p[j] = in[j];
    }
  }
}

__device__ __forceinline__ void load_codes(const std::uint8_t* p, bool vec, int n, std::uint8_t (&out)[kPerThread]) {
  if (vec || !kScalarPath) {
    const Vec<std::uint8_t, kPerThread> v = load_vec<std::uint8_t, kPerThread>(p);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = v.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = j < n ? p[j] : 0;
  }
}

__device__ __forceinline__ void store_codes(std::uint8_t* p, bool vec, int n, const std::uint8_t (&in)[kPerThread]) {
  if (vec || !kScalarPath) {
    Vec<std::uint8_t, kPerThread> v;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) v.v[j] = in[j];
    store_vec<std::uint8_t, kPerThread>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (j < n) p[j] = in[j];
    }
  }
}

// Max over the 16 lanes of a half warp (every lane of the warp calls it).
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// lists: p, g, qm, am, qv, av, step, shadow. SH: the shadow type, NoShadow without EMA.
template <typename P, typename SH>
struct AdamW8bitOp {
  AdamW8bitArgs a;
  __device__ void operator()(std::int32_t k, void** ptrs, std::int64_t begin, std::int64_t end) const {
    constexpr bool kEma = !std::is_same_v<SH, NoShadow>;
    using ShT = std::conditional_t<kEma, SH, float>;
    __shared__ float maps[4][kQBlock];  // SMAP, SBOUND, UMAP, UBOUND
    for (int i = threadIdx.x; i < 4 * kQBlock; i += blockDim.x) maps[i / kQBlock][i % kQBlock] = a.maps[i];
    __syncthreads();

    P* p = global_ptr<P>(ptrs[0]);
    const P* g = global_ptr<const P>(ptrs[1]);
    std::uint8_t* qm = global_ptr<std::uint8_t>(ptrs[2]);
    float* am_ptr = global_ptr<float>(ptrs[3]);
    std::uint8_t* qv = global_ptr<std::uint8_t>(ptrs[4]);
    float* av_ptr = global_ptr<float>(ptrs[5]);
    const float t = *global_ptr<const float>(ptrs[6]);
    ShT* sh = kEma ? global_ptr<ShT>(ptrs[7]) : nullptr;

    const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
    const float step_size = lr / -expm1f(t * a.ln_beta1);
    const float bias2_sqrt = sqrtf(-expm1f(t * a.ln_beta2));
    const float decay = 1.f - lr * a.weight_decay;
    const float coef = a.coef != nullptr ? *a.coef : 1.f;

    const std::int64_t i0 = begin + static_cast<std::int64_t>(threadIdx.x) * kPerThread;
    const std::int64_t left = end - i0;
    const int n = left <= 0 ? 0 : (left >= kPerThread ? kPerThread : static_cast<int>(left));
    bool vec = n == kPerThread && aligned16(p + i0, g + i0, qm + i0, qv + i0);
    if constexpr (kEma) vec = vec && aligned16(sh + i0);
    const std::int64_t blk = i0 / kQBlock;
    const bool block_live = (threadIdx.x % 16 == 0) ? n > 0 : false;  // the block's first lane stores absmax

    float pv[kPerThread], gv[kPerThread], m[kPerThread], v[kPerThread];
    std::uint8_t cm[kPerThread], cv[kPerThread];
    float am = 0.f, av = 0.f;
    if (n > 0) {  // every load first
      load16<P>(p + i0, vec, n, pv);
      load16<P>(g + i0, vec, n, gv);
      load_codes(qm + i0, vec, n, cm);
      load_codes(qv + i0, vec, n, cv);
      am = am_ptr[blk];
      av = av_ptr[blk];
    }
    float new_am = 0.f, new_av = 0.f;
    P po[kPerThread];
    if (n > 0) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (j >= n) {  // past the tensor: 0, so it never raises the block's max
          m[j] = 0.f;
          v[j] = 0.f;
          po[j] = from_float<P>(0.f);
          continue;
        }
        float gi = __fmul_rn(gv[j], coef);  // never contracted: the product the separate clip stores
        if (a.maximize) gi = -gi;
        const float mi = lerp_like_torch(maps[0][cm[j]] * am, gi, 1.f - a.beta1);
        const float vi = maps[2][cv[j]] * av * a.beta2 + (1.f - a.beta2) * (gi * gi);
        m[j] = mi;
        v[j] = vi;
        const float pi = pv[j] * decay - step_size * (mi / (sqrtf(vi) / bias2_sqrt + a.eps));
        po[j] = store_param<P>(pi, a.stochastic, a.seed, k, i0 + j);
        new_am = fmaxf(new_am, fabsf(mi));
        new_av = fmaxf(new_av, vi);
      }
      store16<P>(p + i0, vec, n, po);
      if constexpr (kEma) {
        if (vec || !kScalarPath) {
          ema_fold<ShT, P, kPerThread>(sh + i0, po, a.ema_weight);  // 16-byte pieces, as load16 / store16
        } else {
#pragma unroll
          for (int j = 0; j < kPerThread; ++j) {
            if (j < n) ema_fold<ShT, P, 1>(sh + i0 + j, {po[j]}, a.ema_weight);
          }
        }
      }
    }
    new_am = half_warp_max(new_am);  // all lanes: a quantization block is 16 lanes of one warp
    new_av = half_warp_max(new_av);
    if (n > 0) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {  // x / absmax rounded to nearest (no fast-math), 0 for absmax 0
        cm[j] = quantize(new_am > 0.f ? m[j] / new_am : 0.f, maps[1]);
        cv[j] = quantize(new_av > 0.f ? v[j] / new_av : 0.f, maps[3]);
      }
      store_codes(qm + i0, vec, n, cm);
      store_codes(qv + i0, vec, n, cv);
      if (block_live) {
        am_ptr[blk] = new_am;
        av_ptr[blk] = new_av;
      }
    }
  }
};

}  // namespace

void multi_tensor_adamw8bit(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t qm_list,
                            std::uintptr_t am_list, std::uintptr_t qv_list, std::uintptr_t av_list,
                            std::uintptr_t step_list, std::uintptr_t sh_list, std::uintptr_t numels,
                            std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                            std::int64_t chunk, int p_dtype, int g_dtype, int sh_dtype, std::uintptr_t maps,
                            std::uintptr_t lr_ptr, double lr, double beta1, double beta2, double eps,
                            double weight_decay, bool maximize, bool stochastic_rounding, std::int64_t seed,
                            std::uintptr_t coef_ptr, double ema_weight, std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(valid_dtype(p_dtype) && g_dtype == p_dtype,
                    std::string("multi_tensor_adamw8bit: unsupported dtypes p=") + dtype_name(p_dtype) + ", g=" +
                        dtype_name(g_dtype) + "; supported: params float32/float16/bfloat16, grads of the params' "
                        "dtype");
  FASTGEN_ARG_CHECK(sh_list == 0 || valid_dtype(sh_dtype),
                    std::string("multi_tensor_adamw8bit: unsupported EMA shadow dtype ") + dtype_name(sh_dtype));
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk == kChunk8,
                    "multi_tensor_adamw8bit: need num_chunks >= 0 and chunk == 4096 (16 quantization blocks of "
                    "256 per thread block), got chunk " + std::to_string(chunk));
  FASTGEN_ARG_CHECK(num_chunks == 0 || maps != 0, "multi_tensor_adamw8bit: maps is null (4 x 256 fp32 tables)");
  FASTGEN_ARG_CHECK(std::isfinite(ema_weight), "multi_tensor_adamw8bit: ema_weight must be finite");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({p_list, g_list, qm_list, am_list, qv_list, av_list, step_list,
                                      sh_list != 0 ? sh_list : p_list},
                                     numels, chunk_ids, chunk_offs, chunk);
  const AdamW8bitArgs a{reinterpret_cast<const float*>(lr_ptr), static_cast<float>(lr), static_cast<float>(beta1),
                        static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
                        static_cast<float>(std::log(beta1)), static_cast<float>(std::log(beta2)), maximize,
                        stochastic_rounding && p_dtype == kBFloat16, static_cast<std::uint32_t>(seed),
                        reinterpret_cast<const float*>(coef_ptr), static_cast<float>(ema_weight),
                        reinterpret_cast<const float*>(maps)};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(p_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    if (sh_list == 0) {
      multi_tensor_apply<8>(t, num_chunks, AdamW8bitOp<P, NoShadow>{a}, s);
    } else {
      dispatch_one(sh_dtype, [&](auto sh_tag) {
        multi_tensor_apply<8>(t, num_chunks, AdamW8bitOp<P, decltype(sh_tag)>{a}, s);
      });
    }
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_adamw8bit kernel launch");
}

}  // namespace fastgen
