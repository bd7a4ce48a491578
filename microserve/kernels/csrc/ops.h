// The kernels each op family's file defines, for the files that call across families (decode.cpp,
// quant.cpp) and for bindings.cpp. ops.py types the same functions for Python: keep the three in step.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace microserve {

// attention.cpp
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, int64_t block_size,
                                     double scale);
// norm.cpp
torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps);
// activation.cpp
torch::Tensor silu_mul(torch::Tensor gate_up);
// rope.cpp
std::vector<torch::Tensor> rope_qkv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                                    int64_t kv_heads, torch::Tensor slots, torch::Tensor k_cache,
                                    torch::Tensor v_cache);
// gemm/amx.h
bool amx_available();
// gemm/linear.cpp
torch::Tensor amx_pack(torch::Tensor w, bool gate_up);
torch::Tensor amx_linear_bf16(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                              bool silu_mul);
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias);
// quant.cpp
torch::Tensor amx_pack_q4(torch::Tensor q, torch::Tensor scale, torch::Tensor zero, bool gate_up);
torch::Tensor amx_linear_q4(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias);
torch::Tensor amx_silu_mul(torch::Tensor x, torch::Tensor packed);
torch::Tensor amx_pack_q8(torch::Tensor q, torch::Tensor scale);
torch::Tensor amx_linear_q8(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias);
// decode.cpp
void decode_layers(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> tiles,
                   std::vector<torch::Tensor> qkv_bias, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables, torch::Tensor lens,
                   int64_t block_size, int64_t heads, double scale, double eps);
// sampling.cpp
torch::Tensor argmax_rows(torch::Tensor x);

}  // namespace microserve
