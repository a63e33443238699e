// AVX2 tiles: bytes multiplied with vpmaddubsw (u8 x s8 pairs into int16; decoded codes <= 128,
// q >= -128 and q <= 127 keep every pair sum inside int16, so nothing saturates), bits counted with
// a nibble lookup table.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "depthwise.h"
#include "products.h"
#include "isa.h"

namespace {

struct Isa {
  static constexpr int kTileRows = 2;  // 16 registers: 4 sums, 4 float totals, weights, row
  static constexpr int kTileRowsOneGroup = 3;  // 6 narrow and 6 wide sums, codes, a row: all 16 registers
  static constexpr int kSingleRowChains = 2;  // two loads in flight
  static constexpr int kSingleRowPanels = 1;  // panels a single-row tile spans
  // Narrow sums are int16 pairs from vpmaddubsw. Int4 codes are <= 15, so a pair is at most
  // 2 * 15 * 128 = 3840 in size and 8 quads of them (30720) still fit in int16. Codes through a
  // lookup table reach 128 (a pair up to 32768 in size): their pairs are widened to int32 at once,
  // and the int32 narrow sums hold 1024 quads (at most 4 * 128 * 128 * 1024 = 2^26 in size).
  static constexpr bool kHighInPlace = false;  // 16 x code would overflow the int16 pairs
  template <bool Lut>
  static constexpr int64_t chunk_quads() { return Lut ? 1024 : 8; }
  template <bool Lut>
  static __m256i dot(__m256i narrow, __m256i u8, __m256i s8) {
    const __m256i pairs = _mm256_maddubs_epi16(u8, s8);
    if (Lut) return _mm256_add_epi32(narrow, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    return _mm256_add_epi16(narrow, pairs);
  }
  template <bool Lut>
  static __m256i add_narrow(__m256i a, __m256i b) { return Lut ? _mm256_add_epi32(a, b) : _mm256_add_epi16(a, b); }
  template <bool Lut>
  static __m256i widen(__m256i narrow, bool) { return Lut ? narrow : _mm256_madd_epi16(narrow, _mm256_set1_epi16(1)); }

  static constexpr int64_t kWords = 4;
  using Bits = __m256i;
  using Counter = __m256i;  // four 64-bit totals
  static Bits load(const uint64_t* at) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)); }
  static Bits broadcast(uint64_t word) { return _mm256_set1_epi64x(static_cast<long long>(word)); }
  static void store_lanes(Counter c, int64_t* to) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), c); }
  static constexpr int kBinaryRows = 2;  // 4 totals and 4 partials (two each per row), 2 panel vectors, row word, mask, 2 constants
  static constexpr int kBinarySingleRowPanels = 2;  // a single row: 4 independent partials
  static Counter zero_counter() { return _mm256_setzero_si256(); }
  // Partials are per-byte counts from a nibble lookup table: each word adds at most 8 to a byte,
  // so 31 words fit before the bytes are summed into the 64-bit lanes.
  using Partial = __m256i;
  static constexpr int64_t kPartialWords = 31;
  static Partial zero_partial() { return _mm256_setzero_si256(); }
  static Partial count_partial(Partial bytes, Bits x, Bits w, Bits mask, bool masked) {
    __m256i d = _mm256_xor_si256(x, w);
    if (masked) d = _mm256_and_si256(d, mask);
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low_mask = _mm256_set1_epi8(0x0F);
    const __m256i counts = _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(d, low_mask)),
                                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(d, 4), low_mask)));
    return _mm256_add_epi8(bytes, counts);
  }
  static Counter widen(Counter total, Partial bytes) {
    return _mm256_add_epi64(total, _mm256_sad_epu8(bytes, _mm256_setzero_si256()));
  }
};

#include "tiles.h"

}  // namespace

namespace ptq::isa {

const Kernels& avx2_kernels() {
  static const Kernels table{nibble_gemm_tiles,          binary_gemm_tiles,  depthwise_accumulate,
                             depthwise_accumulate_float, depthwise_quantized_patches,
                             quantize_row_avx2,          binarize_row_avx2,  dot_rows_i16};
  return table;
}

void quantize_row_avx2(const float* x, int64_t k, int64_t kp, int8_t* q, float* scale) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (i = 0; i + 8 <= k; i += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(words, words));
  }
  for (; i < k; ++i) q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / s))));
  std::fill(q + k, q + kp, int8_t{0});
  *scale = s;
}

void binarize_row_avx2(const float* x, const uint8_t* valid, int64_t k, int64_t words, uint64_t* bits,
                       uint64_t* valid_bits, int32_t* count, float* scale) {
  std::fill(bits, bits + words, uint64_t{0});
  if (valid_bits) std::fill(valid_bits, valid_bits + words, uint64_t{0});
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 sums = _mm256_setzero_ps();
  int32_t real = 0;
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    __m256 keep = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    if (valid) {
      const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(valid + i)));
      keep = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_cmpeq_epi32(flags, _mm256_setzero_si256()), _mm256_set1_epi32(-1)));
    }
    const uint64_t negative = static_cast<uint64_t>(_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), keep)));
    const uint64_t kept = static_cast<uint64_t>(_mm256_movemask_ps(keep));
    bits[i / 64] |= negative << (i % 64);
    if (valid_bits) valid_bits[i / 64] |= kept << (i % 64);
    real += __builtin_popcount(static_cast<unsigned>(kept));
    sums = _mm256_add_ps(sums, _mm256_and_ps(_mm256_and_ps(v, magnitude), keep));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  for (; i < k; ++i) {
    if (valid && !valid[i]) continue;
    if (x[i] < 0.0f) bits[i / 64] |= uint64_t{1} << (i % 64);
    if (valid_bits) valid_bits[i / 64] |= uint64_t{1} << (i % 64);
    lanes[i % 8] += std::fabs(x[i]);
    ++real;
  }
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  *count = real;
  *scale = real > 0 ? total / static_cast<float>(real) : 0.0f;
}

}  // namespace ptq::isa
