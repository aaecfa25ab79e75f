// Named parameter structs of fastgen._C's entry points (no torch headers).
//
// Each entry point takes one struct. Its fields are listed once, below, in the order of
// the C++ function it forwards to (the header of that op, minus the trailing stream);
// from that one list come the struct, its pybind11 binding (one read-write attribute per
// field: a misspelled name is an AttributeError), the check that every field was set
// (a field left unset is a ValueError naming it) and the forwarding call.
//
// Field types: PTR a device address (0 = absent, where the op allows it), I64 a size or a
// stride in elements, INT a dtype code or a 0/1 switch, F64 a float.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace fastgen {
namespace params {

using PTR = std::uintptr_t;
using I64 = std::int64_t;
using INT = int;
using F64 = double;

// "Not set" values: none is a value any caller passes on purpose.
inline constexpr PTR unset(PTR*) { return std::numeric_limits<PTR>::max(); }
inline constexpr I64 unset(I64*) { return std::numeric_limits<I64>::min(); }
inline constexpr INT unset(INT*) { return std::numeric_limits<INT>::min(); }
// F64: a NaN with a payload of its own, so that a NaN the caller passes (eps=nan) reaches the
// op's own check and is reported as such.
inline constexpr std::uint64_t kUnsetF64Bits = 0x7FF8FA57FA57FA57ull;
inline F64 unset(F64*) {
  F64 v;
  std::memcpy(&v, &kUnsetF64Bits, sizeof v);
  return v;
}
inline bool is_unset(PTR v) { return v == unset(static_cast<PTR*>(nullptr)); }
inline bool is_unset(I64 v) { return v == unset(static_cast<I64*>(nullptr)); }
inline bool is_unset(INT v) { return v == unset(static_cast<INT*>(nullptr)); }
inline bool is_unset(F64 v) {
  std::uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits == kUnsetF64Bits;
}

}  // namespace params
}  // namespace fastgen

#define FG_RMS_NORM_FWD(F) \
  F(PTR, x_ptr) F(PTR, w_ptr) F(PTR, r_ptr) F(PTR, y_ptr) F(PTR, h_ptr) F(PTR, rstd_ptr) F(I64, M) F(I64, N) \
  F(I64, stride_x) F(I64, stride_r) F(INT, x_dtype) F(INT, w_dtype) F(F64, eps)

#define FG_RMS_NORM_BWD(F) \
  F(PTR, dy_ptr) F(PTR, h_ptr) F(PTR, w_ptr) F(PTR, rstd_ptr) F(PTR, dhout_ptr) F(PTR, dx_ptr) \
  F(PTR, dw_partial_ptr) F(I64, M) F(I64, N) F(I64, stride_dy) F(I64, stride_h) F(I64, stride_dhout) \
  F(INT, x_dtype) F(INT, w_dtype) F(I64, num_partials)

#define FG_GROUP_NORM_FWD(F) \
  F(PTR, x_ptr) F(PTR, w_ptr) F(PTR, b_ptr) F(PTR, y_ptr) F(PTR, mean_ptr) F(PTR, rstd_ptr) F(PTR, part_ptr) \
  F(I64, N) F(I64, C) F(I64, S) F(I64, G) F(INT, channels_last) F(I64, splits) F(I64, chunk_s) F(INT, x_dtype) \
  F(INT, w_dtype) F(F64, eps) F(INT, silu)

#define FG_GROUP_NORM_BWD(F) \
  F(PTR, dy_ptr) F(PTR, x_ptr) F(PTR, w_ptr) F(PTR, b_ptr) F(PTR, mean_ptr) F(PTR, rstd_ptr) F(PTR, dwp_ptr) \
  F(PTR, dbp_ptr) F(PTR, c_ptr) F(PTR, dx_ptr) F(I64, N) F(I64, C) F(I64, S) F(I64, G) F(INT, channels_last) \
  F(I64, splits) F(I64, chunk_s) F(INT, x_dtype) F(INT, w_dtype) F(INT, silu)

