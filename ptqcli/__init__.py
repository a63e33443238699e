"""ptqcli: post-training quantization and pruning for ONNX models."""

__version__ = "0.1.0"
