// Decode attention over the paged K/V storage (paged_decode_attention).

#include "vec.h"
#include "ops.h"

namespace microserve {

#if defined(__AVX512F__)
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

}  // namespace microserve
