// AVX-512 tiles for CPUs that have VNNI and VPOPCNTDQ: vpdpbusd adds four u8 x s8 products straight
// into int32 (no int16 step at all), and vpopcntq counts 512 bits per instruction. Same integers,
// same float epilogue as the AVX2 tiles.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "depthwise.h"
#include "products.h"
#include "isa.h"

namespace {

struct Isa {
  static constexpr int kTileRows = 4;  // 32 registers: 8 sums, 8 float totals, weights, row
  static constexpr int kTileRowsOneGroup = 8;  // 16 sums; the float totals only at the end
  static constexpr int kSingleRowChains = 2;  // with 2 panels: 8 chains, about vpdpbusd's latency over its throughput
  static constexpr int kSingleRowPanels = 2;  // panels a single-row tile spans
  // vpdpbusd adds into int32 directly: the narrow sums are int32 already. High nibbles stay in
  // place (16 x code): a chunk of 1024 quads sums to at most 16 * 15 * 128 * 4096 < 2^31 in size,
  // and its sums, multiples of 16, divide back exactly.
  static constexpr bool kHighInPlace = true;
  template <bool>
  static constexpr int64_t chunk_quads() { return 1024; }
  template <bool>
  static __m256i dot(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_epi32(acc, u8, s8); }
  template <bool>
  static __m256i add_narrow(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }
  template <bool>
  static __m256i widen(__m256i narrow, bool high_in_place) { return high_in_place ? _mm256_srai_epi32(narrow, 4) : narrow; }

  static constexpr int64_t kWords = 8;
  using Bits = __m512i;
  using Counter = __m512i;
  static Bits load(const uint64_t* at) { return _mm512_loadu_si512(at); }
  static Bits broadcast(uint64_t word) { return _mm512_set1_epi64(static_cast<long long>(word)); }
  static void store_lanes(Counter c, int64_t* to) { _mm512_storeu_si512(to, c); }
  static constexpr int kBinaryRows = 8;  // 8 totals, the panel word, a row word and its mask
  static constexpr int kBinarySingleRowPanels = 4;  // a single row: 4 independent counts
  static Counter zero_counter() { return _mm512_setzero_si512(); }
  // Partials are the 64-bit totals themselves: vpopcntq counts each lane directly.
  using Partial = __m512i;
  static constexpr int64_t kPartialWords = int64_t{1} << 40;
  static Partial zero_partial() { return _mm512_setzero_si512(); }
  static Partial count_partial(Partial total, Bits x, Bits w, Bits mask, bool masked) {
    __m512i d = _mm512_xor_si512(x, w);
    if (masked) d = _mm512_and_si512(d, mask);
    return _mm512_add_epi64(total, _mm512_popcnt_epi64(d));
  }
  static Counter widen(Counter total, Partial p) { return _mm512_add_epi64(total, p); }
};

#include "tiles.h"

// ---- nibble GEMM in 512-bit vectors: two panels side by side, the 32 bytes of a quad of panel p in
// the low half of a zmm and of panel p + 1 in the high half. Lane l < 8 then holds channel l (low
// nibbles) or 8 + l (high nibbles) of panel p, lane 8 + l the same channel of panel p + 1: one
// vpdpbusd does the work of two in the 256-bit tiles. High nibbles are shifted down rather than
// left in place, so a group's sums cannot overflow and need no chunks: the registers hold MR x 2
// sums and MR x 2 float totals. Per lane, the same integer sums and the same float steps in the
// same order as nibble_tile: the results are identical.

inline __m512i pair_of(const __m256i low_half, const __m256i high_half) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(low_half), high_half, 1);
}

inline __m512i pair_epi32(const int32_t* first, const int32_t* second) {
  return pair_of(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first)),
                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second)));
}

inline __m512 pair_ps(const float* first, const float* second) {
  // Through the 64-bit-lane forms, which need only AVX-512F (the 32-bit-lane ones need DQ).
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(first))),
                                             _mm256_castps_pd(_mm256_loadu_ps(second)), 1));
}

