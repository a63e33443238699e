// SIMD tile kernels, compiled once per instruction set: a translation unit defines `Isa` (how
// bytes are multiplied into int32 sums, how bits are counted) and then includes this header inside
// an anonymous namespace, so each copy has internal linkage and its own target flags.
//
// Nibble tiles hold MR rows x NR columns of int32 sums in 256-bit vectors (one per output, 8
// lanes over k). Tiles of 8 outputs reduce all 8 sums with one hadd tree and apply zero points,
// scales and the float accumulation to the 8 outputs as one vector: the same IEEE operations, in
// the same order, as the scalar path, so results stay bit-identical.

inline __m256i unpack_codes(const uint8_t* block) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low_mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  return _mm256_set_m128i(hi, lo);
}

template <bool Lut>
inline __m256i decoded_block(const uint8_t* block, __m256i lut) {
  const __m256i codes = unpack_codes(block);
  return Lut ? _mm256_shuffle_epi8(lut, codes) : codes;
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// Eight vectors of partial sums -> one vector of their eight totals, in order.
inline __m256i reduce8(const __m256i* s) {
  const __m256i ab = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
  const __m256i cd = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

// Per-lane values of a tile of 8 outputs, lane = i * NR + j: a column quantity (one per j) and a
// row quantity (one per i). Column arrays are group-major [G, N], row arrays [G, M] or [M].
template <int MR, int NR>
inline __m256i lane_cols(const int32_t* at) {
  if constexpr (NR == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  static_assert(NR == 2 || NR == 8, "8-output tiles are 4x2 or 1x8");
  int64_t pair;
  std::memcpy(&pair, at, sizeof(pair));
  return _mm256_set1_epi64x(pair);
}

template <int MR, int NR>
inline __m256 lane_cols(const float* at) {
  return _mm256_castsi256_ps(lane_cols<MR, NR>(reinterpret_cast<const int32_t*>(at)));
}

template <int MR, int NR>
inline __m256i lane_rows(const int32_t* at) {
  if constexpr (MR == 1) return _mm256_set1_epi32(at[0]);
  const __m256i four = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  return _mm256_permutevar8x32_epi32(four, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}

template <int MR, int NR>
inline __m256 lane_rows(const float* at) {
  return _mm256_castsi256_ps(lane_rows<MR, NR>(reinterpret_cast<const int32_t*>(at)));
}

// Everything a nibble tile reads, with the per-group arrays group-major.
struct NibbleCtx {
  const ptq::QuantRows* x;
  const ptq::NibbleWeights* w;
  const int32_t* row_term;  // [G, M]: rowsum - group * x_zero, so corrected = raw - w_zero * row_term - x_zero * colsum
  const float* bias;
  ptq::OutputView out;
  __m256i lut;
};

inline int32_t corrected_scalar(int32_t raw, const NibbleCtx& c, int64_t m, int64_t n, int64_t g) {
  const ptq::NibbleWeights& w = *c.w;
  const int64_t gn = g * w.ld + n;
  return raw - w.zero[gn] * c.row_term[g * c.x->m + m] - c.x->zero[m] * w.colsum[gn];
}

template <int MR, int NR, bool Lut>
inline void nibble_tile(const NibbleCtx& c, int64_t m, int64_t n) {
  const ptq::NibbleWeights& w = *c.w;
  const ptq::QuantRows& x = *c.x;
  constexpr int kOut = MR * NR;
  // Vector epilogue over chunks of 8 outputs: 4 rows x 2 columns, or 1 row x 8 columns.
  constexpr bool kVector = (NR == 2 && MR % 4 == 0) || (MR == 1 && NR == 8);
  constexpr int kChunkRows = NR == 2 ? 4 : 1;
  constexpr int kChunks = kVector ? kOut / 8 : 1;
  const int64_t row_bytes = w.kp / 2;
  const int64_t blocks_per_group = w.group / ptq::kNibbleBlock;
  __m256 acc_v[kChunks];
  for (int ch = 0; ch < kChunks; ++ch) acc_v[ch] = _mm256_setzero_ps();
  float acc_s[kOut] = {};
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i sums[kOut];
    for (int o = 0; o < kOut; ++o) sums[o] = _mm256_setzero_si256();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m256i codes[NR];
      for (int j = 0; j < NR; ++j) codes[j] = decoded_block<Lut>(w.packed + (n + j) * row_bytes + b * 16, c.lut);
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (m + i) * w.kp + b * ptq::kNibbleBlock));
        for (int j = 0; j < NR; ++j) sums[i * NR + j] = Isa::dot(sums[i * NR + j], codes[j], xv);
      }
    }
    if constexpr (kVector) {
      const int64_t gn = g * w.ld + n;
      for (int ch = 0; ch < kChunks; ++ch) {
        const int64_t mc = m + ch * kChunkRows;
        const __m256i raw = reduce8(sums + ch * 8);
        const __m256i x_zero = lane_rows<kChunkRows, NR>(x.zero + mc);
        const __m256i fixed = _mm256_sub_epi32(
            _mm256_sub_epi32(raw, _mm256_mullo_epi32(lane_cols<kChunkRows, NR>(w.zero + gn),
                                                     lane_rows<kChunkRows, NR>(c.row_term + g * x.m + mc))),
            _mm256_mullo_epi32(x_zero, lane_cols<kChunkRows, NR>(w.colsum + gn)));
        acc_v[ch] = _mm256_add_ps(acc_v[ch], _mm256_mul_ps(_mm256_cvtepi32_ps(fixed), lane_cols<kChunkRows, NR>(w.scale + gn)));
      }
    } else {
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
          const int32_t fixed = corrected_scalar(hsum(sums[i * NR + j]), c, m + i, n + j, g);
          acc_s[i * NR + j] += static_cast<float>(fixed) * w.scale[g * w.ld + n + j];
        }
    }
  }
  if constexpr (kVector)
    for (int ch = 0; ch < kChunks; ++ch) _mm256_storeu_ps(acc_s + ch * 8, acc_v[ch]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const float scaled = acc_s[i * NR + j] * x.scale[m + i];
      c.out.y[(m + i) * c.out.row_stride + (n + j) * c.out.col_stride] = c.bias ? scaled + c.bias[n + j] : scaled;
    }
}

