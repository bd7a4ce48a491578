// RoPE on q and k with the K/V cache write (rope_qkv).

#include "vec.h"
#include "ops.h"

namespace microserve {

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

}  // namespace microserve
