// Greedy sampling's argmax (argmax_rows).

#include "vec.h"
#include "ops.h"

namespace microserve {

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

}  // namespace microserve
