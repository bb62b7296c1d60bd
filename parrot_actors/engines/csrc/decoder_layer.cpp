// One Llama decoder layer of a decode step as a single op.
//
// Why: at batch 1 a step's kernels take ~16-20 ms and the Python between them ~3 ms (30 layers
// x 9 ops, each a wrapper call and a dispatch; README, "Measured"). This op runs the same
// kernels in the same order from C++, so a decode step crosses from Python once per layer. It
// computes exactly what llama.py's op-by-op path computes (same kernels, same order).
//
// decoder_layer(x [T, H] (written), h [T, H] (x normed by this layer's input norm),
//               w = [qkv, o, gate_up, down] packed panels (float32, or int8 with scales),
//               scales = [] or the four int8 scale vectors, n = the four out_features,
//               norm2 [H], next_norm [H] or None, cache [NB, 2, BS, nkv, D], pos [T],
//               cos/sin [P, D], slots [2T], tables [T, MB], lens [T], nq, nkv, eps, scale):
//   qkv = h @ Wqkv; rotary on q, k and K/V into the cache (rope_store_kv_); attention of each
//   token's q over its sequence's blocks (paged_decode_attention); x += attn @ Wo;
//   x += down(silu(gate) * up) of rms_norm(x, norm2). Returns rms_norm(x, next_norm) (the next
//   layer's h), or, without next_norm (the last layer), the MLP output already added into x.
#include "kernels.h"

#include <torch/library.h>

namespace parrot {

namespace {

at::Tensor linear(const at::Tensor& x, at::TensorList w, at::TensorList scales,
                  at::IntArrayRef n, size_t i) {
  return scales.empty() ? packed_linear(x, w[i], n[i])
                        : packed_linear_int8(x, w[i], scales[i], n[i]);
}

}  // namespace

at::Tensor decoder_layer(at::Tensor& x, const at::Tensor& h, at::TensorList w,
                         at::TensorList scales, at::IntArrayRef n, const at::Tensor& norm2,
                         const std::optional<at::Tensor>& next_norm, at::Tensor& cache,
                         const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& slots, const at::Tensor& tables,
                         const at::Tensor& lens, int64_t nq, int64_t nkv, double eps,
                         double scale) {
  TORCH_CHECK(w.size() == 4 && n.size() == 4 && (scales.empty() || scales.size() == 4),
              "decoder_layer: need 4 weights, 4 out_features and 0 or 4 scale vectors, got ",
              w.size(), ", ", n.size(), " and ", scales.size());
  TORCH_CHECK(x.dim() == 2 && h.sizes() == x.sizes() && cos.dim() == 2,
              "decoder_layer: x and h must be [T, H] of one shape, cos [P, D]");
  const int64_t T = x.size(0), D = cos.size(1);
  at::Tensor qkv = linear(h, w, scales, n, 0);  // [T, (nq + 2 nkv) D]
  rope_store_kv_(qkv, pos, cos, sin, cache, slots, nq, nkv);
  const at::Tensor q = qkv.narrow(1, 0, nq * D).view({T, nq, D});  // rows strided, heads not
  const at::Tensor attn = paged_decode_attention(q, cache, tables, lens, scale);  // [T, nq, D]
  const at::Tensor h2 = add_rms_norm_(x, linear(attn.view({T, nq * D}), w, scales, n, 1),
                                      norm2, eps);
  const at::Tensor mlp = linear(silu_mul(linear(h2, w, scales, n, 2)), w, scales, n, 3);
  if (next_norm.has_value()) return add_rms_norm_(x, mlp, *next_norm, eps);
  x.add_(mlp);
  return mlp;
}

}  // namespace parrot

TORCH_LIBRARY_FRAGMENT(parrot_kernels, m) {
  m.def(
      "decoder_layer(Tensor(a!) x, Tensor h, Tensor[] w, Tensor[] scales, int[] n, "
      "Tensor norm2, Tensor? next_norm, Tensor(b!) cache, Tensor pos, Tensor cos, Tensor sin, "
      "Tensor slots, Tensor tables, Tensor lens, int nq, int nkv, float eps, float scale) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(parrot_kernels, CPU, m) { m.impl("decoder_layer", parrot::decoder_layer); }
