// The AMX tile GEMM every weight form shares (bf16 tiles in gemm/linear.cpp, int4 and int8 in
// quant.cpp): tile configuration, the epilogues, and `amx_gemm` over a source of bf16 B tiles.
#pragma once

#include "../ops.h"
#include "../vec.h"

namespace microserve {

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

inline bool amx_permitted() {  // Linux hands out AMX state only on request, once per process
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  return ok;
}

// C tiles 0, 1 (rows 0..15 x blocks 0, 1) and 2, 3 (rows 16..31); A tiles 4, 5; B tiles 6, 7.
inline void configure_tiles(int rows0, int rows1) {
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
inline bool gate_up_tiles(const torch::Tensor& tiles) {
  return tiles.dim() == (tiles.scalar_type() == torch::kByte ? 4 : 6) && tiles.size(1) == 2;
}

// The epilogue for tiles `paired` or not; SiLU(gate) * up only from gate/up tiles (from `packer`).
inline Epilogue epilogue_for(bool paired, bool silu_mul, const char* packer) {
  TORCH_CHECK(!silu_mul || paired, "SiLU(gate) * up needs gate/up tiles (", packer, " with gate_up)");
  return silu_mul ? Epilogue::kSiluMul : paired ? Epilogue::kGateUp : Epilogue::kPlain;
}

// Rows [gate; up] (N % 32 == 0) reordered gate 0..15, up 0..15, gate 16..31, ...: packed in that order,
// each pair of 16-column blocks a thread computes is a gate block and its up block.
inline torch::Tensor pair_gate_up_rows(const torch::Tensor& t) {
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

}  // namespace microserve
