"""Recurrent models on their real tasks: float, int8 LSTM weights as QDQ (stock ORT's LSTM), and the
LSTM on integers (ptqcli's IntLSTM: int8 weights and inputs, int16 gates and cell, piecewise-linear
sigmoid and tanh fitted on calibration data).

    python bench/recurrent.py [--out bench/results/recurrent.md]

Models (bench/graph_corpus.py says where each comes from):
- g2p-id's grapheme-to-phoneme LSTM encoder and decoder: held-out words of the package's own
  lexicon decoded greedily, as the package does; judged by word accuracy against the lexicon's
  pronunciation and agreement with the float models' output.
- silero-vad's sequence model (LSTM over 32 frames per call, h/c carried from call to call): speech
  probabilities over held-out spoken sentences, each model streaming on its own state; judged by
  agreement of the speech decisions (p > 0.5) with float, and the largest probability change.
Both quantizations calibrate on disjoint data (other words, other sentences). Time is the task's
wall time at batch 1, one thread setting for all, the variants taking turns.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphs  # noqa: E402  (the corpus, its inputs and the speech)
import harness  # noqa: E402

ROOT = harness.ROOT
WORK = ROOT / "bench" / ".cache" / "recurrent"
DEFAULT_OUT = ROOT / "bench" / "results" / "recurrent.md"
PTQ = ROOT / ".venv" / "bin" / "ptq"
VARIANTS = ("float", "qdq", "native")


def session(path: Path, threads: int):
    import onnxruntime as ort

    from ptqcli import nativelib
    from ptqcli.runtime import without_spinning

    options = nativelib.session_options(threads)
    options.log_severity_level = 3
    without_spinning(options)  # the variants take turns
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def save_samples(folder: Path, feeds: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, f in enumerate(feeds):
        np.savez(folder / f"sample_{i:04d}.npz", **f)
    return folder


def quantize(model: Path, data: Path, fmt: str, out: Path, threads: int) -> tuple[float, str]:
    cmd = [str(PTQ), "quantize", str(model), "--data", str(data), "--format", fmt, "-o", str(out), "--no-latency"]
    proc, seconds, _ = harness.spawn(cmd, out.with_suffix(".log"), WORK, threads, 8.0, 1800)
    if proc.returncode != 0:
        raise SystemExit(f"ptq quantize {model.name} --format {fmt} failed: {proc.stderr.strip().splitlines()[-1]}")
    ops = [n.op_type for n in __import__("onnx").load(str(out)).graph.node]
    lstm = "IntLSTM" if "IntLSTM" in ops else "LSTM (int8 weights, QDQ)" if fmt == "qdq" else "LSTM"
    return seconds, lstm


# --------------------------------------------------------------------------- g2p

class G2p:
    def __init__(self):
        extras = graphs.corpus.extras_dir("g2p_lstm_encoder")
        self.cfg = json.loads((extras / "config.json").read_text())
        self.g2id = json.loads((extras / "g2id.json").read_text())
        self.p2id = json.loads((extras / "p2id.json").read_text())
        self.id2p = {v: k for k, v in self.p2id.items()}
        lexicon = (extras / "lexicon_id.tsv").read_text(encoding="utf-8").splitlines()
        self.lexicon = dict(line.split("\t", 1) for line in lexicon if "\t" in line)
        self.encoder = graphs.corpus.build_one(graphs.corpus.BY_NAME["g2p_lstm_encoder"])
        self.decoder = graphs.corpus.build_one(graphs.corpus.BY_NAME["g2p_lstm_decoder"])

    def decode(self, enc, dec, word: str, steps: list | None = None) -> str:
        """Greedy decoding as g2p-id does it; `steps` collects the decoder's feeds."""
        h, c = enc.run(None, {"input_1": graphs.g2p_encoder_input(word, self.cfg, self.g2id)})
        token = np.zeros((1, 1, self.cfg["num_decoder_tokens"]), np.float32)
        token[0, 0, self.p2id[self.cfg["bos_token"]]] = 1
        out = []
        for _ in range(self.cfg["max_decoder_seq_length"]):
            feed = {"input_2": token, "input_3": h, "input_4": c}
            if steps is not None:
                steps.append(feed)
            probs, h, c = dec.run(None, feed)
            best = int(np.argmax(probs[0, -1]))
            if best == self.p2id[self.cfg["eos_token"]]:
                break
            out.append(self.id2p[best])
            token = np.zeros_like(token)
            token[0, 0, best] = 1
        return "".join(out)

    def truth(self, word: str) -> str:
        return self.lexicon[word].replace(" ", "")


