// Integer GEMM kernels: an AVX2 path chosen at run time and a portable scalar path with the same
// arithmetic, so results are bit-identical whichever runs.
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ptq {

void serial_for(size_t count, const std::function<void(size_t)>& task) {
  for (size_t i = 0; i < count; ++i) task(i);
}

namespace {

bool has_avx2() {
  static const bool value = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return value;
}

// Output tiles handed to threads: rows x columns. Sized so a tile's packed weights stay in L2.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 32;

template <typename Body>
void for_each_tile(int64_t m, int64_t n, const ParallelFor& parallel, Body body) {
  const int64_t row_tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (n + kTileCols - 1) / kTileCols;
  parallel(static_cast<size_t>(row_tiles * col_tiles), [&](size_t task) {
    const int64_t rt = static_cast<int64_t>(task) / col_tiles;
    const int64_t ct = static_cast<int64_t>(task) % col_tiles;
    const int64_t m0 = rt * kTileRows, n0 = ct * kTileCols;
    body(m0, std::min(m, m0 + kTileRows), n0, std::min(n, n0 + kTileCols));
  });
}

inline uint8_t decode(const NibbleWeights& w, uint8_t code) { return w.lut ? w.lut[code] : code; }

inline uint8_t code_at(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[(k / kNibbleBlock) * (kNibbleBlock / 2) + (k % (kNibbleBlock / 2))];
  return (k % kNibbleBlock) < kNibbleBlock / 2 ? (byte & 0x0F) : (byte >> 4);
}

// Exact integer sum over group g of (q - x_zero) * (decoded - w_zero), from the raw sum of q * decoded.
inline int32_t corrected(int32_t raw, const QuantRows& x, const NibbleWeights& w, int64_t m, int64_t n, int64_t g) {
  const int32_t xz = x.zero[m];
  const int32_t wz = w.zero[n * w.groups + g];
  return raw - wz * x.rowsum[m * w.groups + g] - xz * w.colsum[n * w.groups + g] +
         static_cast<int32_t>(w.group) * xz * wz;
}

inline void store(OutputView out, int64_t m, int64_t n, float value) {
  out.y[m * out.row_stride + n * out.col_stride] = value;
}

inline float finish(float acc, float x_scale, const float* bias, int64_t n) {
  const float scaled = acc * x_scale;
  return bias ? scaled + bias[n] : scaled;
}

void gemm_nibble_scalar(const QuantRows& x, const NibbleWeights& w, const float* bias, OutputView out,
                        int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t row_bytes = w.kp / 2;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = x.q + m * w.kp;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w.packed + n * row_bytes;
      float acc = 0.0f;
      for (int64_t g = 0; g < w.groups; ++g) {
        int32_t raw = 0;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) raw += int32_t(xr[k]) * decode(w, code_at(wr, k));
        acc += static_cast<float>(corrected(raw, x, w, m, n, g)) * w.scale[n * w.groups + g];
      }
      store(out, m, n, finish(acc, x.scale[m], bias, n));
    }
  }
}

__attribute__((target("avx2"))) inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// 32 decoded codes of one block, in k order.
template <bool Lut>
__attribute__((target("avx2"))) inline __m256i unpack_block(const uint8_t* block, __m256i lut) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  const __m256i codes = _mm256_set_m128i(hi, lo);
  return Lut ? _mm256_shuffle_epi8(lut, codes) : codes;
}

// MR rows x NR columns of output; weights decoded once per block and reused across the rows.
template <int MR, int NR, bool Lut>
__attribute__((target("avx2"))) void nibble_micro(const QuantRows& x, const NibbleWeights& w, const float* bias,
                                                  OutputView out, int64_t m, int64_t n, __m256i lut) {
  const int64_t row_bytes = w.kp / 2;
  const int64_t blocks_per_group = w.group / kNibbleBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  float acc[MR][NR] = {};
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i sums[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) sums[i][j] = _mm256_setzero_si256();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m256i wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = unpack_block<Lut>(w.packed + (n + j) * row_bytes + b * 16, lut);
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (m + i) * w.kp + b * kNibbleBlock));
        for (int j = 0; j < NR; ++j) {
          // u8 x s8 pairs: |code| <= 128 and |q| <= 128 keep each pair sum within int16.
          const __m256i pairs = _mm256_maddubs_epi16(wv[j], xv);
          sums[i][j] = _mm256_add_epi32(sums[i][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        acc[i][j] += static_cast<float>(corrected(hsum(sums[i][j]), x, w, m + i, n + j, g)) *
                     w.scale[(n + j) * w.groups + g];
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) store(out, m + i, n + j, finish(acc[i][j], x.scale[m + i], bias, n + j));
}

template <bool Lut>
__attribute__((target("avx2"))) void gemm_nibble_avx2(const QuantRows& x, const NibbleWeights& w, const float* bias,
                                                      OutputView out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  alignas(32) uint8_t table[32] = {};
  if (Lut) {
    std::memcpy(table, w.lut, 16);
    std::memcpy(table + 16, w.lut, 16);
  }
  const __m256i lut = _mm256_load_si256(reinterpret_cast<const __m256i*>(table));
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) nibble_micro<4, 2, Lut>(x, w, bias, out, m, n, lut);
    for (; m < m1; ++m) nibble_micro<1, 2, Lut>(x, w, bias, out, m, n, lut);
  }
  for (; n < n1; ++n) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) nibble_micro<4, 1, Lut>(x, w, bias, out, m, n, lut);
    for (; m < m1; ++m) nibble_micro<1, 1, Lut>(x, w, bias, out, m, n, lut);
  }
}

