// Host entry points of the multi-tensor optimizers (declared for csrc/bindings.cpp).
// Tables are device arrays (see csrc/common/multi_tensor.cuh), passed as addresses;
// dtype codes as in csrc/common/dtype.cuh; `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace fastgen {

// lists: params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq (0 unless amsgrad), steps (fp32 0-d tensors,
// already incremented). lr_ptr: address of an fp32 device scalar, or 0 to use `lr`.
// The one-pass step (AdamW and Lion): coef_ptr, an fp32 device clip coefficient applied to the gradients
// (0: none); sh_list, EMA shadows of sh_dtype (float32 or the parameters' dtype; 0: none) folded from the
// stored parameters: s <- s + ema_weight * (p - s).
void multi_tensor_adamw(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t v_list,
                        std::uintptr_t vmax_list, std::uintptr_t step_list, std::uintptr_t numels,
                        std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                        std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                        bool stochastic_rounding, std::uint32_t seed, std::uintptr_t sh_list, int sh_dtype,
                        std::uintptr_t coef_ptr, double ema_weight, std::uintptr_t stream);

// lists: params, grads, exp_avg.
void multi_tensor_lion(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t m_list, std::uintptr_t numels,
                       std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                       std::int64_t chunk, int p_dtype, int g_dtype, int s_dtype, std::uintptr_t lr_ptr, double lr,
                       double beta1, double beta2, double weight_decay, bool maximize, std::uintptr_t sh_list,
                       int sh_dtype, std::uintptr_t coef_ptr, double ema_weight, std::uintptr_t stream);

// Gradient clipping, step 1 of 2. lists: grads (g_dtype). partial_ptr: fp32 [num_chunks] output, one
// value per chunk: the sum of |g|^p (p = norm_type, finite, >= 1; p = 2 and 1 take fast paths) or, for
// norm_type = inf, max |g| (NaN propagates). Chunk c's value lands in partial[c], so lists of other
// dtypes can fill further slices of one buffer (pass partial_ptr + 4 * offset).
void multi_tensor_norm(std::uintptr_t g_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                       std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int g_dtype,
                       double norm_type, std::uintptr_t partial_ptr, std::uintptr_t stream);

// Step 2: one block reduces partial[0, n) in a fixed order (deterministic, no atomics; fp64 sums) and
// writes the fp32 total norm (sum^(1/p), or the max for inf) to *total_ptr and, unless coef_ptr is 0,
// the clip coefficient min(1, max_norm / (total + 1e-6)) (NaN stays NaN, as torch.clamp) to *coef_ptr.
// norm_type = 1 over |g|^2 partials gives the plain sum of squares. Launches also for n = 0 (total 0).
void multi_tensor_norm_finalize(std::uintptr_t partial_ptr, std::int64_t n, double norm_type, double max_norm,
                                std::uintptr_t total_ptr, std::uintptr_t coef_ptr, std::uintptr_t stream);

// g <- g * coef in place (coef_ptr: address of an fp32 device scalar), fp32 math, one rounding.
void multi_tensor_scale(std::uintptr_t g_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                        std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int g_dtype,
                        std::uintptr_t coef_ptr, std::uintptr_t stream);

// EMA. lists: shadows (s_dtype, updated in place), params (p_dtype); numels / chunks of the shadows.
// s <- s + weight * (p - s) in fp32 (weight = 1 - decay), one rounding at the store. weight_ptr: an fp32
// device scalar holding 1 - decay (a captured warm-up), read instead of `weight` when not 0.
void multi_tensor_ema(std::uintptr_t s_list, std::uintptr_t p_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                      std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int s_dtype,
                      int p_dtype, double weight, std::uintptr_t weight_ptr, std::uintptr_t stream);

