// CPU kernels for the model's step, where torch's ops cost more than the arithmetic they do.
//
// paged_decode_attention: one query token per sequence attends over its K/V read straight from the paged
//   storage, with no gathered copy: one K/V head at a time, the query heads that share it together,
//   the first head's pass prefetching every head's rows. float32 and bfloat16 storage; float32 sums
//   (VDPBF16PS on bf16 rows where the CPU has AVX512-BF16); AVX-512 for head sizes 64 and 128 with
//   common group sizes, a scalar loop otherwise.
// add_rms_norm, silu_mul, rope_qkv: the glue between the GEMMs (residual add + RMSNorm, SiLU(gate) * up,
//   RoPE with the K/V cache write), one pass each, rounded between operations exactly as torch's eager
//   ops round in bfloat16.
// amx_pack, amx_linear: bf16 x @ W.T on AMX tiles from weights packed once as tiles. Same sums in the
//   same order as oneDNN's AMX GEMM (equal to the bit up to 32 rows), ~1.5x its speed on a decode step's
//   few rows, where oneDNN's overheads dominate a GEMM that should be a stream over the weights.
// amx_pack_q4, amx_linear_q4: the same GEMM straight from 4-bit groups (GGUF's Q4_0/Q4_1), each tile
//   dequantized in registers just before it is used: the dense weights' results to the bit, 3/8 of the bytes.
// amx_pack_q8, amx_linear_q8: the same for 8-bit groups (GGUF's Q8_0, e.g. a tied embedding's LM head),
//   9/16 of the bytes.
// amx_silu_mul: the MLP's gate/up GEMM on either weight form, packed with gate and up blocks paired, with
//   SiLU(gate) * up applied as each pair of blocks finishes.
// decode_layers: a decode step's whole layer loop in one call, on the kernels above.
// argmax_rows: greedy sampling's argmax over float32 or bf16 logits, with torch.max's tie and NaN rules.
//
// Built by microserve/kernels/__init__.py (at setup, or at first use).

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

namespace {

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

// One sequence, one K/V head at a time, its `G` query heads together: scores for 16 tokens at once (one
// K row read serves the G heads, sums reduced 16 at a time), then the weighted sum of V rows into
// accumulators that stay in registers. NV vectors of 16 per head row. The sequence's K/V (~70 KiB for
// the bundled model at 192 tokens) stays in L2 across its heads.
//
// bf16 caches on a CPU with AVX512-BF16 skip the conversions to float32: q.K by VDPBF16PS straight on
// the bf16 rows (exact products, float32 sums; the scale applied to the sum), and P.V by VDPBF16PS on
// pairs of tokens, the probabilities rounded to bf16 as torch's SDPA rounds them for its P.V GEMM.
constexpr int64_t kAhead = 32;  // tokens the K prefetch runs ahead

#if defined(__AVX512BF16__)
inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
#endif

template <typename T, int NV, int G>
void attend_seq(const T* q, const float* qf, float scale, const T* k_cache, const T* v_cache,
                const int64_t* table, int64_t len, int64_t kv_heads, int64_t block_size, float* scores,
                at::BFloat16* probs, T* out) {
#if defined(__AVX512BF16__)
  constexpr bool bf16_dot = std::is_same_v<T, at::BFloat16> && NV % 2 == 0;
#else
  constexpr bool bf16_dot = false;
#endif
  constexpr int64_t dim = 16 * NV;
  const int64_t token_stride = kv_heads * dim, pstride = len + 1;  // probs: one zero past the end
  for (int64_t h = 0; h < kv_heads; ++h) {
    float maxes[G];
    std::fill(maxes, maxes + G, -std::numeric_limits<float>::infinity());
    RowWalk<T> keys{k_cache + h * dim, table, block_size, token_stride};
    // The first head's pass fetches ahead for all: K rows `kAhead` tokens ahead, and the V rows of the
    // tokens at hand, every head of each (the later heads find them in cache).
    RowWalk<T> ahead_k{k_cache, table, block_size, token_stride}, ahead_v{v_cache, table, block_size, token_stride};
    const int64_t row_bytes = token_stride * static_cast<int64_t>(sizeof(T));
    auto fetch = [&](RowWalk<T>& walk, int64_t from, int64_t to) {
      for (int64_t t = from; t < std::min(to, len); ++t) {
        const char* r = reinterpret_cast<const char*>(walk.next());
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(r + b, _MM_HINT_T0);
      }
    };
    if (h == 0) fetch(ahead_k, 0, kAhead);
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, len - t0));
      if (h == 0) {
        fetch(ahead_k, t0 + kAhead, t0 + kAhead + 16);
        fetch(ahead_v, t0, t0 + 16);
      }
      const T* rows[16];
      for (int i = 0; i < n; ++i) rows[i] = keys.next();
      const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
      for (int g = 0; g < G; ++g) {
        __m512 part[16], sc;
        if constexpr (bf16_dot) {
#if defined(__AVX512BF16__)
          const T* qg = q + (h * G + g) * dim;
          __m512bh qv[NV / 2];
          for (int v = 0; v < NV / 2; ++v) qv[v] = as_bh(_mm512_loadu_si512(qg + 32 * v));
          for (int i = 0; i < 16; ++i) {
            part[i] = _mm512_setzero_ps();
            if (i >= n) continue;
            for (int v = 0; v < NV / 2; ++v)
              part[i] = _mm512_dpbf16_ps(part[i], as_bh(_mm512_loadu_si512(rows[i] + 32 * v)), qv[v]);
          }
          sc = _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale));
#endif
        } else {
          const float* qg = qf + (h * G + g) * dim;
          __m512 qv[NV];
          for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(qg + 16 * v);
          for (int i = 0; i < 16; ++i) {
            if (i >= n) {
              part[i] = _mm512_setzero_ps();
              continue;
            }
            __m512 a = _mm512_mul_ps(qv[0], load16(rows[i]));
            for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(qv[v], load16(rows[i] + 16 * v), a);
            part[i] = a;
          }
          sc = hsum16(part);
        }
        _mm512_mask_storeu_ps(scores + g * len + t0, live, sc);
        maxes[g] = std::max(maxes[g], _mm512_mask_reduce_max_ps(live, sc));
      }
    }
    float inv[G];
    for (int g = 0; g < G; ++g) {
      float* sr = scores + g * len;
      const __m512 mx = _mm512_set1_ps(maxes[g]);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < len; t += 16) {
        const __mmask16 m = len - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + t), mx));
        if constexpr (bf16_dot) {
#if defined(__AVX512BF16__)
          _mm256_mask_storeu_epi16(probs + g * pstride + t, m, (__m256i)_mm512_cvtneps_pbh(e));
#endif
        } else {
          _mm512_mask_storeu_ps(sr + t, m, e);
        }
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
      }
      if constexpr (bf16_dot) probs[g * pstride + len] = at::BFloat16(0.f);
      inv[g] = 1.f / _mm512_reduce_add_ps(sum);
    }
    __m512 acc[G][NV];
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
    RowWalk<T> values{v_cache + h * dim, table, block_size, token_stride};
    if constexpr (bf16_dot) {
#if defined(__AVX512BF16__)
      // Tokens t, t + 1 interleaved value by value (within 128-bit lanes) against (p_t, p_t+1): each
      // accumulator holds 16 of the head's values in a lane order undone at the store.
      for (int64_t t = 0; t < len; t += 2) {
        const T* va = values.next();
        const T* vb = t + 1 < len ? values.next() : nullptr;
        __m512bh pp[G];
        for (int g = 0; g < G; ++g) {
          int32_t pair;
          std::memcpy(&pair, probs + g * pstride + t, sizeof(pair));
          pp[g] = as_bh(_mm512_set1_epi32(pair));
        }
        for (int v = 0; v < NV / 2; ++v) {
          const __m512i a = _mm512_loadu_si512(va + 32 * v);
          const __m512i b = vb ? _mm512_loadu_si512(vb + 32 * v) : _mm512_setzero_si512();
          const __m512bh lo = as_bh(_mm512_unpacklo_epi16(a, b)), hi = as_bh(_mm512_unpackhi_epi16(a, b));
          for (int g = 0; g < G; ++g) {
            acc[g][2 * v] = _mm512_dpbf16_ps(acc[g][2 * v], lo, pp[g]);
            acc[g][2 * v + 1] = _mm512_dpbf16_ps(acc[g][2 * v + 1], hi, pp[g]);
          }
        }
      }
      // lo lane 4j + r holds value 8j + r of its 32, hi lane 4j + r value 8j + 4 + r.
      const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(inv[g]);
        T* o = out + (h * G + g) * dim;
        for (int v = 0; v < NV / 2; ++v) {
          const __m512 lo = acc[g][2 * v], hi = acc[g][2 * v + 1];
          store16(o + 32 * v, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), s));
          store16(o + 32 * v + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), s));
        }
      }