template <int MR, bool OneGroup>
inline void nibble_pair_tile(const NibbleCtx& c, int64_t m, int64_t panel) {
  const ptq::NibbleWeights& w = *c.w;
  const ptq::QuantRows& x = *c.x;
  const uint8_t* first = w.panels + panel * w.kp * 8;
  const uint8_t* second = first + w.kp * 8;
  const int64_t quads_per_group = w.group / 4;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t groups = OneGroup ? 1 : w.groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) sums[i][0] = sums[i][1] = _mm512_setzero_si512();
    for (int64_t q = g * quads_per_group; q < (g + 1) * quads_per_group; ++q) {
      const __m512i bytes = pair_of(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + q * 32)),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + q * 32)));
      const __m512i low = _mm512_and_si512(bytes, mask);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t quad;
        std::memcpy(&quad, x.q + (m + i) * w.kp + q * 4, sizeof(quad));
        const __m512i xv = _mm512_set1_epi32(quad);
        sums[i][0] = _mm512_dpbusd_epi32(sums[i][0], low, xv);
        sums[i][1] = _mm512_dpbusd_epi32(sums[i][1], high, xv);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int32_t term = c.row_term[g * x.m + m + i];
      const int32_t x_zero = x.zero[m + i];
      const __m512i shared_term =
          _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w.shared_zero) * static_cast<uint32_t>(term)));
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        const int64_t at = ptq::group_index(w.groups, panel * ptq::kPanel, g) + 8 * v;
        const int64_t next = ptq::group_index(w.groups, (panel + 1) * ptq::kPanel, g) + 8 * v;
        __m512i fixed;
        if (w.shared_zero >= 0) {
          fixed = _mm512_sub_epi32(sums[i][v], shared_term);
        } else {
          fixed = _mm512_sub_epi32(sums[i][v],
                                   _mm512_mullo_epi32(pair_epi32(w.zero + at, w.zero + next), _mm512_set1_epi32(term)));
        }
        if (x_zero != 0)
          fixed = _mm512_sub_epi32(
              fixed, _mm512_mullo_epi32(_mm512_set1_epi32(x_zero), pair_epi32(w.colsum + at, w.colsum + next)));
        acc[i][v] = _mm512_add_ps(acc[i][v], _mm512_mul_ps(_mm512_cvtepi32_ps(fixed), pair_ps(w.scale + at, w.scale + next)));
      }
    }
  }
  const int64_t n0 = panel * ptq::kPanel, cols = std::min<int64_t>(2 * ptq::kPanel, w.n - n0);
  alignas(64) float lanes[MR][2 * ptq::kPanel];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 row_scale = _mm512_set1_ps(x.scale[m + i]);
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const __m512 y = _mm512_mul_ps(acc[i][v], row_scale);
      _mm256_store_ps(lanes[i] + 8 * v, _mm512_castps512_ps256(y));
      _mm256_store_ps(lanes[i] + ptq::kPanel + 8 * v, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1)));
    }
    if (c.bias)
      for (int64_t j = 0; j < cols; ++j) lanes[i][j] += c.bias[n0 + j];
  }
  store_tile<MR, 2 * ptq::kPanel>(c.out, m, n0, cols, lanes);
}

// Pairs of panels in tiles of kPairRows rows where both fit; the 256-bit tiles take the rest (a last
// odd panel, the last rows) and lookup-table codes.
constexpr int kPairRows = 4;  // 8 sums, 8 float totals; 6 and 8 rows measured slower (SmolLM2 g128: 97 and 101 ms against 96)

template <bool OneGroup>
inline void nibble_pairs(const NibbleCtx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t p0 = n0 / ptq::kPanel, p1 = (n1 + ptq::kPanel - 1) / ptq::kPanel;
  const int64_t pairs_end = p0 + (p1 - p0) / 2 * 2;
  const int64_t rows_end = m0 + (m1 - m0) / kPairRows * kPairRows;
  for (int64_t panel = p0; panel < pairs_end; panel += 2)
    for (int64_t m = m0; m < rows_end; m += kPairRows) nibble_pair_tile<kPairRows, OneGroup>(c, m, panel);
  if (pairs_end < p1 && rows_end > m0) nibble_range<false, OneGroup>(c, m0, rows_end, pairs_end * ptq::kPanel, n1);
  if (rows_end < m1) nibble_range<false, OneGroup>(c, rows_end, m1, n0, n1);
}

inline void nibble_gemm_pairs(const ptq::QuantRows& x, const ptq::NibbleWeights& w, const int32_t* row_term,
                              const float* bias, ptq::OutputView out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (w.lut) {
    nibble_gemm_tiles(x, w, row_term, bias, out, m0, m1, n0, n1);
    return;
  }
  const NibbleCtx c{&x, &w, row_term, bias, out, _mm256_setzero_si256()};
  w.groups == 1 ? nibble_pairs<true>(c, m0, m1, n0, n1) : nibble_pairs<false>(c, m0, m1, n0, n1);
}

}  // namespace

namespace ptq::isa {

const Kernels& avx512_kernels() {
  static const Kernels table{nibble_gemm_pairs,          binary_gemm_tiles,  depthwise_accumulate,
                             depthwise_accumulate_float, depthwise_quantized_patches,
                             quantize_row_avx2,          binarize_row_avx2,  dot_rows_i16};
  return table;
}

}  // namespace ptq::isa
