// ONNX Runtime custom operators (domain "ptqcli") over the kernels in kernels.h. One table, kOps,
// lists every operator: its weight format (family) and how its input is laid out (layout).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "lstm.h"

namespace {

enum class Family { Int4, Shift, Binary };
enum class Layout { MatMul, Gemm, Conv };

struct OpEntry {
  const char* name;
  Family family;
  Layout layout;
};

constexpr OpEntry kOps[] = {
    {"Int4MatMul", Family::Int4, Layout::MatMul},   {"Int4Gemm", Family::Int4, Layout::Gemm},
    {"Int4Conv", Family::Int4, Layout::Conv},       {"ShiftMatMul", Family::Shift, Layout::MatMul},
    {"ShiftGemm", Family::Shift, Layout::Gemm},     {"ShiftConv", Family::Shift, Layout::Conv},
    {"BinaryMatMul", Family::Binary, Layout::MatMul}, {"BinaryGemm", Family::Binary, Layout::Gemm},
    {"BinaryConv", Family::Binary, Layout::Conv},
};

// Shift codes: bit 3 the sign, bits 0-2 the exponent e (2^e for e < 7; e = 7 is zero), decoded
// with +64 so every value is an unsigned byte, and 64 taken back out as the zero point.
constexpr int32_t kShiftOffset = 64;
const uint8_t kShiftLut[16] = {65, 66, 68, 72, 80, 96, 128, 64, 63, 62, 60, 56, 48, 32, 0, 64};

// Nibble inputs: X, W, W_scale, W_zero, X_scale, X_zero, Bias. Binary inputs: X, W, W_scale, Bias.
constexpr size_t kNibbleInputs = 7;
constexpr size_t kBinaryInputs = 4;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void require(bool ok, const std::string& node, const std::string& message) {
  if (!ok) throw Error(node + ": " + message);
}

std::vector<int64_t> attribute_list(const Ort::ConstKernelInfo& info, const char* name, std::vector<int64_t> fallback) {
  try {
    return info.GetAttributes<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

int64_t attribute(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback) {
  try {
    return info.GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

void run_task(void* data, size_t index) { (*static_cast<const std::function<void(size_t)>*>(data))(index); }

ptq::ParallelFor session_threads(const Ort::KernelContext& ctx) {
  return [&ctx](size_t count, const std::function<void(size_t)>& task) {
    if (count <= 1) return ptq::serial_for(count, task);
    ctx.ParallelFor(run_task, count, 0, const_cast<void*>(static_cast<const void*>(&task)));
  };
}

struct Conv {
  std::vector<int64_t> kernel, strides, pads, dilations;
  int64_t group = 1;
};

// Activations as int8 rows padded to kp: quantized per row on the fly (float input) or taken as
// given with the tensor's scale and zero point (int8/uint8 input, uint8 shifted by -128).
struct Activations {
  std::unique_ptr<int8_t[]> q;  // [M, kp], left uninitialized: every byte is written before it is read
  std::vector<float> scale;
  std::vector<int32_t> zero;
  std::vector<int32_t> rowsum;
};

class Kernel {
 public:
  Kernel(const OpEntry& entry, const OrtKernelInfo* raw_info) : entry_(entry) {
    Ort::ConstKernelInfo info(raw_info);
    node_ = info.GetNodeName();
    k_ = attribute(info, "K", -1);
    n_ = attribute(info, "N", -1);
    group_size_ = attribute(info, "group_size", 0);
    require(k_ > 0 && n_ > 0, node_, "attributes K and N must be positive");
    if (entry.layout == Layout::Conv) {
      conv_.kernel = attribute_list(info, "kernel_shape", {});
      require(conv_.kernel.size() == 2, node_, "kernel_shape must have 2 values (2-D convolution)");
      conv_.strides = attribute_list(info, "strides", {1, 1});
      conv_.pads = attribute_list(info, "pads", {0, 0, 0, 0});
      conv_.dilations = attribute_list(info, "dilations", {1, 1});
      conv_.group = attribute(info, "group", 1);
      require(conv_.strides.size() == 2 && conv_.pads.size() == 4 && conv_.dilations.size() == 2, node_,
              "strides, pads and dilations must describe a 2-D convolution");
      // A zero stride would divide by zero, a negative pad index outside the input: refused here,
      // while the session is made, never met in the kernels.
      for (const int64_t v : conv_.kernel) require(v > 0, node_, "kernel_shape values must be positive");
      for (const int64_t v : conv_.strides) require(v > 0, node_, "strides must be positive");
      for (const int64_t v : conv_.dilations) require(v > 0, node_, "dilations must be positive");
      for (const int64_t v : conv_.pads) require(v >= 0, node_, "pads must not be negative");
      require(conv_.group > 0 && n_ % conv_.group == 0, node_, "N must be a multiple of group");
    }
    if (entry.family == Family::Binary) {
      words_ = (k_ + ptq::kBinaryWord - 1) / ptq::kBinaryWord;
      int w_constant = 0;
      Ort::ConstValue w = info.GetTensorConstantInput(1, &w_constant);
      if (w_constant) {
        check_count(w, n_ * words_, "W (sign bits, N x ceil(K/64) words)");
        binary_panels_ = binary_slices(w.GetTensorData<uint64_t>());
      }
    } else {
      require(group_size_ >= 0 && group_size_ % ptq::kNibbleBlock == 0, node_,
              "group_size must be 0 (per channel) or a multiple of 32");
      kp_ = ptq::round_up(k_, group_size_ > 0 ? group_size_ : ptq::kNibbleBlock);
      // Per channel, the kernels need K only in steps of 16, not of the file's 32-element blocks:
      // a 16-channel 1x1 conv does half the work.
      kr_ = group_size_ > 0 ? kp_ : ptq::round_up(k_, ptq::kNibbleStep);
      group_ = group_size_ > 0 ? group_size_ : kr_;
      groups_ = kr_ / group_;
      cache_prepared_weights(info);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      if (entry_.layout == Layout::Conv)
        compute_conv(ctx);
      else
        compute_rows(ctx);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
  }

 private:
  // Weights re-laid into panels once, when they are initializers (they are in exported models).
  void cache_prepared_weights(const Ort::ConstKernelInfo& info) {
    const bool zero_given = info.GetInputCount() > 3 && !info.GetInputName(3).empty();
    int zero_constant = 1;
    if (zero_given) {
      Ort::ConstValue z = info.GetTensorConstantInput(3, &zero_constant);
      if (zero_constant) zero_ = weight_zeros(z.GetTensorData<uint8_t>(), z.GetTensorTypeAndShapeInfo().GetElementCount());
    } else {
      zero_ = weight_zeros(nullptr, 0);
    }
    int w_constant = 0, scale_constant = 0;
    Ort::ConstValue w = info.GetTensorConstantInput(1, &w_constant);
    Ort::ConstValue scale = info.GetTensorConstantInput(2, &scale_constant);
    if (w_constant && scale_constant && zero_constant) {
      check_count(w, n_ * kp_ / 2, "W (packed 4-bit codes, N x Kp/2)");
      check_count(scale, n_ * groups_, "W_scale");
      slices_ = prepare(w.GetTensorData<uint8_t>(), scale.GetTensorData<float>(), zero_);
      if (depthwise_shaped()) depthwise_ = depthwise_weights(w.GetTensorData<uint8_t>(), zero_.data());
    }
  }

  // One input channel per output channel, one scale group: run by ptq::depthwise_conv.
  bool depthwise_shaped() const {
    return entry_.layout == Layout::Conv && conv_.group == n_ && k_ == conv_.kernel[0] * conv_.kernel[1] && groups_ == 1;
  }

  ptq::DepthwiseWeights depthwise_weights(const uint8_t* rows, const int32_t* zero) const {
    return ptq::depthwise_weights(rows, n_, kp_, k_, zero, lut());
  }

  // Sign-bit panels per convolution group (one in all for MatMul and Gemm).
  std::vector<std::vector<uint64_t>> binary_slices(const uint64_t* bits) const {
    const int64_t slices = entry_.layout == Layout::Conv ? conv_.group : 1, per_slice = n_ / slices;
    std::vector<std::vector<uint64_t>> out;
    for (int64_t i = 0; i < slices; ++i) out.push_back(ptq::binary_panels(bits + i * per_slice * words_, per_slice, words_));
    return out;
  }

  // One prepared slice per convolution group (one in all for MatMul and Gemm).
  std::vector<ptq::PreparedNibbles> prepare(const uint8_t* rows, const float* scale, const std::vector<int32_t>& zero) const {
    const int64_t slices = entry_.layout == Layout::Conv ? conv_.group : 1;
    const int64_t per_slice = n_ / slices;
    std::vector<ptq::PreparedNibbles> out;
    for (int64_t i = 0; i < slices; ++i)
      out.push_back(ptq::prepare_nibbles(rows, scale, zero.data(), i * per_slice, per_slice, kp_, kr_, group_, lut()));
    return out;
  }

  // [N, groups] decoded zero points.
  std::vector<int32_t> weight_zeros(const uint8_t* given, size_t count) const {
    const size_t expected = static_cast<size_t>(n_ * groups_);
    if (entry_.family == Family::Shift) {
      require(given == nullptr, node_, "shift weights take no zero point");
      return std::vector<int32_t>(expected, kShiftOffset);
    }
    if (given == nullptr) return std::vector<int32_t>(expected, 8);  // signed int4 stored as code + 8
    require(count == expected, node_, "W_zero_point must have N x groups elements");
    std::vector<int32_t> zeros(expected);
    for (size_t i = 0; i < expected; ++i) {
      require(given[i] < 16, node_, "W_zero_point values must be 4-bit");
      zeros[i] = given[i];
    }
    return zeros;
  }

  // The weights as the kernels read them: cached, or prepared for this call into storage.
  struct WeightsNow {
    const std::vector<ptq::PreparedNibbles>* slices;
    const uint8_t* rows;
    const float* scale;
    const int32_t* zero;
  };

  WeightsNow weights_now(const Ort::KernelContext& ctx, std::vector<ptq::PreparedNibbles>& slice_storage,
                         std::vector<int32_t>& zero_storage) const {
    Ort::ConstValue w = ctx.GetInput(1), scale = ctx.GetInput(2);
    check_count(w, n_ * kp_ / 2, "W (packed 4-bit codes, N x Kp/2)");
    check_count(scale, n_ * groups_, "W_scale");
    const std::vector<int32_t>* zero = &zero_;
    if (zero_.empty()) {
      Ort::ConstValue z = optional_input(ctx, 3);
      zero_storage = weight_zeros(z.GetTensorData<uint8_t>(), z.GetTensorTypeAndShapeInfo().GetElementCount());
      zero = &zero_storage;
    }
    const std::vector<ptq::PreparedNibbles>* slices = &slices_;
    if (slices_.empty()) {
      slice_storage = prepare(w.GetTensorData<uint8_t>(), scale.GetTensorData<float>(), *zero);
      slices = &slice_storage;
    }
    return {slices, w.GetTensorData<uint8_t>(), scale.GetTensorData<float>(), zero->data()};
  }

  const uint8_t* lut() const { return entry_.family == Family::Shift ? kShiftLut : nullptr; }

  static std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

  static int64_t element_count(const std::vector<int64_t>& shape) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    return count;
  }

  void check_count(const Ort::ConstValue& v, int64_t expected, const char* what) const {
    require(v != nullptr && static_cast<int64_t>(v.GetTensorTypeAndShapeInfo().GetElementCount()) == expected, node_,
            std::string(what) + " must have " + std::to_string(expected) + " elements");
  }

  static Ort::ConstValue optional_input(const Ort::KernelContext& ctx, size_t index) {
    return index < ctx.GetInputCount() ? ctx.GetInput(index) : Ort::ConstValue(nullptr);
  }

  // Scale and zero point of an integer input, the zero point shifted into int8 like the values.
  std::pair<float, int32_t> input_quantization(const Ort::KernelContext& ctx, ONNXTensorElementDataType type) const {
    Ort::ConstValue scale = optional_input(ctx, 4), zero = optional_input(ctx, 5);
    require(scale != nullptr, node_, "an integer X needs X_scale");
    check_count(scale, 1, "X_scale");
    int32_t z = 0;
    if (zero != nullptr) {
      check_count(zero, 1, "X_zero_point");
      require(zero.GetTensorTypeAndShapeInfo().GetElementType() == type, node_, "X_zero_point must have X's type");
      z = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? int32_t(zero.GetTensorData<uint8_t>()[0]) - 128
                                                       : int32_t(zero.GetTensorData<int8_t>()[0]);
    } else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
      z = -128;
    }
    return {scale.GetTensorData<float>()[0], z};
  }

  // An integer tensor as int8 (uint8 shifted by -128), so one kernel serves both.
  static std::vector<int8_t> as_int8(const Ort::ConstValue& x, ONNXTensorElementDataType type, int64_t count) {
    std::vector<int8_t> out(static_cast<size_t>(count));
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
      const uint8_t* src = x.GetTensorData<uint8_t>();
      for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int8_t>(int32_t(src[i]) - 128);
    } else {
      const int8_t* src = x.GetTensorData<int8_t>();
      std::copy(src, src + count, out.begin());
    }
    return out;
  }

  void finish_rows(Activations& a, int64_t m, const ptq::ParallelFor& parallel) const {
    a.rowsum.resize(static_cast<size_t>(m * groups_));
    ptq::quant_rowsums(a.q.get(), m, kr_, group_, a.rowsum.data(), parallel);
  }

  const float* bias_input(const Ort::KernelContext& ctx) const {
    Ort::ConstValue bias = optional_input(ctx, entry_.family == Family::Binary ? kBinaryInputs - 1 : kNibbleInputs - 1);
    if (bias == nullptr) return nullptr;
    check_count(bias, n_, "Bias");
    return bias.GetTensorData<float>();
  }

  ONNXTensorElementDataType checked_type(const Ort::ConstValue& x) const {
    const auto type = x.GetTensorTypeAndShapeInfo().GetElementType();
    const bool ok = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
                    (entry_.family != Family::Binary &&
                     (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 || type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8));
    require(ok, node_, entry_.family == Family::Binary ? "X must be float" : "X must be float, int8 or uint8");
    return type;
  }

  void compute_rows(Ort::KernelContext& ctx) {
    Ort::ConstValue x = ctx.GetInput(0);
    const auto type = checked_type(x);
    std::vector<int64_t> shape = shape_of(x);
    require(!shape.empty() && shape.back() == k_, node_, "the last dimension of X must be K=" + std::to_string(k_));
    require(entry_.layout != Layout::Gemm || shape.size() == 2, node_, "Gemm takes a 2-D X");
    const int64_t m = element_count(shape) / k_;
    shape.back() = n_;
    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    const ptq::OutputView out{y.GetTensorMutableData<float>(), n_, 1};
    const float* bias = bias_input(ctx);
    const auto parallel = session_threads(ctx);
    if (entry_.family == Family::Binary) {
      run_binary(ctx, x.GetTensorData<float>(), nullptr, m, bias, out, parallel);
      return;
    }
    Activations a;
    a.q.reset(new int8_t[static_cast<size_t>(m * kr_)]);
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      a.scale.resize(m);
      a.zero.resize(m);
      ptq::quantize_rows_symmetric(x.GetTensorData<float>(), m, k_, kr_, a.q.get(), a.scale.data(), a.zero.data(),
                                   parallel);
    } else {
      const auto [scale, zero] = input_quantization(ctx, type);
      const std::vector<int8_t> values = as_int8(x, type, m * k_);
      for (int64_t r = 0; r < m; ++r) {
        std::copy(values.begin() + r * k_, values.begin() + (r + 1) * k_, a.q.get() + r * kr_);
        std::fill(a.q.get() + r * kr_ + k_, a.q.get() + (r + 1) * kr_, static_cast<int8_t>(zero));
      }
      a.scale.assign(m, scale);
      a.zero.assign(m, zero);
    }
    finish_rows(a, m, parallel);
    std::vector<ptq::PreparedNibbles> slice_storage;
    std::vector<int32_t> zero_storage;
    const WeightsNow now = weights_now(ctx, slice_storage, zero_storage);
    ptq::gemm_nibble({a.q.get(), m, a.scale.data(), a.zero.data(), a.rowsum.data()}, now.slices->front().view(), bias,
                     out, parallel);
  }

  void run_binary(const Ort::KernelContext& ctx, const float* rows, const uint8_t* valid, int64_t m, const float* bias,
                  ptq::OutputView out, const ptq::ParallelFor& parallel, int64_t n0 = 0, int64_t n = -1) const {
    Ort::ConstValue w = ctx.GetInput(1), scale = ctx.GetInput(2);
    check_count(w, n_ * words_, "W (sign bits, N x ceil(K/64) words)");
    check_count(scale, n_, "W_scale");
    if (n < 0) n = n_;
    std::vector<uint64_t> bits(static_cast<size_t>(m * words_)), valid_bits(valid ? bits.size() : 0);
    std::vector<int32_t> count(m);
    std::vector<float> x_scale(m);
    ptq::binarize_rows(rows, valid, m, k_, words_, bits.data(), valid ? valid_bits.data() : nullptr, count.data(),
                       x_scale.data(), parallel);
    const ptq::BinaryRows xr{bits.data(), valid ? valid_bits.data() : nullptr, count.data(), x_scale.data(), m};
    const uint64_t* w_bits = w.GetTensorData<uint64_t>() + n0 * words_;
    std::vector<uint64_t> prepared;  // only when W is not a constant
    if (binary_panels_.empty()) prepared = ptq::binary_panels(w_bits, n, words_);
    const uint64_t* panels = binary_panels_.empty() ? prepared.data() : binary_panels_[n0 / n].data();
    const ptq::BinaryWeights wr{w_bits, panels, scale.GetTensorData<float>() + n0, n, words_};
    ptq::gemm_binary(xr, wr, bias ? bias + n0 : nullptr, out, parallel);
  }

  void compute_conv(Ort::KernelContext& ctx) {
    Ort::ConstValue x = ctx.GetInput(0);
    const auto type = checked_type(x);
    const std::vector<int64_t> shape = shape_of(x);
    require(shape.size() == 4, node_, "Conv takes X as N x C x H x W");
    const int64_t batch = shape[0], channels = shape[1];
    require(channels % conv_.group == 0, node_, "C must be a multiple of group");
    const int64_t cg = channels / conv_.group, ng = n_ / conv_.group;
    require(cg * conv_.kernel[0] * conv_.kernel[1] == k_, node_, "K must equal C/group x kernel_h x kernel_w");
    const ptq::ConvShape s{channels, shape[2], shape[3], conv_.kernel[0], conv_.kernel[1],
                           conv_.strides[0], conv_.strides[1], conv_.pads[0], conv_.pads[1],
                           conv_.pads[2], conv_.pads[3], conv_.dilations[0], conv_.dilations[1]};
    const int64_t oh = s.out_h(), ow = s.out_w(), pixels = oh * ow;
    require(oh > 0 && ow > 0, node_, "the kernel does not fit the padded input");
    Ort::UnownedValue y = ctx.GetOutput(0, std::vector<int64_t>{batch, n_, oh, ow});
    float* out = y.GetTensorMutableData<float>();
    const float* bias = bias_input(ctx);
    const auto parallel = session_threads(ctx);
    const int64_t image_size = channels * s.height * s.width;

    // Many small groups (depthwise-like) run one group per task; one big group spreads inside it.
    const auto for_each_group = [&](const std::function<void(int64_t, int64_t, const ptq::ParallelFor&)>& run) {
      if (conv_.group == 1) {
        for (int64_t b = 0; b < batch; ++b) run(b, 0, parallel);
        return;
      }
      parallel(static_cast<size_t>(batch * conv_.group), [&](size_t task) {
        run(static_cast<int64_t>(task) / conv_.group, static_cast<int64_t>(task) % conv_.group, ptq::serial_for);
      });
    };

    if (entry_.family == Family::Binary) {
      for_each_group([&](int64_t b, int64_t g, const ptq::ParallelFor& inner) {
        std::vector<float> rows(static_cast<size_t>(pixels * k_));
        std::vector<uint8_t> valid(rows.size());
        ptq::im2col<float>(x.GetTensorData<float>() + b * image_size, s, g * cg, cg, k_, 0.0f, rows.data(), valid.data(),
                           inner);
        const ptq::OutputView view{out + (b * n_ + g * ng) * pixels, 1, pixels};
        run_binary(ctx, rows.data(), valid.data(), pixels, bias, view, inner, g * ng, ng);
      });
      return;
    }

    std::vector<ptq::PreparedNibbles> slice_storage;
    std::vector<int32_t> zero_storage;
    const WeightsNow now = weights_now(ctx, slice_storage, zero_storage);
    float input_scale = 0.0f;
    int32_t input_zero = 0;
    // Integer images are read in place: uint8 as int8 with the top bit flipped (see image_value).
    const uint8_t* image = nullptr;
    uint8_t flip = 0;
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      std::tie(input_scale, input_zero) = input_quantization(ctx, type);
      image = static_cast<const uint8_t*>(x.GetTensorRawData());
      flip = type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? 0x80 : 0;
    }
    if (depthwise_shaped()) {  // straight from the image, no patches (cg == 1 follows from K)
      ptq::DepthwiseWeights made;
      if (depthwise_.taps == 0) made = depthwise_weights(now.rows, now.zero);
      const ptq::DepthwiseWeights& weights = depthwise_.taps == 0 ? made : depthwise_;
      for (int64_t b = 0; b < batch; ++b) {
        ptq::DepthwiseImage in;
        if (image != nullptr) {
          in.bytes = image + b * image_size;
          in.flip = flip;
          in.x_scale = input_scale;
          in.x_zero = input_zero;
        } else {
          in.floats = x.GetTensorData<float>() + b * image_size;
        }
        ptq::depthwise_conv(in, s, weights, now.scale, bias, out + b * n_ * pixels, parallel);
      }
      return;
    }
    for_each_group([&](int64_t b, int64_t g, const ptq::ParallelFor& inner) {
      Activations a;
      a.q.reset(new int8_t[static_cast<size_t>(pixels * kr_)]);
      a.scale.resize(pixels);
      a.zero.resize(pixels);
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        std::vector<float> rows(static_cast<size_t>(pixels * k_));
        ptq::im2col<float>(x.GetTensorData<float>() + b * image_size, s, g * cg, cg, k_, 0.0f, rows.data(), nullptr,
                           inner);
        ptq::quantize_rows_symmetric(rows.data(), pixels, k_, kr_, a.q.get(), a.scale.data(), a.zero.data(), inner);
      } else {
        ptq::im2col<int8_t>(reinterpret_cast<const int8_t*>(image) + b * image_size, s, g * cg, cg, kr_,
                            static_cast<int8_t>(input_zero), a.q.get(), nullptr, inner, flip);
        std::fill(a.scale.begin(), a.scale.end(), input_scale);
        std::fill(a.zero.begin(), a.zero.end(), input_zero);
      }
      finish_rows(a, pixels, inner);
      const ptq::OutputView view{out + (b * n_ + g * ng) * pixels, 1, pixels};
      ptq::gemm_nibble({a.q.get(), pixels, a.scale.data(), a.zero.data(), a.rowsum.data()}, (*now.slices)[g].view(),
                       bias ? bias + g * ng : nullptr, view, inner);
    });
  }

