// Integer GEMM kernels behind the ptqcli custom operators; no ONNX Runtime types here, so they can
// be tested and benchmarked on their own. Packed formats are described in native/README.md and
// mirrored by ptqcli/export/native_ref.py (the numpy references the tests compare against).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace ptq {

// Runs task(i) for i in [0, count), possibly on several threads.
using ParallelFor = std::function<void(size_t count, const std::function<void(size_t)>& task)>;
void serial_for(size_t count, const std::function<void(size_t)>& task);

constexpr int64_t kNibbleBlock = 32;  // K elements per 16-byte block of packed 4-bit codes
constexpr int64_t kNibbleStep = 16;   // the kernels' K step: groups hold whole multiples of 4 quads
constexpr int64_t kBinaryWord = 64;   // K elements per 64-bit word of sign bits

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// out[r] = sum over j < n of m[r * n + j] * v[j], exact (int8 values in m, int16 in v; see
// products.h), with the widest instructions this CPU has.
void dot_rows16(const int16_t* m, const int16_t* v, int64_t rows, int64_t n, int64_t* out);

// Where output element (m, n) goes: y[m * row_stride + n * col_stride].
struct OutputView {
  float* y;
  int64_t row_stride;
  int64_t col_stride;
};

// ---- 4-bit codes (Int4 and Shift operators) --------------------------------------------------
// In the model, codes are packed per output row n over K in blocks of 32: byte j of a block holds
// the code of k = 32b + j in its low nibble and of k = 32b + 16 + j in its high nibble. A code c
// decodes to the unsigned byte lut[c] (identity for int4); the weight is
// (decoded - zero_point[n, g]) * scale[n, g].
//
// The GEMM reads them re-laid into panels of 16 output channels (done once per model load): per
// panel and per 4 consecutive k, 32 bytes; byte t holds channel t / 4 (low nibble) and channel
// 8 + t / 4 (high nibble) at k offset t % 4. One 32-byte load then gives 4 k of 8 channels per
// nibble half, and a broadcast of 4 activation bytes multiplies all 8 channels at once: the int32
// sums come out one channel per lane, with no horizontal reduction.
constexpr int64_t kPanel = 16;

struct NibbleWeights {
  const uint8_t* panels;   // [ceil(N / 16), kp * 8]
  int64_t n;               // output channels
  int64_t kp;              // reduction length as the kernels read it: a multiple of 16 and of the group
  int64_t group;           // elements per scale group (multiple of 32), kp when per-channel
  int64_t groups;          // kp / group
  int64_t ld;              // N rounded up to 16
  // Per-group arrays are panel-major, [ceil(N / 16), groups, 16] (padding channels 0): 8 channels
  // load as one vector, and a panel's groups follow one another in memory (group_index).
  const float* scale;
  const int32_t* zero;     // decoded units
  const int32_t* colsum;   // sum of decoded codes over each group (padding included)
  const uint8_t* lut;      // 16 entries, or nullptr for identity
  int32_t shared_zero;     // the zero point of every channel and group when they are all equal, else -1
};

// Where the per-group values of channel n, group g sit in NibbleWeights' per-group arrays.
inline int64_t group_index(int64_t groups, int64_t n, int64_t g) { return ((n / kPanel) * groups + g) * kPanel + n % kPanel; }

// Owns what NibbleWeights points at, for output channels [n0, n0 + n) of a model's weight.
struct PreparedNibbles {
  std::vector<uint8_t> panels;
  std::vector<float> scale;
  std::vector<int32_t> zero, colsum;
  int64_t n = 0, kp = 0, group = 0, groups = 0, ld = 0;
  const uint8_t* lut = nullptr;
  int32_t shared_zero = -1;
  NibbleWeights view() const {
    return {panels.data(), n, kp, group, groups, ld, scale.data(), zero.data(), colsum.data(), lut, shared_zero};
  }
};

// rows: the model's packed codes [N, kp/2]; scale [N, groups]; zero [N, groups] decoded units. The
// panels cover K up to kr <= kp (codes past kr are padding).
PreparedNibbles prepare_nibbles(const uint8_t* rows, const float* scale, const int32_t* zero, int64_t n0, int64_t n,
                                int64_t kp, int64_t kr, int64_t group, const uint8_t* lut);

// The code of element k in one packed model row.
inline uint8_t code_at(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[(k / kNibbleBlock) * (kNibbleBlock / 2) + (k % (kNibbleBlock / 2))];
  return (k % kNibbleBlock) < kNibbleBlock / 2 ? (byte & 0x0F) : (byte >> 4);
}

// Rows of int8 activations padded to kp with their zero point; x = (q - zero) * scale.
struct QuantRows {
  const int8_t* q;        // [M, kp]
  int64_t m;
  const float* scale;     // [M]
  const int32_t* zero;    // [M]
  const int32_t* rowsum;  // [M, groups], sum of q over each group
};

void quant_rowsums(const int8_t* q, int64_t m, int64_t kp, int64_t group, int32_t* rowsum, const ParallelFor& parallel);

// y[m, n] = x_scale[m] * sum_g(float(acc[m, n, g]) * scale[n, g]) + bias[n], acc the exact int32
// sum over group g of (q - x_zero) * (decoded - w_zero). Float steps are taken in this order.
void gemm_nibble(const QuantRows& x, const NibbleWeights& w, const float* bias, OutputView out,
                 const ParallelFor& parallel);

// Symmetric int8 per row: scale = max|x| / 127 (1 when the row is all zeros), q = round-half-even(x / scale).
// Which tiles run: "avx512-vnni", "avx2" or "scalar" (PTQ_NATIVE_ISA=avx2|scalar caps it).
const char* active_isa();

