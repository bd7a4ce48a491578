// bf16 x @ W.T on AMX tiles from weights packed once (amx_pack, amx_linear).

#include "../vec.h"
#include "../ops.h"
#include "amx.h"

namespace microserve {

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

}  // namespace microserve
