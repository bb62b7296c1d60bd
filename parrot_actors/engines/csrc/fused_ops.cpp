// Fused float32 CPU ops for one decoder layer of the Llama family, and paged decode attention.
//
// Why: at decode batch sizes a layer's elementwise work (RMSNorm, residual adds, rotary, SwiGLU,
// the KV write) is ~25 small torch ops, each a dispatch from Python and a pass over memory; and
// decode attention gathered every sequence's KV blocks into a padded copy before SDPA read it
// again. These ops do each piece in one pass, reading the paged cache in place (the paged
// attention of vLLM, Kwon et al., SOSP 2023, section 4.1), with the online softmax of
// FlashAttention (Dao et al., NeurIPS 2022, section 3.1) over one block at a time.
//
// All tensors float32 on the CPU. Shapes (T tokens, H hidden, I intermediate, B decodes):
//   rms_norm(x [T, H], w [H], eps) -> [T, H]: w * x / sqrt(mean(x^2) + eps).
//   add_rms_norm_(x [T, H], d [T, H], w [H], eps) -> [T, H]: x += d in place, then rms_norm(x).
//   silu_mul(gu [T, 2I]) -> [T, I]: silu(gu[:, :I]) * gu[:, I:].
//   rope_store_kv_(qkv [T, (nq + 2 nkv) * D], pos [T] int64, cos [P, D], sin [P, D],
//                  cache [NB, 2, BS, nkv, D], slots [2T] int64, nq, nkv): rotary (rotate-half
//     form) on the q and k heads of qkv in place, then k and v rows into the cache's flat rows
//     slots[t] (K) and slots[T + t] (V) of cache.view(-1, nkv, D).
//   paged_decode_attention(q [B, nq, D] (rows may be strided), cache [NB, 2, BS, nkv, D],
//                          tables [B, MB] int64, lens [B] int64, scale) -> [B, nq, D]:
//     each query attends to positions [0, lens[b]) of its blocks tables[b], grouped-query
//     (query head j reads kv head j / (nq / nkv)).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t GRAIN_ELEMS = 1 << 14;  // below this many elements a single thread does it

int64_t rows_grain(int64_t row_elems) { return std::max<int64_t>(1, GRAIN_ELEMS / row_elems); }

#if defined(__AVX2__) && defined(__FMA__)
// e^x for 8 floats: Cephes expf (range reduction by ln 2 split in two constants, degree-5
// polynomial; ~1 ulp), the algorithm of Cephes' expf.c as vectorized in Pommier's
// avx_mathfun. 2^n is applied as two factors so results down into the subnormal range round
// as std::exp's; beyond the float range the result is exactly +inf or 0, and nan stays nan.
inline __m256 exp8(__m256 in) {
  const __m256 x =
      _mm256_min_ps(_mm256_max_ps(in, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(88.7228394f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);  // in [-150, 128]
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(in, _mm256_set1_ps(88.7228394f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, in, _mm256_cmp_ps(in, in, _CMP_UNORD_Q));
}
#endif

// y[i] = e^(x[i] - shift) for i < n; returns their sum.
inline float exp_shifted(const float* x, float shift, float* y, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  for (float v : part) sum += v;
#endif
  for (; i < n; ++i) {
    y[i] = std::exp(x[i] - shift);
    sum += y[i];
  }
  return sum;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  if (n >= 16) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    const __m256 v = _mm256_add_ps(s0, s1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_hadd_ps(r, r);
    s = _mm_cvtss_f32(_mm_hadd_ps(r, r));
  }
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += a * x[i] for i < n.
inline void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void rms_row(const float* __restrict x, const float* __restrict w, double eps,
                    float* __restrict out, int64_t H) {
  const float inv = 1.0f / std::sqrt(dot(x, x, H) / static_cast<float>(H) +
                                     static_cast<float>(eps));
#pragma omp simd
  for (int64_t h = 0; h < H; ++h) out[h] = w[h] * (x[h] * inv);
}

void check_f32(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(), op, ": ",
              name, " must be a contiguous float32 tensor of rank ", dim);
}

void check_norm(const char* op, const at::Tensor& x, const at::Tensor& w) {
  check_f32(op, "x", x, 2);
  check_f32(op, "w", w, 1);
  TORCH_CHECK(w.size(0) == x.size(1), op, ": w has ", w.size(0), " elements, x rows ", x.size(1));
}

}  // namespace

namespace parrot {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm("rms_norm", x, w);
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, rows_grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rms_row(xp + t * H, wp, eps, op + t * H, H);
  });
  return out;
}

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& d, const at::Tensor& w, double eps) {
  check_norm("add_rms_norm_", x, w);
  check_f32("add_rms_norm_", "d", d, 2);
  TORCH_CHECK(d.sizes() == x.sizes(), "add_rms_norm_: d must have the shape of x");
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor out = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float *dp = d.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, rows_grain(H), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* xr = xp + t * H;
      const float* dr = dp + t * H;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) xr[h] += dr[h];
      rms_row(xr, wp, eps, op + t * H, H);
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_f32("silu_mul", "gu", gu, 2);
  TORCH_CHECK(gu.size(1) % 2 == 0, "silu_mul: gu must have an even number of columns");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * I, GRAIN_ELEMS, [&](int64_t e0, int64_t e1) {
    // Elements [e0, e1) of out, row by row.
    for (int64_t e = e0; e < e1;) {
      const int64_t t = e / I, i0 = e % I, i1 = std::min(I, i0 + (e1 - e));
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t i = i0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= i1; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < i1; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      e += i1 - i0;
    }
  });
  return out;
}

