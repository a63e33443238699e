// Integer GEMM kernels: the portable parts, the scalar tiles, and the choice of tiles at run time
// (AVX-512 VNNI, AVX2 or scalar; all bit-identical).
#include "kernels.h"

#include <emmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "depthwise.h"
#include "products.h"
#include "isa.h"

namespace ptq {

void serial_for(size_t count, const std::function<void(size_t)>& task) {
  for (size_t i = 0; i < count; ++i) task(i);
}

namespace {

enum class Level { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Level cpu_level() {
  static const Level level = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
                        __builtin_cpu_supports("avx512vpopcntdq");
    if (avx512) return Level::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return Level::Avx2;
    return Level::Scalar;
  }();
  return level;
}

// PTQ_NATIVE_ISA=scalar|avx2 caps the instruction set (to test or time every path on one machine).
Level active_level() {
  const char* cap = std::getenv("PTQ_NATIVE_ISA");
  Level limit = Level::Avx512;
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) limit = Level::Scalar;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) limit = Level::Avx2;
  return std::min(cpu_level(), limit);
}

// The kernel table of the active instruction set (defined below, after the scalar kernels).
const isa::Kernels& kernels();

// Output tiles handed to threads: rows x columns. Sized so a tile's packed weights stay in L2.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileCols = 128;
static_assert(kTileCols % kBinaryPanel == 0 && kTileCols % kPanel == 0, "tiles start on a panel boundary");

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

inline void store(OutputView out, int64_t m, int64_t n, float value) {
  out.y[m * out.row_stride + n * out.col_stride] = value;
}

// The code of channel j of a panel at element k (see NibbleWeights).
inline uint8_t panel_code(const uint8_t* panel, int64_t j, int64_t k) {
  const uint8_t byte = panel[(k / 4) * 32 + (j % 8) * 4 + k % 4];
  return j < 8 ? (byte & 0x0F) : (byte >> 4);
}

void nibble_scalar(const QuantRows& x, const NibbleWeights& w, const int32_t* row_term, const float* bias,
                   OutputView out, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xr = x.q + m * w.kp;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* panel = w.panels + (n / kPanel) * w.kp * 8;
      float acc = 0.0f;
      for (int64_t g = 0; g < w.groups; ++g) {
        int32_t raw = 0;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) {
          const uint8_t code = panel_code(panel, n % kPanel, k);
          raw += int32_t(xr[k]) * (w.lut ? w.lut[code] : code);
        }
        const int64_t gn = group_index(w.groups, n, g);
        const int32_t fixed = raw - w.zero[gn] * row_term[g * x.m + m] - x.zero[m] * w.colsum[gn];
        acc += static_cast<float>(fixed) * w.scale[gn];
      }
      const float scaled = acc * x.scale[m];
      store(out, m, n, bias ? scaled + bias[n] : scaled);
    }
  }
}

void binary_scalar(const BinaryRows& x, const BinaryWeights& w, const float* bias, OutputView out, int64_t m0,
                   int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      int32_t differ = 0;
      for (int64_t t = 0; t < w.words; ++t) {
        const uint64_t bits = x.bits[m * w.words + t] ^ w.bits[n * w.words + t];
        differ += __builtin_popcountll(x.valid ? (bits & x.valid[m * w.words + t]) : bits);
      }
      const float y = (static_cast<float>(x.count[m] - 2 * differ) * x.scale[m]) * w.scale[n];
      store(out, m, n, bias ? y + bias[n] : y);
    }
}

}  // namespace

