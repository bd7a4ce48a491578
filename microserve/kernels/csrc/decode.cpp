// A decode step's whole layer loop in one call (decode_layers), on the other files' kernels.

#include "vec.h"
#include "ops.h"
#include "gemm/amx.h"

namespace microserve {

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

}  // namespace microserve
