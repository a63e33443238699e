// IntLSTM (see lstm.h). Inputs: X float [T, N, F]; W int8 [D, 4H, F]; R int8 [D, 4H, H]; W_mult,
// R_mult, Bias int64 [D, 4H]; knots, values int32 [D, 3, S + 1]; slopes int64 [D, 3, S]; optional
// initial_h, initial_c float [D, N, H]. Attributes: hidden_size, x_scale, cell_frac, direction.
// Outputs Y [T, D, N, H], Y_h and Y_c [D, N, H]. Gates in ONNX's order i, o, f, c; the three
// tables are sigmoid (i, o, f), tanh (c) and the cell's tanh.
#include "lstm.h"

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace ptq {
namespace {

constexpr int kAccShift = 24;
constexpr int kOutFrac = 15;
constexpr int kSlopeFrac = 16;
constexpr int64_t kInt16Max = 32767;

int64_t rshift_round(int64_t v, int bits) { return (v + (int64_t{1} << (bits - 1))) >> bits; }

std::vector<int16_t> widened(const int8_t* v, int64_t n) { return std::vector<int16_t>(v, v + n); }
int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

struct Table {
  const int32_t* knots;   // segments + 1
  const int32_t* values;  // segments + 1
  const int64_t* slopes;  // segments
  int64_t segments;

  int64_t operator()(int64_t x) const {
    if (x <= knots[0]) return values[0];
    if (x >= knots[segments]) return values[segments];
    const int64_t k = std::clamp<int64_t>(std::upper_bound(knots, knots + segments + 1, x) - knots - 1, 0, segments - 1);
    const int64_t y = values[k] + rshift_round(slopes[k] * (x - knots[k]), kSlopeFrac);
    return clamp(y, -kInt16Max, kInt16Max);
  }
};

std::runtime_error error(const std::string& node, const std::string& message) {
  return std::runtime_error(node + ": " + message);
}

}  // namespace

IntLstmKernel::IntLstmKernel(const OrtKernelInfo* raw) {
  Ort::ConstKernelInfo info(raw);
  node_ = info.GetNodeName();
  hidden_ = info.GetAttribute<int64_t>("hidden_size");
  cell_frac_ = info.GetAttribute<int64_t>("cell_frac");
  x_scale_ = info.GetAttribute<float>("x_scale");
  const std::string direction = info.GetAttribute<std::string>("direction");
  if (hidden_ <= 0) throw error(node_, "hidden_size must be positive");
  if (cell_frac_ < 0 || cell_frac_ > 15) throw error(node_, "cell_frac must be 0-15");
  if (!(x_scale_ > 0.0f) || !std::isfinite(x_scale_)) throw error(node_, "x_scale must be positive and finite");
  if (direction == "forward") {
  } else if (direction == "reverse") {
    forward_ = false, reverse_ = true;
  } else if (direction == "bidirectional") {
    reverse_ = true;
  } else {
    throw error(node_, "direction must be forward, reverse or bidirectional");
  }
  int w_constant = 0, r_constant = 0;
  const Ort::ConstValue w = info.GetTensorConstantInput(1, &w_constant);
  const Ort::ConstValue r = info.GetTensorConstantInput(2, &r_constant);
  if (w_constant && r_constant) {
    w16_ = widened(w.GetTensorData<int8_t>(), static_cast<int64_t>(w.GetTensorTypeAndShapeInfo().GetElementCount()));
    r16_ = widened(r.GetTensorData<int8_t>(), static_cast<int64_t>(r.GetTensorTypeAndShapeInfo().GetElementCount()));
  }
}

OrtStatusPtr IntLstmKernel::ComputeV2(OrtKernelContext* raw) {
  try {
    Ort::KernelContext ctx(raw);
    compute(ctx);
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
}

void IntLstmKernel::compute(Ort::KernelContext& ctx) const {
  const auto x = ctx.GetInput(0);
  const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
  if (xs.size() != 3) throw error(node_, "X must be [T, N, F]");
  const int64_t steps = xs[0], batch = xs[1], h = hidden_, rows = 4 * h;
  const int64_t dirs = (forward_ && reverse_) ? 2 : 1;
  const int64_t w_count = static_cast<int64_t>(ctx.GetInput(1).GetTensorTypeAndShapeInfo().GetElementCount());
  const int64_t features = w_count / (dirs * rows);
  if (features < 1 || features * dirs * rows != w_count)
    throw error(node_, "W must be [D, 4 * hidden_size, F]");
  if (xs[2] != features) throw error(node_, "last dimension of X must be F=" + std::to_string(features));
  auto count = [&](size_t index, int64_t expected, const char* what) {
    const auto v = ctx.GetInput(index);
    if (static_cast<int64_t>(v.GetTensorTypeAndShapeInfo().GetElementCount()) != expected)
      throw error(node_, std::string(what) + " must have " + std::to_string(expected) + " elements");
    return v;
  };
  const auto w = count(1, dirs * rows * features, "W");
  const auto r = count(2, dirs * rows * h, "R");
  const auto w_mult = count(3, dirs * rows, "W_mult"), r_mult = count(4, dirs * rows, "R_mult");
  const auto bias = count(5, dirs * rows, "Bias");
  const auto knots = ctx.GetInput(6);
  const int64_t per_table = static_cast<int64_t>(knots.GetTensorTypeAndShapeInfo().GetElementCount()) / (dirs * 3);
  if (per_table < 2 || per_table * dirs * 3 != static_cast<int64_t>(knots.GetTensorTypeAndShapeInfo().GetElementCount()))
    throw error(node_, "knots must be [D, 3, S + 1] with S >= 1");
  const int64_t segments = per_table - 1;
  const auto values = count(7, dirs * 3 * per_table, "values");
  const auto slopes = count(8, dirs * 3 * segments, "slopes");
  const size_t given = ctx.GetInputCount();
  const Ort::ConstValue h0 = given > 9 ? ctx.GetInput(9) : Ort::ConstValue(nullptr);
  const Ort::ConstValue c0 = given > 10 ? ctx.GetInput(10) : Ort::ConstValue(nullptr);
  for (const auto& state : {h0, c0}) {
    if (state != nullptr && static_cast<int64_t>(state.GetTensorTypeAndShapeInfo().GetElementCount()) != dirs * batch * h)
      throw error(node_, "initial_h and initial_c must be [D, N, hidden_size]");
  }

  auto y = ctx.GetOutput(0, {steps, dirs, batch, h});
  auto y_h = ctx.GetOutput(1, {dirs, batch, h});
  auto y_c = ctx.GetOutput(2, {dirs, batch, h});
  float* y_out = y ? y.GetTensorMutableData<float>() : nullptr;
  float* yh_out = y_h ? y_h.GetTensorMutableData<float>() : nullptr;
  float* yc_out = y_c ? y_c.GetTensorMutableData<float>() : nullptr;

  const float* x_data = x.GetTensorData<float>();
  const float inverse = 1.0f / x_scale_;
  std::vector<int16_t> xq(static_cast<size_t>(steps * batch * features));  // int8 values, 16 bits wide
  for (size_t i = 0; i < xq.size(); ++i)
    xq[i] = static_cast<int16_t>(clamp(static_cast<int64_t>(std::nearbyint(x_data[i] * inverse)), -127, 127));

  const float out_scale = std::ldexp(1.0f, -kOutFrac), cell_scale = std::ldexp(1.0f, -static_cast<int>(cell_frac_));
  const float cell_one = std::ldexp(1.0f, static_cast<int>(cell_frac_)), out_one = std::ldexp(1.0f, kOutFrac);
  std::vector<int64_t> z(static_cast<size_t>(rows));
  std::vector<int64_t> cell(static_cast<size_t>(h));
  std::vector<int16_t> h15(static_cast<size_t>(h));  // Q0.15, within +-32767
  std::vector<int64_t> xproj(static_cast<size_t>(steps * rows));  // W x of every step: no h in it
  std::vector<int64_t> hproj(static_cast<size_t>(rows));  // R h of the current step
  const bool cached = static_cast<int64_t>(w16_.size()) == dirs * rows * features &&
                      static_cast<int64_t>(r16_.size()) == dirs * rows * h;
  const std::vector<int16_t> w_all = cached ? std::vector<int16_t>() : widened(w.GetTensorData<int8_t>(), dirs * rows * features);
  const std::vector<int16_t> r_all = cached ? std::vector<int16_t>() : widened(r.GetTensorData<int8_t>(), dirs * rows * h);
  for (int64_t d = 0; d < dirs; ++d) {
    const bool backwards = reverse_ && (d == 1 || !forward_);
    const int16_t* wd = (cached ? w16_.data() : w_all.data()) + d * rows * features;
    const int16_t* rd = (cached ? r16_.data() : r_all.data()) + d * rows * h;
    const int64_t* wm = w_mult.GetTensorData<int64_t>() + d * rows;
    const int64_t* rm = r_mult.GetTensorData<int64_t>() + d * rows;
    const int64_t* bd = bias.GetTensorData<int64_t>() + d * rows;
    Table tables[3];
    for (int k = 0; k < 3; ++k)
      tables[k] = Table{knots.GetTensorData<int32_t>() + (d * 3 + k) * per_table,
                        values.GetTensorData<int32_t>() + (d * 3 + k) * per_table,
                        slopes.GetTensorData<int64_t>() + (d * 3 + k) * segments, segments};
    for (int64_t n = 0; n < batch; ++n) {
      for (int64_t j = 0; j < h; ++j) {
        const int64_t at = (d * batch + n) * h + j;
        h15[j] = static_cast<int16_t>(
            h0 ? clamp(static_cast<int64_t>(std::nearbyint(h0.GetTensorData<float>()[at] * out_one)), -kInt16Max, kInt16Max)
               : 0);
        cell[j] = c0 ? clamp(static_cast<int64_t>(std::nearbyint(c0.GetTensorData<float>()[at] * cell_one)), -kInt16Max, kInt16Max) : 0;
      }
      for (int64_t t = 0; t < steps; ++t)
        dot_rows16(wd, xq.data() + (t * batch + n) * features, rows, features, xproj.data() + t * rows);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t t = backwards ? steps - 1 - s : s;
        dot_rows16(rd, h15.data(), rows, h, hproj.data());
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t acc = xproj[t * rows + row] * wm[row] + hproj[row] * rm[row] + bd[row];
          z[row] = clamp(rshift_round(acc, kAccShift), -32768, kInt16Max);
        }
        for (int64_t j = 0; j < h; ++j) {
          const int64_t i_gate = tables[0](z[j]), o_gate = tables[0](z[h + j]), f_gate = tables[0](z[2 * h + j]);
          const int64_t g = tables[1](z[3 * h + j]);
          cell[j] = clamp(rshift_round(f_gate * cell[j], kOutFrac) +
                              rshift_round(i_gate * g, 2 * kOutFrac - static_cast<int>(cell_frac_)),
                          -kInt16Max, kInt16Max);
          const int64_t full = o_gate * tables[2](cell[j]);
          h15[j] = static_cast<int16_t>(rshift_round(full, kOutFrac));
          if (y_out) y_out[((t * dirs + d) * batch + n) * h + j] = static_cast<float>(h15[j]) * out_scale;
        }
      }
      for (int64_t j = 0; j < h; ++j) {
        const int64_t at = (d * batch + n) * h + j;
        if (yh_out) yh_out[at] = static_cast<float>(h15[j]) * out_scale;
        if (yc_out) yc_out[at] = static_cast<float>(cell[j]) * cell_scale;
      }
    }
  }
}

OrtStatusPtr IntLstmOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  try {
    *kernel = new IntLstmKernel(info);
    return nullptr;
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

ONNXTensorElementDataType IntLstmOp::GetInputType(size_t index) const {
  switch (index) {
    case 1:
    case 2:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case 3:
    case 4:
    case 5:
    case 8:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case 6:
    case 7:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    default:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

}  // namespace ptq