PreparedNibbles prepare_nibbles(const uint8_t* rows, const float* scale, const int32_t* zero, int64_t n0, int64_t n,
                                int64_t kp, int64_t kr, int64_t group, const uint8_t* lut) {
  PreparedNibbles p;
  p.n = n;
  p.kp = kr;
  p.group = group;
  p.groups = kr / group;
  p.ld = round_up(n, kPanel);
  p.lut = lut;
  p.panels.assign(static_cast<size_t>(p.ld / kPanel * kr * 8), 0);
  p.scale.assign(static_cast<size_t>(p.groups * p.ld), 0.0f);
  p.zero.assign(p.scale.size(), 0);
  p.colsum.assign(p.scale.size(), 0);
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = rows + (n0 + j) * (kp / 2);
    uint8_t* panel = p.panels.data() + (j / kPanel) * kr * 8;
    const int64_t lane = j % kPanel;
    for (int64_t k = 0; k < kr; ++k) {
      const uint8_t code = code_at(row, k);
      uint8_t& byte = panel[(k / 4) * 32 + (lane % 8) * 4 + k % 4];
      byte = static_cast<uint8_t>(lane < 8 ? (byte & 0xF0) | code : (byte & 0x0F) | (code << 4));
      p.colsum[group_index(p.groups, j, k / group)] += lut ? lut[code] : code;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      p.scale[group_index(p.groups, j, g)] = scale[(n0 + j) * p.groups + g];
      p.zero[group_index(p.groups, j, g)] = zero[(n0 + j) * p.groups + g];
    }
  }
  const int32_t* zeros = zero + n0 * p.groups;
  const bool shared = n > 0 && std::all_of(zeros, zeros + n * p.groups, [&](int32_t z) { return z == zeros[0]; });
  p.shared_zero = shared ? zeros[0] : -1;
  return p;
}


void gemm_nibble(const QuantRows& x, const NibbleWeights& w, const float* bias, OutputView out,
                 const ParallelFor& parallel) {
  std::vector<int32_t> row_term(static_cast<size_t>(w.groups * x.m));
  for (int64_t m = 0; m < x.m; ++m)
    for (int64_t g = 0; g < w.groups; ++g)
      row_term[g * x.m + m] = x.rowsum[m * w.groups + g] - static_cast<int32_t>(w.group) * x.zero[m];
  const isa::NibbleTiles tiles = kernels().nibble;
  for_each_tile(x.m, w.n, parallel, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    tiles(x, w, row_term.data(), bias, out, m0, m1, n0, n1);
  });
}

namespace {

void quantize_row_scalar(const float* x, int64_t k, int64_t kp, int8_t* q, float* scale) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t i = 0; i < k; ++i) q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / s))));
  std::fill(q + k, q + kp, int8_t{0});
  *scale = s;
}

// |x| is summed in 8 lanes (element i into lane i % 8, each lane in order), then the lanes in order:
// the order the vector path takes, written out.
void binarize_row_scalar(const float* x, const uint8_t* valid, int64_t k, int64_t words, uint64_t* bits,
                         uint64_t* valid_bits, int32_t* count, float* scale) {
  std::fill(bits, bits + words, uint64_t{0});
  if (valid_bits) std::fill(valid_bits, valid_bits + words, uint64_t{0});
  float lanes[8] = {};
  int32_t real = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (valid && !valid[i]) continue;
    const uint64_t bit = uint64_t{1} << (i % kBinaryWord);
    if (x[i] < 0.0f) bits[i / kBinaryWord] |= bit;
    if (valid_bits) valid_bits[i / kBinaryWord] |= bit;
    lanes[i % 8] += std::fabs(x[i]);
    ++real;
  }
  float total = 0.0f;
  for (float lane : lanes) total += lane;
  *count = real;
  *scale = real > 0 ? total / static_cast<float>(real) : 0.0f;
}

// Rows per parallel task for the row-wise steps (quantization, binarization).
constexpr int64_t kRowsPerTask = 16;

template <typename Body>
void for_each_row(int64_t m, const ParallelFor& parallel, Body body) {
  parallel(static_cast<size_t>((m + kRowsPerTask - 1) / kRowsPerTask), [&](size_t task) {
    const int64_t r0 = static_cast<int64_t>(task) * kRowsPerTask;
    for (int64_t r = r0; r < std::min(m, r0 + kRowsPerTask); ++r) body(r);
  });
}

const isa::Kernels& kernels() {
  static const isa::Kernels scalar{nibble_scalar,        binary_scalar,       depthwise_accumulate,
                                   depthwise_accumulate_float,  depthwise_quantized_patches,
                                   quantize_row_scalar,  binarize_row_scalar, dot_rows_i16};
  switch (active_level()) {
    case Level::Avx512:
      return isa::avx512_kernels();
    case Level::Avx2:
      return isa::avx2_kernels();
    default:
      return scalar;
  }
}

}  // namespace

