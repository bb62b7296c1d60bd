// Small-M fp32 linear layer over a weight packed in 16-column panels: y = x @ W^T.
//
// Why: at decode batch sizes (M = 1..64 rows) the BLAS GEMM torch calls on the CPU runs far
// below the machine's read bandwidth and FMA rate (docs/guide.md, "Measured"). This is the
// register-blocked micro-kernel design of BLIS (Van Zee & van de Geijn, "BLIS: A Framework
// for Rapidly Instantiating BLAS Functionality", TOMS 2015, section 3), also used by
// PyTorch Inductor's CPU GEMM template: the weight is packed once as
// [ceil(N / 16), K, 16] so each micro-kernel streams one contiguous panel while keeping a
// MR x 16 tile of the output in registers.
//
// Shapes: x [M, K] float32 contiguous; wp [ceil(N / 16), K, 16] float32 contiguous;
// returns y [M, N] float32.
//
// packed_linear_int8 is the weight-only int8 variant (symmetric, one scale per output column,
// as in LLM.int8()'s vector-wise quantization without outliers, Dettmers et al. 2022 section
// 3.1): wp int8 in the same panel layout, scales [ceil(N / 16) * 16] float32; the weights are
// widened to float32 in registers, so the products are float32 and only the stored weight is
// rounded. At batch 1 the step reads a quarter of the bytes.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int NR = 16;  // output columns per panel (two 8-float AVX2 registers)
constexpr int MR = 6;   // output rows per micro-tile: 12 accumulators + 2 weights + 1 input
constexpr int64_t MC = 48;  // rows of x per chunk, so a chunk of x stays in L2

#if defined(__AVX2__) && defined(__FMA__)
// Row k of a panel as two 8-float vectors (int8 weights widened in registers).
inline void load_row(const float* wk, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(wk);
  w1 = _mm256_loadu_ps(wk + 8);
}

inline void load_row(const int8_t* wk, __m256& w0, __m256& w1) {
  const __m128i w8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wk));
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w8, 8)));
}
#endif

// y[R, ncols] = x[R, K] @ panel[K, ncols] (times scale[j] per column when scale is given).
// next: the panel this thread multiplies after this one (or this one when it is the last),
// fetched into L2 while this tile computes.
template <int R, typename W>
inline void tile(const float* __restrict x, int64_t ldx, const W* __restrict wp, int64_t K,
                 const float* __restrict scale, float* __restrict y, int64_t ldy, int ncols,
                 const W* __restrict next) {
#if defined(__AVX2__) && defined(__FMA__)
  __m256 lo[R], hi[R];
  _Pragma("GCC unroll 8") for (int m = 0; m < R; ++m) {
    lo[m] = _mm256_setzero_ps();
    hi[m] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    // Why: with 4 or more rows a tile does enough FMAs per weight row that the hardware
    // prefetcher falls behind and each new panel starts from DRAM; fetching the next panel one
    // row per k (a float row is one 64-byte line) during this one ran a step's 121 matmuls
    // 1.2-1.26x faster at 32 rows and ~1.5x at 8 (docs/guide.md, "Measured"). With one row the loop
    // is bound by the read itself and the extra prefetches cost 3-7% instead.
    if constexpr (R >= 4) _mm_prefetch(reinterpret_cast<const char*>(next + k * NR), _MM_HINT_T1);
    __m256 w0, w1;
    load_row(wp + k * NR, w0, w1);
    _Pragma("GCC unroll 8") for (int m = 0; m < R; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * ldx + k);
      lo[m] = _mm256_fmadd_ps(a, w0, lo[m]);
      hi[m] = _mm256_fmadd_ps(a, w1, hi[m]);
    }
  }
  alignas(32) float acc[R][NR];
  _Pragma("GCC unroll 8") for (int m = 0; m < R; ++m) {
    _mm256_store_ps(acc[m], lo[m]);
    _mm256_store_ps(acc[m] + 8, hi[m]);
  }
