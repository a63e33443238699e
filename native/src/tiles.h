// SIMD tile kernels, compiled once per instruction set: a translation unit defines `Isa` (how
// bytes are multiplied into int32 sums, how bits are counted, how many rows a nibble tile has)
// and then includes this header inside an anonymous namespace, so each copy has internal linkage
// and its own target flags.
//
// A nibble tile is MR rows x NP 16-channel panels: per row and panel two vectors of 8 int32 sums,
// one lane per channel (see NibbleWeights). Zero points, scales and the float accumulation are applied per
// lane: the same IEEE operations, in the same order, as the scalar path, so results are identical.

struct NibbleCtx {
  const ptq::QuantRows* x;
  const ptq::NibbleWeights* w;
  const int32_t* row_term;  // [G, M]: rowsum - group * x_zero; corrected = raw - w_zero * row_term - x_zero * colsum
  const float* bias;
  ptq::OutputView out;
  __m256i lut;
};

// The high nibbles come out shifted down (0..15), or left in place (16 x code) where Isa takes
// them so (Isa::kHighInPlace: one instruction fewer; their sums are divided by 16 when widened).
template <bool Lut>
inline void decode_quad(const uint8_t* at, __m256i lut, __m256i& low, __m256i& high) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  low = _mm256_and_si256(bytes, mask);
  if (!Lut && Isa::kHighInPlace) {
    high = _mm256_andnot_si256(mask, bytes);
    return;
  }
  high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  if (Lut) {
    low = _mm256_shuffle_epi8(lut, low);
    high = _mm256_shuffle_epi8(lut, high);
  }
}

// Rows m.. m + MR of a tile's outputs, columns n0 .. n0 + cols, from `lanes` (row i, column j at
// lanes[i][j]) into the output, in whatever layout it has.
template <int MR, int W>
inline void store_tile(ptq::OutputView out, int64_t m, int64_t n0, int64_t cols, const float (&lanes)[MR][W]) {
  if (out.col_stride == 1) {
    for (int i = 0; i < MR; ++i) std::memcpy(out.y + (m + i) * out.row_stride + n0, lanes[i], cols * sizeof(float));
    return;
  }
  int64_t j0 = 0;
  if constexpr (MR % 4 == 0) {
    // Outputs of consecutive rows adjacent in memory (a conv's pixels): 4 x 4 blocks transposed,
    // so each channel gets four pixels in one store.
    if (out.row_stride == 1) {
      for (; j0 + 4 <= cols; j0 += 4)
#pragma GCC unroll 4
        for (int i = 0; i < MR; i += 4) {
          __m128 r0 = _mm_load_ps(lanes[i] + j0), r1 = _mm_load_ps(lanes[i + 1] + j0);
          __m128 r2 = _mm_load_ps(lanes[i + 2] + j0), r3 = _mm_load_ps(lanes[i + 3] + j0);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          float* y = out.y + (n0 + j0) * out.col_stride + m + i;
          _mm_storeu_ps(y, r0);
          _mm_storeu_ps(y + out.col_stride, r1);
          _mm_storeu_ps(y + 2 * out.col_stride, r2);
          _mm_storeu_ps(y + 3 * out.col_stride, r3);
        }
    }
  }
  for (int64_t j = j0; j < cols; ++j) {
    float* y = out.y + (n0 + j) * out.col_stride + m * out.row_stride;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) y[i * out.row_stride] = lanes[i][j];
  }
}