void quantize_rows_symmetric(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* scale,
                             int32_t* zero, const ParallelFor& parallel);

// ---- sign bits (Binary operators) --------------------------------------------------------------
// Bit k % 64 of word k / 64 is 1 where the value is negative; bits past k are 0.
struct BinaryRows {
  const uint64_t* bits;   // [M, words]
  const uint64_t* valid;  // [M, words] 1 where the element is real (not conv padding), or nullptr
  const int32_t* count;   // [M] number of real elements
  const float* scale;     // [M] mean |x| over the real elements
  int64_t m;
};

constexpr int64_t kBinaryPanel = 8;  // weight rows side by side in a panel, one 64-bit lane each

struct BinaryWeights {
  const uint64_t* bits;    // [N, words]
  const uint64_t* panels;  // [ceil(N / 8), words, 8] (binary_panels): what the vector paths read
  const float* scale;      // [N]
  int64_t n;
  int64_t words;
};

// bits [N, words] re-laid as panels: word t of rows 8p..8p+7 side by side (rows past N are 0).
std::vector<uint64_t> binary_panels(const uint64_t* bits, int64_t n, int64_t words);

// y[m, n] = (float(dot) * x_scale[m]) * w_scale[n] + bias[n], dot = count - 2 * popcount((x ^ w) & valid).
void gemm_binary(const BinaryRows& x, const BinaryWeights& w, const float* bias, OutputView out,
                 const ParallelFor& parallel);

// Sign bits and mean |x| of float rows; valid (optional, [M, K] bytes) marks real elements. The
// |x| sum runs in 8 lanes (element i into lane i % 8), then over the lanes in order.
void binarize_rows(const float* x, const uint8_t* valid, int64_t m, int64_t k, int64_t words, uint64_t* bits,
                   uint64_t* valid_bits, int32_t* count, float* scale, const ParallelFor& parallel);

// ---- convolution lowering ---------------------------------------------------------------------
struct ConvShape {
  int64_t channels, height, width;  // one image, input
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_left, pad_bottom, pad_right;
  int64_t dilation_h, dilation_w;
  int64_t out_h() const { return (height + pad_top + pad_bottom - dilation_h * (kernel_h - 1) - 1) / stride_h + 1; }
  int64_t out_w() const { return (width + pad_left + pad_right - dilation_w * (kernel_w - 1) - 1) / stride_w + 1; }
};

// Integer images are read as bytes: int8 as they are (flip 0), uint8 shifted by -128 (flip 0x80:
// the top bit flipped gives the same int8), so one kernel serves both without a converted copy.
inline int32_t image_value(uint8_t byte, uint8_t flip) { return static_cast<int8_t>(byte ^ flip); }

// A depthwise layer's weights (one input channel per output channel, one scale group): per channel
// the integer weights (decoded - zero) over the taps, as ints and as floats, and the sum of their
// sizes, which decides whether float sums are exact. Made once per model load when W is constant.
struct DepthwiseWeights {
  int64_t taps = 0;
  std::vector<int32_t> values;  // [channels, taps]
  std::vector<float> floats;    // the same values
  std::vector<int64_t> magnitude;
};

DepthwiseWeights depthwise_weights(const uint8_t* rows, int64_t channels, int64_t kp, int64_t taps, const int32_t* zero,
                                   const uint8_t* lut);

// A depthwise layer's input image: integers (bytes read through image_value, with a scale and zero
// point) or floats (each output's patch then quantized on its own, as quantize_rows_symmetric does).
struct DepthwiseImage {
  const uint8_t* bytes = nullptr;
  uint8_t flip = 0;
  float x_scale = 1.0f;
  int32_t x_zero = 0;
  const float* floats = nullptr;
};

// Depthwise convolution straight from the image, without patches: out[c, p] equals the patch-row
// path (im2col, quantize_rows_symmetric for float input, gemm_nibble) bit for bit.
void depthwise_conv(const DepthwiseImage& image, const ConvShape& s, const DepthwiseWeights& w, const float* scale,
                    const float* bias, float* out, const ParallelFor& parallel);

// Depthwise sums in float (exact when every partial sum is an integer below 2^24 in size) read the
// zero-padded input split into stride_h x stride_w phase planes of one row pitch wq: each tap adds
// one contiguous run of a phase plane to the outputs, laid out [out_h, wq] (columns past out_w dropped).
constexpr int64_t kDepthwiseStep = 16;  // outputs are computed in runs of 16 (a zmm, or two ymm)

struct DepthwisePhases {
  int64_t wq = 0, phase_size = 0;
  int64_t planes_size = 0;      // floats of the phase planes, with room for a run's overreach
  int64_t length = 0;           // out_h * wq rounded up to kDepthwiseStep
  int64_t scratch_size = 0;     // planes, sums (length), then one input row or the patch scales (length)
  std::vector<int64_t> offset;  // per tap (kh, kw order): where its run starts in the planes
  std::vector<int64_t> row;     // per input row: where it starts in its phase plane (column phase 0)
  std::vector<int64_t> first;   // per column phase b: the first input column of that phase
  std::vector<int64_t> column;  // per column phase b: where that first column lands, from row[iy]
};

DepthwisePhases depthwise_phases(const ConvShape& s);

// Patches of channels [c0, c0 + cg) as rows [out_h * out_w, ld] ordered (c, kh, kw); padding gets
// pad_value and, if valid is given, a 0 in valid. Integer images are XORed with flip on the way.
template <typename T>
void im2col(const T* image, const ConvShape& s, int64_t c0, int64_t cg, int64_t ld, T pad_value, T* rows,
            uint8_t* valid, const ParallelFor& parallel, uint8_t flip = 0);

}  // namespace ptq
