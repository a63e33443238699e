"""AIMET (aimet-onnx) AdaRound on the embedded Fashion-MNIST CNN, for comparison with ptqcli.

Runs in a separate virtualenv that has aimet-onnx (NOT the project's .venv):

    python3 -m venv bench/.cache/aimet-venv
    bench/.cache/aimet-venv/bin/pip install torch==2.13.0 aimet-onnx==2.42.0
    OMP_NUM_THREADS=1 taskset -c 0 bench/.cache/aimet-venv/bin/python bench/aimet_adaround.py --rounding nearest
    OMP_NUM_THREADS=1 taskset -c 0 bench/.cache/aimet-venv/bin/python bench/aimet_adaround.py --rounding adaround --iters 1000

One configuration per process, so ru_maxrss is that configuration's peak. Prints one JSON line.

Settings, chosen to match ptqcli's defaults (W4A8):
- BatchNorm folded into the preceding Conv (aimet_onnx.batch_norm_fold.fold_all_batch_norms_to_weight).
- param_type int4: symmetric per-channel weights for Conv/Gemm (AIMET's "default" config,
  default_config_per_channel.json); biases left in float.
- activation_type int8: 8-bit asymmetric per-tensor (AIMET's default for activations, i.e. uint8 with a
  zero point), min/max range (QuantScheme.min_max); model input quantized, Conv+Relu / Gemm+Relu fused
  (no quantizer between them).
- calibration: the first 256 images of fashion_calib.npz (ptqcli's --num-samples default), in batches of 32.
- AdaRound: aimet_onnx.apply_adaround(sim, batches, num_iterations=N) before compute_encodings (AIMET's
  documented order); AIMET's own defaults otherwise (Adam lr 1e-3, 32 images per step, reg 0.01,
  beta 20->2 cosine, 20 % warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "ptqcli", "assets", "fashion_cnn.onnx")
CALIB = os.path.join(ROOT, "ptqcli", "assets", "fashion_calib.npz")
TEST = os.path.join(ROOT, "ptqcli", "assets", "fashion_test.npz")


def batches(x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{"input": np.ascontiguousarray(x[i:i + size])} for i in range(0, len(x), size)]


def top1(run, x: np.ndarray, y: np.ndarray, size: int = 250) -> float:
    correct = 0
    for i in range(0, len(x), size):
        logits = run(x[i:i + size])
        correct += int(np.sum(np.argmax(logits, axis=1) == y[i:i + size]))
    return 100.0 * correct / len(x)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounding", choices=["nearest", "adaround"], required=True)
    ap.add_argument("--iters", type=int, default=None, help="AdaRound steps per layer (AIMET default: 10000)")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--export", default=None, help="also write the QDQ model here and evaluate it with plain ORT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict-symmetric", action="store_true",
                    help="int4 weights on -7..7 (ptqcli's grid) instead of AIMET's default -8..7")
    ap.add_argument("--no-output-quant", action="store_true",
                    help="leave the graph output (logits) in float, as ptqcli does")
    args = ap.parse_args()

    t_import = time.perf_counter()
    import onnx
    import onnxruntime as ort
    import torch
    import aimet_onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import_s = time.perf_counter() - t_import

    calib = np.load(CALIB)["input"][: args.num_samples].astype(np.float32)
    test = np.load(TEST)
    x_test, y_test = test["input"][: args.eval_samples], test["labels"][: args.eval_samples]
    calib_batches = batches(calib, args.batch_size)

    t0 = time.perf_counter()
    model = onnx.load(MODEL)
    folded = fold_all_batch_norms_to_weight(model)
    config_file = "default"  # default_config_per_channel.json
    if args.strict_symmetric:
        import tempfile
        from aimet_onnx.common.quantsim_config import quantsim_config as qc_mod
        src = os.path.join(os.path.dirname(qc_mod.__file__), qc_mod._config_file_aliases["default"])
        cfg = json.load(open(src))
        cfg["defaults"]["strict_symmetric"] = "True"
        config_file = os.path.join(tempfile.mkdtemp(), "strict_per_channel.json")
        json.dump(cfg, open(config_file, "w"))
    sim = QuantizationSimModel(
        model,
        param_type="int4",
        activation_type="int8",
        quant_scheme="min_max",
        config_file=config_file,
        session_options_kwargs={"intra_op_num_threads": 1, "inter_op_num_threads": 1},
    )
    if args.no_output_quant:
        for out in model.graph.output:
            if out.name in sim.qc_quantize_op_dict:
                sim.qc_quantize_op_dict[out.name].enabled = False
    t_sim = time.perf_counter()
    adaround_s = 0.0
    if args.rounding == "adaround":
        kwargs = {} if args.iters is None else {"num_iterations": args.iters}
        apply_adaround(sim, calib_batches, **kwargs)
        adaround_s = time.perf_counter() - t_sim
    t_enc = time.perf_counter()
    sim.compute_encodings(calib_batches)
    t1 = time.perf_counter()

    sess = sim.session
    acc_sim = top1(lambda xb: sess.run(None, {"input": xb})[0], x_test, y_test)
    t2 = time.perf_counter()

    # Describe the quantizers actually in force (sanity check of the settings).
    weights = {}
    acts = []
    for name, q in sim.qc_quantize_op_dict.items():
        if not q.enabled:
            continue
        if name in sim.param_names:
            enc = q.get_encodings()
            weights[name] = {"bits": q.bitwidth, "per_channel": bool(q.quant_info.usePerChannelMode),
                             "symmetric": bool(q.use_symmetric_encodings), "channels": len(enc) if enc else 0}
        else:
            acts.append(name)
    act_desc = {}
    for name in acts:
        q = sim.qc_quantize_op_dict[name]
        act_desc[name] = {"bits": q.bitwidth, "symmetric": bool(q.use_symmetric_encodings)}

    acc_qdq = None
    if args.export:
        qdq = sim.to_onnx_qdq()
        onnx.save(qdq, args.export)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        s2 = ort.InferenceSession(args.export, so, providers=["CPUExecutionProvider"])
        acc_qdq = top1(lambda xb: s2.run(None, {"input": xb})[0], x_test, y_test)

    # Float model, same BN-folded graph, as a check of the data path.
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    fsess = ort.InferenceSession(MODEL, so, providers=["CPUExecutionProvider"])
    acc_float = top1(lambda xb: fsess.run(None, {"input": xb})[0], x_test, y_test)

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "tool": "aimet-onnx " + aimet_onnx.__version__,
        "rounding": args.rounding,
        "strict_symmetric": args.strict_symmetric,
        "output_quantized": not args.no_output_quant,
        "iters": (args.iters if args.iters is not None else (10000 if args.rounding == "adaround" else None)),
        "top1_sim": round(acc_sim, 2),
        "top1_qdq": None if acc_qdq is None else round(acc_qdq, 2),
        "top1_float": round(acc_float, 2),
        "quantize_wall_s": round(t1 - t0, 2),  # BN fold + sim build + adaround + compute_encodings
        "sim_build_s": round(t_sim - t0, 2),
        "adaround_s": round(adaround_s, 2),
        "compute_encodings_s": round(t1 - t_enc, 2),
        "eval_sim_s": round(t2 - t1, 2),
        "import_s": round(import_s, 2),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
        "bn_folded": len(folded[0]) if isinstance(folded, tuple) else None,
        "weights": weights,
        "activations": act_desc,
        "versions": {"aimet_onnx": aimet_onnx.__version__, "onnxruntime": ort.__version__,
                     "onnx": onnx.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