#else
  // Portable path: fixed trip counts the compiler vectorizes for the machine it builds on.
  (void)next;
  float acc[R][NR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const W* __restrict wk = wp + k * NR;
    for (int m = 0; m < R; ++m) {
      const float a = x[m * ldx + k];
      for (int j = 0; j < NR; ++j) acc[m][j] += a * static_cast<float>(wk[j]);
    }
  }
#endif
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < ncols; ++j) y[m * ldy + j] = scale ? acc[m][j] * scale[j] : acc[m][j];
}

// One panel's output rows [m0, m1): full MR-row tiles, then one tile for the rest.
template <typename W>
inline void panel_rows(const float* x, int64_t K, const W* wb, const float* sb, float* yb,
                       int64_t N, int64_t m0, int64_t m1, int ncols, const W* next) {
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile<MR>(x + m * K, K, wb, K, sb, yb + m * N, N, ncols, next);
  const float* xm = x + m * K;
  float* ym = yb + m * N;
  switch (m1 - m) {
    case 5: tile<5>(xm, K, wb, K, sb, ym, N, ncols, next); break;
    case 4: tile<4>(xm, K, wb, K, sb, ym, N, ncols, next); break;
    case 3: tile<3>(xm, K, wb, K, sb, ym, N, ncols, next); break;
    case 2: tile<2>(xm, K, wb, K, sb, ym, N, ncols, next); break;
    case 1: tile<1>(xm, K, wb, K, sb, ym, N, ncols, next); break;
    default: break;
  }
}

// y [M, N] = x [M, K] @ W^T over packed panels w [nb, K, NR]; scales [nb * NR] or nullptr.
template <typename W>
at::Tensor run(const at::Tensor& x, const W* w, const float* scales, int64_t nb, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Threads split the output columns, so each reads its own part of the weight once per chunk.
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t m1 = std::min(M, m0 + MC);
      for (int64_t b = b0; b < b1; ++b) {
        const int ncols = static_cast<int>(std::min<int64_t>(NR, N - b * NR));
        const float* sb = scales ? scales + b * NR : nullptr;
        const W* next = w + std::min(b + 1, b1 - 1) * K * NR;
        panel_rows(xp, K, w + b * K * NR, sb, yp + b * NR, N, m0, m1, ncols, next);
      }
    }
  });
  return y;
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& wp, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == NR && wp.is_contiguous() && wp.size(1) == x.size(1),
              op, ": wp must be a contiguous [ceil(N/16), K, 16] tensor");
  TORCH_CHECK(N > 0 && (N + NR - 1) / NR == wp.size(0), op, ": N does not match wp");
}

}  // namespace

namespace parrot {

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& wp, int64_t N) {
  check_common("packed_linear", x, wp, N);
  TORCH_CHECK(wp.scalar_type() == at::kFloat, "packed_linear: wp must be float32");
  return run(x, wp.data_ptr<float>(), nullptr, wp.size(0), N);
}

at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& wp,
                              const at::Tensor& scales, int64_t N) {
  check_common("packed_linear_int8", x, wp, N);
  TORCH_CHECK(wp.scalar_type() == at::kChar, "packed_linear_int8: wp must be int8");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && scales.size(0) == wp.size(0) * NR,
              "packed_linear_int8: scales must be a contiguous float32 [ceil(N/16) * 16] tensor");
  return run(x, wp.data_ptr<int8_t>(), scales.data_ptr<float>(), wp.size(0), N);
}

}  // namespace parrot

TORCH_LIBRARY(parrot_kernels, m) {
  m.def("packed_linear(Tensor x, Tensor wp, int n) -> Tensor");
  m.def("packed_linear_int8(Tensor x, Tensor wp, Tensor scales, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(parrot_kernels, CPU, m) {
  m.impl("packed_linear", parrot::packed_linear);
  m.impl("packed_linear_int8", parrot::packed_linear_int8);
}
