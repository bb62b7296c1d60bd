// The kernels of the `parrot_kernels` torch library, declared for use across its sources
// (all built into one shared object; shapes and contracts in packed_linear.cpp and
// fused_ops.cpp, where each is defined).
#pragma once

#include <ATen/ATen.h>

namespace parrot {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& wp, int64_t N);
at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& wp,
                              const at::Tensor& scales, int64_t N);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
void rope_store_kv_(at::Tensor& qkv, const at::Tensor& pos, const at::Tensor& cos,
                    const at::Tensor& sin, at::Tensor& cache, const at::Tensor& slots,
                    int64_t nq, int64_t nkv);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& cache,
                                  const at::Tensor& tables, const at::Tensor& lens,
                                  double scale);

}  // namespace parrot
