// Entry points of the per-instruction-set tile kernels (kernels_avx2.cpp, kernels_avx512.cpp).
#pragma once

#include "kernels.h"

namespace ptq::isa {

// row_term: [G, M] rowsum - group * x_zero (see tiles.h).
using NibbleTiles = void (*)(const QuantRows&, const NibbleWeights&, const int32_t* row_term, const float* bias,
                             OutputView, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
using BinaryTiles = void (*)(const BinaryRows&, const BinaryWeights&, const float* bias, OutputView, int64_t m0,
                             int64_t m1, int64_t n0, int64_t n1);

void nibble_avx2(const QuantRows&, const NibbleWeights&, const int32_t*, const float*, OutputView, int64_t, int64_t,
                 int64_t, int64_t);
void binary_avx2(const BinaryRows&, const BinaryWeights&, const float*, OutputView, int64_t, int64_t, int64_t, int64_t);
void nibble_avx512(const QuantRows&, const NibbleWeights&, const int32_t*, const float*, OutputView, int64_t, int64_t,
                   int64_t, int64_t);
void binary_avx512(const BinaryRows&, const BinaryWeights&, const float*, OutputView, int64_t, int64_t, int64_t,
                   int64_t);

// One depthwise channel's integer sums (depthwise.h), compiled per instruction set.
using DepthwiseAccumulate = void (*)(const uint8_t* plane, uint8_t flip, const ConvShape&, int32_t x_zero,
                                     const int32_t* weight, int32_t* acc);
void depthwise_avx2(const uint8_t*, uint8_t, const ConvShape&, int32_t, const int32_t*, int32_t*);
void depthwise_avx512(const uint8_t*, uint8_t, const ConvShape&, int32_t, const int32_t*, int32_t*);
using DepthwiseAccumulateFloat = void (*)(const uint8_t* plane, uint8_t flip, const ConvShape&, const DepthwisePhases&,
                                          int32_t x_zero, const float* weight, float* out, float* scratch);
void depthwise_float_avx2(const uint8_t*, uint8_t, const ConvShape&, const DepthwisePhases&, int32_t, const float*,
                          float*, float*);
using DepthwisePatches = void (*)(const float* plane, const ConvShape&, const DepthwisePhases&, const float* weight,
                                  float* sums, float* scales, float* scratch);
void depthwise_patches_avx2(const float*, const ConvShape&, const DepthwisePhases&, const float*, float*, float*, float*);
void depthwise_patches_avx512(const float*, const ConvShape&, const DepthwisePhases&, const float*, float*, float*,
                              float*);
void depthwise_float_avx512(const uint8_t*, uint8_t, const ConvShape&, const DepthwisePhases&, int32_t, const float*,
                            float*, float*);

// One row each; the AVX2 versions serve every level above scalar (see kernels.cpp for the scalar ones).
void quantize_row_avx2(const float* x, int64_t k, int64_t kp, int8_t* q, float* scale);
void binarize_row_avx2(const float* x, const uint8_t* valid, int64_t k, int64_t words, uint64_t* bits,
                       uint64_t* valid_bits, int32_t* count, float* scale);

}  // namespace ptq::isa
