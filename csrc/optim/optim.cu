// Multi-tensor AdamW and Lion (one launch per dtype combination), CUDA C++.
//
// AdamW, per element in fp32, as torch.optim.AdamW (t = the tensor's step, already incremented):
//   g = maximize ? -grad : grad
//   p = p * (1 - lr * wd);  m = m + (1 - beta1) * (g - m);  v = beta2 * v + (1 - beta2) * g^2
//   v = max(vmax, v) (amsgrad; stored back to vmax)
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The bias corrections 1 - beta^t = -expm1(t * ln(beta)) are computed once per block
// from the device step (accurate in fp32, also for t = 1 where 1 - beta is tiny).
// bf16 parameters may be rounded stochastically: 16 hashed random bits are added
// below the bf16 mantissa before truncation.
//
// Lion: c = beta1 * m + (1 - beta1) * g;  p = p * (1 - lr * wd) - lr * sign(c);
//       m = beta2 * m + (1 - beta2) * g.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/multi_tensor.cuh"
#include "optim.h"

namespace fastgen {
namespace {

constexpr int kAdamWLists = 6;  // p, g, m, v, vmax, step
constexpr int kLionLists = 3;   // p, g, m

template <typename P>
__device__ __forceinline__ P store_param(float x, bool stochastic, std::uint32_t seed, std::int32_t k,
                                         std::int64_t i) {
  if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (stochastic) {
      const std::uint32_t bits = __float_as_uint(x) + (hash3(seed, static_cast<std::uint32_t>(k),
                                                             static_cast<std::uint64_t>(i)) & 0xFFFFu);
      return __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
    }
  }
  return from_float<P>(x);
}

struct AdamWArgs {
  const float* lr_ptr;  // null: use lr
  float lr, beta1, beta2, eps, weight_decay;
  float ln_beta1, ln_beta2;  // ln(beta); -inf for beta = 0
  bool amsgrad, maximize, stochastic;
  std::uint32_t seed;
};

template <typename P, typename S>
struct AdamWOp {
  AdamWArgs a;
  __device__ void operator()(std::int32_t k, void** ptrs, std::int64_t begin, std::int64_t end) const {
    P* p = static_cast<P*>(ptrs[0]);
    const P* g = static_cast<const P*>(ptrs[1]);
    S* m = static_cast<S*>(ptrs[2]);
    S* v = static_cast<S*>(ptrs[3]);
    S* vmax = static_cast<S*>(ptrs[4]);
    const float t = *static_cast<const float*>(ptrs[5]);
    const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
    const float step_size = lr / -expm1f(t * a.ln_beta1);
    const float bias2_sqrt = sqrtf(-expm1f(t * a.ln_beta2));
    const float decay = 1.f - lr * a.weight_decay;
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      float gi = to_float(g[i]);
      if (a.maximize) gi = -gi;
      float mi = to_float(m[i]);
      mi = mi + (1.f - a.beta1) * (gi - mi);
      float vi = to_float(v[i]) * a.beta2 + (1.f - a.beta2) * (gi * gi);
      m[i] = from_float<S>(mi);
      v[i] = from_float<S>(vi);
      if (a.amsgrad) {
        vi = fmaxf(to_float(vmax[i]), vi);
        vmax[i] = from_float<S>(vi);
      }
      const float pi = to_float(p[i]) * decay - step_size * (mi / (sqrtf(vi) / bias2_sqrt + a.eps));
      p[i] = store_param<P>(pi, a.stochastic, a.seed, k, i);
    }
  }
};

struct LionArgs {
  const float* lr_ptr;
  float lr, beta1, beta2, weight_decay;
  bool maximize;
};

template <typename P, typename S>
struct LionOp {
  LionArgs a;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    P* p = static_cast<P*>(ptrs[0]);
    const P* g = static_cast<const P*>(ptrs[1]);
    S* m = static_cast<S*>(ptrs[2]);
    const float lr = a.lr_ptr != nullptr ? *a.lr_ptr : a.lr;
    const float decay = 1.f - lr * a.weight_decay;
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      float gi = to_float(g[i]);
      if (a.maximize) gi = -gi;
      const float mi = to_float(m[i]);
      const float c = a.beta1 * mi + (1.f - a.beta1) * gi;
      const float sign = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);
      p[i] = from_float<P>(to_float(p[i]) * decay - lr * sign);
      m[i] = from_float<S>(a.beta2 * mi + (1.f - a.beta2) * gi);
    }
  }
};

TensorTables make_tables(std::initializer_list<std::uintptr_t> lists, std::uintptr_t numels, std::uintptr_t ids,
                         std::uintptr_t offs, std::int64_t chunk) {
  TensorTables t{};
  int l = 0;
  for (std::uintptr_t list : lists) t.lists[l++] = reinterpret_cast<const std::uint64_t*>(list);
  t.numels = reinterpret_cast<const std::int64_t*>(numels);
  t.chunk_ids = reinterpret_cast<const std::int32_t*>(ids);
  t.chunk_offs = reinterpret_cast<const std::int64_t*>(offs);
  t.chunk = chunk;
  return t;
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

}  // namespace

void multi_tensor_adamw(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t v_list,
                        std::uintptr_t vmax_list, std::uintptr_t step_list, std::uintptr_t numels,
                        std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                        std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                        bool stochastic_rounding, std::uint32_t seed, std::uintptr_t stream) {
  check_dtypes("multi_tensor_adamw", p_dtype, g_dtype, s_dtype);
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_adamw: need num_chunks >= 0 and chunk > 0");
  FASTGEN_ARG_CHECK(!amsgrad || vmax_list != 0, "multi_tensor_adamw: amsgrad needs the max_exp_avg_sq list");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({p_list, g_list, m_list, v_list, amsgrad ? vmax_list : m_list, step_list},
                                     numels, chunk_ids, chunk_offs, chunk);
  const AdamWArgs a{reinterpret_cast<const float*>(lr_ptr), static_cast<float>(lr), static_cast<float>(beta1),
                    static_cast<float>(beta2), static_cast<float>(eps), static_cast<float>(weight_decay),
                    static_cast<float>(std::log(beta1)), static_cast<float>(std::log(beta2)), amsgrad, maximize, stochastic_rounding && p_dtype == kBFloat16, seed};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_p_s(p_dtype, s_dtype, [&](auto p_tag, auto s_tag) {
    using Op = AdamWOp<decltype(p_tag), decltype(s_tag)>;
    multi_tensor_apply<kAdamWLists>(t, num_chunks, Op{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_adamw kernel launch");
}

void multi_tensor_lion(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t numels,
                       std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                       std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                       double beta1, double beta2, double weight_decay, bool maximize, std::uintptr_t stream) {
  check_dtypes("multi_tensor_lion", p_dtype, g_dtype, s_dtype);
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, "multi_tensor_lion: need num_chunks >= 0 and chunk > 0");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({p_list, g_list, m_list}, numels, chunk_ids, chunk_offs, chunk);
  const LionArgs a{reinterpret_cast<const float*>(lr_ptr), static_cast<float>(lr), static_cast<float>(beta1),
                   static_cast<float>(beta2), static_cast<float>(weight_decay), maximize};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_p_s(p_dtype, s_dtype, [&](auto p_tag, auto s_tag) {
    using Op = LionOp<decltype(p_tag), decltype(s_tag)>;
    multi_tensor_apply<kLionLists>(t, num_chunks, Op{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_lion kernel launch");
}

}  // namespace fastgen
