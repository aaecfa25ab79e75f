// Multi-tensor Prodigy, CUDA C++: the two passes of fastgen.optim.FusedProdigy (slice_p = 1), as the
// Triton kernels of kernels/prodigy.py.
//
// Pass 1 (prodigy_moments), per element, c1 = d (1 - beta1), c2 = d^2 (1 - beta2), c3 = (d / d0) * dlr
// (or * d with the safeguard warm-up) read from a device [3] fp32 array, g as given (the caller
// applies coupled weight decay to it first):
//   dot += g * (p0 - p)
//   m  = beta1 * m + c1 * g        v = beta2 * v + c2 * g^2        s = beta3 * s + c3 * g
//   abs += |s|  (of s as stored)
// one fp32 partial of each sum per chunk (a fixed shuffle tree, then warps in order), which the
// caller adds in fp64 in a fixed order: deterministic.
// Pass 2 (prodigy_update), after the caller updated d on the device, coefs [w, a, e]:
//   p = p + w * p  (decoupled weight decay, rounded to the parameter dtype as the Triton kernel)
//   p = p + a * n / (sqrt(v) + e)         (n = m, or g when beta1 = 0)
// Every tensor is of the parameters' dtype (the states are zeros_like(p); torch keeps p.grad in p's
// dtype). Memory access as csrc/optim/optim.cu: 16-byte pieces of every operand on the vector path,
// element by element for tails and unaligned views. Bytes per element: pass 1 reads p, g, p0, m, v, s
// and writes m, v, s; pass 2 reads p, n, v and writes p.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/multi_tensor.cuh"
#include "../common/optim_math.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "optim.h"

namespace fastgen {
namespace {

constexpr int kProdigyElems = 8;  // elements per thread per round (6 operands: ~80 registers)

struct MomentsArgs {
  const float* coefs;  // c1, c2, c3
  float* dot;          // [num_chunks] partial sums of g (p0 - p)
  float* abs_sum;      // [num_chunks] partial sums of |s|
  float beta1, beta2, beta3;
  bool has_m;
};

// lists: p, g, p0, m (v's table when !has_m), v, s.
template <typename P>
struct ProdigyMomentsOp {
  MomentsArgs a;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    const P* p = global_ptr<const P>(ptrs[0]);
    const P* g = global_ptr<const P>(ptrs[1]);
    const P* p0 = global_ptr<const P>(ptrs[2]);
    P* m = global_ptr<P>(ptrs[3]);
    P* v = global_ptr<P>(ptrs[4]);
    P* s = global_ptr<P>(ptrs[5]);
    const float c1 = a.coefs[0], c2 = a.coefs[1], c3 = a.coefs[2];
    constexpr int VEC = vec_width<P>;
    constexpr int U = kProdigyElems / VEC > 0 ? kProdigyElems / VEC : 1;
    float dot = 0.f, abs_sum = 0.f;
    chunk_rounds<VEC, U>(begin, end, aligned16(p, g, p0, m, v, s), [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float pv[U][W], gv[U][W], p0v[U][W], mv[U][W], vv[U][W], sv[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // every load of the round first
        if (!ok[u]) continue;
        load_elems<P, W>(p + idx[u], pv[u]);
        load_elems<P, W>(g + idx[u], gv[u]);
        load_elems<P, W>(p0 + idx[u], p0v[u]);
        if (a.has_m) load_elems<P, W>(m + idx[u], mv[u]);
        load_elems<P, W>(v + idx[u], vv[u]);
        load_elems<P, W>(s + idx[u], sv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        P mo[W], vo[W], so[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const float gi = gv[u][j];
          dot += gi * (p0v[u][j] - pv[u][j]);
          if (a.has_m) mo[j] = from_float<P>(mv[u][j] * a.beta1 + gi * c1);
          vo[j] = from_float<P>(vv[u][j] * a.beta2 + (gi * c2) * gi);
          so[j] = from_float<P>(sv[u][j] * a.beta3 + gi * c3);
          abs_sum += fabsf(to_float(so[j]));
        }
        if (a.has_m) store_elems<P, W>(m + idx[u], mo);
        store_elems<P, W>(v + idx[u], vo);
        store_elems<P, W>(s + idx[u], so);
      }
    });
    __shared__ float smem[32];
    dot = group_reduce_sum(dot, static_cast<int>(blockDim.x), smem);
    abs_sum = group_reduce_sum(abs_sum, static_cast<int>(blockDim.x), smem);
    if (threadIdx.x == 0) {
      a.dot[blockIdx.x] = dot;
      a.abs_sum[blockIdx.x] = abs_sum;
    }
  }
};

struct UpdateArgs {
  const float* coefs;  // w, a, e
  bool decoupled_wd;
};

// lists: p, n (m or g), v.
template <typename P>
struct ProdigyUpdateOp {
  UpdateArgs a;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    P* p = global_ptr<P>(ptrs[0]);
    const P* n = global_ptr<const P>(ptrs[1]);
    const P* v = global_ptr<const P>(ptrs[2]);
    const float w_ = a.coefs[0], a_ = a.coefs[1], e_ = a.coefs[2];
    constexpr int VEC = vec_width<P>;
    constexpr int U = kElemsPerThread / VEC;
    chunk_rounds<VEC, U>(begin, end, aligned16(p, n, v), [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float pv[U][W], nv[U][W], vv[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        load_elems<P, W>(p + idx[u], pv[u]);
        load_elems<P, W>(n + idx[u], nv[u]);
        load_elems<P, W>(v + idx[u], vv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        P po[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          float pi = pv[u][j];
          if (a.decoupled_wd) pi = round_to<P>(pi + w_ * pi);
          po[j] = from_float<P>(pi + a_ * (nv[u][j] / (sqrtf(vv[u][j]) + e_)));
        }
        store_elems<P, W>(p + idx[u], po);
      }
    });
  }
};

void check_prodigy(const char* op, int p_dtype, int g_dtype, std::int64_t num_chunks, std::int64_t chunk,
                   std::uintptr_t coefs) {
  FASTGEN_ARG_CHECK(valid_dtype(p_dtype) && g_dtype == p_dtype,
                    std::string(op) + ": unsupported dtypes p=" + dtype_name(p_dtype) + ", g=" + dtype_name(g_dtype) +
                        "; supported: float32, float16, bfloat16, the gradients and states of the parameters' dtype");
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0, std::string(op) + ": need num_chunks >= 0 and chunk > 0");
  FASTGEN_ARG_CHECK(num_chunks == 0 || coefs != 0, std::string(op) + ": coefs_ptr is null (3 fp32 device values)");
}

}  // namespace