// One output tile range: 4x2 tiles over full row quads, 1x8 tiles over the rows left, then singles.
// (Taller tiles spill their sums to the stack with GCC and run slower, even with 32 registers.)
template <bool Lut>
inline void nibble_range(const NibbleCtx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) nibble_tile<4, 2, Lut>(c, m, n);
    for (; n < n1; ++n) nibble_tile<4, 1, Lut>(c, m, n);
  }
  for (; m < m1; ++m) {
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) nibble_tile<1, 8, Lut>(c, m, n);
    for (; n < n1; ++n) nibble_tile<1, 1, Lut>(c, m, n);
  }
}

inline void nibble_gemm_tiles(const ptq::QuantRows& x, const ptq::NibbleWeights& w, const int32_t* row_term,
                              const float* bias, ptq::OutputView out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  alignas(32) uint8_t table[32] = {};
  if (w.lut) {
    std::memcpy(table, w.lut, 16);
    std::memcpy(table + 16, w.lut, 16);
  }
  const NibbleCtx c{&x, &w, row_term, bias, out, _mm256_load_si256(reinterpret_cast<const __m256i*>(table))};
  if (w.lut)
    nibble_range<true>(c, m0, m1, n0, n1);
  else
    nibble_range<false>(c, m0, m1, n0, n1);
}

// ---- binary: MR rows x NR weight rows, counting differing sign bits over Isa::kWords-word chunks.
template <int MR, int NR, bool Masked>
inline void binary_tile(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, int64_t m, int64_t n, int32_t* differ) {
  // Totals live in registers only when every index is a constant: hence the unrolled loops.
  typename Isa::Counter totals[MR * NR];
#pragma GCC unroll 16
  for (int o = 0; o < MR * NR; ++o) totals[o] = Isa::zero_counter();
  int64_t t = 0;
  for (; t + Isa::kWords <= w.words; t += Isa::kWords) {
    typename Isa::Bits wv[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) wv[j] = Isa::load(w.bits + (n + j) * w.words + t);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const typename Isa::Bits xv = Isa::load(x.bits + (m + i) * w.words + t);
      const typename Isa::Bits mask = Masked ? Isa::load(x.valid + (m + i) * w.words + t) : xv;
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) totals[i * NR + j] = Isa::count_differ(totals[i * NR + j], xv, wv[j], mask, Masked);
    }
  }
#pragma GCC unroll 16
  for (int o = 0; o < MR * NR; ++o) differ[o] = Isa::total(totals[o]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int64_t r = t; r < w.words; ++r) {
        const uint64_t bits = x.bits[(m + i) * w.words + r] ^ w.bits[(n + j) * w.words + r];
        differ[i * NR + j] += static_cast<int32_t>(_mm_popcnt_u64(Masked ? (bits & x.valid[(m + i) * w.words + r]) : bits));
      }
}

template <int MR, int NR, bool Masked>
inline void binary_store(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, const float* bias, ptq::OutputView out,
                         int64_t m, int64_t n) {
  int32_t differ[MR * NR];
  binary_tile<MR, NR, Masked>(x, w, m, n, differ);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const float y = (static_cast<float>(x.count[m + i] - 2 * differ[i * NR + j]) * x.scale[m + i]) * w.scale[n + j];
      out.y[(m + i) * out.row_stride + (n + j) * out.col_stride] = bias ? y + bias[n + j] : y;
    }
}

template <bool Masked>
inline void binary_range(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, const float* bias, ptq::OutputView out,
                         int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 2 <= m1; m += 2) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) binary_store<2, 4, Masked>(x, w, bias, out, m, n);
    for (; n < n1; ++n) binary_store<2, 1, Masked>(x, w, bias, out, m, n);
  }
  for (; m < m1; ++m) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) binary_store<1, 4, Masked>(x, w, bias, out, m, n);
    for (; n < n1; ++n) binary_store<1, 1, Masked>(x, w, bias, out, m, n);
  }
}
