// Host entry points of the CUDA GroupNorm (+ fused SiLU) (declared for csrc/bindings.cpp).
// Pointers are raw device addresses, dtype codes as in csrc/common/dtype.cuh, `stream` is a
// cudaStream_t as an integer. x is viewed as [N, C, S] (S = product of the spatial dims),
// contiguous (strides C*S, S, 1) or channels-last (strides S*C, 1, C) when channels_last != 0;
// y / dy / dx have the strides of x. A group (n, g) is channels [g*K, (g+1)*K), K = C / G, of
// sample n, split along S into `splits` chunks of `chunk_s` positions (one block each).
#pragma once

#include <cstdint>

namespace fastgen {

// mean_ptr / rstd_ptr: [N*G] fp32 out. part_ptr: [N*G, splits, 3] fp32 scratch (count, mean, M2),
// needed when splits > 1. w_ptr / b_ptr may be 0; both (when given) have dtype w_dtype.
void group_norm_fwd(std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t b_ptr, std::uintptr_t y_ptr,
                    std::uintptr_t mean_ptr, std::uintptr_t rstd_ptr, std::uintptr_t part_ptr, std::int64_t N,
                    std::int64_t C, std::int64_t S, std::int64_t G, int channels_last, std::int64_t splits,
                    std::int64_t chunk_s, int x_dtype, int w_dtype, double eps, int silu, std::uintptr_t stream);

// dwp_ptr / dbp_ptr: [N*splits, C] fp32 out, per-block partial sums of dyn*xhat and dyn per channel
// (the caller sums them over dim 0: deterministic dw / db). c_ptr: [2, N*G] fp32 scratch.
void group_norm_bwd(std::uintptr_t dy_ptr, std::uintptr_t x_ptr, std::uintptr_t w_ptr, std::uintptr_t b_ptr,
                    std::uintptr_t mean_ptr, std::uintptr_t rstd_ptr, std::uintptr_t dwp_ptr, std::uintptr_t dbp_ptr,
                    std::uintptr_t c_ptr, std::uintptr_t dx_ptr, std::int64_t N, std::int64_t C, std::int64_t S,
                    std::int64_t G, int channels_last, std::int64_t splits, std::int64_t chunk_s, int x_dtype,
                    int w_dtype, int silu, std::uintptr_t stream);

}  // namespace fastgen
