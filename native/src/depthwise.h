// The accumulation loop of one depthwise channel, included by the scalar, AVX2 and AVX-512
// translation units so that each is compiled (and auto-vectorised) for its own instruction set.
// Integer arithmetic only: every path gives the same sums.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels.h"

// Internal linkage: each translation unit keeps its own copy, compiled for its own instruction set
// (one shared inline definition would let the linker hand the AVX-512 copy to every path).
namespace {

// acc[oh * ow] += sum over taps of (x - x_zero) * weight[tap]; taps whose input lies in the
// padding add 0 and are skipped.
inline void depthwise_accumulate(const int8_t* plane, const ptq::ConvShape& s, int32_t x_zero, const int32_t* weight,
                                 int32_t* acc) {
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
        const int8_t* line = plane + iy * s.width + shift;
        int32_t* row = acc + y * ow;
        if (s.stride_w == 1) {  // contiguous: the loop the compiler vectorises
          for (int64_t x = x0; x < x1; ++x) row[x] += (int32_t(line[x]) - x_zero) * wt;
        } else if (s.stride_w == 2) {
          for (int64_t x = x0; x < x1; ++x) row[x] += (int32_t(line[2 * x]) - x_zero) * wt;
        } else {
          for (int64_t x = x0; x < x1; ++x) row[x] += (int32_t(line[x * s.stride_w]) - x_zero) * wt;
        }
      }
    }
}

}  // namespace
