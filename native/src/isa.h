// The per-instruction-set kernels (kernels_avx2.cpp, kernels_avx512.cpp) and their table.
#pragma once

#include "kernels.h"

namespace ptq::isa {

// row_term: [G, M] rowsum - group * x_zero (see tiles.h).
using NibbleTiles = void (*)(const QuantRows&, const NibbleWeights&, const int32_t* row_term, const float* bias,
                             OutputView, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
using BinaryTiles = void (*)(const BinaryRows&, const BinaryWeights&, const float* bias, OutputView, int64_t m0,
                             int64_t m1, int64_t n0, int64_t n1);

// One depthwise channel's integer sums (depthwise.h), compiled per instruction set.
using DepthwiseAccumulate = void (*)(const uint8_t* plane, uint8_t flip, const ConvShape&, int32_t x_zero,
                                     const int32_t* weight, int32_t* acc);
using DepthwiseAccumulateFloat = void (*)(const uint8_t* plane, uint8_t flip, const ConvShape&, const DepthwisePhases&,
                                          int32_t x_zero, const float* weight, float* out, float* scratch);
using DepthwisePatches = void (*)(const float* plane, const ConvShape&, const DepthwisePhases&, const float* weight,
                                  float* sums, float* scales, float* scratch);
using QuantizeRow = void (*)(const float* x, int64_t k, int64_t kp, int8_t* q, float* scale);
using DotRows16 = void (*)(const int16_t* m, const int16_t* v, int64_t rows, int64_t n, int64_t* out);
using BinarizeRow = void (*)(const float* x, const uint8_t* valid, int64_t k, int64_t words, uint64_t* bits,
                             uint64_t* valid_bits, int32_t* count, float* scale);

// Everything one instruction set runs, in one table; kernels.cpp picks the table once per call.
struct Kernels {
  NibbleTiles nibble;
  BinaryTiles binary;
  DepthwiseAccumulate depthwise;
  DepthwiseAccumulateFloat depthwise_float;
  DepthwisePatches depthwise_patches;
  QuantizeRow quantize_row;
  BinarizeRow binarize_row;
  DotRows16 dot_rows_i16;  // products.h
};

const Kernels& avx2_kernels();
const Kernels& avx512_kernels();

// One row each; the AVX2 versions serve every level above scalar (see kernels.cpp for the scalar ones).
void quantize_row_avx2(const float* x, int64_t k, int64_t kp, int8_t* q, float* scale);
void binarize_row_avx2(const float* x, const uint8_t* valid, int64_t k, int64_t words, uint64_t* bits,
                       uint64_t* valid_bits, int32_t* count, float* scale);

}  // namespace ptq::isa
