// The one pybind11 module of fastgen: fastgen._C.
//
// No torch headers: every entry point takes raw device pointers (Python
// ints), sizes, strides in elements, dtype codes (0 = float32, 1 = float16,
// 2 = bfloat16) and the cudaStream_t as an int. Argument errors raise
// ValueError, CUDA errors RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "rms_norm/rms_norm.h"

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastgen CUDA kernels (torch-independent: raw pointers, sizes, strides, dtype codes, stream as int)";

  m.def("build_info", &build_info,
        "Dict with archs (list of int), ptx (int), cuda_version (CUDART_VERSION as str), nvcc_version, "
        "compiled_with.");
  m.def("device_count", &device_count, "Number of CUDA devices; 0 when there is no driver or GPU.");

  m.def("rms_norm_fwd", &fastgen::rms_norm_fwd, py::arg("x_ptr"), py::arg("w_ptr"), py::arg("r_ptr"),
        py::arg("y_ptr"), py::arg("h_ptr"), py::arg("rstd_ptr"), py::arg("M"), py::arg("N"), py::arg("stride_x"),
        py::arg("stride_r"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "RMSNorm forward with optional residual: h = x + r (stored in x dtype), rstd = 1/sqrt(mean(h^2)+eps), "
        "y = (h*rstd)*w. w_ptr / r_ptr / h_ptr may be 0 (absent).");
  m.def("rms_norm_bwd", &fastgen::rms_norm_bwd, py::arg("dy_ptr"), py::arg("h_ptr"), py::arg("w_ptr"),
        py::arg("rstd_ptr"), py::arg("dhout_ptr"), py::arg("dx_ptr"), py::arg("dw_partial_ptr"), py::arg("M"),
        py::arg("N"), py::arg("stride_dy"), py::arg("stride_h"), py::arg("stride_dhout"), py::arg("x_dtype"),
        py::arg("w_dtype"), py::arg("num_partials"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "RMSNorm backward: dx = rstd*(g - xhat*mean(g*xhat)) + dh_out with xhat = h*rstd, g = dy*w; fp32 partial "
        "weight gradients (sum over rows of dy*xhat) into dw_partial[num_partials, N]. w_ptr / dhout_ptr may be 0.");
}
