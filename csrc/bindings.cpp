// The one pybind11 module of fastgen: fastgen._C.
//
// No torch headers: entry points take raw device pointers (Python ints), sizes,
// strides in elements, dtype codes (0 = float32, 1 = float16, 2 = bfloat16) and
// the cudaStream_t as an int. Every entry point takes them as one
// named parameter struct (params.h): fastgen._C.RmsNormFwdParams(x_ptr=..., ...),
// a misspelled field is an AttributeError, an unset one a ValueError naming it.
// Argument errors raise ValueError, CUDA errors RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "rms_norm/rms_norm.h"
#include "group_norm/group_norm.h"
#include "rope/rope.h"
#include "qk_norm_rope/qk_norm_rope.h"
#include "optim/optim.h"
#include "params.h"

#ifndef FASTGEN_ARCHS
#define FASTGEN_ARCHS ""
#endif
#ifndef FASTGEN_PTX_ARCH
#define FASTGEN_PTX_ARCH 0
#endif
#ifndef FASTGEN_NVCC_VERSION
#define FASTGEN_NVCC_VERSION "unknown"
#endif

namespace py = pybind11;

namespace {

std::vector<int> parse_archs(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(std::stoi(item));
  }
  return out;
}

py::dict build_info() {
  py::dict d;
  d["archs"] = parse_archs(FASTGEN_ARCHS);
  d["ptx"] = FASTGEN_PTX_ARCH;
  d["cuda_version"] = std::to_string(CUDART_VERSION);
  d["nvcc_version"] = std::string(FASTGEN_NVCC_VERSION);
  std::string compiler = "unknown";
#if defined(__clang__)
  compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  compiler = "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
             std::to_string(__GNUC_PATCHLEVEL__);
#endif
  d["compiled_with"] = "nvcc " + std::string(FASTGEN_NVCC_VERSION) + ", host " + compiler + ", C++" +
                       std::to_string(__cplusplus) + ", cudart static";
  d["cudart"] = "static";
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) +
                          "." + std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error, report 0
    return 0;
  }
  return n;
}

}  // namespace