#endif
    } else {
      for (int64_t t = 0; t < len; ++t) {
        const T* vp = values.next();
        __m512 val[NV];
        for (int v = 0; v < NV; ++v) val[v] = load16(vp + 16 * v);
        for (int g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[g * len + t]);
          for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, val[v], acc[g][v]);
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(inv[g]);
        for (int v = 0; v < NV; ++v) store16(out + (h * G + g) * dim + 16 * v, _mm512_mul_ps(acc[g][v], s));
      }
    }
  }
}

// The vectorised kernel for the head sizes and group sizes of common models; false: not one of them.
template <typename T>
bool attend_fast(int64_t dim, int64_t group, const T* q, const float* qf, float scale, const T* k_cache,
                 const T* v_cache, const int64_t* table, int64_t len, int64_t kv_heads, int64_t block_size,
                 float* scores, at::BFloat16* probs, T* out) {
#define MICROSERVE_ATTEND(NV, G)                                                                       \
  if (dim == 16 * (NV) && group == (G)) {                                                             \
    attend_seq<T, NV, G>(q, qf, scale, k_cache, v_cache, table, len, kv_heads, block_size, scores,  \
                         probs, out);                                                              \
    return true;                                                                                      \
  }
  MICROSERVE_ATTEND(4, 1) MICROSERVE_ATTEND(4, 2) MICROSERVE_ATTEND(4, 3) MICROSERVE_ATTEND(4, 4)
  MICROSERVE_ATTEND(4, 8) MICROSERVE_ATTEND(8, 1) MICROSERVE_ATTEND(8, 2) MICROSERVE_ATTEND(8, 4)
  MICROSERVE_ATTEND(8, 5) MICROSERVE_ATTEND(8, 7) MICROSERVE_ATTEND(8, 8)
#undef MICROSERVE_ATTEND
  return false;
}
#endif

// Any head size, any CPU: the same computation one value at a time.
template <typename T>
void attend_one_scalar(const float* qf, const T* k_cache, const T* v_cache, const int64_t* table,
                       int64_t len, int64_t kv_heads, int64_t h, int64_t block_size, int64_t group,
                       int64_t dim, float* scores, float* acc, T* out) {
  for (int64_t g = 0; g < group; ++g) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) {
      const T* kp = k_cache + ((table[t / block_size] * block_size + t % block_size) * kv_heads + h) * dim;
      float s = 0.f;
      for (int64_t d = 0; d < dim; ++d) s += qf[g * dim + d] * static_cast<float>(kp[d]);
      scores[t] = s;
      mx = std::max(mx, s);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
    std::fill(acc, acc + dim, 0.f);
    for (int64_t t = 0; t < len; ++t) {
      const T* vp = v_cache + ((table[t / block_size] * block_size + t % block_size) * kv_heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += scores[t] * static_cast<float>(vp[d]);
    }
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = static_cast<T>(acc[d] / sum);
  }
}

template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                      int64_t table_stride, const int64_t* lens, T* out, int64_t batch, int64_t heads,
                      int64_t kv_heads, int64_t dim, int64_t block_size, float scale) {
  const int64_t group = heads / kv_heads;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, lens[b]);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * dim), scores(heads * longest), acc(heads * dim);
    std::vector<at::BFloat16> probs(group * (longest + 1));
    for (int64_t b = begin; b < end; ++b) {
      const T* qb = q + b * heads * dim;
      for (int64_t i = 0; i < heads * dim; ++i) qf[i] = static_cast<float>(qb[i]) * scale;
      const int64_t* table = tables + b * table_stride;
      T* ob = out + b * heads * dim;
#if defined(__AVX512F__)
      if (attend_fast<T>(dim, group, qb, qf.data(), scale, k_cache, v_cache, table, lens[b], kv_heads,
                         block_size, scores.data(), probs.data(), ob))
        continue;
#endif
      for (int64_t h = 0; h < kv_heads; ++h)
        attend_one_scalar<T>(qf.data() + h * group * dim, k_cache, v_cache, table, lens[b], kv_heads, h,
                             block_size, group, dim, scores.data(), acc.data(), ob + h * group * dim);
    }
  });
}