void dot_rows16(const int16_t* m, const int16_t* v, int64_t rows, int64_t n, int64_t* out) {
  kernels().dot_rows_i16(m, v, rows, n, out);
}

void quant_rowsums(const int8_t* q, int64_t m, int64_t kp, int64_t group, int32_t* rowsum, const ParallelFor& parallel) {
  const int64_t groups = kp / group;
  for_each_row(m, parallel, [&](int64_t r) {
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += q[r * kp + k];
      rowsum[r * groups + g] = sum;
    }
  });
}

void quantize_rows_symmetric(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* scale,
                             int32_t* zero, const ParallelFor& parallel) {
  const isa::QuantizeRow row = kernels().quantize_row;
  for_each_row(m, parallel, [&](int64_t r) {
    row(x + r * k, k, kp, q + r * kp, scale + r);
    zero[r] = 0;
  });
}

void binarize_rows(const float* x, const uint8_t* valid, int64_t m, int64_t k, int64_t words, uint64_t* bits,
                   uint64_t* valid_bits, int32_t* count, float* scale, const ParallelFor& parallel) {
  const isa::BinarizeRow row = kernels().binarize_row;
  for_each_row(m, parallel, [&](int64_t r) {
    row(x + r * k, valid ? valid + r * k : nullptr, k, words, bits + r * words,
        valid_bits ? valid_bits + r * words : nullptr, count + r, scale + r);
  });
}

void gemm_binary(const BinaryRows& x, const BinaryWeights& w, const float* bias, OutputView out,
                 const ParallelFor& parallel) {
  const isa::BinaryTiles tiles = kernels().binary;
  for_each_tile(x.m, w.n, parallel, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    tiles(x, w, bias, out, m0, m1, n0, n1);
  });
}

std::vector<uint64_t> binary_panels(const uint64_t* bits, int64_t n, int64_t words) {
  const int64_t panels = (n + kBinaryPanel - 1) / kBinaryPanel;
  std::vector<uint64_t> out(static_cast<size_t>(panels * words * kBinaryPanel), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t t = 0; t < words; ++t)
      out[((r / kBinaryPanel) * words + t) * kBinaryPanel + r % kBinaryPanel] = bits[r * words + t];
  return out;
}

const char* active_isa() {
  static const char* names[] = {"scalar", "avx2", "avx512-vnni"};
  return names[static_cast<int>(active_level())];
}

