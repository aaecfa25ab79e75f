// Multi-tensor AdamW, Lion, gradient clipping and EMA (one launch per dtype combination), CUDA C++.
//
// AdamW, per element in fp32, as torch.optim.AdamW (t = the tensor's step, already incremented):
//   g = maximize ? -grad : grad
//   p = p * (1 - lr * wd);  m = lerp(m, g, 1 - beta1) (as torch.lerp);  v = beta2 * v + (1 - beta2) * g^2
//   v = max(vmax, v) (amsgrad; stored back to vmax)
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The bias corrections 1 - beta^t = -expm1(t * ln(beta)) are computed once per block
// from the device step (accurate in fp32, also for t = 1 where 1 - beta is tiny).
// bf16 parameters may be rounded stochastically: 16 hashed random bits are added
// below the bf16 mantissa before truncation.
//
// Lion: c = beta1 * m + (1 - beta1) * g;  p = p * (1 - lr * wd) - lr * sign(c);
//       m = beta2 * m + (1 - beta2) * g.
//
// Gradient clipping (as torch.nn.utils.clip_grad_norm_), three launches per call, no atomics:
//   1. multi_tensor_norm, per dtype: block c writes partial[c] = sum over its chunk of |g|^p in fp32
//      (a fixed shuffle tree; p = 2 and 1 without powf), or max |g| for p = inf (NaN propagates);
//   2. multi_tensor_norm_finalize: one block sums all partials in a fixed order in fp64 (max for inf):
//      total = sum^(1/p); coef = min(1, max_norm / (total + 1e-6)) as torch computes it in fp32;
//   3. multi_tensor_scale, per dtype: g = g * coef (coef read on the device: no host sync).
//
// EMA: s = s + (1 - decay) * (p - s) in fp32, one rounding at the store; shadow and parameter
// dtypes independent (an fp32 shadow of bf16 parameters is the usual case).
//
// Memory access (csrc/common/multi_tensor.cuh chunk_rounds): a tensor whose operands all start on
// 16 bytes is walked in groups of VEC = 16 bytes of its narrowest operand (8 bf16, 4 fp32), every
// operand moved with 16-byte ld.global.v4 / st.global.v4 (an fp32 state of a bf16 parameter: two
// per group), all loads of a round issued before its math; the tail past the last whole group and
// any tensor with an unaligned operand go element by element. The per-element math is the same on
// both paths. Bytes per element: AdamW 2P + 2S read, P + 2S written (+ S read and written with
// amsgrad); Lion 2P + S read, P + S written; norm P read; scale P read and written; EMA S + P read,
// S written (P, S: parameter / gradient and state element sizes).

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

constexpr int kAdamWLists = 7;  // p, g, m, v, vmax, step, EMA shadow
constexpr int kLionLists = 4;   // p, g, m, EMA shadow
constexpr int kFinalizeThreads = 512;
// AdamW's elements per thread per round: 8 (not kElemsPerThread) keeps it near 80 registers, three
// blocks per SM on sm_90; 16 would need ~150 (one block) and hold fewer bytes in flight per SM.
constexpr int kAdamWElems = 8;

struct AdamWArgs {
  const float* lr_ptr;  // null: use lr
  float lr, beta1, beta2, eps, weight_decay;
  float ln_beta1, ln_beta2;  // ln(beta); -inf for beta = 0
  bool amsgrad, maximize, stochastic;
  std::uint32_t seed;
  const float* coef;  // the one-pass step's clip coefficient (device), or null
  float ema_weight;   // 1 - EMA decay (with a shadow)
};

