// Shared by every kernel file: the headers, the float32/bfloat16 dispatch, and the AVX-512 vector helpers
// (16 float32 lanes; bf16 loaded and stored through float32). Files guard their AVX-512, AVX512-BF16 and
// AMX paths with the same macros (`__AVX512F__`, `__AVX512BF16__`, MICROSERVE_AMX) and keep a scalar path
// for every other CPU.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <memory>
#include <vector>
#if defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define MICROSERVE_AMX 1
#endif

namespace microserve {

// The body once, for float32 and bfloat16 storage (`scalar_t` inside it), as torch's AT_DISPATCH_* do.
#define MICROSERVE_DISPATCH_FLOAT_BF16(type, name, ...) \
  AT_DISPATCH_SWITCH(type, name, AT_DISPATCH_CASE(torch::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(torch::kBFloat16, __VA_ARGS__))

#if defined(__AVX512F__)
// 16 lanes at a time: the K/V rows of a head (64 values for the bundled model) are 4 vectors.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is the high half of a float32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
// x rounded to bfloat16 (nearest even, NaN kept NaN as torch casts), still as float32 lanes.
inline __m512i bf16_bits(__m512 x) {  // the rounded value's bits in the high half of each lane
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}
inline void store16(at::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(x), 16)));
}

// e^x for x <= 88 (softmax takes scores minus their maximum): 2^n * 2^f, f in [-0.5, 0.5], 2^f by its
// degree-7 Taylor polynomial (relative error < 1e-8, below float32's resolution); 0 below -87.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// A sequence's token rows (every head's K, or V) in order, through its block table: one division per
// block, not per token.
template <typename T>
struct RowWalk {
  const T* cache;
  const int64_t* table;
  int64_t block_size, token_stride;
  int64_t t = 0, left = 0;
  const T* row = nullptr;

  const T* next() {
    if (left == 0) {
      row = cache + table[t / block_size] * block_size * token_stride;
      left = block_size;
    } else {
      row += token_stride;
    }
    --left;
    ++t;
    return row;
  }
};

// 16 vectors -> one vector of their horizontal sums (lane i = the sum of v[i]'s lanes), in 45 operations
// instead of 16 reductions of ~8: pairs interleaved and added within 128-bit lanes, then across lanes.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // lane l: [v2i, v2i+1, v2i, v2i+1] partial sums
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane l: [v4i, v4i+1, v4i+2, v4i+3] summed over that lane
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes 0, 1 from b[2i] and 2, 3 from b[2i+1], each now over two lanes
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
#endif

#if defined(__AVX512F__)
// The value x takes once stored as T: what torch's eager ops round to between two ops.
inline __m512 as_stored(__m512 x, const float*) { return x; }
inline __m512 as_stored(__m512 x, const at::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(x), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

template <typename F>
inline void for_rows(int64_t rows, int64_t grain, const F& f) {  // threads only where there is enough work
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

#if defined(__AVX512F__)
// SiLU(g) * u for 16 values of gate and up as stored in T, with SiLU's result rounded to T before the
// product, as the eager ops round; the caller's store16 rounds the product.
template <typename T>
inline __m512 silu_mul16(__m512 g, __m512 u, const T* like) {
  const __m512 e = exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.f)));
  return _mm512_mul_ps(as_stored(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), like), u);
}
#endif

}  // namespace microserve