namespace {

// A 1x1, stride-1, unpadded convolution's patches are a transpose of the image, [C, P] -> [P, ld]:
// done in 16 x 16 byte blocks with SSE2 unpacks (every x86-64 CPU has them), the rest one by one.
void transpose_bytes(const int8_t* image, int64_t pixels, int64_t c0, int64_t cg, int64_t ld, int8_t pad_value,
                     int8_t* rows, uint8_t flip, const ParallelFor& parallel) {
  constexpr int64_t kBlock = 16, kPixelsPerTask = 256;
  const __m128i flip_bits = _mm_set1_epi8(static_cast<char>(flip));
  parallel(static_cast<size_t>((pixels + kPixelsPerTask - 1) / kPixelsPerTask), [&](size_t task) {
    const int64_t p0 = static_cast<int64_t>(task) * kPixelsPerTask, p1 = std::min(pixels, p0 + kPixelsPerTask);
    int64_t p = p0;
    for (; p + kBlock <= p1; p += kBlock) {
      int64_t c = 0;
      for (; c + kBlock <= cg; c += kBlock) {
        // Register i holds channel bit_reversed(i): four rounds of interleaving register i with
        // i + 8 (bytes, then pairs, quads and eights) then leave pixel i in register i, in channel order.
        static constexpr int kBitReversed[kBlock] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
        __m128i r[kBlock];
        for (int i = 0; i < kBlock; ++i)
          r[i] = _mm_xor_si128(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(image + (c0 + c + kBitReversed[i]) * pixels + p)),
              flip_bits);
        for (int round = 0; round < 4; ++round) {
          __m128i t[kBlock];
          for (int i = 0; i < kBlock / 2; ++i) {
            const __m128i a = r[i], b = r[i + kBlock / 2];
            switch (round) {
              case 0: t[2 * i] = _mm_unpacklo_epi8(a, b), t[2 * i + 1] = _mm_unpackhi_epi8(a, b); break;
              case 1: t[2 * i] = _mm_unpacklo_epi16(a, b), t[2 * i + 1] = _mm_unpackhi_epi16(a, b); break;
              case 2: t[2 * i] = _mm_unpacklo_epi32(a, b), t[2 * i + 1] = _mm_unpackhi_epi32(a, b); break;
              default: t[2 * i] = _mm_unpacklo_epi64(a, b), t[2 * i + 1] = _mm_unpackhi_epi64(a, b); break;
            }
          }
          std::copy(t, t + kBlock, r);
        }
        for (int i = 0; i < kBlock; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(rows + (p + i) * ld + c), r[i]);
      }
      for (; c < cg; ++c)
        for (int64_t i = 0; i < kBlock; ++i) rows[(p + i) * ld + c] = static_cast<int8_t>(image[(c0 + c) * pixels + p + i] ^ flip);
    }
    for (; p < p1; ++p)
      for (int64_t c = 0; c < cg; ++c) rows[p * ld + c] = static_cast<int8_t>(image[(c0 + c) * pixels + p] ^ flip);
    for (p = p0; p < p1; ++p) std::fill(rows + p * ld + cg, rows + (p + 1) * ld, pad_value);
  });
}

}  // namespace

template <typename T>
void im2col(const T* image, const ConvShape& s, int64_t c0, int64_t cg, int64_t ld, T pad_value, T* rows,
            uint8_t* valid, const ParallelFor& parallel, uint8_t flip) {
  const bool pointwise = s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_top == 0 &&
                         s.pad_left == 0 && s.pad_bottom == 0 && s.pad_right == 0;
  if constexpr (std::is_same_v<T, int8_t>) {
    if (pointwise && valid == nullptr) return transpose_bytes(image, s.height * s.width, c0, cg, ld, pad_value, rows, flip,
                                                              parallel);
  }
  const int64_t oh = s.out_h(), ow = s.out_w();
  const int64_t k = cg * s.kernel_h * s.kernel_w;
  // Per kernel column j, the output columns whose input column lies inside the image: [x0, x1).
  std::vector<int64_t> x0(static_cast<size_t>(s.kernel_w)), x1(x0.size());
  for (int64_t j = 0; j < s.kernel_w; ++j) {
    const int64_t shift = j * s.dilation_w - s.pad_left;
    x0[j] = std::min(ow, std::max<int64_t>(0, (-shift + s.stride_w - 1) / s.stride_w));
    x1[j] = std::max(x0[j], std::min<int64_t>(ow, shift >= s.width ? 0 : (s.width - 1 - shift) / s.stride_w + 1));
  }
  // One output row per task; each patch column is filled for the whole row at once, so the inner
  // loop reads the input line in order and has no bounds tests.
  parallel(static_cast<size_t>(oh), [&](size_t task) {
    // Local copies: stores through T (a char type for int8) could alias anything read by reference.
    const int64_t y = static_cast<int64_t>(task), pitch = ld, step = s.stride_w, width = ow;
    const T pad = pad_value;
    T* __restrict__ out = rows + y * width * pitch;
    uint8_t* out_valid = valid ? valid + y * width * k : nullptr;
    int64_t col = 0;
    for (int64_t c = c0; c < c0 + cg; ++c)
      for (int64_t i = 0; i < s.kernel_h; ++i) {
        const int64_t iy = y * s.stride_h - s.pad_top + i * s.dilation_h;
        const bool row_inside = iy >= 0 && iy < s.height;
        const T* line = image + (c * s.height + (row_inside ? iy : 0)) * s.width;
        for (int64_t j = 0; j < s.kernel_w; ++j, ++col) {
          const int64_t lo = row_inside ? x0[j] : width, hi = row_inside ? x1[j] : width;
          const T* __restrict__ src = line + j * s.dilation_w - s.pad_left;
          T* __restrict__ dst = out + col;
          for (int64_t x = 0; x < lo; ++x) dst[x * pitch] = pad;
          if constexpr (std::is_integral_v<T>) {
            for (int64_t x = lo; x < hi; ++x) dst[x * pitch] = static_cast<T>(src[x * step] ^ flip);
          } else {
            for (int64_t x = lo; x < hi; ++x) dst[x * pitch] = src[x * step];
          }
          for (int64_t x = std::max(lo, hi); x < width; ++x) dst[x * pitch] = pad;
          if (out_valid) {
            for (int64_t x = 0; x < width; ++x) out_valid[x * k + col] = x >= lo && x < hi ? 1 : 0;
          }
        }
      }
    for (int64_t x = 0; x < width; ++x) std::fill(out + x * pitch + k, out + (x + 1) * pitch, pad);
  });
}