// A tile is MR rows x NP panels: per row 2 * NP vectors of 8 int32 sums (vector v holds channels
// 8v..8v+7 of the tile). Products of a chunk of quads add up in narrow sums (Isa::dot), widened
// into the int32 sums once per chunk (Isa::widen); U independent narrow chains per sum (quad q
// feeds chain q % U) hide the latency of the multiply-add when a tile has few rows. Integers add
// up exactly in any order. Chunks (Isa::chunk_quads) are a multiple of U, and U divides 4: a group
// holds a multiple of 4 quads (kNibbleStep elements).
// OneGroup: per-channel weights, known at compile time, so the float totals are formed once at the
// end and a tile can have more rows (Isa::kTileRowsOneGroup).
template <int MR, int NP, int U, bool Lut, bool OneGroup>
inline void nibble_tile(const NibbleCtx& c, int64_t m, int64_t panel) {
  constexpr int64_t kChunk = Isa::template chunk_quads<Lut>();
  static_assert(kChunk % U == 0 && (ptq::kNibbleStep / 4) % U == 0, "chains tile a chunk and a group");
  constexpr int V = 2 * NP;
  const ptq::NibbleWeights& w = *c.w;
  const ptq::QuantRows& x = *c.x;
  const uint8_t* base = w.panels + panel * w.kp * 8;
  const int64_t panel_bytes = w.kp * 8;
  const int64_t quads_per_group = w.group / 4;
  __m256 acc[MR][V];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  const int64_t groups = OneGroup ? 1 : w.groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[MR][V];
    const int64_t group_end = (g + 1) * quads_per_group;
    for (int64_t q0 = g * quads_per_group; q0 < group_end; q0 += kChunk) {
      const int64_t q1 = std::min(group_end, q0 + kChunk);
      __m256i narrow[U][MR][V];
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
          for (int v = 0; v < V; ++v) narrow[u][i][v] = _mm256_setzero_si256();
      for (int64_t q = q0; q < q1; q += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          __m256i codes[V];
#pragma GCC unroll 4
          for (int p = 0; p < NP; ++p)
            decode_quad<Lut>(base + p * panel_bytes + (q + u) * 32, c.lut, codes[2 * p], codes[2 * p + 1]);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i) {
            int32_t quad;
            std::memcpy(&quad, x.q + (m + i) * w.kp + (q + u) * 4, sizeof(quad));
            const __m256i xv = _mm256_set1_epi32(quad);
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) narrow[u][i][v] = Isa::template dot<Lut>(narrow[u][i][v], codes[v], xv);
          }
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
          __m256i chunk = narrow[0][i][v];
#pragma GCC unroll 8
          for (int u = 1; u < U; ++u) chunk = Isa::template add_narrow<Lut>(chunk, narrow[u][i][v]);
          const __m256i wide = Isa::template widen<Lut>(chunk, !Lut && v % 2 == 1);
          sums[i][v] = q0 == g * quads_per_group ? wide : _mm256_add_epi32(sums[i][v], wide);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const int32_t term = c.row_term[g * x.m + m + i];
      const int32_t x_zero = x.zero[m + i];  // 0 for activations quantized on the fly: skip that term
      // Symmetric weights (one zero point for all) take the product as a scalar: no vpmulld.
      const __m256i shared_term =
          _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w.shared_zero) * static_cast<uint32_t>(term)));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const int64_t at = ptq::group_index(w.groups, (panel + v / 2) * ptq::kPanel, g) + 8 * (v % 2);
        __m256i fixed;
        if (w.shared_zero >= 0) {
          fixed = _mm256_sub_epi32(sums[i][v], shared_term);
        } else {
          const __m256i zero = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.zero + at));
          fixed = _mm256_sub_epi32(sums[i][v], _mm256_mullo_epi32(zero, _mm256_set1_epi32(term)));
        }
        if (x_zero != 0) {
          const __m256i colsum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.colsum + at));
          fixed = _mm256_sub_epi32(fixed, _mm256_mullo_epi32(_mm256_set1_epi32(x_zero), colsum));
        }
        const __m256 scale = _mm256_loadu_ps(w.scale + at);
        acc[i][v] = _mm256_add_ps(acc[i][v], _mm256_mul_ps(_mm256_cvtepi32_ps(fixed), scale));
      }
    }
  }
  const int64_t n0 = panel * ptq::kPanel, cols = std::min<int64_t>(NP * ptq::kPanel, w.n - n0);
  // y = acc * x_scale + bias, in vectors (bias read as vectors only where the tile is whole).
  const bool whole = cols == V * 8;
  alignas(32) float lanes[MR][V * 8];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m256 row_scale = _mm256_set1_ps(x.scale[m + i]);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      __m256 y = _mm256_mul_ps(acc[i][v], row_scale);
      if (c.bias && whole) y = _mm256_add_ps(y, _mm256_loadu_ps(c.bias + n0 + 8 * v));
      _mm256_store_ps(lanes[i] + 8 * v, y);
    }
    if (c.bias && !whole)
      for (int64_t j = 0; j < cols; ++j) lanes[i][j] += c.bias[n0 + j];
  }
  store_tile<MR, V * 8>(c.out, m, n0, cols, lanes);
}