  OpEntry entry_;
  std::string node_;
  int64_t k_ = 0, n_ = 0, group_size_ = 0;
  int64_t kp_ = 0;  // K rounded up as the model's packed rows are
  int64_t kr_ = 0;  // K rounded up as the kernels read it (activation rows, weight panels)
  int64_t group_ = 0, groups_ = 0, words_ = 0;
  Conv conv_;
  std::vector<int32_t> zero_;                     // [N, groups], when constant
  std::vector<ptq::PreparedNibbles> slices_;      // when W, W_scale and W_zero_point are constant
  ptq::DepthwiseWeights depthwise_;               // likewise, for depthwise layers
  std::vector<std::vector<uint64_t>> binary_panels_;  // per conv group, when W is a constant
};

struct Op : Ort::CustomOpBase<Op, Kernel, true> {
  explicit Op(const OpEntry& entry) : entry_(entry) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(entry_, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }

  const char* GetName() const { return entry_.name; }
  size_t GetInputTypeCount() const { return binary() ? kBinaryInputs : kNibbleInputs; }

  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (binary()) {
      return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    switch (index) {
      case 0:  // float, int8 or uint8, checked at run time
      case 5:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
      case 1:
      case 3:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }

  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    const size_t required = 3;  // X, W, W_scale
    return index < required ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  bool binary() const { return entry_.family == Family::Binary; }
  OpEntry entry_;
};

std::once_flag ops_made;
std::vector<std::unique_ptr<Op>>* all_ops = nullptr;
ptq::IntLstmOp* int_lstm = nullptr;
Ort::CustomOpDomain* domain = nullptr;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // The API table of the headers' version: the operators use it throughout, so an older runtime,
  // which has no such table, is refused here with a status built from API 1, which every runtime has.
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* oldest = api_base->GetApi(1);
    const std::string message = "ptqcli native operators need ONNX Runtime C API " + std::to_string(ORT_API_VERSION) +
                                " (onnxruntime >= 1." + std::to_string(ORT_API_VERSION) + "); this runtime is " +
                                api_base->GetVersionString();
    return oldest == nullptr ? nullptr : oldest->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    std::call_once(ops_made, [] {
      // Kept for the life of the process: sessions hold pointers to the domain and its ops.
      all_ops = new std::vector<std::unique_ptr<Op>>();
      domain = new Ort::CustomOpDomain("ptqcli");
      for (const OpEntry& entry : kOps) {
        all_ops->push_back(std::make_unique<Op>(entry));
        domain->Add(all_ops->back().get());
      }
      int_lstm = new ptq::IntLstmOp();
      domain->Add(int_lstm);
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// The instruction set the kernels use on this CPU ("avx512-vnni", "avx2" or "scalar").
extern "C" __attribute__((visibility("default"))) const char* PtqNativeIsa() { return ptq::active_isa(); }

// The ONNX Runtime C API version the library was compiled against and asks the runtime for.
extern "C" __attribute__((visibility("default"))) int PtqNativeOrtApiVersion() { return ORT_API_VERSION; }

// The operator names of kOps, comma-separated: Python reads them instead of keeping its own list.
extern "C" __attribute__((visibility("default"))) const char* PtqNativeOperators() {
  static const std::string names = [] {
    std::string joined;
    for (const OpEntry& entry : kOps) {
      joined += (joined.empty() ? "" : ",");
      joined += entry.name;
    }
    return joined + "," + ptq::IntLstmOp().GetName();
  }();
  return names.c_str();
}