DepthwisePhases depthwise_phases(const ConvShape& s) {
  DepthwisePhases p;
  const int64_t hp = s.height + s.pad_top + s.pad_bottom, wp = s.width + s.pad_left + s.pad_right;
  const int64_t hq = (hp + s.stride_h - 1) / s.stride_h;
  p.wq = (wp + s.stride_w - 1) / s.stride_w;
  p.phase_size = hq * p.wq;
  p.length = round_up(s.out_h() * p.wq, kDepthwiseStep);
  // A run starts within the last phase and reads at most a row and a block past its end.
  p.planes_size = s.stride_h * s.stride_w * p.phase_size + p.wq + kDepthwiseStep;
  p.scratch_size = p.planes_size + p.length + std::max(p.length, s.width);
  for (int64_t i = 0; i < s.kernel_h; ++i)
    for (int64_t j = 0; j < s.kernel_w; ++j) {
      const int64_t oy = i * s.dilation_h, ox = j * s.dilation_w;
      const int64_t phase = (oy % s.stride_h) * s.stride_w + ox % s.stride_w;
      p.offset.push_back(phase * p.phase_size + (oy / s.stride_h) * p.wq + ox / s.stride_w);
    }
  for (int64_t iy = 0; iy < s.height; ++iy) {
    const int64_t py = iy + s.pad_top;
    p.row.push_back((py % s.stride_h) * s.stride_w * p.phase_size + (py / s.stride_h) * p.wq);
  }
  for (int64_t b = 0; b < s.stride_w; ++b) {  // input columns ix with (ix + pad_left) % stride_w == b
    const int64_t ix0 = ((b - s.pad_left) % s.stride_w + s.stride_w) % s.stride_w;
    p.first.push_back(ix0);
    p.column.push_back(b * p.phase_size + (ix0 + s.pad_left) / s.stride_w);
  }
  return p;
}

DepthwiseWeights depthwise_weights(const uint8_t* rows, int64_t channels, int64_t kp, int64_t taps, const int32_t* zero,
                                   const uint8_t* lut) {
  DepthwiseWeights w;
  w.taps = taps;
  w.values.resize(static_cast<size_t>(channels * taps));
  w.magnitude.assign(static_cast<size_t>(channels), 0);
  for (int64_t c = 0; c < channels; ++c) {
    const uint8_t* codes = rows + c * (kp / 2);
    for (int64_t t = 0; t < taps; ++t) {
      const int32_t value = (lut ? lut[code_at(codes, t)] : code_at(codes, t)) - zero[c];
      w.values[c * taps + t] = value;
      w.magnitude[c] += std::abs(value);
    }
  }
  w.floats.assign(w.values.begin(), w.values.end());
  return w;
}

