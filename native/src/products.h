// Exact int16 dot products, included by the scalar, AVX2 and AVX-512 translation units so that
// each compiles (and auto-vectorises) them for its own instruction set. Integer arithmetic only:
// every path gives the same sums.
#pragma once

#include <algorithm>
#include <cstdint>

// Internal linkage, as in depthwise.h: each translation unit keeps its own copy.
namespace {

// int16 x int16 products summed in int32 this many at a time: a run of int8 x Q0.15 products (the
// IntLSTM's R h) stays within int32 (127 * 32767 * 512 < 2^31), and the runs add up in int64.
constexpr int64_t kInt32Run = 512;

// out[r] = sum over j < n of m[r * n + j] * v[j] (m holds values of at most 8 bits, v of at most
// 16), exact.
inline void dot_rows_i16(const int16_t* m, const int16_t* v, int64_t rows, int64_t n, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const int16_t* a = m + r * n;
    int64_t total = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kInt32Run) {
      const int64_t j1 = std::min(n, j0 + kInt32Run);
      int32_t part = 0;
      for (int64_t j = j0; j < j1; ++j) part += int32_t{a[j]} * int32_t{v[j]};
      total += part;
    }
    out[r] = total;
  }
}

}  // namespace
