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
// One file per op family under csrc/ (vec.h: the shared vector helpers), bound here as one
// extension, built by microserve/kernels/__init__.py (at setup, or at first use).

#include "ops.h"

using namespace microserve;

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