// 8-bit AdamW (csrc/optim/adamw8bit.cu). lists: params, grads (p_dtype), first-moment codes (uint8) and
// absmax (fp32, one per 256 elements), second-moment codes and absmax, steps (fp32 0-d, already incremented),
// EMA shadows (sh_dtype; 0: no EMA). chunk must be 4096. maps: 4 x 256 fp32 device tables (SMAP, SBOUND,
// UMAP, UBOUND of fastgen/optim/quant8.py). coef_ptr: fp32 clip coefficient on the device, or 0.
void multi_tensor_adamw8bit(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t qm_list,
                            std::uintptr_t am_list, std::uintptr_t qv_list, std::uintptr_t av_list,
                            std::uintptr_t step_list, std::uintptr_t sh_list, std::uintptr_t numels,
                            std::uintptr_t chunk_ids, std::uintptr_t chunk_offs, std::int64_t num_chunks,
                            std::int64_t chunk, int p_dtype, int g_dtype, int sh_dtype, std::uintptr_t maps,
                            std::uintptr_t lr_ptr, double lr, double beta1, double beta2, double eps,
                            double weight_decay, bool maximize, bool stochastic_rounding, std::int64_t seed,
                            std::uintptr_t coef_ptr, double ema_weight, std::uintptr_t stream);

// Prodigy (csrc/optim/prodigy.cu), pass 1. lists: params, grads, p0, exp_avg (0: beta1 = 0), exp_avg_sq, s, all
// of p_dtype (g_dtype must equal it). coefs_ptr: fp32 [3] device (c1, c2, c3); dot_ptr / abs_ptr: fp32
// [num_chunks] per-chunk partial sums of g (p0 - p) and of |s| (as stored).
void multi_tensor_prodigy_moments(std::uintptr_t p_list, std::uintptr_t g_list, std::uintptr_t p0_list,
                                  std::uintptr_t m_list, std::uintptr_t v_list, std::uintptr_t s_list,
                                  std::uintptr_t numels, std::uintptr_t chunk_ids, std::uintptr_t chunk_offs,
                                  std::int64_t num_chunks, std::int64_t chunk, int p_dtype, int g_dtype,
                                  std::uintptr_t coefs_ptr, std::uintptr_t dot_ptr, std::uintptr_t abs_ptr,
                                  double beta1, double beta2, double beta3, std::uintptr_t stream);

// Prodigy pass 2. lists: params, numerators (exp_avg, or grads when beta1 = 0), exp_avg_sq. coefs_ptr: fp32 [3]
// device (w, a, e): p = p + w p (decoupled_wd), p = p + a n / (sqrt(v) + e).
void multi_tensor_prodigy_update(std::uintptr_t p_list, std::uintptr_t n_list, std::uintptr_t v_list,
                                 std::uintptr_t numels, std::uintptr_t chunk_ids, std::uintptr_t chunk_offs,
                                 std::int64_t num_chunks, std::int64_t chunk, int p_dtype, int n_dtype,
                                 std::uintptr_t coefs_ptr, bool decoupled_wd, std::uintptr_t stream);

// Schedule-free AdamW (csrc/optim/schedulefree.cu). lists: y (the parameters), g, z, v (exp_avg_sq); y, z, v of
// p_dtype, g of g_dtype (= p_dtype). scalars_ptr: address of 4 fp32 device values [1 - beta2^(k+1), c,
// lr (beta1 (1 - c) - 1), lr], this step's schedule, computed on the device
// (fastgen.optim.schedulefree.advance_schedule): no host sync.
void multi_tensor_schedulefree(std::uintptr_t y_list, std::uintptr_t g_list, std::uintptr_t z_list,
                               std::uintptr_t v_list, std::uintptr_t numels, std::uintptr_t chunk_ids,
                               std::uintptr_t chunk_offs, std::int64_t num_chunks, std::int64_t chunk, int p_dtype,
                               int g_dtype, std::uintptr_t scalars_ptr, double beta2, double eps, double weight_decay,
                               std::uintptr_t stream);

}  // namespace fastgen
