// The accumulation loop of one depthwise channel, included by the scalar, AVX2 and AVX-512
// translation units so that each is compiled (and auto-vectorised) for its own instruction set.
// Integer arithmetic only: every path gives the same sums.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

// Internal linkage: each translation unit keeps its own copy, compiled for its own instruction set
// (one shared inline definition would let the linker hand the AVX-512 copy to every path).
namespace {

// acc[oh * ow] += sum over taps of (x - x_zero) * weight[tap] (x = image_value(byte, flip)); taps
// whose input lies in the padding add 0 and are skipped. Larger sums only: the float path serves most.
inline void depthwise_accumulate(const uint8_t* plane, uint8_t flip, const ptq::ConvShape& s, int32_t x_zero,
                                 const int32_t* weight, int32_t* acc) {
  const int64_t oh = s.out_h(), ow = s.out_w();
  for (int64_t i = 0; i < s.kernel_h; ++i)
    for (int64_t j = 0; j < s.kernel_w; ++j) {
      const int32_t wt = weight[i * s.kernel_w + j];
      if (wt == 0) continue;
      const int64_t shift = j * s.dilation_w - s.pad_left;
      const int64_t x0 = std::max<int64_t>(0, (-shift + s.stride_w - 1) / s.stride_w);
      const int64_t x1 = std::min<int64_t>(ow, shift >= s.width ? 0 : (s.width - 1 - shift) / s.stride_w + 1);
      for (int64_t y = 0; y < oh; ++y) {
        const int64_t iy = y * s.stride_h - s.pad_top + i * s.dilation_h;
        if (iy < 0 || iy >= s.height) continue;
        const uint8_t* line = plane + iy * s.width + shift;
        int32_t* row = acc + y * ow;
        for (int64_t x = x0; x < x1; ++x) row[x] += (ptq::image_value(line[x * s.stride_w], flip) - x_zero) * wt;
      }
    }
}

// GCC vector types: each translation unit lowers them to its own registers (ymm, or pairs of xmm).
// Runs add up in the widest registers the unit is compiled for.
#ifdef __AVX512F__
constexpr int kRunFloats = 16;
#else
constexpr int kRunFloats = 8;
#endif
typedef float Run __attribute__((vector_size(kRunFloats * 4)));
typedef float Floats8 __attribute__((vector_size(32)));
typedef int32_t Ints8 __attribute__((vector_size(32)));
typedef int8_t Bytes8 __attribute__((vector_size(8)));

// Eight image bytes from `at` as floats x - x_zero (x = image_value(byte, flip)).
inline Floats8 centered8(const uint8_t* at, uint8_t flip, int32_t x_zero) {
  Bytes8 bytes;
  std::memcpy(&bytes, at, sizeof(bytes));
  bytes ^= static_cast<int8_t>(flip);
  return __builtin_convertvector(__builtin_convertvector(bytes, Ints8) - x_zero, Floats8);
}
typedef int32_t RunInts __attribute__((vector_size(kRunFloats * 4)));

// The same sums in float, for channels whose sums are exact in float: every partial sum an integer
// of size below 2^24 (the caller checks 255 * sum|weight| < 2^24). Stride is taken out by splitting
// the zero-padded plane (x - x_zero) into stride_h x stride_w phase planes of one row pitch; each
// tap then adds one shifted, contiguous run of a phase plane to every output at once (the columns
// past out_w in each row are computed and dropped).
// weight: the integer weights as floats; out: [oh * ow]; scratch: scratch_size floats, zeroed before the first channel: channels
// write the same interior positions, so the padding stays zero from one channel to the next.

inline void depthwise_accumulate_float(const uint8_t* __restrict__ plane, uint8_t flip, const ptq::ConvShape& s,
                                       const ptq::DepthwisePhases& p, int32_t x_zero, const float* weight,
                                       float* __restrict__ out, float* __restrict__ scratch) {
  const int64_t oh = s.out_h(), ow = s.out_w();
  float* planes = scratch;
  float* sums = planes + p.planes_size;
  float* line_values = sums + p.length;  // one input row as floats, before it is dealt to the phases
  for (int64_t iy = 0; iy < s.height; ++iy) {
    const uint8_t* line = plane + iy * s.width;
    // Strided rows are converted in vectors first, then dealt out: an element-wise conversion into
    // a strided store runs one dependent scalar conversion after another.
    if (s.stride_w == 2) {  // the common stride: converted and split into even and odd columns in vectors
      const int b_even = p.first[0] == 0 ? 0 : 1;
      float* even = planes + p.row[iy] + p.column[b_even];
      float* odd = planes + p.row[iy] + p.column[1 - b_even];
      int64_t ix = 0;
      for (; ix + 16 <= s.width; ix += 16) {
        const Floats8 low = centered8(line + ix, flip, x_zero), high = centered8(line + ix + 8, flip, x_zero);
        const Floats8 evens = __builtin_shufflevector(low, high, 0, 2, 4, 6, 8, 10, 12, 14);
        const Floats8 odds = __builtin_shufflevector(low, high, 1, 3, 5, 7, 9, 11, 13, 15);
        std::memcpy(even + ix / 2, &evens, sizeof(evens));
        std::memcpy(odd + ix / 2, &odds, sizeof(odds));
      }
      for (; ix < s.width; ++ix)
        ((ix % 2 == 0) ? even : odd)[ix / 2] = static_cast<float>(ptq::image_value(line[ix], flip) - x_zero);
      continue;
    }
    float* converted = s.stride_w == 1 ? planes + p.row[iy] + p.column[0] : line_values;
    int64_t ix = 0;
    for (; ix + 8 <= s.width; ix += 8) {
      const Floats8 values = centered8(line + ix, flip, x_zero);
      std::memcpy(converted + ix, &values, sizeof(values));
    }
    for (; ix < s.width; ++ix) converted[ix] = static_cast<float>(ptq::image_value(line[ix], flip) - x_zero);
    if (s.stride_w == 1) continue;
    for (int64_t b = 0; b < s.stride_w; ++b) {
      float* phase_row = planes + p.row[iy] + p.column[b];
      for (int64_t from = p.first[b], col = 0; from < s.width; from += s.stride_w, ++col) phase_row[col] = line_values[from];
    }
  }
  const int64_t taps = static_cast<int64_t>(p.offset.size());
  constexpr int kVectors = 8;  // independent sums, enough to cover the latency of an add
  constexpr int64_t kBlock = kVectors * kRunFloats;
  static_assert(ptq::kDepthwiseStep % kRunFloats == 0, "runs tile the padded length");
  int64_t f0 = 0;
  for (; f0 + kBlock <= p.length; f0 += kBlock) {
    Run block[kVectors] = {};
    for (int64_t t = 0; t < taps; ++t) {
      const Run wt = Run{} + weight[t];
      const float* src = planes + p.offset[t] + f0;
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) {
        Run run;
        std::memcpy(&run, src + kRunFloats * v, sizeof(run));
        block[v] += wt * run;
      }
    }
    std::memcpy(sums + f0, block, sizeof(block));
  }
  // The rest one run at a time (small planes are all rest), the taps spread over 4 sums so that the
  // adds do not wait on each other; the sums are exact integers, so their order does not matter.
  for (; f0 < p.length; f0 += kRunFloats) {
    const auto term = [&](int64_t t) {
      Run run;
      std::memcpy(&run, planes + p.offset[t] + f0, sizeof(run));
      return (Run{} + weight[t]) * run;
    };
    Run a = Run{}, b = Run{}, c = Run{}, d = Run{};
    int64_t t = 0;
    for (; t + 4 <= taps; t += 4) {
      a += term(t);
      b += term(t + 1);
      c += term(t + 2);
      d += term(t + 3);
    }
    for (; t < taps; ++t) a += term(t);
    const Run block = (a + b) + (c + d);
    std::memcpy(sums + f0, &block, sizeof(block));
  }
  for (int64_t y = 0; y < oh; ++y) std::copy(sums + y * p.wq, sums + y * p.wq + ow, out + y * ow);
}

