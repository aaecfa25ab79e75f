// Host entry points of the CUDA fused per-head QK-RMSNorm + RoPE (declared for csrc/bindings.cpp).
// Pointers are raw device addresses, strides in elements, dtype codes as in csrc/common/dtype.cuh,
// `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace fastgen {

// q_out / k_out = rope(rms_norm(q / k, wq / wk)) for q (B, S, Hq, D) and k (B, S, Hk, D) given by
// (batch, sequence, head) strides with a unit last stride; qo / ko likewise (must not alias q / k).
// wq / wk (D,) contiguous, each in x_dtype or float32 (own codes). cos / sin (B or 1, S, R) by
// (batch, sequence) strides (batch stride 0 for a shared table), unit last stride, in table_dtype
// (x_dtype or float32). fp32 math, one rounding at the store.
void qk_norm_rope_fwd(std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t wq_ptr, std::uintptr_t wk_ptr,
                      std::uintptr_t qo_ptr, std::uintptr_t ko_ptr, std::uintptr_t cos_ptr, std::uintptr_t sin_ptr,
                      std::int64_t B, std::int64_t S, std::int64_t Hq, std::int64_t Hk, std::int64_t D,
                      std::int64_t R, std::int64_t sqb, std::int64_t sqs, std::int64_t sqh, std::int64_t skb,
                      std::int64_t sks, std::int64_t skh, std::int64_t soqb, std::int64_t soqs, std::int64_t soqh,
                      std::int64_t sokb, std::int64_t soks, std::int64_t sokh, std::int64_t scb, std::int64_t scs,
                      std::int64_t ssb, std::int64_t sss, int x_dtype, int wq_dtype, int wk_dtype, int table_dtype,
                      double eps, bool interleaved, std::uintptr_t stream);

// Backward: dq / dk (strides sdq* / sdk* for the incoming gradients dqo / dko, sq* / sk* for the
// saved inputs, soq* / sok* for the outputs dq / dk) and fp32 weight-gradient partials
// dw_partial [num_partials_q + num_partials_k, D]: rows [0, num_partials_q) belong to wq, the
// rest to wk; the caller sums each range over its rows (deterministic, no atomics).
// num_partials_q must be >= 1 when B*S*Hq > 0 (likewise for k).
void qk_norm_rope_bwd(std::uintptr_t dqo_ptr, std::uintptr_t dko_ptr, std::uintptr_t q_ptr, std::uintptr_t k_ptr,
                      std::uintptr_t wq_ptr, std::uintptr_t wk_ptr, std::uintptr_t dq_ptr, std::uintptr_t dk_ptr,
                      std::uintptr_t dw_partial_ptr, std::uintptr_t cos_ptr, std::uintptr_t sin_ptr, std::int64_t B,
                      std::int64_t S, std::int64_t Hq, std::int64_t Hk, std::int64_t D, std::int64_t R,
                      std::int64_t sdqb, std::int64_t sdqs, std::int64_t sdqh, std::int64_t sdkb, std::int64_t sdks,
                      std::int64_t sdkh, std::int64_t sqb, std::int64_t sqs, std::int64_t sqh, std::int64_t skb,
                      std::int64_t sks, std::int64_t skh, std::int64_t soqb, std::int64_t soqs, std::int64_t soqh,
                      std::int64_t sokb, std::int64_t soks, std::int64_t sokh, std::int64_t scb, std::int64_t scs,
                      std::int64_t ssb, std::int64_t sss, int x_dtype, int wq_dtype, int wk_dtype, int table_dtype,
                      double eps, bool interleaved, std::int64_t num_partials_q, std::int64_t num_partials_k,
                      std::uintptr_t stream);

}  // namespace fastgen