// (batch, seq, head) strides of a (B, S, H, D) tensor, and (batch, seq) strides of a table.
#define FG_BSH(F, p) F(I64, p##b) F(I64, p##s) F(I64, p##h)
#define FG_TABLES(F) F(I64, scb) F(I64, scs) F(I64, ssb) F(I64, sss)
#define FG_QK_DIMS(F) F(I64, B) F(I64, S) F(I64, Hq) F(I64, Hk) F(I64, D) F(I64, R)

#define FG_APPLY_ROPE(F) \
  F(PTR, q_ptr) F(PTR, k_ptr) F(PTR, qo_ptr) F(PTR, ko_ptr) F(PTR, cos_ptr) F(PTR, sin_ptr) FG_QK_DIMS(F) \
  FG_BSH(F, sq) FG_BSH(F, sk) FG_BSH(F, soq) FG_BSH(F, sok) FG_TABLES(F) F(INT, x_dtype) F(INT, table_dtype) \
  F(INT, interleaved) F(INT, inverse) F(INT, copy_pass)

#define FG_QK_NORM_ROPE_FWD(F) \
  F(PTR, q_ptr) F(PTR, k_ptr) F(PTR, wq_ptr) F(PTR, wk_ptr) F(PTR, qo_ptr) F(PTR, ko_ptr) F(PTR, cos_ptr) \
  F(PTR, sin_ptr) FG_QK_DIMS(F) FG_BSH(F, sq) FG_BSH(F, sk) FG_BSH(F, soq) FG_BSH(F, sok) FG_TABLES(F) \
  F(INT, x_dtype) F(INT, wq_dtype) F(INT, wk_dtype) F(INT, table_dtype) F(F64, eps) F(INT, interleaved)

#define FG_QK_NORM_ROPE_BWD(F) \
  F(PTR, dqo_ptr) F(PTR, dko_ptr) F(PTR, q_ptr) F(PTR, k_ptr) F(PTR, wq_ptr) F(PTR, wk_ptr) F(PTR, dq_ptr) \
  F(PTR, dk_ptr) F(PTR, dw_partial_ptr) F(PTR, cos_ptr) F(PTR, sin_ptr) FG_QK_DIMS(F) FG_BSH(F, sdq) \
  FG_BSH(F, sdk) FG_BSH(F, sq) FG_BSH(F, sk) FG_BSH(F, soq) FG_BSH(F, sok) FG_TABLES(F) F(INT, x_dtype) \
  F(INT, wq_dtype) F(INT, wk_dtype) F(INT, table_dtype) F(F64, eps) F(INT, interleaved) F(I64, num_partials_q) \
  F(I64, num_partials_k)

// Multi-tensor optimizers (optim/optim.h): per list a device table of addresses (*_list), and the
// chunk tables of csrc/common/multi_tensor.cuh. Switches (amsgrad, ...) are INT 0 / 1.
#define FG_MT_CHUNKS(F) F(PTR, numels) F(PTR, chunk_ids) F(PTR, chunk_offs) F(I64, num_chunks) F(I64, chunk)
// The one-pass step: EMA shadows (0: none) and their dtype, the device clip coefficient (0: none), 1 - decay.
#define FG_MT_ONE_PASS(F) F(PTR, sh_list) F(INT, sh_dtype) F(PTR, coef_ptr) F(F64, ema_weight)

#define FG_MULTI_TENSOR_ADAMW(F) \
  F(PTR, p_list) F(PTR, g_list) F(PTR, m_list) F(PTR, v_list) F(PTR, vmax_list) F(PTR, step_list) FG_MT_CHUNKS(F) \
  F(INT, p_dtype) F(INT, g_dtype) F(INT, s_dtype) F(PTR, lr_ptr) F(F64, lr) F(F64, beta1) F(F64, beta2) F(F64, eps) \
  F(F64, weight_decay) F(INT, amsgrad) F(INT, maximize) F(INT, stochastic_rounding) F(I64, seed) FG_MT_ONE_PASS(F)