// SH: the EMA shadow type of the one-pass step (NoShadow: none).
template <typename P, typename S, typename SH>
struct AdamWOp {
  AdamWArgs a;
  __device__ void operator()(std::int32_t k, void** ptrs, std::int64_t begin, std::int64_t end) const {
    constexpr bool kEma = !std::is_same_v<SH, NoShadow>;
    using ShT = std::conditional_t<kEma, SH, float>;
    ShT* sh = global_ptr<ShT>(ptrs[6]);
    P* p = global_ptr<P>(ptrs[0]);
    const P* g = global_ptr<const P>(ptrs[1]);
    S* m = global_ptr<S>(ptrs[2]);
    S* v = global_ptr<S>(ptrs[3]);
    S* vmax = global_ptr<S>(ptrs[4]);
    const float t = *global_ptr<const float>(ptrs[5]);
    const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
    const float step_size = lr / -expm1f(t * a.ln_beta1);
    const float bias2_sqrt = sqrtf(-expm1f(t * a.ln_beta2));
    const float decay = 1.f - lr * a.weight_decay;
    const float coef = a.coef != nullptr ? *a.coef : 1.f;
    constexpr int VEC = vec_width<P, S>;
    constexpr int U = kAdamWElems / VEC;
    const bool vec_ok = aligned16(p, g, m, v, vmax) && (!kEma || aligned16(sh));
    chunk_rounds<VEC, U>(begin, end, vec_ok, [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float pv[U][W], gv[U][W], mv[U][W], vv[U][W], xv[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // every load of the round first
        if (!ok[u]) continue;
        load_elems<P, W>(p + idx[u], pv[u]);
        load_elems<P, W>(g + idx[u], gv[u]);
        load_elems<S, W>(m + idx[u], mv[u]);
        load_elems<S, W>(v + idx[u], vv[u]);
        if (a.amsgrad) load_elems<S, W>(vmax + idx[u], xv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        P po[W];
        S mo[W], vo[W], xo[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          float gi = __fmul_rn(gv[u][j], coef);  // never contracted: the product the separate clip stores
          if (a.maximize) gi = -gi;
          const float mi = lerp_like_torch(mv[u][j], gi, 1.f - a.beta1);
          float vi = vv[u][j] * a.beta2 + (1.f - a.beta2) * (gi * gi);
          mo[j] = from_float<S>(mi);
          vo[j] = from_float<S>(vi);
          if (a.amsgrad) {
            vi = fmaxf(xv[u][j], vi);
            xo[j] = from_float<S>(vi);
          }
          const float pi = pv[u][j] * decay - step_size * (mi / (sqrtf(vi) / bias2_sqrt + a.eps));
          po[j] = store_param<P>(pi, a.stochastic, a.seed, k, idx[u] + j);
        }
        store_elems<S, W>(m + idx[u], mo);
        store_elems<S, W>(v + idx[u], vo);
        if (a.amsgrad) store_elems<S, W>(vmax + idx[u], xo);
        store_elems<P, W>(p + idx[u], po);
        if constexpr (kEma) ema_fold<ShT, P, W>(sh + idx[u], po, a.ema_weight);  // the stored parameter
      }
    });
  }
};

struct LionArgs {
  const float* lr_ptr;
  float lr, beta1, beta2, weight_decay;
  bool maximize;
  const float* coef;  // the one-pass step's clip coefficient (device), or null
  float ema_weight;   // 1 - EMA decay (with a shadow)
};

template <typename P, typename S, typename SH>
struct LionOp {
  LionArgs a;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    constexpr bool kEma = !std::is_same_v<SH, NoShadow>;
    using ShT = std::conditional_t<kEma, SH, float>;
    ShT* sh = global_ptr<ShT>(ptrs[3]);
    P* p = global_ptr<P>(ptrs[0]);
    const P* g = global_ptr<const P>(ptrs[1]);
    S* m = global_ptr<S>(ptrs[2]);
    const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
    const float decay = 1.f - lr * a.weight_decay;
    const float coef = a.coef != nullptr ? *a.coef : 1.f;
    constexpr int VEC = vec_width<P, S>;
    constexpr int U = kElemsPerThread / VEC;
    const bool vec_ok = aligned16(p, g, m) && (!kEma || aligned16(sh));
    chunk_rounds<VEC, U>(begin, end, vec_ok, [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float pv[U][W], gv[U][W], mv[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        load_elems<P, W>(p + idx[u], pv[u]);
        load_elems<P, W>(g + idx[u], gv[u]);
        load_elems<S, W>(m + idx[u], mv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        P po[W];
        S mo[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          float gi = __fmul_rn(gv[u][j], coef);  // never contracted: the product the separate clip stores
          if (a.maximize) gi = -gi;
          const float mi = mv[u][j];
          const float c = a.beta1 * mi + (1.f - a.beta1) * gi;
          const float sign = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);
          po[j] = from_float<P>(pv[u][j] * decay - lr * sign);
          mo[j] = from_float<S>(a.beta2 * mi + (1.f - a.beta2) * gi);
        }
        store_elems<P, W>(p + idx[u], po);
        store_elems<S, W>(m + idx[u], mo);
        if constexpr (kEma) ema_fold<ShT, P, W>(sh + idx[u], po, a.ema_weight);  // the stored parameter
      }
    });
  }
};