// q [B, heads, dim]; caches [slots, kv_heads, dim]; tables [B, max_blocks] int64; lens [B] int64.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, int64_t block_size,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong, "int64 indices");
  TORCH_CHECK(q.size(0) == tables.size(0) && q.size(0) == lens.size(0), "one table and length per row");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0, "head layout mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  q = q.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  // A wrong table must be an error, never a read outside the caches.
  const int64_t num_blocks = k_cache.size(0) / block_size, width = tables.size(1);
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "block_size must divide the cache slots");
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] > 0 && lp[b] <= width * block_size, "context length outside its block table");
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * width + i] >= 0 && tp[b * width + i] < num_blocks, "block id out of range");
  }
  auto out = torch::empty_like(q);
  MICROSERVE_DISPATCH_FLOAT_BF16(q.scalar_type(), "paged_decode_attention", [&] {
    using T = scalar_t;
    decode_attention<T>(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), tables.data_ptr<int64_t>(),
                        tables.size(1), lens.data_ptr<int64_t>(), out.data_ptr<T>(), q.size(0), q.size(1),
                        k_cache.size(1), q.size(2), block_size, static_cast<float>(scale));
  });
  return out;
}


// ---- Row-wise glue between the GEMMs: RMSNorm (with the residual add), SiLU(gate) * up, RoPE. ----

#if defined(__AVX512F__)
// The value x takes once stored as T: what torch's eager ops round to between two ops.
inline __m512 as_stored(__m512 x, const float*) { return x; }
inline __m512 as_stored(__m512 x, const at::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(x), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#endif

template <typename T>
void rms_row(const T* x, const T* weight, T* y, int64_t dim, float eps) {
  int64_t d = 0;
  float ss = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= dim; d += 16) {
    const __m512 v = load16(x + d);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; d < dim; ++d) ss += static_cast<float>(x[d]) * static_cast<float>(x[d]);
  // As transformers: normalise in float32, cast to the model's dtype, then scale by the weight.
  const float norm = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
  d = 0;
#if defined(__AVX512F__)
  const __m512 n = _mm512_set1_ps(norm);
  for (; d + 16 <= dim; d += 16) {
    const __m512 h = as_stored(_mm512_mul_ps(load16(x + d), n), y);
    store16(y + d, _mm512_mul_ps(load16(weight + d), h));
  }
#endif
  for (; d < dim; ++d)
    y[d] = static_cast<T>(static_cast<float>(weight[d]) * static_cast<float>(static_cast<T>(static_cast<float>(x[d]) * norm)));
}

template <typename T>
void add_row(T* x, const T* delta, int64_t dim) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= dim; d += 16) store16(x + d, _mm512_add_ps(load16(x + d), load16(delta + d)));
#endif
  for (; d < dim; ++d) x[d] = static_cast<T>(static_cast<float>(x[d]) + static_cast<float>(delta[d]));
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

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t half) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= half; d += 16) store16(out + d, silu_mul16(load16(gate + d), load16(up + d), out));
#endif
  for (; d < half; ++d) {
    const float g = static_cast<float>(gate[d]);
    const float s = static_cast<float>(static_cast<T>(g / (1.f + std::exp(-g))));
    out[d] = static_cast<T>(s * static_cast<float>(up[d]));
  }
}

template <typename F>
void for_rows(int64_t rows, int64_t grain, const F& f) {  // threads only where there is enough work
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

void check_rows(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, dim] tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [dim] in x's dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "float32 or bfloat16 only");
}

// rms_norm(x) with transformers' rounding; when `delta` is given, x += delta in place first.
torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps) {
  check_rows(x, weight);
  if (delta) {
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(), "delta must match x");
    *delta = delta->contiguous();
  }
  auto y = torch::empty_like(x);
  const int64_t dim = x.size(1);
  MICROSERVE_DISPATCH_FLOAT_BF16(x.scalar_type(), "add_rms_norm", [&] {
    using T = scalar_t;
    T *xp = x.data_ptr<T>(), *yp = y.data_ptr<T>();
    const T* dp = delta ? delta->data_ptr<T>() : nullptr;
    const T* wp = weight.data_ptr<T>();
    for_rows(x.size(0), 16, [&](int64_t r) {
      if (dp) add_row(xp + r * dim, dp + r * dim, dim);
      rms_row(xp + r * dim, wp, yp + r * dim, dim, static_cast<float>(eps));
    });
  });
  return y;
}

// gate_up [rows, 2 * half] -> silu(gate_up[:, :half]) * gate_up[:, half:], rounded as the eager ops are.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [rows, 2 * half]");
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat || gate_up.scalar_type() == torch::kBFloat16,
              "float32 or bfloat16 only");
  gate_up = gate_up.contiguous();
  const int64_t half = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), half}, gate_up.options());
  MICROSERVE_DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_rows(gate_up.size(0), 16, [&](int64_t r) { silu_mul_row(g + 2 * r * half, g + (2 * r + 1) * half, o + r * half, half); });
  });
  return out;
}

// RoPE on the q and k parts of the fused q/k/v projection, rounded as `x * cos + rotate_half(x) * sin`
// is in eager torch; the rotated k and the v of each token are also written to its slot of the caches.
template <typename T>
void rope_row(const T* x, const T* cos, const T* sin, T* out, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float rot = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
    const float a = static_cast<float>(static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(cos[d])));
    const float b = static_cast<float>(static_cast<T>(rot * static_cast<float>(sin[d])));
    out[d] = static_cast<T>(a + b);
  }
}

#if defined(__AVX512F__)
template <typename T>
void rope_row16(const T* x, const T* cos, const T* sin, T* out, int64_t dim) {  // dim % 32 == 0
  const int64_t half = dim / 2;
  const __m512 minus = _mm512_set1_ps(-1.f);
  for (int64_t d = 0; d < dim; d += 16) {
    __m512 rot = d < half ? _mm512_mul_ps(minus, load16(x + d + half)) : load16(x + d - half);
    const __m512 a = as_stored(_mm512_mul_ps(load16(x + d), load16(cos + d)), out);
    const __m512 b = as_stored(_mm512_mul_ps(rot, load16(sin + d)), out);
    store16(out + d, _mm512_add_ps(a, b));
  }
}
#endif

template <typename T>
void rope_qkv_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                   int64_t kv_heads, int64_t dim, const int64_t* slots, torch::Tensor& k_cache,
                   torch::Tensor& v_cache, torch::Tensor& q, torch::Tensor& k) {
  const T* in = qkv.data_ptr<T>();
  const T *cp = cos.data_ptr<T>(), *snp = sin.data_ptr<T>();
  T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>();
  const int64_t width = (heads + 2 * kv_heads) * dim;
  for_rows(qkv.size(0), 16, [&](int64_t t) {
    const T* row = in + t * width;
    const T *c = cp + t * dim, *s = snp + t * dim;
    auto rope = [&](const T* x, T* out) {
#if defined(__AVX512F__)
      if (dim % 32 == 0) return rope_row16(x, c, s, out, dim);
#endif
      rope_row(x, c, s, out, dim);
    };
    for (int64_t h = 0; h < heads; ++h) rope(row + h * dim, qp + (t * heads + h) * dim);
    for (int64_t h = 0; h < kv_heads; ++h) rope(row + (heads + h) * dim, kp + (t * kv_heads + h) * dim);
    std::copy(kp + t * kv_heads * dim, kp + (t + 1) * kv_heads * dim, kc + slots[t] * kv_heads * dim);
    std::copy(row + (heads + kv_heads) * dim, row + width, vc + slots[t] * kv_heads * dim);
  });
}