// ---- binary ----

inline int32_t binary_dot_scalar(const uint64_t* a, const uint64_t* b, const uint64_t* valid, int64_t words) {
  int32_t differ = 0;
  for (int64_t i = 0; i < words; ++i) {
    const uint64_t x = a[i] ^ b[i];
    differ += __builtin_popcountll(valid ? (x & valid[i]) : x);
  }
  return differ;
}

// Per-byte popcount of 256 bits (nibble lookup table), summed into four 64-bit lanes.
__attribute__((target("avx2"))) inline __m256i popcount_bytes(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low_mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low_mask));
  const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low_mask));
  return _mm256_add_epi8(lo, hi);
}

__attribute__((target("avx2"))) inline int32_t hsum64(__m256i v) {
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return static_cast<int32_t>(_mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1));
}

// One row of activations against NR weight rows: the activation words are loaded once.
template <int NR, bool Masked>
__attribute__((target("avx2,popcnt"))) void binary_row(const BinaryRows& x, const BinaryWeights& w, int64_t m,
                                                       int64_t n, int32_t* differ) {
  const uint64_t* xr = x.bits + m * w.words;
  const uint64_t* vr = Masked ? x.valid + m * w.words : nullptr;
  __m256i totals[NR];
  for (int j = 0; j < NR; ++j) totals[j] = _mm256_setzero_si256();
  int64_t i = 0;
  // Byte counters hold at most 8 per chunk: flush them before they can pass 255.
  constexpr int64_t kChunksPerFlush = 31;
  while (i + 4 <= w.words) {
    __m256i bytes[NR];
    for (int j = 0; j < NR; ++j) bytes[j] = _mm256_setzero_si256();
    for (int64_t c = 0; c < kChunksPerFlush && i + 4 <= w.words; ++c, i += 4) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + i));
      const __m256i mask = Masked ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + i)) : _mm256_setzero_si256();
      for (int j = 0; j < NR; ++j) {
        __m256i d = _mm256_xor_si256(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.bits + (n + j) * w.words + i)));
        if (Masked) d = _mm256_and_si256(d, mask);
        bytes[j] = _mm256_add_epi8(bytes[j], popcount_bytes(d));
      }
    }
    for (int j = 0; j < NR; ++j) totals[j] = _mm256_add_epi64(totals[j], _mm256_sad_epu8(bytes[j], _mm256_setzero_si256()));
  }
  for (int j = 0; j < NR; ++j) {
    differ[j] = hsum64(totals[j]);
    for (int64_t t = i; t < w.words; ++t) {
      const uint64_t d = xr[t] ^ w.bits[(n + j) * w.words + t];
      differ[j] += static_cast<int32_t>(_mm_popcnt_u64(Masked ? (d & vr[t]) : d));
    }
  }
}

inline float binary_value(int32_t count, int32_t differ, float x_scale, float w_scale, const float* bias, int64_t n) {
  const float y = (static_cast<float>(count - 2 * differ) * x_scale) * w_scale;
  return bias ? y + bias[n] : y;
}

template <bool Masked>
__attribute__((target("avx2,popcnt"))) void gemm_binary_avx2(const BinaryRows& x, const BinaryWeights& w,
                                                              const float* bias, OutputView out, int64_t m0, int64_t m1,
                                                              int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    int64_t n = n0;
    int32_t differ[4];
    for (; n + 4 <= n1; n += 4) {
      binary_row<4, Masked>(x, w, m, n, differ);
      for (int j = 0; j < 4; ++j)
        store(out, m, n + j, binary_value(x.count[m], differ[j], x.scale[m], w.scale[n + j], bias, n + j));
    }
    for (; n < n1; ++n) {
      binary_row<1, Masked>(x, w, m, n, differ);
      store(out, m, n, binary_value(x.count[m], differ[0], x.scale[m], w.scale[n], bias, n));
    }
  }
}

}  // namespace

void nibble_colsums(const uint8_t* packed, int64_t n, int64_t kp, int64_t group, const uint8_t* lut,
                    int32_t* colsum) {
  const int64_t groups = kp / group;
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = packed + r * (kp / 2);
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const uint8_t code = code_at(row, k);
        sum += lut ? lut[code] : code;
      }
      colsum[r * groups + g] = sum;
    }
  }
}

