// SiLU(gate) * up over a fused gate/up projection's output (silu_mul).

#include "vec.h"
#include "ops.h"

namespace microserve {

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

}  // namespace microserve
