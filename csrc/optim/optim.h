// Host entry points of the multi-tensor optimizers (declared for csrc/bindings.cpp).
// Tables are device arrays (see csrc/common/multi_tensor.cuh), passed as addresses;
// dtype codes as in csrc/common/dtype.cuh; `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace fastgen {

// lists: params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq (0 unless amsgrad), steps (fp32 0-d tensors,
// already incremented). lr_ptr: address of an fp32 device scalar, or 0 to use `lr`.
void multi_tensor_adamw(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t v_list,
                        std::uintptr_t vmax_list, std::uintptr_t step_list, std::uintptr_t numels,
                        std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                        std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                        bool stochastic_rounding, std::uint32_t seed, std::uintptr_t stream);

// lists: params, grads, exp_avg.
void multi_tensor_lion(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t numels,
                       std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                       std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                       double beta1, double beta2, double weight_decay, bool maximize, std::uintptr_t stream);

}  // namespace fastgen