namespace {

// One patch at a time, in integers: the float-input depthwise path for sums too large for float.
void quantized_patches_exact(const float* plane, const ConvShape& s, const int32_t* weight, float* sums,
                             float* scales) {
  const int64_t oh = s.out_h(), ow = s.out_w(), taps = s.kernel_h * s.kernel_w;
  std::vector<float> patch(static_cast<size_t>(taps));
  std::vector<int8_t> q(static_cast<size_t>(taps));
  for (int64_t y = 0; y < oh; ++y)
    for (int64_t x = 0; x < ow; ++x) {
      for (int64_t i = 0; i < s.kernel_h; ++i)
        for (int64_t j = 0; j < s.kernel_w; ++j) {
          const int64_t iy = y * s.stride_h - s.pad_top + i * s.dilation_h;
          const int64_t ix = x * s.stride_w - s.pad_left + j * s.dilation_w;
          const bool inside = iy >= 0 && iy < s.height && ix >= 0 && ix < s.width;
          patch[i * s.kernel_w + j] = inside ? plane[iy * s.width + ix] : 0.0f;
        }
      quantize_row_scalar(patch.data(), taps, taps, q.data(), &scales[y * ow + x]);
      int64_t fixed = 0;
      for (int64_t t = 0; t < taps; ++t) fixed += int64_t{q[t]} * weight[t];
      sums[y * ow + x] = static_cast<float>(static_cast<int32_t>(fixed));
    }
}

}  // namespace

void depthwise_conv(const DepthwiseImage& image, const ConvShape& s, const DepthwiseWeights& w, const float* scale,
                    const float* bias, float* out, const ParallelFor& parallel) {
  const int64_t pixels = s.out_h() * s.out_w(), plane_size = s.height * s.width, taps = w.taps;
  const int64_t channels = static_cast<int64_t>(w.magnitude.size());
  const isa::Kernels& run = kernels();
  const DepthwisePhases phases = depthwise_phases(s);
  // Every float partial sum is an exact integer while its size stays below 2^24: integer inputs are
  // at most 255 from their zero point, quantized patches at most 127 in size.
  const int64_t largest_input = image.floats ? 127 : 255;
  constexpr int64_t kChannelsPerTask = 8;
  parallel(static_cast<size_t>((channels + kChannelsPerTask - 1) / kChannelsPerTask), [&](size_t task) {
    std::vector<float> sums(static_cast<size_t>(pixels)), x_scales(image.floats ? sums.size() : 0);
    std::vector<float> scratch(static_cast<size_t>(phases.scratch_size));
    std::vector<int32_t> acc;
    const int64_t c0 = static_cast<int64_t>(task) * kChannelsPerTask;
    for (int64_t c = c0; c < std::min(channels, c0 + kChannelsPerTask); ++c) {
      const int32_t* weight = w.values.data() + c * taps;
      const float* float_weight = w.floats.data() + c * taps;
      const bool exact_in_float = largest_input * w.magnitude[c] < (int64_t{1} << 24);
      if (image.floats) {
        const float* plane = image.floats + c * plane_size;
        if (exact_in_float)
          run.depthwise_patches(plane, s, phases, float_weight, sums.data(), x_scales.data(), scratch.data());
        else
          quantized_patches_exact(plane, s, weight, sums.data(), x_scales.data());
      } else {
        const uint8_t* plane = image.bytes + c * plane_size;
        if (exact_in_float) {
          run.depthwise_float(plane, image.flip, s, phases, image.x_zero, float_weight, sums.data(), scratch.data());
        } else {
          acc.assign(static_cast<size_t>(pixels), 0);
          run.depthwise(plane, image.flip, s, image.x_zero, weight, acc.data());
          std::copy(acc.begin(), acc.end(), sums.begin());
        }
      }
      float* dst = out + c * pixels;
      const float b = bias ? bias[c] : 0.0f;
      for (int64_t p = 0; p < pixels; ++p) {
        const float scaled = (sums[p] * scale[c]) * (image.floats ? x_scales[p] : image.x_scale);
        dst[p] = bias ? scaled + b : scaled;
      }
    }
  });
}

template void im2col<float>(const float*, const ConvShape&, int64_t, int64_t, int64_t, float, float*, uint8_t*,
                            const ParallelFor&, uint8_t);
template void im2col<int8_t>(const int8_t*, const ConvShape&, int64_t, int64_t, int64_t, int8_t, int8_t*, uint8_t*,
                             const ParallelFor&, uint8_t);

}  // namespace ptq