// Rows [m0, m1) x the panels that hold columns [n0, n1); n0 on a panel boundary. Single rows take
// Isa::kSingleRowPanels panels at once (their weights decoded once per row, more independent sums).
template <bool Lut, bool OneGroup>
inline void nibble_range(const NibbleCtx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = Isa::template chunk_quads<Lut>();
  constexpr int kChains = static_cast<int>(std::min<int64_t>(Isa::kSingleRowChains, kChunk));
  constexpr int kWide = Isa::kSingleRowPanels;
  constexpr int kBigRows = OneGroup ? Isa::kTileRowsOneGroup : Isa::kTileRows;
  const int64_t p0 = n0 / ptq::kPanel, p1 = (n1 + ptq::kPanel - 1) / ptq::kPanel;
  const int64_t big = m0 + (m1 - m0) / kBigRows * kBigRows;  // rows in the largest tiles end here
  const int64_t full = big + (m1 - big) / Isa::kTileRows * Isa::kTileRows;
  for (int64_t panel = p0; panel < p1; ++panel) {
    for (int64_t m = m0; m < big; m += kBigRows) nibble_tile<kBigRows, 1, 1, Lut, OneGroup>(c, m, panel);
    if constexpr (kBigRows != Isa::kTileRows) {
      for (int64_t m = big; m < full; m += Isa::kTileRows) nibble_tile<Isa::kTileRows, 1, 1, Lut, OneGroup>(c, m, panel);
    }
  }
  for (int64_t m = full; m < m1; ++m) {
    int64_t panel = p0;
    for (; panel + kWide <= p1; panel += kWide) nibble_tile<1, kWide, kChains, Lut, OneGroup>(c, m, panel);
    for (; panel < p1; ++panel) nibble_tile<1, 1, kChains, Lut, OneGroup>(c, m, panel);
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
  const bool one_group = w.groups == 1;
  if (w.lut)
    one_group ? nibble_range<true, true>(c, m0, m1, n0, n1) : nibble_range<true, false>(c, m0, m1, n0, n1);
  else
    one_group ? nibble_range<false, true>(c, m0, m1, n0, n1) : nibble_range<false, false>(c, m0, m1, n0, n1);
}

// ---- binary over panels: word t of 8 weight rows sits side by side, one 64-bit lane each, so a
// row's word is broadcast, XORed with the panel and counted per lane: 8 outputs accumulate in one
// register and no horizontal sums are needed. A tile is MR rows x NP consecutive panels.
template <int MR, int NP, bool Masked>
inline void binary_panel_tile(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, int64_t m, int64_t panel,
                              int64_t* differ) {
  constexpr int V = NP * ptq::kBinaryPanel / Isa::kWords;  // vectors per row of the tile
  constexpr int kPanelVectors = ptq::kBinaryPanel / Isa::kWords;
  typename Isa::Counter totals[MR * V];
#pragma GCC unroll 16
  for (int o = 0; o < MR * V; ++o) totals[o] = Isa::zero_counter();
  const int64_t panel_words = w.words * ptq::kBinaryPanel;
  const uint64_t* pw = w.panels + panel * panel_words;
  // Counts build up in narrow partials (bytes on AVX2) for as many words as cannot overflow them,
  // then widen into the totals once per block.
  for (int64_t t0 = 0; t0 < w.words; t0 += Isa::kPartialWords) {
    const int64_t t1 = std::min<int64_t>(w.words, t0 + Isa::kPartialWords);
    typename Isa::Partial partial[MR * V];
#pragma GCC unroll 16
    for (int o = 0; o < MR * V; ++o) partial[o] = Isa::zero_partial();
    for (int64_t t = t0; t < t1; ++t) {
      typename Isa::Bits wv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v)
        wv[v] = Isa::load(pw + (v / kPanelVectors) * panel_words + t * ptq::kBinaryPanel +
                          (v % kPanelVectors) * Isa::kWords);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const typename Isa::Bits xv = Isa::broadcast(x.bits[(m + i) * w.words + t]);
        const typename Isa::Bits mask = Masked ? Isa::broadcast(x.valid[(m + i) * w.words + t]) : xv;
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v)
          partial[i * V + v] = Isa::count_partial(partial[i * V + v], xv, wv[v], mask, Masked);
      }
    }