// Binds struct Name (fields from LIST, filled by keyword: Name(x_ptr=..., ...); Name.fields lists
// them in order) and the entry point fn(params), which refuses unset fields and forwards them to
// fastgen::fn in LIST order.
#define FG_ENTRY(Name, LIST, fn, doc)                                                             \
  {                                                                                               \
    FG_PARAMS(Name, LIST)                                                                         \
    using Params = Name;                                                                          \
    py::class_<Params> cls(m, #Name, "Parameters of " #fn "; set every field by name.");         \
    cls.def(py::init([](py::kwargs fields) {                                                      \
      Params p;                                                                                   \
      py::object self = py::cast(&p, py::return_value_policy::reference);                        \
      for (auto item : fields) py::setattr(self, item.first, item.second);                        \
      return p;                                                                                   \
    }));                                                                                          \
    LIST(FG_RW) FG_RW(PTR, stream)                                                                \
    py::list names;                                                                               \
    LIST(FG_NAME) FG_NAME(PTR, stream)                                                            \
    cls.attr("fields") = py::tuple(names);                                                        \
    m.def(                                                                                        \
        #fn,                                                                                      \
        [](const Params& p) {                                                                     \
          std::string missing;                                                                    \
          LIST(FG_MISSING) FG_MISSING(PTR, stream)                                                \
          if (!missing.empty()) throw std::invalid_argument(#fn ": fields not set: " + missing);  \
          py::gil_scoped_release release;                                                         \
          fastgen::fn(LIST(FG_ARG) p.stream);                                                     \
        },                                                                                        \
        py::arg("params"), doc);                                                                  \
  }

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgen CUDA kernels (torch-independent: raw pointers, sizes, strides, dtype codes, stream as int)";

  m.def("build_info", &build_info,
        "Dict with archs (list of int), ptx (int), cuda_version (CUDART_VERSION as str), nvcc_version, "
        "compiled_with.");
  m.def("device_count", &device_count, "Number of CUDA devices; 0 when there is no driver or GPU.");

  FG_ENTRY(RmsNormFwdParams, FG_RMS_NORM_FWD, rms_norm_fwd,
           "RMSNorm forward with optional residual: h = x + r (stored in x dtype), rstd = 1/sqrt(mean(h^2)+eps), "
           "y = (h*rstd)*w. w_ptr / r_ptr / h_ptr may be 0 (absent).");
  FG_ENTRY(RmsNormBwdParams, FG_RMS_NORM_BWD, rms_norm_bwd,
           "RMSNorm backward: dx = rstd*(g - xhat*mean(g*xhat)) + dh_out with xhat = h*rstd, g = dy*w; fp32 partial "
           "weight gradients (sum over rows of dy*xhat) into dw_partial[num_partials, N]. w_ptr / dhout_ptr may be 0.");
  FG_ENTRY(GroupNormFwdParams, FG_GROUP_NORM_FWD, group_norm_fwd,
           "GroupNorm forward (+ fused SiLU) of x [N, C, S] (contiguous or channels-last strides): split Welford "
           "statistics mean / rstd [N*G] fp32, y = act((x - mean) * rstd * w + b). w_ptr / b_ptr may be 0; part_ptr "
           "([N*G, splits, 3] fp32 scratch) may be 0 when splits == 1.");
  FG_ENTRY(GroupNormBwdParams, FG_GROUP_NORM_BWD, group_norm_bwd,
           "GroupNorm backward (+ fused SiLU): dx = rstd*(g - mean(g) - xhat*mean(g*xhat)), g = dyn*w; per-block fp32 "
           "partials of dw (dyn*xhat) and db (dyn) into dwp / dbp [N*splits, C]; c_ptr: [2, N*G] fp32 scratch.");
  FG_ENTRY(ApplyRopeParams, FG_APPLY_ROPE, apply_rope,
           "RoPE of q (B,S,Hq,D) and k (B,S,Hk,D) given (batch, seq, head) strides into qo / ko (may alias: in place) "
           "with cos/sin tables (B|1, S, R) given (batch, seq) strides; pairs (2j, 2j+1) if interleaved else "
           "(j, j+R/2); inverse applies the transpose (backward); copy_pass copies dims R..D-1.");
  FG_ENTRY(QkNormRopeFwdParams, FG_QK_NORM_ROPE_FWD, qk_norm_rope_fwd,
           "Fused per-head RMSNorm + RoPE of q (B,S,Hq,D) and k (B,S,Hk,D) given (batch, seq, head) strides into new "
           "qo / ko: n = x*rsqrt(mean(x^2)+eps)*w in fp32 (never rounded), then the rotation of apply_rope with cos/sin "
           "(B|1, S, R); wq / wk (D,) in x dtype or float32 (own codes); one rounding at the store.");
  FG_ENTRY(QkNormRopeBwdParams, FG_QK_NORM_ROPE_BWD, qk_norm_rope_bwd,
           "Backward of qk_norm_rope_fwd (rstd recomputed from q / k): dq, dk = rstd*(g - xhat*mean(g*xhat)) with "
           "g = rope^T(dy)*w; fp32 weight-gradient partials (sums of rope^T(dy)*xhat) into dw_partial[num_partials_q + "
           "num_partials_k, D], q's rows first; the caller sums them in a fixed order (deterministic, no atomics).");
  FG_ENTRY(MultiTensorAdamwParams, FG_MULTI_TENSOR_ADAMW, multi_tensor_adamw,
           "AdamW over lists of tensors given as device address tables (see csrc/common/multi_tensor.cuh); vmax_list "
           "0 unless amsgrad; lr_ptr: an fp32 device scalar, or 0 to use lr; seed: 32 bits of stochastic rounding.");
  FG_ENTRY(MultiTensorLionParams, FG_MULTI_TENSOR_LION, multi_tensor_lion,
           "Lion over lists of tensors given as device address tables; lr_ptr as for AdamW.");
  FG_ENTRY(MultiTensorNormParams, FG_MULTI_TENSOR_NORM, multi_tensor_norm,
           "Per-chunk fp32 partials of a multi-tensor norm into partial[num_chunks]: the sum of |g|^p (norm_type = p "
           ">= 1) or max |g| (norm_type = inf, NaN propagates).");
  FG_ENTRY(MultiTensorNormFinalizeParams, FG_MULTI_TENSOR_NORM_FINALIZE, multi_tensor_norm_finalize,
           "One block reduces partial[n] in a fixed order (deterministic): fp32 total norm (sum^(1/p), or max for inf) "
           "into *total_ptr and, unless coef_ptr is 0, min(1, max_norm / (total + 1e-6)) into *coef_ptr.");
  FG_ENTRY(MultiTensorScaleParams, FG_MULTI_TENSOR_SCALE, multi_tensor_scale,
           "g *= coef in place over lists of tensors; coef_ptr: address of an fp32 device scalar.");
  FG_ENTRY(MultiTensorAdamw8bitParams, FG_MULTI_TENSOR_ADAMW8BIT, multi_tensor_adamw8bit,
           "8-bit AdamW over lists of tensors (block-wise dynamic quantization, 256 elements per fp32 absmax): "
           "dequantize, update in fp32, requantize in one pass; chunk 4096; maps: SMAP, SBOUND, UMAP, UBOUND "
           "(4 x 256 fp32); optional clip coefficient (coef_ptr) and EMA shadows (sh_list, ema_weight = 1 - decay).");
  FG_ENTRY(MultiTensorProdigyMomentsParams, FG_MULTI_TENSOR_PRODIGY_MOMENTS, multi_tensor_prodigy_moments,
           "Prodigy pass 1 over lists of tensors: m, v, s updated in place with the device coefficients c1, c2, c3 "
           "(coefs_ptr), per-chunk fp32 partial sums of g (p0 - p) and |s| into dot_ptr / abs_ptr [num_chunks]; "
           "m_list 0 when beta1 = 0.");
  FG_ENTRY(MultiTensorProdigyUpdateParams, FG_MULTI_TENSOR_PRODIGY_UPDATE, multi_tensor_prodigy_update,
           "Prodigy pass 2 over lists of tensors: p += w p (decoupled_wd), p += a n / (sqrt(v) + e) with the device "
           "coefficients w, a, e (coefs_ptr); n: exp_avg, or the gradient when beta1 = 0.");
  FG_ENTRY(MultiTensorEmaParams, FG_MULTI_TENSOR_EMA, multi_tensor_ema,
           "EMA over lists of tensors: shadow += weight * (param - shadow) in fp32 (weight = 1 - decay, or the fp32 "
           "device scalar at weight_ptr when not 0), one rounding.");
  FG_ENTRY(MultiTensorSchedulefreeParams, FG_MULTI_TENSOR_SCHEDULEFREE, multi_tensor_schedulefree,
           "Schedule-free AdamW over lists of tensors (y, g, z, v tables): this step's scalars [1 - beta2^(k+1), c, "
           "lr (beta1 (1 - c) - 1), lr] read from scalars_ptr (4 fp32 device values); fp32 math, one rounding per "
           "store.");
}
