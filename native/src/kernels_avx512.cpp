// AVX-512 tiles for CPUs that have VNNI and VPOPCNTDQ: vpdpbusd adds four u8 x s8 products straight
// into int32 (no int16 step at all), and vpopcntq counts 512 bits per instruction. Same integers,
// same float epilogue as the AVX2 tiles.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "depthwise.h"
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

}  // namespace

namespace ptq::isa {

const Kernels& avx512_kernels() {
  static const Kernels table{nibble_gemm_tiles,          binary_gemm_tiles,  depthwise_accumulate,
                             depthwise_accumulate_float, depthwise_quantized_patches,
                             quantize_row_avx2,          binarize_row_avx2};
  return table;
}

}  // namespace ptq::isa