void quant_rowsums(const int8_t* q, int64_t m, int64_t kp, int64_t group, int32_t* rowsum) {
  const int64_t groups = kp / group;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += q[r * kp + k];
      rowsum[r * groups + g] = sum;
    }
}

void gemm_nibble(const QuantRows& x, const NibbleWeights& w, const float* bias, OutputView out,
                 const ParallelFor& parallel) {
  const bool avx2 = has_avx2();
  for_each_tile(x.m, w.n, parallel, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (!avx2)
      gemm_nibble_scalar(x, w, bias, out, m0, m1, n0, n1);
    else if (w.lut)
      gemm_nibble_avx2<true>(x, w, bias, out, m0, m1, n0, n1);
    else
      gemm_nibble_avx2<false>(x, w, bias, out, m0, m1, n0, n1);
  });
}

void quantize_rows_symmetric(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* scale,
                             int32_t* zero) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    int8_t* qr = q + r * kp;
    for (int64_t i = 0; i < k; ++i) {
      const float v = std::nearbyint(xr[i] / s);
      qr[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
    }
    std::fill(qr + k, qr + kp, int8_t{0});
    scale[r] = s;
    zero[r] = 0;
  }
}

void gemm_binary(const BinaryRows& x, const BinaryWeights& w, const float* bias, OutputView out,
                 const ParallelFor& parallel) {
  const bool avx2 = has_avx2();
  for_each_tile(x.m, w.n, parallel, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (avx2 && x.valid)
      gemm_binary_avx2<true>(x, w, bias, out, m0, m1, n0, n1);
    else if (avx2)
      gemm_binary_avx2<false>(x, w, bias, out, m0, m1, n0, n1);
    else
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          const int32_t differ = binary_dot_scalar(x.bits + m * w.words, w.bits + n * w.words,
                                                   x.valid ? x.valid + m * w.words : nullptr, w.words);
          store(out, m, n, binary_value(x.count[m], differ, x.scale[m], w.scale[n], bias, n));
        }
  });
}

void binarize_rows(const float* x, const uint8_t* valid, int64_t m, int64_t k, int64_t words, uint64_t* bits,
                   uint64_t* valid_bits, int32_t* count, float* scale) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    uint64_t* br = bits + r * words;
    uint64_t* vr = valid_bits ? valid_bits + r * words : nullptr;
    std::fill(br, br + words, uint64_t{0});
    if (vr) std::fill(vr, vr + words, uint64_t{0});
    float total = 0.0f;
    int32_t real = 0;
    for (int64_t i = 0; i < k; ++i) {
      const bool is_real = valid == nullptr || valid[r * k + i];
      if (!is_real) continue;
      const uint64_t bit = uint64_t{1} << (i % kBinaryWord);
      if (xr[i] < 0.0f) br[i / kBinaryWord] |= bit;
      if (vr) vr[i / kBinaryWord] |= bit;
      total += std::fabs(xr[i]);
      ++real;
    }
    count[r] = real;
    scale[r] = real > 0 ? total / static_cast<float>(real) : 0.0f;
  }
}

template <typename T>
void im2col(const T* image, const ConvShape& s, int64_t c0, int64_t cg, int64_t ld, T pad_value, T* rows,
            uint8_t* valid) {
  const int64_t oh = s.out_h(), ow = s.out_w();
  const int64_t k = cg * s.kernel_h * s.kernel_w;
  for (int64_t y = 0; y < oh; ++y)
    for (int64_t x = 0; x < ow; ++x) {
      const int64_t row = y * ow + x;
      T* out = rows + row * ld;
      uint8_t* out_valid = valid ? valid + row * k : nullptr;
      int64_t col = 0;
      for (int64_t c = c0; c < c0 + cg; ++c)
        for (int64_t i = 0; i < s.kernel_h; ++i) {
          const int64_t iy = y * s.stride_h - s.pad_top + i * s.dilation_h;
          for (int64_t j = 0; j < s.kernel_w; ++j, ++col) {
            const int64_t ix = x * s.stride_w - s.pad_left + j * s.dilation_w;
            const bool inside = iy >= 0 && iy < s.height && ix >= 0 && ix < s.width;
            out[col] = inside ? image[(c * s.height + iy) * s.width + ix] : pad_value;
            if (out_valid) out_valid[col] = inside ? 1 : 0;
          }
        }
      std::fill(out + k, out + ld, pad_value);
    }
}

template void im2col<float>(const float*, const ConvShape&, int64_t, int64_t, int64_t, float, float*, uint8_t*);
template void im2col<int8_t>(const int8_t*, const ConvShape&, int64_t, int64_t, int64_t, int8_t, int8_t*, uint8_t*);

}  // namespace ptq