void rope_store_kv_(at::Tensor& qkv, const at::Tensor& pos, const at::Tensor& cos,
                    const at::Tensor& sin, at::Tensor& cache, const at::Tensor& slots,
                    int64_t nq, int64_t nkv) {
  const char* op = "rope_store_kv_";
  check_f32(op, "qkv", qkv, 2);
  check_f32(op, "cos", cos, 2);
  check_f32(op, "sin", sin, 2);
  check_f32(op, "cache", cache, 5);
  const int64_t T = qkv.size(0), D = cos.size(1), P = cos.size(0);
  TORCH_CHECK(nq > 0 && nkv > 0 && D % 2 == 0 && qkv.size(1) == (nq + 2 * nkv) * D &&
                  sin.sizes() == cos.sizes(),
              op, ": qkv must be [T, (nq + 2 nkv) * D] with cos/sin [P, D], D even");
  TORCH_CHECK(cache.size(1) == 2 && cache.size(3) == nkv && cache.size(4) == D, op,
              ": cache must be [blocks, 2, block_size, nkv, D]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == T &&
                  pos.is_contiguous(),
              op, ": pos must be a contiguous int64 [T] tensor");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == 2 * T &&
                  slots.is_contiguous(),
              op, ": slots must be a contiguous int64 [2T] tensor");
  const int64_t W = qkv.size(1), half = D / 2, row = nkv * D;
  const int64_t cache_rows = cache.numel() / row;
  const int64_t *pp = pos.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < P, op, ": position ", pp[t], " outside [0, ", P, ")");
    TORCH_CHECK(sp[t] >= 0 && sp[t] < cache_rows && sp[T + t] >= 0 && sp[T + t] < cache_rows,
                op, ": slot outside the cache");
  }
  float* qp = qkv.data_ptr<float>();
  float* cp = cache.data_ptr<float>();
  const float *cosp = cos.data_ptr<float>(), *sinp = sin.data_ptr<float>();
  at::parallel_for(0, T, rows_grain(W), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* r = qp + t * W;
      const float* c = cosp + pp[t] * D;
      const float* s = sinp + pp[t] * D;
      for (int64_t h = 0; h < nq + nkv; ++h) {
        float* x = r + h * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] - b * s[i];
          x[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
      std::copy(r + nq * D, r + (nq + nkv) * D, cp + sp[t] * row);
      std::copy(r + (nq + nkv) * D, r + W, cp + sp[T + t] * row);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& cache,
                                  const at::Tensor& tables, const at::Tensor& lens,
                                  double scale) {
  const char* op = "paged_decode_attention";
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1 &&
                  q.stride(1) == q.size(2),
              op, ": q must be float32 [B, nq, D] with contiguous heads");
  check_f32(op, "cache", cache, 5);
  const int64_t B = q.size(0), nq = q.size(1), D = q.size(2);
  const int64_t BS = cache.size(2), nkv = cache.size(3), NB = cache.size(0);
  TORCH_CHECK(cache.size(1) == 2 && cache.size(4) == D && nkv > 0 && nq % nkv == 0, op,
              ": cache must be [blocks, 2, block_size, nkv, D] with nq a multiple of nkv");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == B &&
                  tables.is_contiguous(),
              op, ": tables must be a contiguous int64 [B, max_blocks] tensor");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.size(0) == B &&
                  lens.is_contiguous(),
              op, ": lens must be a contiguous int64 [B] tensor");
  const int64_t MB = tables.size(1), G = nq / nkv, row = nkv * D;
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= MB * BS, op, ": lens[", b, "] = ", lp[b],
                " outside [1, ", MB * BS, "]");
    for (int64_t i = 0; i < (lp[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(tp[b * MB + i] >= 0 && tp[b * MB + i] < NB, op, ": block id ",
                  tp[b * MB + i], " outside [0, ", NB, ")");
  }
  at::Tensor out = at::empty({B, nq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* cp = cache.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int64_t qs = q.stride(0);
  const float sc = static_cast<float>(scale);
  // A work item is one sequence and HI of its kv heads (the G query heads of each share every
  // K/V row loaded). With enough sequences to keep every thread busy, HI = nkv: an item then
  // reads each cache row whole and each block as one contiguous run, which the hardware
  // prefetcher streams (one kv head per item reads 1/nkv of every row, a strided pattern
  // that measured ~2x slower with the cache cold). Fewer sequences: one kv head per item, so
  // that a long context of a single sequence still uses every thread.
  const int64_t threads = at::get_num_threads();
  const int64_t HI = B >= 2 * threads ? nkv : 1, items_per_seq = nkv / HI, W = HI * G;
  at::parallel_for(0, B * items_per_seq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qh(W * D), acc(W * D), m(W), l(W), s(W * BS), p(W * BS);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * HI, len = lp[b];
      // Query heads h0 * G .. (h0 + HI) * G - 1, in order: row w of qh is head h0 * G + w.
      for (int64_t w = 0; w < W; ++w) {
        const float* src = qp + b * qs + (h0 * G + w) * D;
        for (int64_t d = 0; d < D; ++d) qh[w * D + d] = src[d] * sc;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t blk = 0; blk * BS < len; ++blk) {
        const int64_t n = std::min(BS, len - blk * BS);
        const float* kb = cp + (tp[b * MB + blk] * 2 * BS) * row + h0 * D;
        const float* vb = kb + BS * row;
        // Scores of the block's positions for all W heads; each K row is read once.
        for (int64_t t = 0; t < n; ++t)
          for (int64_t w = 0; w < W; ++w)
            s[w * BS + t] = dot(qh.data() + w * D, kb + t * row + (w / G) * D, D);
        for (int64_t w = 0; w < W; ++w) {
          float mx = m[w];
          for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[w * BS + t]);
          // Online softmax: rescale what was summed under the old maximum.
          const float corr = m[w] == -std::numeric_limits<float>::infinity()
                                 ? 0.0f
                                 : std::exp(m[w] - mx);
          l[w] = l[w] * corr + exp_shifted(s.data() + w * BS, mx, p.data() + w * BS, n);
          m[w] = mx;
          float* a = acc.data() + w * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] *= corr;
        }
        // Weighted V rows, each read once for all W heads.
        for (int64_t t = 0; t < n; ++t) {
          const float* v = vb + t * row;
          for (int64_t w = 0; w < W; ++w)
            axpy(p[w * BS + t], v + (w / G) * D, acc.data() + w * D, D);
        }
      }
      for (int64_t w = 0; w < W; ++w) {
        float* dst = op_ + (b * nq + h0 * G + w) * D;
        const float inv = 1.0f / l[w];
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[w * D + d] * inv;
      }
    }
  });
  return out;
}

}  // namespace parrot

TORCH_LIBRARY_FRAGMENT(parrot_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor d, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def(
      "rope_store_kv_(Tensor(a!) qkv, Tensor pos, Tensor cos, Tensor sin, Tensor(b!) cache, "
      "Tensor slots, int nq, int nkv) -> ()");
  m.def(
      "paged_decode_attention(Tensor q, Tensor cache, Tensor tables, Tensor lens, float scale) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(parrot_kernels, CPU, m) {
  m.impl("rms_norm", parrot::rms_norm);
  m.impl("add_rms_norm_", parrot::add_rms_norm_);
  m.impl("silu_mul", parrot::silu_mul);
  m.impl("rope_store_kv_", parrot::rope_store_kv_);
  m.impl("paged_decode_attention", parrot::paged_decode_attention);
}
