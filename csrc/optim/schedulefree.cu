// Multi-tensor schedule-free AdamW step (fastgen.optim.FusedAdamWScheduleFree), CUDA C++.
//
// Per element in fp32, as the Triton kernel (kernels/schedulefree.py) and the schedulefree package:
//   v = beta2 * v + (1 - beta2) * g^2             (stored, and used as stored: rounded to P first)
//   u = g / (sqrt(v / bc2) + eps) + weight_decay * y
//   y = lerp(y, z, c) + y_coef * u                 (lerp as torch.lerp evaluates it)
//   z = z - lr * u
// with this step's scalars read from the device, scalars = [bc2, c, y_coef, lr] (bc2 = 1 - beta2^(k+1),
// c the averaging weight, y_coef = lr (beta1 (1 - c) - 1)): a captured step replays with each step's own
// schedule. Division and square root are IEEE round-to-nearest (__fdiv_rn, __fsqrt_rn), as the Triton
// kernel's div_rn / sqrt_rn.
//
// Memory access (csrc/common/multi_tensor.cuh chunk_rounds): a tensor whose four operands start on
// 16 bytes is walked in groups of 16 bytes (8 bf16 / fp16, 4 fp32), each operand moved with 16-byte
// ld.global.v4 / st.global.v4, every load of a round issued before its math; the tail and unaligned
// views go element by element with the same math. Bytes per element: y, g, z, v read (4P); y, z, v
// written (3P).

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "../common/check.h"
#include "../common/dtype.cuh"
#include "../common/multi_tensor.cuh"
#include "../common/optim_math.cuh"
#include "../common/vec.cuh"
#include "optim.h"

namespace fastgen {
namespace {

constexpr int kScheduleFreeLists = 4;  // y, g, z, v
// Elements per thread per round: 8, as AdamW's functor (four operands; 16 would double the registers).
constexpr int kScheduleFreeElems = 8;

struct ScheduleFreeArgs {
  const float* scalars;  // [4]: bc2, c, y_coef, lr
  float beta2, eps, weight_decay;
};

template <typename P>
struct ScheduleFreeOp {
  ScheduleFreeArgs a;
  __device__ void operator()(std::int32_t, void** ptrs, std::int64_t begin, std::int64_t end) const {
    P* y = global_ptr<P>(ptrs[0]);
    const P* g = global_ptr<const P>(ptrs[1]);
    P* z = global_ptr<P>(ptrs[2]);
    P* v = global_ptr<P>(ptrs[3]);
    const float bc2 = a.scalars[0];
    const float c = a.scalars[1];
    const float y_coef = a.scalars[2];
    const float lr = a.scalars[3];
    constexpr int VEC = vec_width<P>;
    constexpr int U = kScheduleFreeElems / VEC > 0 ? kScheduleFreeElems / VEC : 1;
    chunk_rounds<VEC, U>(begin, end, aligned16(y, g, z, v), [&](auto w, const auto& idx, const auto& ok) {
      constexpr int W = decltype(w)::value;
      float yv[U][W], gv[U][W], zv[U][W], vv[U][W];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // every load of the round before any store
        if (!ok[u]) continue;
        load_elems<P, W>(y + idx[u], yv[u]);
        load_elems<P, W>(g + idx[u], gv[u]);
        load_elems<P, W>(z + idx[u], zv[u]);
        load_elems<P, W>(v + idx[u], vv[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        P yo[W], zo[W], vo[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const float gi = gv[u][j];
          vo[j] = from_float<P>(vv[u][j] * a.beta2 + (1.f - a.beta2) * (gi * gi));
          const float vi = to_float(vo[j]);  // the package stores v before it uses it
          float ui = __fdiv_rn(gi, __fsqrt_rn(__fdiv_rn(vi, bc2)) + a.eps);
          const float yi = yv[u][j];
          const float zi = zv[u][j];
          ui = ui + a.weight_decay * yi;
          yo[j] = from_float<P>(lerp_like_torch(yi, zi, c) + y_coef * ui);
          zo[j] = from_float<P>(zi - lr * ui);
        }
        store_elems<P, W>(v + idx[u], vo);
        store_elems<P, W>(y + idx[u], yo);
        store_elems<P, W>(z + idx[u], zo);
      }
    });
  }
};

}  // namespace

void multi_tensor_schedulefree(std::uintptr_t y_list, std::uintptr_t g_list, std::uintptr_t z_list,
                               std::uintptr_t v_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                               std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int p_dtype,
                               int g_dtype, std::uintptr_t scalars_ptr, double beta2, double eps, double weight_decay,
                               std::uintptr_t stream) {
  FASTGEN_ARG_CHECK(valid_dtype(p_dtype) && g_dtype == p_dtype,
                    std::string("multi_tensor_schedulefree: unsupported dtypes params=") + dtype_name(p_dtype) +
                        ", grads=" + dtype_name(g_dtype) +
                        "; supported: float32, float16 or bfloat16 parameters (z and exp_avg_sq alike) and grads");
  FASTGEN_ARG_CHECK(num_chunks >= 0 && chunk > 0 && chunk % 16 == 0,
                    "multi_tensor_schedulefree: need num_chunks >= 0 and chunk > 0, a multiple of 16");
  FASTGEN_ARG_CHECK(scalars_ptr != 0 && scalars_ptr % 4 == 0,
                    "multi_tensor_schedulefree: scalars_ptr must be the address of 4 fp32 device values");
  FASTGEN_ARG_CHECK(std::isfinite(beta2) && std::isfinite(eps) && std::isfinite(weight_decay),
                    "multi_tensor_schedulefree: beta2, eps and weight_decay must be finite");
  if (num_chunks == 0) return;
  const TensorTables t = make_tables({y_list, g_list, z_list, v_list}, numels, chunk_ids, chunk_offs, chunk);
  const ScheduleFreeArgs a{reinterpret_cast<const float*>(scalars_ptr), static_cast<float>(beta2),
                           static_cast<float>(eps), static_cast<float>(weight_decay)};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_one(p_dtype, [&](auto p_tag) {
    multi_tensor_apply<kScheduleFreeLists>(t, num_chunks, ScheduleFreeOp<decltype(p_tag)>{a}, s);
  });
  FASTGEN_CHECK_LAUNCH("multi_tensor_schedulefree kernel launch");
}

}  // namespace fastgen
