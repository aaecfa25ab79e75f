// Host entry point of the CUDA rotary position embedding (declared for csrc/bindings.cpp).
// Pointers are raw device addresses, strides in elements, dtype codes as in
// csrc/common/dtype.cuh, `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace fastgen {

// Rotates q (B, S, Hq, D) and k (B, S, Hk, D) -- any (batch, sequence, head) strides, unit
// last stride -- into qo / ko (which may alias q / k: in place) with the cos / sin tables
// (B or 1, S, R) given by (batch, sequence) strides (batch stride 0 for a shared table).
// inverse = true applies the transpose (the backward). copy_pass copies dims R..D-1.
void apply_rope(std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t qo_ptr, std::uintptr_t ko_ptr,
                std::uintptr_t cos_ptr, std::uintptr_t sin_ptr, std::int64_t B, std::int64_t S, std::int64_t Hq,
                std::int64_t Hk, std::int64_t D, std::int64_t R, std::int64_t sqb, std::int64_t sqs,
                std::int64_t sqh, std::int64_t skb, std::int64_t sks, std::int64_t skh, std::int64_t soqb,
                std::int64_t soqs, std::int64_t soqh, std::int64_t sokb, std::int64_t soks, std::int64_t sokh,
                std::int64_t scb, std::int64_t scs, std::int64_t ssb, std::int64_t sss, int x_dtype,
                int table_dtype, bool interleaved, bool inverse, bool copy_pass, std::uintptr_t stream);

}  // namespace fastgen