void multi_tensor_prodigy_moments(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t p0_list,
                                  std::uintptr_t m_list, std::uintptr_t v_list, std::uintptr_t s_list,
                                  std::uintptr_t numels, std::uintptr_t chunk_ids, std::uintptr_t chunk_offs,
                                  std::int64_t num_chunks, std::int64_t chunk, int p_dtype, int g_dtype,
                                  std::uintptr_t coefs_ptr, std::uintptr_t dot_ptr, std::uintptr_t abs_ptr,
                                  double beta1, double beta2, double beta3, std::uintptr_t stream) {
  check_prodigy("multi_tensor_prodigy_moments", p_dtype, g_dtype, num_chunks, chunk, coefs_ptr);
  FASTGEN_ARG_CHECK(num_chunks == 0 || (dot_ptr != 0 && abs_ptr != 0),
                    "multi_tensor_prodigy_moments: dot_ptr / abs_ptr is null (fp32 [num_chunks] outputs)");
  if (num_chunks == 0) return;
  const bool has_m = m_list != 0;
  const TensorTables t =
      make_tables({p_list, g_list, p0_list, has_m ? m_list : v_list, v_list, s_list}, numels, chunk_ids, chunk_offs,
                  chunk);
  const MomentsArgs a{reinterpret_cast<const float*>(coefs_ptr), reinterpret_cast<float*>(dot_ptr),
                      reinterpret_cast<float*>(abs_ptr), static_cast<float>(beta1), static_cast<float>(beta2),
                      static_cast<float>(beta3), has_m};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(p_dtype, [&](auto p_tag) {
    multi_tensor_apply<6>(t, num_chunks, ProdigyMomentsOp<decltype(p_tag)>{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_prodigy_moments kernel launch");
}

void multi_tensor_prodigy_update(std::uintptr_t p_list, std::uintptr_t n_list, std::uintptr_t v_list,
                                 std::uintptr_t numels, std::uintptr_t chunk_ids, std::uintptr_t chunk_offs,
                                 std::int64_t num_chunks, std::int64_t chunk, int p_dtype, int n_dtype,
                                 std::uintptr_t coefs_ptr, bool decoupled_wd, std::uintptr_t stream) {
  check_prodigy("multi_tensor_prodigy_update", p_dtype, n_dtype, num_chunks, chunk, coefs_ptr);
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({p_list, n_list, v_list}, numels, chunk_ids, chunk_offs, chunk);
  const UpdateArgs a{reinterpret_cast<const float*>(coefs_ptr), decoupled_wd};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(p_dtype, [&](auto p_tag) {
    multi_tensor_apply<3>(t, num_chunks, ProdigyUpdateOp<decltype(p_tag)>{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_prodigy_update kernel launch");
}

}  // namespace fastgen
