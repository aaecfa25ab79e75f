// Host entry points of the CUDA RMSNorm (declared for csrc/bindings.cpp).
// Pointers are raw device addresses, strides are in elements, dtype codes as
// in csrc/common/dtype.cuh, `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace fastgen {

void rms_norm_fwd(std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t r_ptr, std::uintptr_t y_ptr,
                  std::uintptr_t h_ptr, std::uintptr_t rstd_ptr, std::int64_t M, std::int64_t N,
                  std::int64_t stride_x, std::int64_t stride_r, int x_dtype, int w_dtype, double eps,
                  std::uintptr_t stream);

void rms_norm_bwd(std::uintptr_t dy_ptr, std::uintptr_t h_ptr, std::uintptr_t w_ptr, std::uintptr_t rstd_ptr,
                  std::uintptr_t dhout_ptr, std::uintptr_t dx_ptr, std::uintptr_t dw_partial_ptr, std::int64_t M,
                  std::int64_t N, std::int64_t stride_dy, std::int64_t stride_h, std::int64_t stride_dhout,
                  int x_dtype, int w_dtype, std::int64_t num_partials, std::uintptr_t stream);

}  // namespace fastgen