// qkv [T, (heads + 2 kv_heads) * dim]; cos, sin [T, dim]; slots [T] int64; caches [S, kv_heads, dim].
// Returns (q [T, heads, dim], k [T, kv_heads, dim]), both rotated.
std::vector<torch::Tensor> rope_qkv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                                    int64_t kv_heads, torch::Tensor slots, torch::Tensor k_cache,
                                    torch::Tensor v_cache) {
  const int64_t tokens = qkv.size(0), dim = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv must be [T, (H + 2 KV) * D]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == dim,
              "cos and sin must be [T, D]");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == tokens, "one int64 slot per token");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(1) == kv_heads,
              "caches must be contiguous [S, kv_heads, D]");
  TORCH_CHECK(qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == k_cache.scalar_type() &&
                  qkv.scalar_type() == v_cache.scalar_type(),
              "qkv, cos, sin and the caches must share a dtype");
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat || qkv.scalar_type() == torch::kBFloat16,
              "float32 or bfloat16 only");
  qkv = qkv.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  slots = slots.contiguous();
  const int64_t num_slots = k_cache.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
  auto q = torch::empty({tokens, heads, dim}, qkv.options());
  auto k = torch::empty({tokens, kv_heads, dim}, qkv.options());
  MICROSERVE_DISPATCH_FLOAT_BF16(qkv.scalar_type(), "rope_qkv", [&] {
    rope_qkv_impl<scalar_t>(qkv, cos, sin, heads, kv_heads, dim, sp, k_cache, v_cache, q, k);
  });
  return {q, k};
}



// ---- bf16 GEMM on AMX tiles: y = x @ W.T (+ bias) ----
//
// W [N, K] is packed once as AMX B tiles, [N/16, K/32, 16, 16, 2]: tile (n, k) holds columns 16n..16n+15
// of rows 32k..32k+31 of W.T, pairs of K side by side as TDPBF16PS reads them, 1 KiB contiguous, and the
// K tiles of one 16-column block follow each other, so a block is one sequential read. A thread takes
// pairs of column blocks; for each 32 rows of x, four C tiles (2 row tiles x 2 column blocks) sum over K
// in order from zero, as oneDNN's brgemm does, then round to bf16 (nearest even) with the bias added in
// float32 first. The pair's weights stay in cache across the row chunks of a longer x.
//
// A fused gate/up projection ([gate; up], the MLP's two halves stacked) can be packed with its blocks
// paired instead: gate block i and up block i side by side, [N/32, 2, K/32, 16, 16, 2], so the pair one
// thread computes holds a gate column block and the up block it multiplies. Its results are the same,
// written where the plain layout would write them, or go through SiLU(gate) * up as the pair finishes
// (`amx_silu_mul`): the [M, N] projection is never written nor read back.

#if defined(MICROSERVE_AMX)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {  // Linux hands out AMX state only on request, once per process
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  return ok;
}

// C tiles 0, 1 (rows 0..15 x blocks 0, 1) and 2, 3 (rows 16..31); A tiles 4, 5; B tiles 6, 7.
void configure_tiles(int rows0, int rows1) {
  TileConfig cfg;
  for (int t : {0, 1, 4}) cfg.rows[t] = static_cast<uint8_t>(rows0);
  for (int t : {2, 3, 5}) cfg.rows[t] = static_cast<uint8_t>(std::max(rows1, 1));
  for (int t : {6, 7}) cfg.rows[t] = 16;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
  // Not _tile_loadconfig: GCC 12 declares it as reading 8 bytes, and then drops the stores that fill the
  // rest of the configuration (ldtilecfg then faults on whatever the stack held).
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}
#endif

// Where a GEMM's results go: y = x @ W.T (+ bias) with W's blocks in order (kPlain) or paired gate/up
// (kGateUp), or SiLU(x @ Wg.T) * (x @ Wu.T) from paired blocks (kSiluMul, y [M, N/2]).
enum class Epilogue { kPlain, kGateUp, kSiluMul };

// Tiles packed with `gate_up` (amx_pack: [N/32, 2, K/32, 16, 16, 2]; amx_pack_q4: [N/32, 2, K/32, 384]).
bool gate_up_tiles(const torch::Tensor& tiles) {
  return tiles.dim() == (tiles.scalar_type() == torch::kByte ? 4 : 6) && tiles.size(1) == 2;
}

// The epilogue for tiles `paired` or not; SiLU(gate) * up only from gate/up tiles (from `packer`).
Epilogue epilogue_for(bool paired, bool silu_mul, const char* packer) {
  TORCH_CHECK(!silu_mul || paired, "SiLU(gate) * up needs gate/up tiles (", packer, " with gate_up)");
  return silu_mul ? Epilogue::kSiluMul : paired ? Epilogue::kGateUp : Epilogue::kPlain;
}

// Rows [gate; up] (N % 32 == 0) reordered gate 0..15, up 0..15, gate 16..31, ...: packed in that order,
// each pair of 16-column blocks a thread computes is a gate block and its up block.
torch::Tensor pair_gate_up_rows(const torch::Tensor& t) {
  const int64_t N = t.size(0);
  return t.contiguous().view({2, N / 32, 16, t.size(1)}).transpose(0, 1).reshape({N, t.size(1)});
}

#if defined(MICROSERVE_AMX)
// How a chunk's tile loads treat the caches. Many rows of x: x streams through L2 (the T1 hint) and the
// pair's B tiles, used again for every chunk, stay in L1 (~25% off a 512-row prefill GEMM of the bundled
// model). One chunk of x: the B tiles are each used once and stream instead.
enum class Reuse { kBoth, kB, kX };
constexpr int64_t kL1WeightBytes = 40 * 1024;  // a pair's B tiles that fit in L1 (48 KiB) beside x's

// The tile intrinsics take the tile's number as a literal, so these are macros (in amx_chunk, of its R).
#define MICROSERVE_LOAD_X(tile, p, stride) \
  if constexpr (R == Reuse::kB) _tile_stream_loadd(tile, p, stride); else _tile_loadd(tile, p, stride)
#define MICROSERVE_LOAD_W(tile, p) \
  if constexpr (R == Reuse::kX) _tile_stream_loadd(tile, p, 64); else _tile_loadd(tile, p, 64)

