// The AMX GEMM straight from GGUF's int4 and int8 groups, dequantized tile by tile in registers.

#include "vec.h"
#include "ops.h"
#include "gemm/amx.h"

namespace microserve {

// ---- The same GEMM on 4-bit weights (GGUF's Q4_0/Q4_1 groups of 32 along K) ----
//
// A B tile (32 K x 16 columns) is one group of each of its 16 columns: packed as 384 bytes, its 512
// values q in 0..15 as nibbles (256 bytes, laid out so each half row of the tile is one shift away from
// a vector of indices, see amx_pack_q4), then the 16 columns' scales and their 16 zeros as float32.
// Dequantized as the GEMM reaches it: w = (q - 8) * scale + zero in float32 (one FMA: the product is
// exact), rounded to bf16 -- the dense weights dequantized at load, so results equal amx_linear's on
// those to the bit, at 3/8 of the bytes read. The dequantization, not the tile products, is most of a
// decode step's GEMM time: on the 2-core Xeon the AMX unit does not overlap with it (~1 KiB of stores a
// tile), so it is kept to 7 vector instructions a tile row (a table lookup for q - 8 instead of integer
// unpacking and a subtraction: ~95 -> ~67 cycles a tile).

constexpr int64_t kQ4TileBytes = 384;

// q [N, K] uint8 (0..15), scale and zero [N, K/32] float32 -> [N/16, K/32, 384] uint8; with `gate_up`
// (N % 32 == 0, the rows [gate; up]), paired as amx_pack's: [N/32, 2, K/32, 384].
torch::Tensor amx_pack_q4(torch::Tensor q, torch::Tensor scale, torch::Tensor zero, bool gate_up) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kByte, "q must be a [N, K] uint8 matrix");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "AMX tiles need N % 16 == 0 and K % 32 == 0, not ", N, " x ", K);
  TORCH_CHECK(scale.sizes() == zero.sizes() && scale.dim() == 2 && scale.size(0) == N && scale.size(1) == K / 32 &&
                  scale.scalar_type() == torch::kFloat && zero.scalar_type() == torch::kFloat,
              "scale and zero must be [N, K/32] float32");
  TORCH_CHECK(!gate_up || N % 32 == 0, "paired gate/up tiles need N % 32 == 0, not ", N);
  auto pairs = [&](const torch::Tensor& t) { return gate_up ? pair_gate_up_rows(t) : t.contiguous(); };
  q = pairs(q);
  scale = pairs(scale);
  zero = pairs(zero);
  TORCH_CHECK(q.numel() == 0 || q.max().item<int64_t>() < 16, "q values must lie in 0..15");
  const int64_t NB = N / 16, KB = K / 32;
  auto out = torch::empty({NB, KB, kQ4TileBytes}, q.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, NB * KB, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / KB, kb = t % KB;
      uint8_t* tile = op + t * kQ4TileBytes;
      // Tile row r, value e: column 16 nb + e / 2, K index 32 kb + 2 r + e % 2. Rows 4g..4g + 3 fill 64
      // bytes as 16 little-endian 32-bit words; word i holds, in nibble t, value 16 (t % 2) + i of row
      // 4g + t / 2, so shifting the words right by 4t puts that half row's values in their low nibbles.
      auto value = [&](int64_t r, int64_t e) { return qp[(nb * 16 + e / 2) * K + kb * 32 + 2 * r + e % 2]; };
      for (int64_t g = 0; g < 4; ++g)
        for (int64_t i = 0; i < 16; ++i) {
          uint32_t word = 0;
          for (int64_t t = 0; t < 8; ++t) word |= static_cast<uint32_t>(value(4 * g + t / 2, 16 * (t % 2) + i)) << (4 * t);
          std::memcpy(tile + 64 * g + 4 * i, &word, 4);
        }
      float* sz = reinterpret_cast<float*>(tile + 256);
      for (int64_t n = 0; n < 16; ++n) {
        sz[n] = sp[(nb * 16 + n) * KB + kb];
        sz[16 + n] = zp[(nb * 16 + n) * KB + kb];
      }
    }
  });
  return gate_up ? out.view({N / 32, 2, KB, kQ4TileBytes}) : out;
}