#pragma GCC unroll 16
    for (int o = 0; o < MR * V; ++o) totals[o] = Isa::widen(totals[o], partial[o]);
  }
#pragma GCC unroll 16
  for (int o = 0; o < MR * V; ++o) Isa::store_lanes(totals[o], differ + o * Isa::kWords);
}

template <int MR, int NP, bool Masked>
inline void binary_panel_store(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, const float* bias,
                               ptq::OutputView out, int64_t m, int64_t panel, int64_t n1) {
  constexpr int64_t kCols = NP * ptq::kBinaryPanel;
  int64_t differ[MR * kCols];
  binary_panel_tile<MR, NP, Masked>(x, w, m, panel, differ);
  const int64_t n0 = panel * ptq::kBinaryPanel, cols = std::min<int64_t>(kCols, n1 - n0);
  for (int i = 0; i < MR; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const int32_t d = static_cast<int32_t>(differ[i * kCols + j]);
      const float y = (static_cast<float>(x.count[m + i] - 2 * d) * x.scale[m + i]) * w.scale[n0 + j];
      out.y[(m + i) * out.row_stride + (n0 + j) * out.col_stride] = bias ? y + bias[n0 + j] : y;
    }
}

// Columns [n0, n1) with n0 on a panel boundary (output tiles are whole panels wide). Single rows
// take Isa::kBinarySingleRowPanels panels at once: more independent counts in flight.
template <bool Masked>
inline void binary_range(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, const float* bias, ptq::OutputView out,
                         int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int kWide = Isa::kBinarySingleRowPanels;
  const int64_t p0 = n0 / ptq::kBinaryPanel, p1 = (n1 + ptq::kBinaryPanel - 1) / ptq::kBinaryPanel;
  int64_t m = m0;
  for (; m + Isa::kBinaryRows <= m1; m += Isa::kBinaryRows)
    for (int64_t p = p0; p < p1; ++p) binary_panel_store<Isa::kBinaryRows, 1, Masked>(x, w, bias, out, m, p, n1);
  for (; m < m1; ++m) {
    int64_t p = p0;
    for (; p + kWide <= p1; p += kWide) binary_panel_store<1, kWide, Masked>(x, w, bias, out, m, p, n1);
    for (; p < p1; ++p) binary_panel_store<1, 1, Masked>(x, w, bias, out, m, p, n1);
  }
}

inline void binary_gemm_tiles(const ptq::BinaryRows& x, const ptq::BinaryWeights& w, const float* bias,
                              ptq::OutputView out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (x.valid)
    binary_range<true>(x, w, bias, out, m0, m1, n0, n1);
  else
    binary_range<false>(x, w, bias, out, m0, m1, n0, n1);
}
