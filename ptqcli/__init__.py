"""ptqcli: post-training quantization and pruning for ONNX models."""

import os

# ptqcli alternates numpy's BLAS with ONNX Runtime sessions on the same cores. OpenBLAS's threads
# spin for about 2^28 cycles (~0.1 s) after each call before they sleep, taking the cores ORT's
# next run needs: GPTQ's segment-by-segment pass over a 135M-parameter language model took 58 s
# instead of 41 s. 2^20 cycles still covers back-to-back BLAS calls. Read when numpy first loads
# OpenBLAS; a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

__version__ = "0.1.0"