def g2p_rows(args) -> list[dict]:
    task = G2p()
    calib_words, eval_words = graphs.g2p_words("calib"), graphs.g2p_words("eval")[: args.words]
    float_enc, float_dec = session(task.encoder, args.threads), session(task.decoder, args.threads)
    steps: list[dict] = []
    for word in calib_words:
        task.decode(float_enc, float_dec, word, steps)
    enc_data = save_samples(WORK / "g2p_encoder_calib",
                            [{"input_1": graphs.g2p_encoder_input(w, task.cfg, task.g2id)} for w in calib_words])
    dec_data = save_samples(WORK / "g2p_decoder_calib", steps[:: max(1, len(steps) // 512)])
    models = {"float": (task.encoder, task.decoder)}
    rows = {"float": {"lstm": "LSTM (float)", "quantize_s": None}}
    for fmt in ("qdq", "native"):
        enc_out, dec_out = WORK / f"g2p_encoder.{fmt}.onnx", WORK / f"g2p_decoder.{fmt}.onnx"
        s1, lstm = quantize(task.encoder, enc_data, fmt, enc_out, args.threads)
        s2, _ = quantize(task.decoder, dec_data, fmt, dec_out, args.threads)
        models[fmt] = (enc_out, dec_out)
        rows[fmt] = {"lstm": lstm, "quantize_s": s1 + s2}
    sessions = {name: (session(e, args.threads), session(d, args.threads)) for name, (e, d) in models.items()}
    outputs = {name: [] for name in sessions}
    seconds = {name: 0.0 for name in sessions}
    for i, word in enumerate(eval_words):
        for name in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
            start = time.perf_counter()
            outputs[name].append(task.decode(*sessions[name], word))
            seconds[name] += time.perf_counter() - start
    out = []
    for name in VARIANTS:
        said = outputs[name]
        out.append({"model": "g2p-id LSTM encoder + decoder", "variant": name, **rows[name],
                    "task": f"{100 * np.mean([s == task.truth(w) for s, w in zip(said, eval_words)]):.1f}% words right",
                    "agreement": f"{100 * np.mean([s == f for s, f in zip(said, outputs['float'])]):.1f}% words as float",
                    "size_mb": sum(harness_size(p) for p in models[name]),
                    "ms": 1000 * seconds[name] / len(eval_words)})
    return out


# --------------------------------------------------------------------------- silero VAD

def vad_stream(sess, chunks: list[np.ndarray]) -> np.ndarray:
    h = c = np.zeros((1, 1, 128), np.float32)
    probs = []
    for chunk in chunks:
        p, h, c = sess.run(None, {"input": chunk, "h": h, "c": c})
        probs.append(np.asarray(p).ravel())
    return np.concatenate(probs)


def vad_chunks(part: str) -> list[np.ndarray]:
    """[32, 576] per call: 512 new samples after 64 of context, 32 frames (as bench/graphs.py feeds it)."""
    wav = graphs.speech(part)
    ctx = np.concatenate([np.zeros(64, np.float32), wav])
    frames = [ctx[i:i + 576] for i in range(0, len(wav) - 512, 512)]
    return [np.stack(frames[i:i + 32]) for i in range(0, len(frames) - 32, 32)]


def vad_rows(args) -> list[dict]:
    entry = graphs.corpus.BY_NAME["silero_vad_seq"]
    path = graphs.corpus.build_one(entry)
    float_sess = session(path, args.threads)
    calib, h, c = [], np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32)
    for chunk in vad_chunks("calib"):
        calib.append({"input": chunk, "h": h, "c": c})
        _, h, c = float_sess.run(None, calib[-1])
    data = save_samples(WORK / "silero_calib", calib)
    models, rows = {"float": path}, {"float": {"lstm": "LSTM (float)", "quantize_s": None}}
    for fmt in ("qdq", "native"):
        out = WORK / f"silero_vad_seq.{fmt}.onnx"
        seconds, lstm = quantize(path, data, fmt, out, args.threads)
        models[fmt], rows[fmt] = out, {"lstm": lstm, "quantize_s": seconds}
    sessions = {name: session(p, args.threads) for name, p in models.items()}
    chunks = vad_chunks("eval")
    probs, seconds = {}, {}
    for name in VARIANTS:
        start = time.perf_counter()
        probs[name] = vad_stream(sessions[name], chunks)
        seconds[name] = time.perf_counter() - start
    speech_share = float(np.mean(probs["float"] > 0.5))
    out = []
    for name in VARIANTS:
        p = probs[name]
        out.append({"model": "silero-vad sequence model", "variant": name, **rows[name],
                    "task": f"{100 * np.mean(p > 0.5):.1f}% frames speech",
                    "agreement": f"{100 * np.mean((p > 0.5) == (probs['float'] > 0.5)):.2f}% decisions as float, "
                                 f"max |dp| {np.abs(p - probs['float']).max():.3f}",
                    "size_mb": harness_size(models[name]), "ms": 1000 * seconds[name] / len(chunks)})
    out[0]["note"] = f"{len(chunks)} calls of 32 frames, float says speech in {100 * speech_share:.1f}% of frames"
    return out


def harness_size(path: Path) -> float:
    return Path(path).stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=100, help="held-out words for g2p")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = g2p_rows(args) + vad_rows(args)
    lines = [
        "# Recurrent models on their tasks: float, int8 QDQ LSTM, integer LSTM (IntLSTM)",
        "",
        f"- command: `python bench/recurrent.py --words {args.words} --threads {args.threads}`; "
        f"total {time.perf_counter() - started:.0f} s",
        f"- CPU: {harness.cpu_description()}",
        f"- ptqcli: {harness.ptq_source()}; speech: {graphs.speech_source()}",
        "- g2p: words of g2p-id's lexicon not used for calibration, greedy decoding; right = the lexicon's "
        "pronunciation exactly. VAD: spoken sentences not used for calibration, each model on its own state.",
        "",
        "| model | variant | LSTM runs as | task | against float | size MB | ms per word / call | quantize s |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        q = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['lstm']} | {r['task']} | {r['agreement']} | "
                     f"{r['size_mb']:.2f} | {r['ms']:.2f} | {q} |")
    notes = [r["note"] for r in rows if r.get("note")]
    lines += [""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
