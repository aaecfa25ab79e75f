// Host entry point of the multi-tensor schedule-free AdamW step (declared for csrc/bindings.cpp).
// Tables are device arrays (csrc/common/multi_tensor.cuh), passed as addresses; dtype codes as in
// csrc/common/dtype.cuh; `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace fastgen {

// lists: y (the parameters), g, z, v (exp_avg_sq); y, z, v of p_dtype, g of g_dtype (= p_dtype).
// scalars_ptr: address of 4 fp32 device values [1 - beta2^(k+1), c, lr (beta1 (1 - c) - 1), lr], this
// step's schedule, computed on the device (fastgen.optim.schedulefree.advance_schedule): no host sync.
void multi_tensor_schedulefree(std::uintptr_t y_list, std::uintptr_t g_list, std::uintptr_t z_list,
                               std::uintptr_t v_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                               std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int p_dtype,
                               int g_dtype, std::uintptr_t scalars_ptr, double beta2, double eps, double weight_decay,
                               std::uintptr_t stream);

}  // namespace fastgen