// Rows [m, m + rows) of x times column blocks nb (and nb + 1 when `pair`) to y as `E` says; `tile(kb, j)`
// gives the bf16 B tile of block nb + j for the kb-th 32 values of K. y has N columns (N / 2 for kSiluMul).
template <Reuse R, typename TileSource>
void amx_chunk(const at::BFloat16* x, const TileSource& tile, const at::BFloat16* bias, at::BFloat16* y,
               int64_t K, int64_t N, int64_t m, int rows0, int rows1, int64_t nb, bool pair, Epilogue E) {
  const int64_t KB = K / 32;
  const at::BFloat16* a0 = x + m * K;
  const at::BFloat16* a1 = a0 + 16 * K;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < KB; ++kb) {
    MICROSERVE_LOAD_X(4, a0 + kb * 32, K * 2);
    MICROSERVE_LOAD_W(6, tile(kb, 0));
    _tile_dpbf16ps(0, 4, 6);
    if (pair) {
      MICROSERVE_LOAD_W(7, tile(kb, 1));
      _tile_dpbf16ps(1, 4, 7);
    }
    if (rows1) {
      MICROSERVE_LOAD_X(5, a1 + kb * 32, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      if (pair) _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float c[4][16 * 16];
  _tile_stored(0, c[0], 64);
  if (pair) _tile_stored(1, c[1], 64);
  if (rows1) {
    _tile_stored(2, c[2], 64);
    if (pair) _tile_stored(3, c[3], 64);
  }
  auto sums = [&](int r, int j) { return _mm512_load_ps(c[(r / 16) * 2 + j] + (r % 16) * 16); };
  if (E == Epilogue::kSiluMul) {  // a pair is gate block p and up block p: output columns 16p..16p+15
    const int64_t col = nb / 2 * 16, half = N / 2;
    for (int r = 0; r < rows0 + rows1; ++r) {
      at::BFloat16* out = y + (m + r) * half + col;
      store16(out, silu_mul16(as_stored(sums(r, 0), out), as_stored(sums(r, 1), out), out));
    }
    return;
  }
  for (int j = 0; j < (pair ? 2 : 1); ++j) {
    const int64_t col = E == Epilogue::kGateUp ? j * (N / 2) + nb / 2 * 16 : (nb + j) * 16;
    const __m512 b = bias ? load16(bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < rows0 + rows1; ++r) store16(y + (m + r) * N + col, _mm512_add_ps(sums(r, j), b));
  }
}
#undef MICROSERVE_LOAD_X
#undef MICROSERVE_LOAD_W
#endif

bool amx_available() {
#if defined(MICROSERVE_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// W [N, K] bf16, N % 16 == 0, K % 32 == 0 -> its AMX tiles [N/16, K/32, 16, 16, 2]; with `gate_up`
// (N % 32 == 0, W = [gate; up]), paired: [N/32, 2, K/32, 16, 16, 2].
torch::Tensor amx_pack(torch::Tensor w, bool gate_up) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16, "W must be a [N, K] bfloat16 matrix");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "AMX tiles need N % 16 == 0 and K % 32 == 0, not ", N, " x ", K);
  TORCH_CHECK(!gate_up || N % 32 == 0, "paired gate/up tiles need N % 32 == 0, not ", N);
  if (gate_up) w = pair_gate_up_rows(w);
  auto tiles = w.contiguous().view({N / 16, 16, K / 32, 16, 2}).permute({0, 2, 3, 1, 4}).contiguous();
  return gate_up ? tiles.view({N / 32, 2, K / 32, 16, 16, 2}) : tiles;
}

// The GEMM both weight forms share: x [M, K] bf16, bias [N] bf16 or None -> y [M, N] bf16 ([M, N/2] for
// kSiluMul). Threads split the pairs of 16-column blocks; each pair meets x 32 rows at a time.
// `prepare(p, scratch)` runs once per pair with `scratch_size` bf16 of the thread's own; `tile(p, kb, j,
// scratch)` gives the bf16 B tile of block 2p + j for the kb-th 32 values of K.
template <typename Prepare, typename Tile>
torch::Tensor amx_gemm(torch::Tensor x, const c10::optional<torch::Tensor>& bias, int64_t NB, int64_t KB,
                       Epilogue epilogue, int64_t scratch_size, const Prepare& prepare, const Tile& tile) {
  TORCH_CHECK(amx_available(), "AMX is not available on this CPU or kernel");
  const int64_t K = KB * 32, N = NB * 16;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == torch::kBFloat16,
              "x must be [M, ", K, "] bfloat16");
  torch::Tensor b;
  if (bias) {
    TORCH_CHECK(epilogue != Epilogue::kSiluMul, "SiLU(gate) * up takes no bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == torch::kBFloat16,
                "bias must be [", N, "] bfloat16");
    b = bias->contiguous();
  }
  x = x.contiguous();
  const int64_t M = x.size(0);
  auto y = torch::empty({M, epilogue == Epilogue::kSiluMul ? N / 2 : N}, x.options());
  if (M == 0) return y;
#if defined(MICROSERVE_AMX)
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* bp = bias ? b.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // Tiles from scratch were just written there: they are in L1 whatever the hint.
  const bool weights_in_l1 = scratch_size > 0 || 2 * KB * 1024 <= kL1WeightBytes;
  const Reuse reuse = M > 32 ? (weights_in_l1 ? Reuse::kB : Reuse::kBoth) : (scratch_size ? Reuse::kBoth : Reuse::kX);
  at::parallel_for(0, (NB + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<at::BFloat16[]> scratch(scratch_size ? new at::BFloat16[scratch_size] : nullptr);
    int configured = -1;  // rows of the current tile configuration
    for (int64_t p = begin; p < end; ++p) {
      prepare(p, scratch.get());
      auto pair_tile = [&](int64_t kb, int j) { return tile(p, kb, j, scratch.get()); };
      for (int64_t m = 0; m < M; m += 32) {
        const int rows = static_cast<int>(std::min<int64_t>(32, M - m));
        if (rows != configured) {
          configure_tiles(std::min(rows, 16), std::max(rows - 16, 0));
          configured = rows;
        }
        const int r0 = std::min(rows, 16), r1 = std::max(rows - 16, 0);
        const bool pair = 2 * p + 1 < NB;
        if (reuse == Reuse::kB)
          amx_chunk<Reuse::kB>(xp, pair_tile, bp, yp, K, N, m, r0, r1, 2 * p, pair, epilogue);
        else if (reuse == Reuse::kX)
          amx_chunk<Reuse::kX>(xp, pair_tile, bp, yp, K, N, m, r0, r1, 2 * p, pair, epilogue);
        else
          amx_chunk<Reuse::kBoth>(xp, pair_tile, bp, yp, K, N, m, r0, r1, 2 * p, pair, epilogue);
      }
    }
    if (configured >= 0) _tile_release();
  });