// Float images (weight-only layers): each output's patch is quantized on its own, as the GEMM path
// quantizes patch rows (quantize_rows_symmetric: scale = max|patch| / 127, or 1 for an all-zero
// patch; q = round-half-even(x / scale) clipped to +-127), and dotted with the integer weights, in
// float: exact while 127 * sum|weight| < 2^24 (the caller checks). Padding is 0.0, as in a patch row.
// sums, scales: [oh * ow]; scratch as above.
inline void depthwise_quantized_patches(const float* __restrict__ plane, const ptq::ConvShape& s,
                                        const ptq::DepthwisePhases& p, const float* weight, float* __restrict__ sums,
                                        float* __restrict__ scales, float* __restrict__ scratch) {
  const int64_t oh = s.out_h(), ow = s.out_w();
  float* planes = scratch;
  float* run_sums = planes + p.planes_size;
  float* run_scales = run_sums + p.length;  // the input-row space of the integer path, and more
  for (int64_t iy = 0; iy < s.height; ++iy) {
    const float* line = plane + iy * s.width;
    for (int64_t b = 0; b < s.stride_w; ++b) {
      float* phase_row = planes + p.row[iy] + p.column[b];
      for (int64_t from = p.first[b], col = 0; from < s.width; from += s.stride_w, ++col) phase_row[col] = line[from];
    }
  }
  const int64_t taps = static_cast<int64_t>(p.offset.size());
  const Run zero = Run{}, one = zero + 1.0f, limit = zero + 127.0f;
  const Run magic = zero + 12582912.0f;  // 1.5 * 2^23: adding and taking it back rounds half to even
  for (int64_t f = 0; f < p.length; f += kRunFloats) {
    Run amax = zero;
    for (int64_t t = 0; t < taps; ++t) {
      Run v;
      std::memcpy(&v, planes + p.offset[t] + f, sizeof(v));
      const Run magnitude = reinterpret_cast<Run>(reinterpret_cast<RunInts>(v) & 0x7FFFFFFF);
      amax = magnitude > amax ? magnitude : amax;
    }
    const Run scale = amax > zero ? amax / limit : one;
    Run acc = zero;
    for (int64_t t = 0; t < taps; ++t) {
      Run v;
      std::memcpy(&v, planes + p.offset[t] + f, sizeof(v));
      Run q = (v / scale + magic) - magic;
      q = q > limit ? limit : q;
      q = q < -limit ? -limit : q;
      acc += q * weight[t];
    }
    std::memcpy(run_sums + f, &acc, sizeof(acc));
    std::memcpy(run_scales + f, &scale, sizeof(scale));
  }
  for (int64_t y = 0; y < oh; ++y) {
    std::copy(run_sums + y * p.wq, run_sums + y * p.wq + ow, sums + y * ow);
    std::copy(run_scales + y * p.wq, run_scales + y * p.wq + ow, scales + y * ow);
  }
}

}  // namespace