// Max that propagates NaN (fmaxf would drop it), as torch's inf-norm does.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// NaN-propagating max over the block (every thread calls it; thread 0 gets the result).
// smem: blockDim.x / 32 floats. A fixed shuffle tree then a fixed order over warps.
__device__ __forceinline__ float block_reduce_max_nan(float v, float* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = smem[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) m = max_nan(m, smem[w]);
  return m;
}

enum NormKind : int { kNormSquares = 0, kNormAbs = 1, kNormPow = 2, kNormMax = 3 };

// partial[block] = sum of |g|^p (or max |g|) over the block's chunk, fp32.
template <typename G, int KIND>
struct NormOp {
  float* partial;
  float p;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    const G* g = global_ptr<const G>(ptrs[0]);
    constexpr int VEC = vec_width<G>;
    constexpr int U = kElemsPerThread / VEC;
    float acc = 0.f;
    chunk_rounds<VEC, U>(begin, end, aligned16(g), [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float x[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // all loads of the round first
        if (ok[u]) {
          load_elems<G, W>(g + idx[u], x[u]);
        } else {
#pragma unroll
          for (int j = 0; j < W; ++j) x[u][j] = 0.f;  // |0|^p = 0 pads the tail
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {  // then a fixed-order accumulation
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const float xa = fabsf(x[u][j]);
          if constexpr (KIND == kNormMax) {
            acc = max_nan(acc, xa);
          } else if constexpr (KIND == kNormSquares) {
            acc += xa * xa;
          } else if constexpr (KIND == kNormAbs) {
            acc += xa;
          } else {
            acc += powf(xa, p);
          }
        }
      }
    });
    __shared__ float smem[32];
    if constexpr (KIND == kNormMax) {
      acc = block_reduce_max_nan(acc, smem);
    } else {
      acc = group_reduce_sum(acc, static_cast<int>(blockDim.x), smem);
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
};

template <typename G>
struct ScaleOp {
  const float* coef;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    G* g = global_ptr<G>(ptrs[0]);
    const float c = *coef;
    constexpr int VEC = vec_width<G>;
    constexpr int U = kElemsPerThread / VEC;
    chunk_rounds<VEC, U>(begin, end, aligned16(g), [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float x[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (ok[u]) load_elems<G, W>(g + idx[u], x[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        G o[W];
#pragma unroll
        for (int j = 0; j < W; ++j) o[j] = from_float<G>(x[u][j] * c);
        store_elems<G, W>(g + idx[u], o);
      }
    });
  }
};

template <typename S, typename P>
struct EmaOp {
  float host_weight;         // 1 - decay
  const float* weight_ptr;   // or 1 - decay read on the device (a captured warm-up), when set
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    const float weight = weight_ptr != nullptr ? *weight_ptr : host_weight;
    S* s = global_ptr<S>(ptrs[0]);
    const P* p = global_ptr<const P>(ptrs[1]);
    constexpr int VEC = vec_width<S, P>;
    constexpr int U = kElemsPerThread / VEC;
    chunk_rounds<VEC, U>(begin, end, aligned16(s, p), [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float sv[U][W], pv[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // loads before stores: s and p might alias as far as nvcc knows
        if (!ok[u]) continue;
        load_elems<S, W>(s + idx[u], sv[u]);
        load_elems<P, W>(p + idx[u], pv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        S o[W];
#pragma unroll
        for (int j = 0; j < W; ++j) o[j] = from_float<S>(sv[u][j] + weight * (pv[u][j] - sv[u][j]));
        store_elems<S, W>(s + idx[u], o);
      }
    });
  }
};

enum RootKind : int { kRootNone = 0, kRootSqrt = 1, kRootPow = 2 };

// One block: total = root(sum of partial[0, n)) (fp64, fixed order) or max (NaN propagates);
// coef = min(1, max_norm / (total + 1e-6)) in fp32 as torch computes it (reciprocal, then times max_norm).
template <bool IS_MAX>
__global__ void __launch_bounds__(kFinalizeThreads)
    norm_finalize_kernel(const float* __restrict__ partial, std::int64_t n, int root, double inv_p, float max_norm,
                         float* __restrict__ total, float* __restrict__ coef) {
  using Acc = std::conditional_t<IS_MAX, float, double>;
  __shared__ Acc buf[kFinalizeThreads];
  Acc acc = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) {
    if constexpr (IS_MAX) {
      acc = max_nan(acc, partial[i]);
    } else {
      acc += static_cast<double>(partial[i]);
    }
  }
  buf[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int stride = kFinalizeThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      if constexpr (IS_MAX) {
        buf[threadIdx.x] = max_nan(buf[threadIdx.x], buf[threadIdx.x + stride]);
      } else {
        buf[threadIdx.x] += buf[threadIdx.x + stride];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float t;
    if constexpr (IS_MAX) {
      t = buf[0];
    } else {
      const double sum = buf[0];
      t = static_cast<float>(root == kRootSqrt ? sqrt(sum) : (root == kRootNone ? sum : pow(sum, inv_p)));
    }
    *total = t;
    if (coef != nullptr) {
      const float c = (1.f / (t + 1e-6f)) * max_norm;
      *coef = c > 1.f ? 1.f : c;  // NaN stays NaN, as torch.clamp(nan, max=1)
    }
  }
}

void check_dtypes(const char* op, int p_dtype, int g_dtype, int s_dtype) {
  FASTGEN_ARG_CHECK(valid_dtype(p_dtype) && g_dtype == p_dtype && (s_dtype == kFloat32 || s_dtype == kBFloat16),
                    std::string(op) + ": unsupported dtypes p=" + dtype_name(p_dtype) + ", g=" +
                        dtype_name(g_dtype) + ", states=" + dtype_name(s_dtype) +
                        "; supported: params float32/float16/bfloat16, grads of the params' dtype, states "
                        "float32 or bfloat16");
}

// Calls body.template operator()<P, S>() for the runtime (p, s) dtype codes.
template <typename Body>
void dispatch_p_s(int p_dtype, int s_dtype, const Body& body) {
  auto with_s = [&](auto p_tag) {
    using P = decltype(p_tag);
    if (s_dtype == kFloat32) {
      body(P{}, float{});
    } else {
      body(P{}, __nv_bfloat16{});
    }
  };
  if (p_dtype == kFloat32) {
    with_s(float{});
  } else if (p_dtype == kFloat16) {
    with_s(__half{});
  } else {
    with_s(__nv_bfloat16{});
  }
}

bool valid_norm_type(double norm_type) { return norm_type >= 1.0; }  // inf included; NaN not

// The one-pass step's shadow: none (sh_list 0), float32, or the parameters' dtype.
void check_shadow(const char* op, std::uintptr_t sh_list, int sh_dtype, int p_dtype, double ema_weight) {
  if (sh_list == 0) return;
  FASTGEN_ARG_CHECK(sh_dtype == kFloat32 || sh_dtype == p_dtype,
                    std::string(op) + ": unsupported EMA shadow dtype " + dtype_name(sh_dtype) + " for " +
                        dtype_name(p_dtype) + " parameters; supported: float32 or the parameters' dtype");
  FASTGEN_ARG_CHECK(std::isfinite(ema_weight), std::string(op) + ": ema_weight (1 - decay) must be finite");
}

// Calls body(P{}, S{}, SH{}) with SH = NoShadow (sh_list 0), float or P.
template <typename Body>
void dispatch_p_s_sh(int p_dtype, int s_dtype, std::uintptr_t sh_list, int sh_dtype, const Body& body) {
  dispatch_p_s(p_dtype, s_dtype, [&](auto p_tag, auto s_tag) {
    using P = decltype(p_tag);
    if (sh_list == 0) {
      body(p_tag, s_tag, NoShadow{});
    } else if (sh_dtype == kFloat32) {
      body(p_tag, s_tag, float{});
    } else if constexpr (!std::is_same_v<P, float>) {
      body(p_tag, s_tag, P{});
    }
  });
}

}  // namespace

void multi_tensor_adamw(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t v_list,
                        std::uintptr_t vmax_list, std::uintptr_t step_list, std::uintptr_t numels,
                        std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                        std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                        bool stochastic_rounding, std::uint32_t seed, std::uintptr_t sh_list, int sh_dtype,
                        std::uintptr_t coef_ptr, double ema_weight, std::uintptr_t stream) {
  check_dtypes("multi_tensor_adamw", p_dtype, g_dtype, s_dtype);
  check_shadow("multi_tensor_adamw", sh_list, sh_dtype, p_dtype, ema_weight);
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_adamw: need num_chunks >= 0 and chunk > 0");
  FASTGEN_ARG_CHECK(!amsgrad || vmax_list != 0, "multi_tensor_adamw: amsgrad needs the max_exp_avg_sq list");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({p_list, g_list, m_list, v_list, amsgrad ? vmax_list : m_list, step_list,
                                      sh_list != 0 ? sh_list : p_list},
                                     numels, chunk_ids, chunk_offs, chunk);
  const AdamWArgs a{reinterpret_cast<const float*>(lr_ptr), static_cast<float>(lr), static_cast<float>(beta1),
                    static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
                    static_cast<float>(std::log(beta1)), static_cast<float>(std::log(beta2)), amsgrad, maximize,
                    stochastic_rounding && p_dtype == kBFloat16, seed, reinterpret_cast<const float*>(coef_ptr),
                    static_cast<float>(ema_weight)};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_p_s_sh(p_dtype, s_dtype, sh_list, sh_dtype, [&](auto p_tag, auto s_tag, auto sh_tag) {
    using Op = AdamWOp<decltype(p_tag), decltype(s_tag), decltype(sh_tag)>;
    multi_tensor_apply<kAdamWLists>(t, num_chunks, Op{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_adamw kernel launch");
}

void multi_tensor_lion(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t numels,
                       std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                       std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                       double beta1, double beta2, double weight_decay, bool maximize, std::uintptr_t sh_list,
                       int sh_dtype, std::uintptr_t coef_ptr, double ema_weight, std::uintptr_t stream) {
  check_dtypes("multi_tensor_lion", p_dtype, g_dtype, s_dtype);
  check_shadow("multi_tensor_lion", sh_list, sh_dtype, p_dtype, ema_weight);
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_lion: need num_chunks >= 0 and chunk > 0");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({p_list, g_list, m_list, sh_list != 0 ? sh_list : p_list}, numels, chunk_ids,
                                     chunk_offs, chunk);
  const LionArgs a{reinterpret_cast<const float*>(lr_ptr), static_cast<float>(lr), static_cast<float>(beta1),
                   static_cast<float>(beta2), static_cast<float>(weight_decay), maximize,
                   reinterpret_cast<const float*>(coef_ptr), static_cast<float>(ema_weight)};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_p_s_sh(p_dtype, s_dtype, sh_list, sh_dtype, [&](auto p_tag, auto s_tag, auto sh_tag) {
    using Op = LionOp<decltype(p_tag), decltype(s_tag), decltype(sh_tag)>;
    multi_tensor_apply<kLionLists>(t, num_chunks, Op{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_lion kernel launch");
}

void multi_tensor_norm(std::uintptr_t g_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                       std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int g_dtype,
                       double norm_type, std::uintptr_t partial_ptr, std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(valid_dtype(g_dtype), std::string("multi_tensor_norm: unsupported dtypes g=") +
                                              dtype_name(g_dtype) + "; supported: float32, float16, bfloat16");
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_norm: need num_chunks >= 0 and chunk > 0");
  FASTGEN_ARG_CHECK(valid_norm_type(norm_type), "multi_tensor_norm: norm_type must be >= 1 or inf, got " +
                                                    std::to_string(norm_type));
  if (num_chunks == 0) return;
  FASTGEN_ARG_CHECK(partial_ptr != 0, "multi_tensor_norm: partial_ptr is null");
  const TensorTables t = make_tables({g_list}, numels, chunk_ids, chunk_offs, chunk);
  float* partial = reinterpret_cast<float*>(partial_ptr);
  const int kind = std::isinf(norm_type) ? kNormMax
                   : norm_type == 2.0    ? kNormSquares
                   : norm_type == 1.0    ? kNormAbs
                                         : kNormPow;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(g_dtype, [&](auto g_tag) {
    using G = decltype(g_tag);
    auto run = [&](auto kind_tag) {
      using Op = NormOp<G, decltype(kind_tag)::value>;
      multi_tensor_apply<1>(t, num_chunks, Op{partial, static_cast<float>(norm_type)}, s);
    };
    switch (kind) {
      case kNormSquares: run(std::integral_constant<int, kNormSquares>{}); break;
      case kNormAbs: run(std::integral_constant<int, kNormAbs>{}); break;
      case kNormPow: run(std::integral_constant<int, kNormPow>{}); break;
      default: run(std::integral_constant<int, kNormMax>{}); break;
    }
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_norm kernel launch");
}

void multi_tensor_norm_finalize(std::uintptr_t partial_ptr, std::int64_t n, double norm_type, double max_norm,
                                std::uintptr_t total_ptr, std::uintptr_t coef_ptr, std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(n >= 0, "multi_tensor_norm_finalize: need n >= 0");
  FASTGEN_ARG_CHECK(valid_norm_type(norm_type), "multi_tensor_norm_finalize: norm_type must be >= 1 or inf, got " +
                                                    std::to_string(norm_type));
  FASTGEN_ARG_CHECK(total_ptr != 0, "multi_tensor_norm_finalize: total_ptr is null");
  FASTGEN_ARG_CHECK(n == 0 || partial_ptr != 0, "multi_tensor_norm_finalize: partial_ptr is null");
  const float* partial = reinterpret_cast<const float*>(partial_ptr);
  float* total = reinterpret_cast<float*>(total_ptr);
  float* coef = reinterpret_cast<float*>(coef_ptr);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (std::isinf(norm_type)) {
    norm_finalize_kernel<true><<<1, kFinalizeThreads, 0, s>>>(partial, n, kRootNone, 0.0,
                                                               static_cast<float>(max_norm), total, coef);
  } else {
    const int root = norm_type == 1.0 ? kRootNone : (norm_type == 2.0 ? kRootSqrt : kRootPow);
    norm_finalize_kernel<false><<<1, kFinalizeThreads, 0, s>>>(partial, n, root, 1.0 / norm_type,
                                                                static_cast<float>(max_norm), total, coef);
  }
  FASTGEN_CHECK_LAUNCH("multi_tensor_norm_finalize kernel launch");
}

void multi_tensor_scale(std::uintptr_t g_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                        std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int g_dtype,
                        std::uintptr_t coef_ptr, std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(valid_dtype(g_dtype), std::string("multi_tensor_scale: unsupported dtypes g=") +
                                              dtype_name(g_dtype) + "; supported: float32, float16, bfloat16");
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_scale: need num_chunks >= 0 and chunk > 0");
  FASTGEN_ARG_CHECK(coef_ptr != 0, "multi_tensor_scale: coef_ptr is null (an fp32 device scalar is needed)");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({g_list}, numels, chunk_ids, chunk_offs, chunk);
  const float* coef = reinterpret_cast<const float*>(coef_ptr);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(g_dtype, [&](auto g_tag) {
    multi_tensor_apply<1>(t, num_chunks, ScaleOp<decltype(g_tag)>{coef}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_scale kernel launch");
}

void multi_tensor_ema(std::uintptr_t s_list, std::uintptr_t p_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                      std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int s_dtype,
                      int p_dtype, double weight, std::uintptr_t weight_ptr, std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(valid_dtype(s_dtype) && valid_dtype(p_dtype),
                    std::string("multi_tensor_ema: unsupported dtypes shadow=") + dtype_name(s_dtype) +
                        ", params=" + dtype_name(p_dtype) + "; supported: float32, float16, bfloat16 (any pair)");
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_ema: need num_chunks >= 0 and chunk > 0");
  FASTGEN_ARG_CHECK(weight_ptr != 0 || std::isfinite(weight),
                    "multi_tensor_ema: weight (1 - decay) must be finite");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({s_list, p_list}, numels, chunk_ids, chunk_offs, chunk);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(s_dtype, [&](auto s_tag) {
    dispatch_one(p_dtype, [&](auto p_tag) {
      using Op = EmaOp<decltype(s_tag), decltype(p_tag)>;
      multi_tensor_apply<2>(t, num_chunks, Op{static_cast<float>(weight), reinterpret_cast<const float*>(weight_ptr)},
                            s);
    });
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_ema kernel launch");
}

}  // namespace fastgen