#endif
  return y;
}

// A bf16 tile tensor's blocks: (NB, KB, paired) for [NB, KB, 16, 16, 2] or paired [NB/2, 2, KB, 16, 16, 2].
std::tuple<int64_t, int64_t, bool> bf16_tile_blocks(const torch::Tensor& packed) {
  const bool paired = gate_up_tiles(packed);
  const int64_t d = paired ? 1 : 0;
  TORCH_CHECK((packed.dim() == 5 || paired) && packed.size(d + 2) == 16 && packed.size(d + 3) == 16 &&
                  packed.size(d + 4) == 2 && packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous(),
              "packed weights must come from amx_pack");
  return {paired ? 2 * packed.size(0) : packed.size(0), packed.size(d + 1), paired};
}

torch::Tensor amx_linear_bf16(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias, bool silu_mul) {
  const auto [NB, KB, paired] = bf16_tile_blocks(packed);
  const Epilogue epilogue = epilogue_for(paired, silu_mul, "amx_pack");
  const at::BFloat16* wp = packed.data_ptr<at::BFloat16>();
  return amx_gemm(
      x, bias, NB, KB, epilogue, 0, [](int64_t, at::BFloat16*) {},
      [&](int64_t p, int64_t kb, int j, at::BFloat16*) { return wp + ((2 * p + j) * KB + kb) * 512; });
}

// x [M, K] bf16, packed from amx_pack, bias [N] bf16 or None -> y [M, N] bf16.
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  return amx_linear_bf16(x, packed, bias, false);
}

// ---- The same GEMM on 4-bit weights (GGUF's Q4_0/Q4_1 groups of 32 along K) ----
//
// A B tile (32 K x 16 columns) is one group of each of its 16 columns: packed as 384 bytes, its 512
// values q in 0..15 as nibbles (256 bytes, laid out so each half row of the tile is one shift away from
// a vector of indices, see amx_pack_q4), then the 16 columns' scales and their 16 zeros as float32.
// Dequantized as the GEMM reaches it: w = (q - 8) * scale + zero in float32 (one FMA: the product is
// exact), rounded to bf16 -- the dense weights dequantized at load, so results equal amx_linear's on
// those to the bit, at 3/8 of the bytes read. The dequantization, not the tile products, is most of a
// decode step's GEMM time: on the 2-core Xeon the AMX unit does not overlap with it (~1 KiB of stores a
// tile), so it is kept to 7 vector instructions a tile row (a table lookup for q - 8 instead of integer
// unpacking and a subtraction: ~95 -> ~67 cycles a tile).

constexpr int64_t kQ4TileBytes = 384;

// q [N, K] uint8 (0..15), scale and zero [N, K/32] float32 -> [N/16, K/32, 384] uint8; with `gate_up`
// (N % 32 == 0, the rows [gate; up]), paired as amx_pack's: [N/32, 2, K/32, 384].
torch::Tensor amx_pack_q4(torch::Tensor q, torch::Tensor scale, torch::Tensor zero, bool gate_up) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kByte, "q must be a [N, K] uint8 matrix");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "AMX tiles need N % 16 == 0 and K % 32 == 0, not ", N, " x ", K);
  TORCH_CHECK(scale.sizes() == zero.sizes() && scale.dim() == 2 && scale.size(0) == N && scale.size(1) == K / 32 &&
                  scale.scalar_type() == torch::kFloat && zero.scalar_type() == torch::kFloat,
              "scale and zero must be [N, K/32] float32");
  TORCH_CHECK(!gate_up || N % 32 == 0, "paired gate/up tiles need N % 32 == 0, not ", N);
  auto pairs = [&](const torch::Tensor& t) { return gate_up ? pair_gate_up_rows(t) : t.contiguous(); };
  q = pairs(q);
  scale = pairs(scale);
  zero = pairs(zero);
  TORCH_CHECK(q.numel() == 0 || q.max().item<int64_t>() < 16, "q values must lie in 0..15");
  const int64_t NB = N / 16, KB = K / 32;
  auto out = torch::empty({NB, KB, kQ4TileBytes}, q.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, NB * KB, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / KB, kb = t % KB;
      uint8_t* tile = op + t * kQ4TileBytes;
      // Tile row r, value e: column 16 nb + e / 2, K index 32 kb + 2 r + e % 2. Rows 4g..4g + 3 fill 64
      // bytes as 16 little-endian 32-bit words; word i holds, in nibble t, value 16 (t % 2) + i of row
      // 4g + t / 2, so shifting the words right by 4t puts that half row's values in their low nibbles.
      auto value = [&](int64_t r, int64_t e) { return qp[(nb * 16 + e / 2) * K + kb * 32 + 2 * r + e % 2]; };
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t i = 0; i < 16; ++i) {
          uint32_t word = 0;
          for (int64_t t = 0; t < 8; ++t) word |= static_cast<uint32_t>(value(4 * g + t / 2, 16 * (t % 2) + i)) << (4 * t);
          std::memcpy(tile + 64 * g + 4 * i, &word, 4);
        }
      float* sz = reinterpret_cast<float*>(tile + 256);
      for (int64_t n = 0; n < 16; ++n) {
        sz[n] = sp[(nb * 16 + n) * KB + kb];
        sz[16 + n] = zp[(nb * 16 + n) * KB + kb];
      }
    }
  });
  return gate_up ? out.view({N / 32, 2, KB, kQ4TileBytes}) : out;
}

#if defined(MICROSERVE_AMX)
// One packed tile -> a bf16 B tile (1 KiB) at dst. Each half row's 16 values index a table of q - 8
// (vpermps reads only an index's low 4 bits), then one FMA each: w = (q - 8) * scale + zero.
inline void dequantize_q4_tile(const uint8_t* src, at::BFloat16* dst) {
  const __m512i lo_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
  const __m512 q_minus_8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const float* sz = reinterpret_cast<const float*>(src + 256);
  const __m512 s = _mm512_loadu_ps(sz), z = _mm512_loadu_ps(sz + 16);
  const __m512 s_lo = _mm512_permutexvar_ps(lo_cols, s), s_hi = _mm512_permutexvar_ps(hi_cols, s);
  const __m512 z_lo = _mm512_permutexvar_ps(lo_cols, z), z_hi = _mm512_permutexvar_ps(hi_cols, z);
  for (int g = 0; g < 4; ++g) {
    const __m512i words = _mm512_loadu_si512(src + 64 * g);
    for (int r = 0; r < 4; ++r) {
      const __m512i lo = _mm512_srli_epi32(words, 8 * r), hi = _mm512_srli_epi32(words, 8 * r + 4);
      const __m512 w_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, q_minus_8), s_lo, z_lo);
      const __m512 w_hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi, q_minus_8), s_hi, z_hi);
      _mm512_storeu_si512(dst + 32 * (4 * g + r), (__m512i)_mm512_cvtne2ps_pbh(w_hi, w_lo));
    }
  }
}
#endif