#if defined(MICROSERVE_AMX)
// One packed tile -> a bf16 B tile (1 KiB) at dst. Each half row's 16 values index a table of q - 8
// (vpermps reads only an index's low 4 bits), then one FMA each: w = (q - 8) * scale + zero.
inline void dequantize_q4_tile(const uint8_t* src, at::BFloat16* dst) {
  const __m512i lo_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
  const __m512 q_minus_8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const float* sz = reinterpret_cast<const float*>(src + 256);
  const __m512 s = _mm512_loadu_ps(sz), z = _mm512_loadu_ps(sz + 16);
  const __m512 s_lo = _mm512_permutexvar_ps(lo_cols, s), s_hi = _mm512_permutexvar_ps(hi_cols, s);
  const __m512 z_lo = _mm512_permutexvar_ps(lo_cols, z), z_hi = _mm512_permutexvar_ps(hi_cols, z);
  for (int g = 0; g < 4; ++g) {
    const __m512i words = _mm512_loadu_si512(src + 64 * g);
    for (int r = 0; r < 4; ++r) {
      const __m512i lo = _mm512_srli_epi32(words, 8 * r), hi = _mm512_srli_epi32(words, 8 * r + 4);
      const __m512 w_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo, q_minus_8), s_lo, z_lo);
      const __m512 w_hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi, q_minus_8), s_hi, z_hi);
      _mm512_storeu_si512(dst + 32 * (4 * g + r), (__m512i)_mm512_cvtne2ps_pbh(w_hi, w_lo));
    }
  }
}
#endif

// The GEMM on weights packed as `tile_bytes`-byte quantized tiles, one per bf16 B tile (blocks in the
// order amx_gemm reads them): `dequantize(src, dst)` turns one into the bf16 tile at dst.
template <typename Dequantize>
torch::Tensor amx_linear_quantized(const torch::Tensor& x, const torch::Tensor& packed,
                                   const c10::optional<torch::Tensor>& bias, Epilogue epilogue, int64_t NB,
                                   int64_t KB, int64_t tile_bytes, const Dequantize& dequantize) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  auto src = [&](int64_t p, int64_t kb, int j) { return wp + ((2 * p + j) * KB + kb) * tile_bytes; };
  // Up to 32 rows: each tile dequantized as its turn comes, into a ring of 4 (two K steps of the pair).
  // More rows: the pair's tiles dequantized once, then every 32 rows against them.
  const bool ring = M <= 32;
  auto prepare = [&](int64_t p, at::BFloat16* scratch) {
    if (ring) return;
    for (int j = 0; j < (2 * p + 1 < NB ? 2 : 1); ++j)
      for (int64_t kb = 0; kb < KB; ++kb) dequantize(src(p, kb, j), scratch + (j * KB + kb) * 512);
  };
  auto tile = [&](int64_t p, int64_t kb, int j, at::BFloat16* scratch) -> const at::BFloat16* {
    if (!ring) return scratch + (j * KB + kb) * 512;
    // One K step ahead: a tile is loaded a step after its stores, never waiting for them to reach L1.
    auto slot = [&](int64_t k) { return scratch + ((k & 1) * 2 + j) * 512; };
    if (kb == 0) dequantize(src(p, 0, j), slot(0));
    if (kb + 1 < KB) dequantize(src(p, kb + 1, j), slot(kb + 1));
    return slot(kb);
  };
  return amx_gemm(x, bias, NB, KB, epilogue, ring ? 4 * 512 : 2 * KB * 512, prepare, tile);
}

torch::Tensor amx_linear_q4_impl(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                                 bool silu_mul) {
  const bool paired = gate_up_tiles(packed);
  TORCH_CHECK((packed.dim() == 3 || paired) && packed.size(-1) == kQ4TileBytes &&
                  packed.scalar_type() == torch::kByte && packed.is_contiguous(),
              "packed weights must come from amx_pack_q4");
  const Epilogue epilogue = epilogue_for(paired, silu_mul, "amx_pack_q4");
  const int64_t NB = paired ? 2 * packed.size(0) : packed.size(0), KB = packed.size(-2);
  return amx_linear_quantized(x, packed, bias, epilogue, NB, KB, kQ4TileBytes,
                              [](const uint8_t* src, at::BFloat16* dst) {
#if defined(MICROSERVE_AMX)
                                dequantize_q4_tile(src, dst);
#endif
                              });
}

