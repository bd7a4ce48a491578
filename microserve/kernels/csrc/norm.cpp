// Residual add + RMSNorm (add_rms_norm), rounded as transformers' eager ops.

#include "vec.h"
#include "ops.h"

namespace microserve {

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

}  // namespace microserve