// The GEMM on weights packed as `tile_bytes`-byte quantized tiles, one per bf16 B tile (blocks in the
// order amx_gemm reads them): `dequantize(src, dst)` turns one into the bf16 tile at dst.
template <typename Dequantize>
torch::Tensor amx_linear_quantized(const torch::Tensor& x, const torch::Tensor& packed,
                                   const c10::optional<torch::Tensor>& bias, Epilogue epilogue, int64_t NB,
                                   int64_t KB, int64_t tile_bytes, const Dequantize& dequantize) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  auto src = [&](int64_t p, int64_t kb, int j) { return wp + ((2 * p + j) * KB + kb) * tile_bytes; };
  // Up to 32 rows: each tile dequantized as its turn comes, into a ring of 4 (two K steps of the pair).
  // More rows: the pair's tiles dequantized once, then every 32 rows against them.
  const bool ring = M <= 32;
  auto prepare = [&](int64_t p, at::BFloat16* scratch) {
    if (ring) return;
    for (int j = 0; j < (2 * p + 1 < NB ? 2 : 1); ++j)
      for (int64_t kb = 0; kb < KB; ++kb) dequantize(src(p, kb, j), scratch + (j * KB + kb) * 512);
  };
  auto tile = [&](int64_t p, int64_t kb, int j, at::BFloat16* scratch) -> const at::BFloat16* {
    if (!ring) return scratch + (j * KB + kb) * 512;
    // One K step ahead: a tile is loaded a step after its stores, never waiting for them to reach L1.
    auto slot = [&](int64_t k) { return scratch + ((k & 1) * 2 + j) * 512; };
    if (kb == 0) dequantize(src(p, 0, j), slot(0));
    if (kb + 1 < KB) dequantize(src(p, kb + 1, j), slot(kb + 1));
    return slot(kb);
  };
  return amx_gemm(x, bias, NB, KB, epilogue, ring ? 4 * 512 : 2 * KB * 512, prepare, tile);
}

torch::Tensor amx_linear_q4_impl(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                                 bool silu_mul) {
  const bool paired = gate_up_tiles(packed);
  TORCH_CHECK((packed.dim() == 3 || paired) && packed.size(-1) == kQ4TileBytes &&
                  packed.scalar_type() == torch::kByte && packed.is_contiguous(),
              "packed weights must come from amx_pack_q4");
  const Epilogue epilogue = epilogue_for(paired, silu_mul, "amx_pack_q4");
  const int64_t NB = paired ? 2 * packed.size(0) : packed.size(0), KB = packed.size(-2);
  return amx_linear_quantized(x, packed, bias, epilogue, NB, KB, kQ4TileBytes,
                              [](const uint8_t* src, at::BFloat16* dst) {
#if defined(MICROSERVE_AMX)
                                dequantize_q4_tile(src, dst);
#endif
                              });
}

// x [M, K] bf16, packed from amx_pack_q4, bias [N] bf16 or None -> y [M, N] bf16.
torch::Tensor amx_linear_q4(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  return amx_linear_q4_impl(x, packed, bias, false);
}

// x [M, K] bf16, gate/up tiles from amx_pack or amx_pack_q4 with gate_up -> SiLU(x @ Wg.T) * (x @ Wu.T)
// [M, N/2] bf16, equal to silu_mul(amx_linear(x, packed)) to the bit.
torch::Tensor amx_silu_mul(torch::Tensor x, torch::Tensor packed) {
  if (packed.scalar_type() == torch::kByte) return amx_linear_q4_impl(x, packed, c10::nullopt, true);
  return amx_linear_bf16(x, packed, c10::nullopt, true);
}

// ---- The same GEMM on 8-bit weights (GGUF's Q8_0: w = q * scale, groups of 32 along K) ----
//
// A tile is 512 bytes of q in -128..127 laid out as the bf16 B tile's values (row r: the K pair 2r, 2r+1
// of each of the 16 columns), then the 16 columns' scales as float32: 576 bytes for the tile's 1 KiB.
// q * scale is exact in float32 (8 by 11 significant bits for GGUF's fp16 scales), rounded to bf16 as the
// dense weights were at load, so results equal amx_linear's on those to the bit. The bundled model's tied
// embedding is Q8_0: its LM head so reads 30 MB a step instead of 57.

constexpr int64_t kQ8TileBytes = 576;

// q [N, K] int8, scale [N, K/32] float32 -> [N/16, K/32, 576] uint8.
torch::Tensor amx_pack_q8(torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar, "q must be a [N, K] int8 matrix");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "AMX tiles need N % 16 == 0 and K % 32 == 0, not ", N, " x ", K);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == K / 32 && scale.scalar_type() == torch::kFloat,
              "scale must be [N, K/32] float32");
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t NB = N / 16, KB = K / 32;
  auto out = torch::empty({NB, KB, kQ8TileBytes}, q.options().dtype(torch::kByte));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, NB * KB, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / KB, kb = t % KB;
      uint8_t* tile = op + t * kQ8TileBytes;
      // Tile row r, value e: column 16 nb + e / 2, K index 32 kb + 2 r + e % 2.
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t e = 0; e < 32; ++e)
          tile[r * 32 + e] = static_cast<uint8_t>(qp[(nb * 16 + e / 2) * K + kb * 32 + 2 * r + e % 2]);
      float* sc = reinterpret_cast<float*>(tile + 512);
      for (int64_t n = 0; n < 16; ++n) sc[n] = sp[(nb * 16 + n) * KB + kb];
    }
  });
  return out;
}

#if defined(MICROSERVE_AMX)
inline void dequantize_q8_tile(const uint8_t* src, at::BFloat16* dst) {
  const __m512i lo_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
  const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(src + 512));
  const __m512 s_lo = _mm512_permutexvar_ps(lo_cols, s), s_hi = _mm512_permutexvar_ps(hi_cols, s);
  for (int r = 0; r < 16; ++r) {
    const __m128i* row = reinterpret_cast<const __m128i*>(src + 32 * r);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row + 1)));
    _mm512_storeu_si512(dst + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s_hi), _mm512_mul_ps(lo, s_lo)));
  }
}
#endif

// x [M, K] bf16, packed from amx_pack_q8, bias [N] bf16 or None -> y [M, N] bf16.
torch::Tensor amx_linear_q8(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kQ8TileBytes && packed.scalar_type() == torch::kByte &&
                  packed.is_contiguous(),
              "packed weights must come from amx_pack_q8");
  return amx_linear_quantized(x, packed, bias, Epilogue::kPlain, packed.size(0), packed.size(1), kQ8TileBytes,
                              [](const uint8_t* src, at::BFloat16* dst) {
#if defined(MICROSERVE_AMX)
                                dequantize_q8_tile(src, dst);
#endif
                              });
}