#define FG_MULTI_TENSOR_LION(F) \
  F(PTR, p_list) F(PTR, g_list) F(PTR, m_list) FG_MT_CHUNKS(F) F(INT, p_dtype) F(INT, g_dtype) F(INT, s_dtype) \
  F(PTR, lr_ptr) F(F64, lr) F(F64, beta1) F(F64, beta2) F(F64, weight_decay) F(INT, maximize) FG_MT_ONE_PASS(F)

#define FG_MULTI_TENSOR_NORM(F) \
  F(PTR, g_list) FG_MT_CHUNKS(F) F(INT, g_dtype) F(F64, norm_type) F(PTR, partial_ptr)

#define FG_MULTI_TENSOR_NORM_FINALIZE(F) \
  F(PTR, partial_ptr) F(I64, n) F(F64, norm_type) F(F64, max_norm) F(PTR, total_ptr) F(PTR, coef_ptr)

#define FG_MULTI_TENSOR_SCALE(F) F(PTR, g_list) FG_MT_CHUNKS(F) F(INT, g_dtype) F(PTR, coef_ptr)

#define FG_MULTI_TENSOR_EMA(F) \
  F(PTR, s_list) F(PTR, p_list) FG_MT_CHUNKS(F) F(INT, s_dtype) F(INT, p_dtype) F(F64, weight) F(PTR, weight_ptr)

// Schedule-free AdamW (optim/optim.h): y, g, z, v tables; scalars_ptr: 4 fp32 device values.
#define FG_MULTI_TENSOR_SCHEDULEFREE(F) \
  F(PTR, y_list) F(PTR, g_list) F(PTR, z_list) F(PTR, v_list) FG_MT_CHUNKS(F) F(INT, p_dtype) F(INT, g_dtype) \
  F(PTR, scalars_ptr) F(F64, beta2) F(F64, eps) F(F64, weight_decay)

#define FG_MULTI_TENSOR_ADAMW8BIT(F) \
  F(PTR, p_list) F(PTR, g_list) F(PTR, qm_list) F(PTR, am_list) F(PTR, qv_list) F(PTR, av_list) F(PTR, step_list) \
  F(PTR, sh_list) FG_MT_CHUNKS(F) F(INT, p_dtype) F(INT, g_dtype) F(INT, sh_dtype) F(PTR, maps) F(PTR, lr_ptr) \
  F(F64, lr) F(F64, beta1) F(F64, beta2) F(F64, eps) F(F64, weight_decay) F(INT, maximize) \
  F(INT, stochastic_rounding) F(I64, seed) F(PTR, coef_ptr) F(F64, ema_weight)

#define FG_MULTI_TENSOR_PRODIGY_MOMENTS(F) \
  F(PTR, p_list) F(PTR, g_list) F(PTR, p0_list) F(PTR, m_list) F(PTR, v_list) F(PTR, s_list) FG_MT_CHUNKS(F) \
  F(INT, p_dtype) F(INT, g_dtype) F(PTR, coefs_ptr) F(PTR, dot_ptr) F(PTR, abs_ptr) F(F64, beta1) F(F64, beta2) \
  F(F64, beta3)

#define FG_MULTI_TENSOR_PRODIGY_UPDATE(F) \
  F(PTR, p_list) F(PTR, n_list) F(PTR, v_list) FG_MT_CHUNKS(F) F(INT, p_dtype) F(INT, n_dtype) F(PTR, coefs_ptr) \
  F(INT, decoupled_wd)

// The struct of an entry point: its fields (unset until filled) and the stream.
#define FG_FIELD(T, name) fastgen::params::T name = fastgen::params::unset(static_cast<fastgen::params::T*>(nullptr));
#define FG_PARAMS(Name, LIST) \
  struct Name {               \
    LIST(FG_FIELD)            \
    FG_FIELD(PTR, stream)     \
  };

// Binding pieces: one attribute per field; the names of the fields left unset.
#define FG_RW(T, name) cls.def_readwrite(#name, &Params::name);
#define FG_MISSING(T, name) \
  if (fastgen::params::is_unset(p.name)) missing += std::string(missing.empty() ? "" : ", ") + #name;
#define FG_NAME(T, name) names.append(#name);
// Forwarding: p.field1, p.field2, ..., then p.stream.
#define FG_ARG(T, name) p.name,
