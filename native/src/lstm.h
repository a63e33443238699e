// IntLSTM: an LSTM on integers (int8 weights and inputs, int16 gates and cell state, sigmoid and
// tanh as piecewise-linear tables). Its numpy reference is ptqcli/recurrent.py, bit for bit.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <string>
#include <vector>

namespace ptq {

class IntLstmKernel {
 public:
  explicit IntLstmKernel(const OrtKernelInfo* info);
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

 private:
  void compute(Ort::KernelContext& ctx) const;
  std::string node_;
  int64_t hidden_ = 0;
  int64_t cell_frac_ = 0;
  float x_scale_ = 1.0f;
  bool forward_ = true, reverse_ = false;
  // W and R widened to int16 once, when the model holds them as constants (else on every run).
  std::vector<int16_t> w16_, r16_;
};

struct IntLstmOp : Ort::CustomOpBase<IntLstmOp, IntLstmKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return "IntLSTM"; }
  size_t GetInputTypeCount() const { return 11; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < 9 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const { return INPUT_OUTPUT_OPTIONAL; }
};

}  // namespace ptq