// ---- Every layer of a decode step in one call ----
//
// The model's layer loop for an all-decode batch whose linear layers all run on AMX tiles: the kernels
// above, in the same order on the same tensors (so the same results to the bit), without the Python
// interpreter and the bindings between them (~10 calls a layer, ~1.5 ms of a 32-sequence step of the
// bundled model).

torch::Tensor tile_linear(const torch::Tensor& x, const torch::Tensor& tiles, const c10::optional<torch::Tensor>& bias) {
  return tiles.scalar_type() == torch::kByte ? amx_linear_q4(x, tiles, bias) : amx_linear(x, tiles, bias);
}

// x [B, hidden], the residual stream, updated in place to the last layer's output. Per layer l:
// norms[2l], norms[2l + 1] (input, post-attention), tiles[4l..4l + 3] (q/k/v, o, gate/up, down: int4 tiles
// from amx_pack_q4 or bf16 tiles from amx_pack, gate/up paired or not), qkv_bias[l] (an empty list: no
// bias); cos, sin [B, dim]; slots [B]; caches [layers, slots, kv_heads, dim]; tables, lens, block_size as
// paged_decode_attention.
void decode_layers(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> tiles,
                   std::vector<torch::Tensor> qkv_bias, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables, torch::Tensor lens,
                   int64_t block_size, int64_t heads, double scale, double eps) {
  const int64_t layers = k_cache.dim() == 4 ? k_cache.size(0) : -1;
  TORCH_CHECK(layers > 0 && v_cache.sizes() == k_cache.sizes(), "caches must be [layers, slots, kv_heads, dim]");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers && static_cast<int64_t>(tiles.size()) == 4 * layers,
              "two norms and four tiled linears per layer");
  TORCH_CHECK(qkv_bias.empty() || static_cast<int64_t>(qkv_bias.size()) == layers, "one q/k/v bias per layer or none");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [B, hidden] tensor");
  const int64_t rows = x.size(0), kv_heads = k_cache.size(2), dim = k_cache.size(3);
  torch::Tensor residual;
  for (int64_t l = 0; l < layers; ++l) {
    const auto bias = qkv_bias.empty() ? c10::optional<torch::Tensor>() : c10::optional<torch::Tensor>(qkv_bias[l]);
    const torch::Tensor kl = k_cache[l], vl = v_cache[l];
    torch::Tensor h = add_rms_norm(x, residual.defined() ? c10::optional<torch::Tensor>(residual) : c10::nullopt,
                                   norms[2 * l], eps);
    const auto qk = rope_qkv(tile_linear(h, tiles[4 * l], bias), cos, sin, heads, kv_heads, slots, kl, vl);
    const torch::Tensor attn = paged_decode_attention(qk[0], kl, vl, tables, lens, block_size, scale);
    h = add_rms_norm(x, tile_linear(attn.view({rows, heads * dim}), tiles[4 * l + 1], c10::nullopt), norms[2 * l + 1], eps);
    const torch::Tensor& gate_up = tiles[4 * l + 2];
    h = gate_up_tiles(gate_up) ? amx_silu_mul(h, gate_up) : silu_mul(tile_linear(h, gate_up, c10::nullopt));
    residual = tile_linear(h, tiles[4 * l + 3], c10::nullopt);
  }
  x += residual;
}

// ---- Greedy sampling: the index of each row's largest value ----

// x [R, V] float32 or bfloat16 -> int64 [R], as torch.max(dim=-1).indices: the first largest value, or the
// first NaN where a row has one. bf16 logits are compared as the float32 values they convert to exactly,
// so greedy sampling needs no float32 copy of them.
template <typename T>
void argmax_impl(const T* xp, int64_t rows, int64_t V, int64_t* op) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * V;
      int64_t v = 0, best = 0;
      float top = static_cast<float>(row[0]);
      bool nan = false;
#if defined(__AVX512F__)
      if (V >= 16) {
        __m512 mx = load16(row);
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i at = idx;
        __mmask16 unordered = _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q);
        for (v = 16; v + 16 <= V; v += 16) {
          at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
          const __m512 x16 = load16(row + v);
          unordered |= _mm512_cmp_ps_mask(x16, x16, _CMP_UNORD_Q);
          const __mmask16 gt = _mm512_cmp_ps_mask(x16, mx, _CMP_GT_OQ);  // strictly: the first stays
          mx = _mm512_mask_mov_ps(mx, gt, x16);
          idx = _mm512_mask_mov_epi32(idx, gt, at);
        }
        nan = unordered != 0;
        top = _mm512_reduce_max_ps(mx);
        const __mmask16 at_top = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(top), _CMP_EQ_OQ);
        best = _mm512_mask_reduce_min_epi32(at_top, idx);
      }
#endif
      for (; v < V; ++v) {
        const float x = static_cast<float>(row[v]);
        nan |= std::isnan(x);
        if (x > top) top = x, best = v;
      }
      if (nan || std::isnan(top)) {
        best = 0;
        while (!std::isnan(static_cast<float>(row[best]))) ++best;
      }
      op[r] = best;
    }
  });
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16),
              "x must be [rows, V > 0] float32 or bfloat16");
  x = x.contiguous();
  auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kLong));
  MICROSERVE_DISPATCH_FLOAT_BF16(x.scalar_type(), "argmax_rows", [&] {
    argmax_impl<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  });
  return out;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel lets go of the GIL, as torch's own ops do: the server's event loop takes requests and
  // sends tokens while a step runs (a prefill step holds the engine thread for ~0.1 s).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, nogil);
  m.def("add_rms_norm", &add_rms_norm, nogil);
  m.def("silu_mul", &silu_mul, nogil);
  m.def("rope_qkv", &rope_qkv, nogil);
  m.def("amx_available", &amx_available, nogil);
  m.def("argmax_rows", &argmax_rows, nogil);
  m.def("decode_layers", &decode_layers, nogil);
  m.def("amx_pack", &amx_pack, py::arg("w"), py::arg("gate_up") = false, nogil);
  m.def("amx_linear", &amx_linear, nogil);
  m.def("amx_pack_q4", &amx_pack_q4, py::arg("q"), py::arg("scale"), py::arg("zero"), py::arg("gate_up") = false,
        nogil);
  m.def("amx_linear_q4", &amx_linear_q4, nogil);
  m.def("amx_silu_mul", &amx_silu_mul, nogil);
  m.def("amx_pack_q8", &amx_pack_q8, nogil);
  m.def("amx_linear_q8", &amx_linear_q8, nogil);
}