// x [M, K] bf16, packed from amx_pack_q4, bias [N] bf16 or None -> y [M, N] bf16.
torch::Tensor amx_linear_q4(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  return amx_linear_q4_impl(x, packed, bias, false);
}

// x [M, K] bf16, gate/up tiles from amx_pack or amx_pack_q4 with gate_up -> SiLU(x @ Wg.T) * (x @ Wu.T)
// [M, N/2] bf16, equal to silu_mul(amx_linear(x, packed)) to the bit.
torch::Tensor amx_silu_mul(torch::Tensor x, torch::Tensor packed) {
  if (packed.scalar_type() == torch::kByte) return amx_linear_q4_impl(x, packed, c10::nullopt, true);
  return amx_linear_bf16(x, packed, c10::nullopt, true);
}

// ---- The same GEMM on 8-bit weights (GGUF's Q8_0: w = q * scale, groups of 32 along K) ----
//
// A tile is 512 bytes of q in -128..127 laid out as the bf16 B tile's values (row r: the K pair 2r, 2r+1
// of each of the 16 columns), then the 16 columns' scales as float32: 576 bytes for the tile's 1 KiB.
// q * scale is exact in float32 (8 by 11 significant bits for GGUF's fp16 scales), rounded to bf16 as the
// dense weights were at load, so results equal amx_linear's on those to the bit. The bundled model's tied
// embedding is Q8_0: its LM head so reads 30 MB a step instead of 57.

constexpr int64_t kQ8TileBytes = 576;

// q [N, K] int8, scale [N, K/32] float32 -> [N/16, K/32, 576] uint8.
torch::Tensor amx_pack_q8(torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar, "q must be a [N, K] int8 matrix");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "AMX tiles need N % 16 == 0 and K % 32 == 0, not ", N, " x ", K);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == K / 32 && scale.scalar_type() == torch::kFloat,
              "scale must be [N, K/32] float32");
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t NB = N / 16, KB = K / 32;
  auto out = torch::empty({NB, KB, kQ8TileBytes}, q.options().dtype(torch::kByte));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, NB * KB, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / KB, kb = t % KB;
      uint8_t* tile = op + t * kQ8TileBytes;
      // Tile row r, value e: column 16 nb + e / 2, K index 32 kb + 2 r + e % 2.
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t e = 0; e < 32; ++e)
          tile[r * 32 + e] = static_cast<uint8_t>(qp[(nb * 16 + e / 2) * K + kb * 32 + 2 * r + e % 2]);
      float* sc = reinterpret_cast<float*>(tile + 512);
      for (int64_t n = 0; n < 16; ++n) sc[n] = sp[(nb * 16 + n) * KB + kb];
    }
  });
  return out;
}

#if defined(MICROSERVE_AMX)
inline void dequantize_q8_tile(const uint8_t* src, at::BFloat16* dst) {
  const __m512i lo_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
  const __m512 s = _mm512_loadu_ps(reinterpret_cast<const float*>(src + 512));
  const __m512 s_lo = _mm512_permutexvar_ps(lo_cols, s), s_hi = _mm512_permutexvar_ps(hi_cols, s);
  for (int r = 0; r < 16; ++r) {
    const __m128i* row = reinterpret_cast<const __m128i*>(src + 32 * r);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(row + 1)));
    _mm512_storeu_si512(dst + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s_hi), _mm512_mul_ps(lo, s_lo)));
  }
}
#endif

// x [M, K] bf16, packed from amx_pack_q8, bias [N] bf16 or None -> y [M, N] bf16.
torch::Tensor amx_linear_q8(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kQ8TileBytes && packed.scalar_type() == torch::kByte &&
                  packed.is_contiguous(),
              "packed weights must come from amx_pack_q8");
  return amx_linear_quantized(x, packed, bias, Epilogue::kPlain, packed.size(0), packed.size(1), kQ8TileBytes,
                              [](const uint8_t* src, at::BFloat16* dst) {
#if defined(MICROSERVE_AMX)
                                dequantize_q8_tile(src, dst);
#endif
                              });
}

}  // namespace microserve
