"""ptq quantize over a corpus of real ONNX graphs: which graphs it takes, which it refuses or crashes on,
and what the ones it takes look like afterwards.

    python bench/graphs.py [--only NAME[,NAME]] [--skip-large] [--timeout 600] [--calib 24] [--eval 8]
                           [--with-optional] [--out bench/results/graphs.md]

The corpus is bench/graph_corpus.py (models from public registry packages, built into
bench/.cache/graphs/). For every model:

1. Inputs are built from the model's input signature, real where cheap: rendered text lines, pages and
   tables (Pillow, DejaVu fonts) for the OCR/layout/table models; espeak-ng speech (a synthetic
   voiced waveform when espeak-ng is missing) for the audio models, with the recurrent states and caches
   those models take produced by running the float model through the audio chunk by chunk (so a state
   input holds a state the model really reaches); chained features for the wake-word models (audio ->
   mel model -> embedding model -> detector); synthesized notes for the music model; the bytes of real
   files for Magika; Indonesian words from the package's lexicon for the G2P models; Wikipedia passages
   (bench/text_data.py) for MiniLM; the held-out rows of the scikit-learn data sets for the sk_* models;
   random data in a sensible range for the rest (the light models, whose weights are synthetic anyway).
   Dynamic dims get concrete values (batch 1; the OCR recognizer's width varies with the text). Every
   sample is checked by running the float model on it.
2. Calibration data is written as a folder with one .npz per sample, each holding one run's feed exactly
   as ONNX Runtime takes it: batch axis included where the model has one, states and scalars as they are
   (`sr` is a 0-d int64, `state` [2,1,128]). Held-out samples come from other sentences / images / rows.
3. `ptq quantize MODEL --data FOLDER -o OUT.onnx` runs with its default options as a child process
   (`PTQ_DEBUG=1`, so an internal error leaves its traceback), under `--timeout` and an address-space
   limit. Outcome: *quantized*, *nothing quantized* (a model written without one Q/DQ or integer op),
   *refused* (ptqcli's one-line error), *crashed* (the traceback's last line and frames), *timeout*,
   *OOM*, or *no output*; *inputs failed* when the benchmark could not build inputs the float model runs.
4. For a quantized model, a second child process (so an ONNX Runtime crash on a bad graph stops only that
   row) measures, with default session options: every output against the float model on the held-out
   samples (mean and min cosine, SQNR in dB; agreement for integer outputs), batch-1 latency of float
   and quantized taking turns (bench/harness.py), and the integer kernels in ORT's optimised graph.
   The quantized file itself is read for QuantizeLinear/DequantizeLinear counts and the op types that
   read a DequantizeLinear output (the ops that got quantized), subgraphs included.

Writes bench/results/graphs.md (CPU from /proc/cpuinfo with its avx2/avx512/vnni/amx flags) and prints
a rich table. Work files: bench/.cache/graphs/runs/NAME/ (calib/, eval/, quantized.onnx, ptq.log).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import wave
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graph_corpus as corpus  # noqa: E402
import harness  # noqa: E402  (child processes, turn-taking latency, machine description)
import transformers as tbench  # noqa: E402  (ORT session options, integer-kernel names)

ROOT = harness.ROOT
RUNS = corpus.CACHE / "runs"
AUDIO = corpus.CACHE / "audio"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "graphs.md"
PTQ = ROOT / ".venv" / "bin" / "ptq"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
INTEGER_TYPES = (2, 3, 21, 22)  # TensorProto UINT8, INT8, UINT4, INT4


# --------------------------------------------------------------------------- #
# Material: text, images, audio
# --------------------------------------------------------------------------- #

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "The meeting was moved to Thursday at half past three in room twelve.",
    "Turn left at the second traffic light and the station is on your right.",
    "Quantization maps floating point values onto a small set of integers.",
    "Rain is expected this evening, with strong winds along the coast.",
    "Invoice number 40217 is due on the fifth of March, total 318 euros.",
    "She sells sea shells by the sea shore, and the shells are surely real.",
    "Hey Jarvis, what is the weather like in Amsterdam tomorrow morning?",
    "A table of contents lists the chapters and the pages where they begin.",
    "Our train leaves at 7:45 from platform nine; tickets cost 12.50 each.",
    "The library closes early on Sundays, so return your books by noon.",
    "Set a timer for ten minutes and remind me to check the oven.",
    "Temperature readings rose by 2.4 degrees over the last decade.",
]
CALIB_SENTENCES, EVAL_SENTENCES = SENTENCES[:10], SENTENCES[10:]


def rng_for(name: str, part: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{name}/{part}".encode()))


def font(size: int, bold: bool = False, mono: bool = False):
    from PIL import ImageFont

    name = "DejaVuSansMono.ttf" if mono else ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(str(FONT_DIR / name), size)
    except OSError:
        return ImageFont.load_default()


def words(sentences: list[str]) -> list[str]:
    return [w for s in sentences for w in s.split()]


def text_line(rng, sentences: list[str], height: int = 48):
    """One rendered text line (dark text on a light, slightly noisy background), as PIL RGB."""
    from PIL import Image, ImageDraw

    ws = words(sentences)
    start = int(rng.integers(0, len(ws) - 3))
    text = " ".join(ws[start:start + int(rng.integers(2, 7))])
    f = font(int(rng.integers(26, 36)), bold=bool(rng.random() < 0.3))
    w = int(f.getlength(text)) + 16
    bg = tuple(int(v) for v in rng.integers(215, 256, 3))
    img = Image.new("RGB", (w, height), bg)
    ImageDraw.Draw(img).text((8, (height - f.size) // 2 - 2), text, font=f, fill=tuple(int(v) for v in rng.integers(0, 70, 3)))
    return _noisy(img, rng, 6)


def _noisy(img, rng, sigma: float):
    from PIL import Image

    a = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def page(rng, sentences: list[str], width: int, height: int):
    """A document page: a title, paragraphs, a ruled table and a figure box."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 247))
    d = ImageDraw.Draw(img)
    y, margin = int(height * 0.05), int(width * 0.08)
    d.text((margin, y), " ".join(words(sentences)[:4]).title(), font=font(int(width / 20), bold=True), fill=(10, 10, 10))
    y += int(width / 12)
    body = font(max(10, int(width / 48)))
    while y < height * 0.92:
        block = rng.random()
        if block < 0.55:  # paragraph
            for _ in range(int(rng.integers(3, 7))):
                s = sentences[int(rng.integers(len(sentences)))]
                d.text((margin, y), s[: int((width - 2 * margin) / (body.size * 0.55))], font=body, fill=(20, 20, 20))
                y += int(body.size * 1.5)
        elif block < 0.8:  # table
            rows, cols = int(rng.integers(3, 6)), int(rng.integers(3, 5))
            cw, rh = (width - 2 * margin) // cols, int(body.size * 1.8)
            for r in range(rows + 1):
                d.line((margin, y + r * rh, margin + cols * cw, y + r * rh), fill=(60, 60, 60))
            for c in range(cols + 1):
                d.line((margin + c * cw, y, margin + c * cw, y + rows * rh), fill=(60, 60, 60))
            ws = words(sentences)
            for r in range(rows):
                for c in range(cols):
                    d.text((margin + c * cw + 4, y + r * rh + 3), ws[int(rng.integers(len(ws)))][:10], font=body, fill=(0, 0, 0))
            y += rows * rh + body.size
        else:  # figure
            fh = int(height * rng.uniform(0.1, 0.2))
            d.rectangle((margin, y, width - margin, y + fh), fill=tuple(int(v) for v in rng.integers(120, 220, 3)))
            d.ellipse((margin + 20, y + 10, margin + 20 + fh, y + fh - 10), fill=(200, 60, 60))
            y += fh + body.size
        y += int(body.size * 0.8)
    return _noisy(img, rng, 3)


def table_image(rng, sentences: list[str], size: int = 488):
    from PIL import Image, ImageDraw

    rows, cols = int(rng.integers(3, 9)), int(rng.integers(2, 6))
    cw, rh = int(rng.integers(80, 140)), int(rng.integers(26, 40))
    img = Image.new("RGB", (cols * cw + 20, rows * rh + 20), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, ws = font(int(rh * 0.5)), words(sentences)
    for r in range(rows + 1):
        d.line((10, 10 + r * rh, 10 + cols * cw, 10 + r * rh), fill=(0, 0, 0), width=1 + (r == 1))
    for c in range(cols + 1):
        d.line((10 + c * cw, 10, 10 + c * cw, 10 + rows * rh), fill=(0, 0, 0))
    for r in range(rows):
        for c in range(cols):
            cell = ws[int(rng.integers(len(ws)))][:9] if r == 0 or c == 0 else f"{rng.uniform(0, 999):.1f}"
            d.text((14 + c * cw, 12 + r * rh + rh // 6), cell, font=f, fill=(0, 0, 0))
    scale = size / max(img.size)
    img = img.resize((max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img, (0, 0))
    return canvas


def face_image(rng, size: int):
    """A drawn face (skin ellipse, eyes, brows, nose, mouth) on a textured background."""
    from PIL import Image, ImageDraw

    bg = rng.integers(30, 220, (size // 8 + 1, size // 8 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(bg).resize((size, size), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    fw, fh = size * rng.uniform(0.3, 0.42), size * rng.uniform(0.38, 0.48)
    skin = tuple(int(v) for v in (rng.uniform(150, 240), rng.uniform(110, 190), rng.uniform(80, 160)))
    d.ellipse((cx - fw, cy - fh, cx + fw, cy + fh), fill=skin)
    for sx in (-1, 1):
        ex, ey = cx + sx * fw * 0.4, cy - fh * 0.2
        d.ellipse((ex - fw * 0.15, ey - fh * 0.07, ex + fw * 0.15, ey + fh * 0.07), fill=(245, 245, 245))
        d.ellipse((ex - fw * 0.06, ey - fh * 0.06, ex + fw * 0.06, ey + fh * 0.06), fill=(40, 30, 20))
        d.line((ex - fw * 0.2, ey - fh * 0.15, ex + fw * 0.2, ey - fh * 0.17), fill=(60, 40, 30), width=max(1, size // 40))
    d.line((cx, cy - fh * 0.05, cx - fw * 0.08, cy + fh * 0.2), fill=(120, 80, 60), width=max(1, size // 60))
    d.arc((cx - fw * 0.4, cy + fh * 0.2, cx + fw * 0.4, cy + fh * 0.55), 20, 160, fill=(150, 40, 40), width=max(1, size // 30))
    return _noisy(img, rng, 4)


def chw(img, mean, std, scale: float = 1 / 255) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32) * scale
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None])


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _espeak(text: str, path: Path) -> bool:
    exe = shutil.which("espeak-ng")
    if not exe:
        return False
    return subprocess.run([exe, "-v", "en-us", "-s", "155", "-w", str(path), text], capture_output=True).returncode == 0


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
        return data, w.getframerate()


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x
    t_out = np.arange(int(len(x) * sr_out / sr_in)) / sr_out
    return np.interp(t_out, np.arange(len(x)) / sr_in, x).astype(np.float32)


def _synthetic_voice(rng, seconds: float, sr: int) -> np.ndarray:
    """Voiced syllables (a glottal-like harmonic series with moving formant weights) between pauses."""
    out = np.zeros(int(seconds * sr), np.float32)
    t = 0.2
    while t < seconds - 0.5:
        dur = rng.uniform(0.12, 0.3)
        n = int(dur * sr)
        tt = np.arange(n) / sr
        f0 = rng.uniform(95, 210) * (1 + 0.1 * np.sin(2 * np.pi * 3 * tt))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        formants = rng.uniform([300, 900, 2300], [800, 2000, 3000])
        sig = sum(np.sin(k * phase) * sum(np.exp(-((k * f0 - f) / 150) ** 2) for f in formants) / k for k in range(1, 30))
        out[int(t * sr):int(t * sr) + n] += (np.hanning(n) * sig).astype(np.float32)
        t += dur + (rng.uniform(0.3, 0.7) if rng.random() < 0.2 else rng.uniform(0.01, 0.05))
    return out


def speech(part: str, sr: int = 16000) -> np.ndarray:
    """Spoken sentences (espeak-ng) with pauses and a low noise floor, peak 0.5; `part` is calib or eval,
    from disjoint sentences. Cached as .npy per rate."""
    AUDIO.mkdir(parents=True, exist_ok=True)
    cached = AUDIO / f"speech_{part}_{sr}.npy"
    if cached.exists():
        return np.load(cached)
    rng = rng_for("speech", part)
    pieces = []
    for i, s in enumerate(CALIB_SENTENCES if part == "calib" else EVAL_SENTENCES):
        wav = AUDIO / f"{part}_{i}.wav"
        if wav.exists() or _espeak(s, wav):
            x, rate = _read_wav(wav)
            x = resample(x, rate, sr)
        else:
            x = _synthetic_voice(rng, 2.5, sr)
        pieces += [x, np.zeros(int(sr * rng.uniform(0.3, 0.9)), np.float32)]
    y = np.concatenate(pieces)
    y = 0.5 * y / (np.abs(y).max() + 1e-9) + rng.normal(0, 2e-3, len(y)).astype(np.float32)
    np.save(cached, y.astype(np.float32))
    return y.astype(np.float32)


def speech_source() -> str:
    return "espeak-ng" if shutil.which("espeak-ng") else "synthetic voiced syllables (espeak-ng not installed)"


def music(rng, seconds: float, sr: int = 22050) -> np.ndarray:
    """Piano-like notes: harmonic partials with exponential decay, chords and melody, random MIDI pitches."""
    out = np.zeros(int(seconds * sr), np.float32)
    t = 0.0
    while t < seconds - 0.2:
        for _ in range(int(rng.integers(1, 4))):
            midi = int(rng.integers(40, 84))
            f = 440 * 2 ** ((midi - 69) / 12)
            dur = rng.uniform(0.2, 1.0)
            n = min(int(dur * sr), len(out) - int(t * sr))
            tt = np.arange(n) / sr
            note = sum(np.sin(2 * np.pi * k * f * tt) * 0.6 ** k for k in range(1, 8) if k * f < sr / 2)
            out[int(t * sr):int(t * sr) + n] += (note * np.exp(-3 * tt) * rng.uniform(0.2, 0.5)).astype(np.float32)
        t += rng.uniform(0.1, 0.5)
    return 0.8 * out / (np.abs(out).max() + 1e-9)


def stft(x: np.ndarray, n_fft: int, hop: int, window: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.fft.rfft(frames * window, n=n_fft)  # [frames, n_fft // 2 + 1]


def mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    def hz2mel(f):
        return 2595 * np.log10(1 + f / 700)

    mels = np.linspace(hz2mel(0), hz2mel(sr / 2), n_mels + 2)
    hz = 700 * (10 ** (mels / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((n_mels, len(bins)), np.float32)
    for i in range(n_mels):
        lo, c, hi = hz[i], hz[i + 1], hz[i + 2]
        fb[i] = np.clip(np.minimum((bins - lo) / (c - lo + 1e-9), (hi - bins) / (hi - c + 1e-9)), 0, None)
    return fb


# --------------------------------------------------------------------------- #
# Inputs per model
# --------------------------------------------------------------------------- #

class Sess:
    """A float ONNX Runtime session that returns outputs by name."""

    def __init__(self, path: Path):
        self.sess = tbench.session(path, 2)
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def __call__(self, feed: dict) -> dict:
        return dict(zip(self.outputs, self.sess.run(None, feed)))


def spread(seq: list, n: int, skip: int = 0) -> list:
    """n items spread evenly over seq[skip:]."""
    seq = seq[skip:] if len(seq) > skip + n else seq
    if len(seq) <= n:
        return list(seq)
    return [seq[int(i)] for i in np.linspace(0, len(seq) - 1, n)]


def stream(sess: Sess, frames: list[dict], states: dict, state_map: dict) -> list[dict]:
    """Run the float model over consecutive frames, feeding each output state back; every feed as run."""
    feeds = []
    for frame in frames:
        feed = {**frame, **states}
        out = sess(feed)
        feeds.append(feed)
        states = {inp: out[o] for inp, o in state_map.items()}
    return feeds


def silero_feeds(e, path: Path, part: str, n: int) -> list[dict]:
    sess, wav = Sess(path), speech(part)
    sig = {i.name: i for i in sess.sess.get_inputs()}
    state_map = dict(zip(e.states, e.state_outputs))
    sr = {"sr": np.array(16000, np.int64)} if "sr" in sig else {}
    if e.name == "silero_vad_v4":  # 512-sample chunks, h/c [2,1,64]
        chunks = [wav[i:i + 512][None] for i in range(0, len(wav) - 512, 512)]
        states = {k: np.zeros((2, 1, 64), np.float32) for k in e.states}
        frames = [{"input": c, **sr} for c in chunks]
    else:  # v5/v6: 512 new samples after 64 of context
        ctx = np.concatenate([np.zeros(64, np.float32), wav])
        chunks = [ctx[i:i + 576][None] for i in range(0, len(wav) - 512, 512)]
        if e.name == "silero_vad_seq":  # [T, 576] per call, T = 32 frames; h/c [1,1,128]
            chunks = [np.concatenate(chunks[i:i + 32]) for i in range(0, len(chunks) - 32, 32)]
            states = {k: np.zeros((1, 1, 128), np.float32) for k in e.states}
        else:
            states = {"state": np.zeros((2, 1, 128), np.float32)}
        frames = [{"input": c, **sr} for c in chunks]
    return spread(stream(sess, frames, states, state_map), n, skip=4)


def oww_features(part: str) -> tuple[np.ndarray, np.ndarray]:
    """openWakeWord's front end on the speech: mel frames [T,32] (x/10 + 2, as the package does) and
    96-d embeddings of every 76-frame window, step 8."""
    mel = Sess(corpus.build_one(corpus.BY_NAME["oww_melspec"]))
    emb = Sess(corpus.build_one(corpus.BY_NAME["oww_embedding"]))
    wav = speech(part) * 32767
    spec = np.squeeze(next(iter(mel({"input": wav[None]}).values()))) / 10 + 2  # [T, 32]
    windows = np.stack([spec[i:i + 76] for i in range(0, len(spec) - 76, 8)])[..., None].astype(np.float32)
    embeds = next(iter(emb({"input_1": windows}).values())).reshape(len(windows), 96)
    return windows, embeds


def g2p_words(part: str) -> list[str]:
    lex = (corpus.extras_dir("g2p_lstm_encoder") / "lexicon_id.tsv").read_text(encoding="utf-8").splitlines()
    ws = [ln.split("\t")[0] for ln in lex if ln and "\t" in ln]
    rng = rng_for("g2p", "words")
    picked = [ws[i] for i in rng.permutation(len(ws))[:400]]
    return picked[:300] if part == "calib" else picked[300:]


def g2p_encoder_input(word: str, cfg: dict, g2id: dict) -> np.ndarray:
    x = np.zeros((1, cfg["max_encoder_seq_length"], cfg["num_encoder_tokens"]), np.float32)
    word = "".join(c for c in word if c in g2id)[: cfg["max_encoder_seq_length"]]
    for i, ch in enumerate(word):
        x[0, i, g2id[ch]] = 1
    x[0, len(word):, g2id[cfg["pad_token"]]] = 1
    return x


def magika_bytes(part: str, n: int) -> list[dict]:
    """Magika's features of real files (stdlib, site-packages, fonts): 1024 leading bytes after leading
    whitespace and 1024 trailing bytes before trailing whitespace, padded with 256."""
    roots = [Path(os.__file__).parent, Path(np.__file__).parent, FONT_DIR, Path("/usr/share/doc"), Path("/etc")]
    files = []
    for r in roots:
        try:
            files += [p for p in sorted(r.rglob("*"))[:4000] if p.is_file() and p.stat().st_size > 64]
        except OSError:
            continue
    rng = rng_for("magika", "files")
    by_ext: dict[str, list[Path]] = {}
    for p in files:
        by_ext.setdefault(p.suffix or p.name, []).append(p)
    pool = [rng.choice(v) for k, v in sorted(by_ext.items())]
    rng.shuffle(pool)
    pool = pool[::2] if part == "calib" else pool[1::2]
    feeds = []
    for p in pool[:n]:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        beg, end = list(data.lstrip()[:1024]), list(data.rstrip()[-1024:])
        x = np.array(beg + [256] * (1024 - len(beg)) + [256] * (1024 - len(end)) + end, np.int32)
        feeds.append({"bytes": x[None]})
    return feeds


def image_feeds(e, part: str, n: int, dtype=np.float32) -> list[dict] | None:
    rng = rng_for(e.name, part)
    sents = CALIB_SENTENCES if part == "calib" else EVAL_SENTENCES
    base = e.base or e.name
    out = []
    for i in range(n):
        if base == "ppocr_cls":
            img = text_line(rng, sents).resize((192, 48))
            if i % 2:
                img = img.rotate(180)
            x = chw(img, (0.5,) * 3, (0.5,) * 3)
        elif base == "ppocrv4_rec":
            img = text_line(rng, sents)
            w = int(np.clip(round(48 * img.size[0] / img.size[1] / 8) * 8, 96, 640))
            x = chw(img.resize((w, 48)), (0.5,) * 3, (0.5,) * 3)
        elif base == "ppocrv4_det":
            x = chw(page(rng, sents, 640, 640), *IMAGENET)
        elif base == "layout_cdla":
            x = chw(page(rng, sents, 608, 800), *IMAGENET)
        elif base == "doc_orientation":
            x = chw(page(rng, sents, 224, 224).rotate(90 * (i % 4)), *IMAGENET)
        elif base == "slanet_table":
            x = chw(table_image(rng, sents), *IMAGENET)
        elif base == "captcha_crnn":
            from PIL import Image, ImageDraw

            img = Image.new("RGB", (160, 60), tuple(int(v) for v in rng.integers(180, 256, 3)))
            d = ImageDraw.Draw(img)
            chars = "".join(rng.choice(list("abcdefghijkmnpqrstuvwxyz23456789"), int(rng.integers(4, 7))))
            for j, ch in enumerate(chars):
                d.text((10 + j * 23 + rng.integers(-3, 4), 8 + rng.integers(-6, 7)), ch, font=font(34, bold=True),
                       fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
            for _ in range(4):
                d.line(tuple(int(v) for v in rng.integers(0, 160, 4)), fill=(90, 90, 90), width=2)
            x = np.ascontiguousarray(np.asarray(_noisy(img, rng, 10), np.float32)[..., ::-1].transpose(2, 0, 1)[None])
        elif base.startswith("ddddocr_ocr"):  # gray, height 64, pixels / 255 (the package's own preprocessing)
            from PIL import Image, ImageDraw

            img = Image.new("L", (160, 64), int(rng.integers(180, 256)))
            d = ImageDraw.Draw(img)
            chars = "".join(rng.choice(list("abcdefghijkmnpqrstuvwxyzABDEFGHJKLMNPQRTY23456789"), int(rng.integers(4, 7))))
            for j, ch in enumerate(chars):
                d.text((8 + j * 24 + rng.integers(-3, 4), 6 + rng.integers(-5, 6)), ch, font=font(36, bold=bool(j % 2)),
                       fill=int(rng.integers(0, 110)))
            for _ in range(3):
                d.line(tuple(int(v) for v in rng.integers(0, 160, 4)), fill=int(rng.integers(60, 140)), width=2)
            x = (np.asarray(img, np.float32) / 255.0)[None, None]
        elif base == "ddddocr_det":  # pixels 0..255, no normalization
            x = np.ascontiguousarray(np.asarray(_noisy(page(rng, sents, 416, 416), rng, 6), np.float32).transpose(2, 0, 1)[None])
        elif base == "nudenet_yolov8n":
            x = chw(face_image(rng, 320), (0.0,) * 3, (1.0,) * 3)
        elif base.startswith("mtcnn_"):
            size = {"mtcnn_pnet": 120, "mtcnn_rnet": 24, "mtcnn_onet": 48}[base]
            a = np.asarray(face_image(rng, size), np.float32)
            x = ((a - 127.5) * 0.0078125)[None]
        else:
            return None
        out.append({"_image": x.astype(dtype)})
    return out


def make_inputs(e, path: Path, part: str, n: int) -> list[dict]:
    """n feeds for the model; `part` calib or eval picks disjoint material."""

    sess = Sess(path)
    ins = sess.sess.get_inputs()
    names = [i.name for i in ins]
    rng = rng_for(e.name, part)
    fp16 = any(i.type == "tensor(float16)" for i in ins)

    imgs = image_feeds(e, part, n, np.float16 if fp16 else np.float32)
    if imgs is not None:
        return [{names[0]: f["_image"]} for f in imgs]
    if e.name.startswith("silero_vad"):
        return silero_feeds(e, path, part, n)
    if e.kind == "sklearn":
        with np.load(corpus.data_path(e)) as d:
            rows = d["calib" if part == "calib" else "eval"]
        idx = rng.permutation(len(rows))[:n]
        return [{names[0]: rows[i:i + 1].astype(np.float32)} for i in idx]
    if e.name in ("minilm", "minilm_fp16", "smollm2"):
        if e.name == "smollm2":
            import lm_data

            m = lm_data.build(verbose=False)
            src = m.calib if part == "calib" else m.eval
        else:
            import text_data

            m = text_data.build(verbose=False)
            src = m.calib if part == "calib" else m.eval
        with np.load(src) as d:
            arrays = {k: d[k] for k in names}
        return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]
    if e.name == "oww_melspec":
        wav = speech(part) * 32767
        starts = np.linspace(0, len(wav) - 1760, n).astype(int)
        return [{names[0]: wav[s:s + 1760][None].astype(np.float32)} for s in starts]
    if e.name == "oww_embedding":
        windows, _ = oww_features(part)
        return [{names[0]: windows[i:i + 1]} for i in spread(list(range(len(windows))), n)]
    if e.name == "oww_hey_jarvis":
        _, emb = oww_features(part)
        starts = spread(list(range(len(emb) - 16)), n)
        return [{names[0]: emb[s:s + 16][None].astype(np.float32)} for s in starts]
    if e.name == "gtcrn":
        wav = speech(part)
        spec = stft(wav, 512, 256, np.sqrt(np.hanning(512)).astype(np.float32))
        frames = [{"mix": np.stack([f.real, f.imag], -1)[None, :, None, :].astype(np.float32)} for f in spec]
        states = {i.name: np.zeros(i.shape, np.float32) for i in ins if i.name in e.states}
        return spread(stream(sess, frames, states, dict(zip(e.states, e.state_outputs))), n, skip=20)
    if e.name == "aecmos":  # 48 kHz model: far end, mic (near end + echo), enhanced; mel 160, + talk-type marker
        sr, fb = 48000, mel_filters(48000, 1536, 160)
        far, near = resample(speech(part), 16000, sr), resample(speech(part)[::-1].copy(), 16000, sr)
        feeds = []
        for s in np.linspace(0, len(far) - 4 * sr, n).astype(int):
            a, b = far[s:s + 4 * sr], near[s:s + 4 * sr]
            echo = 0.5 * np.concatenate([np.zeros(1920, np.float32), a[:-1920]])
            streams = [a, b + echo, b + 0.05 * echo]
            mels = []
            for x in streams:
                p = fb @ (np.abs(stft(x, 1536, 768, np.hanning(1536))) ** 2).T
                db = 10 * np.log10(np.maximum(p, 1e-10))
                mels.append(((db - db.max() + 40) / 40).T)
            marker = np.concatenate([np.ones((20, 160)), np.zeros((20, 160))])
            feats = np.stack([np.concatenate([m, marker]) for m in mels]).astype(np.float32)
            feeds.append({"input": feats[None], "h0": np.zeros((4, 1, 96), np.float32)})
        return feeds
    if e.name == "plcmos":
        wav, feeds = speech(part), []
        for s in np.linspace(0, len(wav) - 4 * 16000, n).astype(int):
            x = wav[s:s + 4 * 16000].copy()
            for k in rng.integers(0, len(x) // 320, 12):  # 20 ms packets lost
                x[k * 320:(k + 1) * 320] = 0
            amp = np.abs(stft(x, 512, 256, np.hamming(513)[:-1]))
            logp = np.log(np.maximum(amp ** 2, (amp[amp > 0].min() ** 2) * 1e-12)) / 20
            feeds.append({"degraded_audio": logp[None, None].astype(np.float32),
                          "rater_embed": rng.normal(size=(1, 64)).astype(np.float32)})
        return feeds
    if e.name == "dnsmos":
        wav = speech(part)
        need = 144160
        wav = np.concatenate([wav, wav]) if len(wav) < need + 16000 else wav
        starts = np.linspace(0, len(wav) - need, n).astype(int)
        return [{names[0]: (wav[s:s + need] + rng.normal(0, 0.01, need)).astype(np.float32)[None]} for s in starts]
    if e.name == "basic_pitch":
        wav = music(rng, 2.2 * n)
        starts = np.linspace(0, len(wav) - 43844, n).astype(int)
        return [{names[0]: wav[s:s + 43844][None, :, None].astype(np.float32)} for s in starts]
    if e.name == "magika":
        return magika_bytes(part, n)
    if e.name.startswith("g2p_lstm"):
        cfg = json.loads((corpus.extras_dir("g2p_lstm_encoder") / "config.json").read_text())
        g2id = json.loads((corpus.extras_dir("g2p_lstm_encoder") / "g2id.json").read_text())
        p2id = json.loads((corpus.extras_dir("g2p_lstm_encoder") / "p2id.json").read_text())
        wlist = g2p_words(part)[: max(n, 8)]
        if e.name.endswith("encoder"):
            return [{names[0]: g2p_encoder_input(w, cfg, g2id)} for w in wlist[:n]]
        enc, feeds = Sess(corpus.build_one(corpus.BY_NAME["g2p_lstm_encoder"])), []
        for w in wlist:
            h, c = enc({"input_1": g2p_encoder_input(w, cfg, g2id)}).values()
            tok = np.zeros((1, 1, cfg["num_decoder_tokens"]), np.float32)
            tok[0, 0, p2id[cfg["bos_token"]]] = 1
            for _ in range(len(w) + 2):
                feed = {"input_2": tok, "input_3": h, "input_4": c}
                out, h, c = sess(feed).values()
                feeds.append(feed)
                tok = np.zeros_like(tok)
                tok[0, 0, int(np.argmax(out[0, -1]))] = 1
        return [feeds[int(i)] for i in rng.permutation(len(feeds))[:n]]
    if e.name == "g2p_bert":
        cfg = json.loads((corpus.extras_dir(e) / "config.json").read_text())
        t2i = json.loads((corpus.extras_dir(e) / "token2id.json").read_text())
        feeds = []
        for w in g2p_words(part):
            toks = [t2i.get(c, None) for c in w.replace("x", "ks")]
            if None in toks or not w.count("e"):
                continue
            ids = [t2i[cfg["mask_token"]] if c == "e" else t2i[c] for c in w.replace("x", "ks")][: cfg["max_seq_length"]]
            ids += [t2i[cfg["pad_token"]]] * (cfg["max_seq_length"] - len(ids))
            feeds.append({names[0]: np.array([ids], np.int64)})
            if len(feeds) == n:
                break
        return feeds
    return generic_feeds(ins, rng, n)


def generic_feeds(ins, rng, n: int) -> list[dict]:
    """From the signature alone: dynamic dims 1 (first) or 16, floats N(0,1) clipped to [-3,3], ints 0..9."""
    feeds = []
    for _ in range(n):
        feed = {}
        for i in ins:
            shape = [d if isinstance(d, int) and d > 0 else (1 if k == 0 else 16) for k, d in enumerate(i.shape)]
            if "float" in i.type:
                a = np.clip(rng.normal(size=shape), -3, 3).astype(np.float16 if "16" in i.type else np.float32)
            elif "bool" in i.type:
                a = rng.random(shape) < 0.5
            else:
                a = rng.integers(0, 10, shape).astype(np.int64 if "64" in i.type else np.int32)
            feed[i.name] = a
        feeds.append(feed)
    return feeds


def input_note(e) -> str:
    notes = {
        "ppocr_cls": "rendered text lines 48x192, half rotated 180 degrees",
        "ppocr_cls_fp16": "rendered text lines 48x192 (float16), half rotated",
        "ppocrv4_rec": "rendered text lines, height 48, width 96-640 by aspect (varies per sample)",
        "ppocrv4_det": "rendered pages 640x640 (paragraphs, tables, figures)",
        "layout_cdla": "rendered pages 608x800", "doc_orientation": "rendered pages 224x224 in 4 rotations",
        "slanet_table": "rendered ruled tables padded to 488x488", "captcha_crnn": "rendered captchas 160x60, BGR 0..255",
        "mtcnn_pnet": "drawn faces 120x120, NHWC", "mtcnn_rnet": "drawn faces 24x24", "mtcnn_onet": "drawn faces 48x48",
        "ddddocr_ocr": "rendered captchas, gray 64x160 / 255", "ddddocr_ocr_int8": "rendered captchas, gray 64x160 / 255",
        "ddddocr_det": "rendered pages 416x416, pixels 0..255", "nudenet_yolov8n": "drawn faces 320x320 / 255",
        "oww_melspec": "speech x32767, 1760 samples", "oww_embedding": "mel windows 76x32 of speech (melspec model)",
        "oww_hey_jarvis": "16 embeddings of speech (melspec + embedding models)",
        "gtcrn": "STFT frames of speech, caches from streaming the float model",
        "aecmos": "mel spectrograms of far end / mic with echo / enhanced speech, 4 s at 48 kHz, h0 zeros",
        "plcmos": "log power spectra of speech with 20 ms packets dropped, 4 s; rater embedding N(0,1)",
        "dnsmos": "9.01 s of speech + noise", "basic_pitch": "synthesized piano-like notes, 2 s at 22.05 kHz",
        "magika": "bytes of real files (stdlib, numpy, fonts, /etc, /usr/share/doc)",
        "g2p_lstm_encoder": "Indonesian words of the package's lexicon, one-hot",
        "g2p_lstm_decoder": "decoder steps of greedy decoding those words (states from the float encoder/decoder)",
        "g2p_bert": "lexicon words with 'e' masked, token ids",
        "minilm": "Wikipedia passages (bench/text_data.py), 128 tokens", "minilm_fp16": "as minilm",
        "smollm2": "Wikipedia windows (bench/lm_data.py), 256 tokens",
    }
    if e.name.startswith("silero_vad"):
        return "speech chunks of 512 samples (+64 context), states from streaming the float model"
    if e.kind == "sklearn":
        return "rows of the scikit-learn data set (held-out split for evaluation)"
    if e.kind == "onnx-light":
        return "N(0,1) clipped to [-3,3]"
    return notes.get(e.name, "from the signature: N(0,1) floats")


# --------------------------------------------------------------------------- #
# Graph analysis
# --------------------------------------------------------------------------- #

def quantized_ops(path: Path) -> dict:
    """Q/DQ counts, integer ops, and the op types reading a DequantizeLinear output (subgraphs included)."""
    import onnx
    from onnx import AttributeProto

    m = onnx.load(str(path), load_external_data=False)
    ops, consumers, producers, in_sub = Counter(), Counter(), {}, Counter()
    graphs = []

    def collect(g, depth: int) -> None:
        graphs.append((g, depth))
        for n in g.node:
            for o in n.output:
                producers[o] = n.op_type
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH:
                    collect(a.g, depth + 1)
                elif a.type == AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        collect(sg, depth + 1)

    collect(m.graph, 0)
    # Weights ptqcli decodes when ORT loads the model (integer codes -> Cast -> Sub/Mul by constants)
    integer = {t.name for g, _ in graphs for t in g.initializer if t.data_type in INTEGER_TYPES}
    constants = {t.name for g, _ in graphs for t in g.initializer}
    decoded, decoded_readers = set(), Counter()
    for g, depth in graphs:
        for n in g.node:
            ops[n.op_type] += 1
            if depth and n.op_type in QDQ:
                in_sub[n.op_type] += 1
            if n.op_type not in QDQ and any(producers.get(i) == "DequantizeLinear" for i in n.input if i):
                consumers[n.op_type] += 1
            if n.op_type in ("Cast", "Gather") and any(i in integer for i in n.input):
                decoded.add(n.output[0])
            elif n.op_type in ("Cast", "Sub", "Mul") and any(i in decoded for i in n.input) and \
                    all(i in decoded or i in constants for i in n.input):
                decoded.add(n.output[0])
            elif any(i in decoded for i in n.input if i) and n.op_type not in QDQ:
                decoded_readers[n.op_type] += 1
    return {"ops": dict(ops), "q": ops["QuantizeLinear"], "dq": ops["DequantizeLinear"],
            "decoded": dict(decoded_readers),
            "dynq": ops["DynamicQuantizeLinear"], "integer": {k: v for k, v in ops.items() if tbench.is_integer_kernel(k)},
            "consumers": dict(consumers), "qdq_in_subgraphs": sum(in_sub.values()),
            "fp16": corpus.describe(path)["fp16"]}


def top_ops(ops: Counter, k: int = 5) -> str:
    return ", ".join(f"{op} {n}" for op, n in ops.most_common(k))


def counter_text(c: Counter | dict, k: int = 8) -> str:
    items = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{op} {n}" for op, n in items[:k]) + (", ..." if len(items) > k else "") if items else "none"


def file_mb(path: Path) -> float:
    extra = sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return (path.stat().st_size + extra) / 1e6


# --------------------------------------------------------------------------- #
# Evaluation child: fidelity and latency of float vs quantized
# --------------------------------------------------------------------------- #

def as_array(v) -> np.ndarray:
    if isinstance(v, list) and v and isinstance(v[0], dict):  # ZipMap: a list of {label: probability}
        return np.array([[d[k] for k in sorted(d)] for d in v], dtype=np.float64)
    return np.asarray(v)


def load_feeds(folder: Path) -> list[dict]:
    feeds = []
    for p in sorted(folder.glob("*.npz")):
        with np.load(p) as d:
            feeds.append({k: d[k] for k in d.files})
    return feeds


def child_eval(float_path: Path, quant_path: Path, eval_dir: Path, threads: int, rounds: int, latency_n: int) -> dict:
    import onnx

    feeds = load_feeds(eval_dir)
    fs, qs = tbench.session(float_path, threads), tbench.session(quant_path, threads)
    names = [o.name for o in fs.get_outputs()]
    ref = [fs.run(None, f) for f in feeds]
    got = [qs.run(None, f) for f in feeds]
    outputs = {}
    for j, name in enumerate(names):
        r = [as_array(x[j]) for x in ref]
        q = [as_array(x[j]) for x in got]
        if any(a.shape != b.shape for a, b in zip(r, q)):
            outputs[name] = {"error": f"shape {q[0].shape} vs float {r[0].shape}"}
            continue
        if r[0].dtype.kind not in "fc":
            agree = float(np.mean([np.mean(a == b) for a, b in zip(r, q)]))
            outputs[name] = {"agreement": agree}
            continue
        cos = []
        for a, b in zip(r, q):
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos.append(1.0 if na == 0 and nb == 0 else float(a @ b / (na * nb)) if na and nb else 0.0)
        a = np.concatenate([x.astype(np.float64).ravel() for x in r])
        b = np.concatenate([x.astype(np.float64).ravel() for x in q])
        err = float(np.sum((a - b) ** 2))
        sqnr = float("inf") if err == 0 else 10 * np.log10(max(float(np.sum(a ** 2)), 1e-300) / err)
        outputs[name] = {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)), "sqnr_db": sqnr,
                         "finite": bool(np.all(np.isfinite(b)))}
    samples = feeds[:latency_n]
    medians = harness.take_turns({"float": lambda i: fs.run(None, samples[i]), "quant": lambda i: qs.run(None, samples[i])},
                                 len(samples), rounds, warmup=2)
    opt = quant_path.with_name("quantized.optimized.onnx")
    opt.unlink(missing_ok=True)
    tbench.session(quant_path, threads, optimized=opt)
    og = onnx.load(str(opt), load_external_data=False).graph
    optimized = Counter(n.op_type for n in og.node)
    return {"outputs": outputs, "float_ms": 1000 * medians["float"], "quant_ms": 1000 * medians["quant"],
            "ort_integer": {k: v for k, v in optimized.items() if tbench.is_integer_kernel(k)},
            "ort_qdq_left": sum(optimized.get(k, 0) for k in QDQ)}


# --------------------------------------------------------------------------- #
# Parent
# --------------------------------------------------------------------------- #

@dataclass
class Result:
    name: str
    source: str
    what: str
    size_mb: float
    inputs: str
    features: list
    nodes: int
    top: str
    input_note: str
    outcome: str = "not run"  # quantized | nothing quantized | refused | crashed | timeout | OOM | no output | inputs failed
    error: str | None = None
    traceback_tail: list = field(default_factory=list)
    quantize_s: float | None = None
    peak_rss_mb: float | None = None
    q: dict | None = None
    quant_mb: float | None = None
    eval: dict | None = None
    eval_error: str | None = None
    ran_with: str = "an earlier run (not recorded)"  # ptqcli source and timeout this row ran with


def classify(proc: subprocess.CompletedProcess, args) -> tuple[str, str, list]:
    text = (proc.stdout or "") + "\n" + (proc.stderr or "")
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    if "timeout after" in text:
        return "timeout", f"timeout (> {args.timeout} s)", []
    if "Traceback (most recent call last)" in text:
        tb = text[text.rindex("Traceback (most recent call last)"):].splitlines()
        tb = [ln for ln in tb if ln.strip()]
        last = next((ln.strip() for ln in reversed(tb) if re.match(r"^\w[\w.]*(Error|Exception|Exit|Interrupt)\b|^\w+:", ln.strip())), tb[-1].strip())
        frames = []
        for ln in tb:
            m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', ln)
            if m:
                where = Path(m.group(1))
                where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else Path(*where.parts[-2:])
                frames.append(f"{where}:{m.group(2)} {m.group(3)}")
        tail = frames[-3:] + [last]
        if "MemoryError" in last or "bad_alloc" in last:
            return "OOM", f"OOM (> {args.mem_limit_gb:g} GB)", tail
        return "crashed", last, tail
    if proc.returncode == -9 or "Unable to allocate" in text or "bad_alloc" in text:
        return "OOM", harness.failure(proc, args.mem_limit_gb, args.timeout), []
    if proc.returncode < 0:
        return "crashed", f"killed by signal {-proc.returncode}", lines[-3:]
    at = next((k for k in range(len(lines) - 1, -1, -1) if lines[k].startswith("error:")), None)
    if at is not None:  # ptqcli's message, joined when ORT's text inside it spans lines
        return "refused", " ".join(ln.strip() for ln in lines[at:]).removeprefix("error:").strip(), []
    return "refused", harness.failure(proc, args.mem_limit_gb, args.timeout), []


def prepare(e, path: Path, args, work: Path) -> tuple[list[dict], list[dict]]:
    calib = make_inputs(e, path, "calib", args.calib)
    held = make_inputs(e, path, "eval", args.eval)
    sess = Sess(path)
    for f in calib + held:  # every sample must run through the float model
        sess(f)
    for sub, feeds in (("calib", calib), ("eval", held)):
        d = work / sub
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for i, f in enumerate(feeds):
            np.savez(d / f"sample_{i:03d}.npz", **f)
    return calib, held


def run_model(e, args) -> Result:
    path = corpus.build_one(e)
    d = corpus.describe(path, e)
    res = Result(e.name, e.source, e.what, path.stat().st_size / 1e6, corpus.signature(d["inputs"]), d["features"],
                 d["nodes"], top_ops(d["ops"]), input_note(e))
    res.ran_with = f"ptqcli {harness.ptq_source()}, timeout {args.timeout} s"
    work = RUNS / e.name
    work.mkdir(parents=True, exist_ok=True)
    try:
        calib, held = prepare(e, path, args, work)
        res.input_note += f"; {len(calib)} calibration + {len(held)} held-out samples"
    except Exception as exc:  # noqa: BLE001  (the row says why)
        res.outcome, res.error = "inputs failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return res
    out = work / "quantized.onnx"
    out.unlink(missing_ok=True)
    cmd = [str(args.ptq), "quantize", str(path), "--data", str(work / "calib"), "-o", str(out)]
    print(f"[{e.name}] {shlex.join(cmd[1:])}", flush=True)
    os.environ["PTQ_DEBUG"] = "1"
    os.environ["_TYPER_STANDARD_TRACEBACK"] = "1"  # plain tracebacks in the log (typer's boxes otherwise)
    proc, res.quantize_s, res.peak_rss_mb = harness.spawn(cmd, work / "ptq.log", work, args.threads, args.mem_limit_gb,
                                                          args.timeout)
    if proc.returncode != 0:
        res.outcome, res.error, res.traceback_tail = classify(proc, args)
        return res
    if not out.exists():
        res.outcome, res.error = "no output", "exit 0 but no output file"
        return res
    res.outcome, res.quant_mb = "quantized", file_mb(out)
    try:
        res.q = quantized_ops(out)
    except Exception as exc:  # noqa: BLE001
        res.eval_error = f"cannot read the output: {type(exc).__name__}: {exc}"
        return res
    if not (res.q["q"] or res.q["dq"] or res.q["dynq"] or res.q["integer"] or res.q["decoded"]):
        res.outcome = "nothing quantized"  # written, but without a single Q/DQ or integer op
        plan = re.search(r"float nodes\s*│\s*(.+?)\s*│", proc.stdout + proc.stderr)
        res.error = f"plan: 0 layers; float nodes {plan.group(1)}" if plan else "no Q/DQ or integer op in the output"
    cmd = [sys.executable, __file__, "--_eval", e.name, "--threads", str(args.threads), "--rounds", str(args.rounds),
           "--latency-samples", str(args.latency_samples)]
    proc, _, _ = harness.spawn(cmd, work / "eval.log", work, args.threads, args.mem_limit_gb, args.timeout)
    last = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or last is None:
        kind, msg, tail = classify(proc, args)
        res.eval_error = f"ORT on the quantized model: {msg}"
        res.traceback_tail = tail
    else:
        res.eval = json.loads(last)
    return res


def worst(ev: dict | None) -> tuple[float | None, float | None, str]:
    if not ev:
        return None, None, ""
    cos = [o["cos_mean"] for o in ev["outputs"].values() if "cos_mean" in o]
    sq = [o["sqnr_db"] for o in ev["outputs"].values() if "sqnr_db" in o]
    agree = [o["agreement"] for o in ev["outputs"].values() if "agreement" in o]
    note = f"int agree {min(agree):.0%}" if agree else ""
    return (min(cos) if cos else None), (min(sq) if sq else None), note


def mb(v: float) -> str:
    return f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"


def fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def row_cells(r: Result, markdown: bool) -> list[str]:
    def esc(s: str) -> str:
        return s.replace("|", "\\|") if markdown else s

    result = r.outcome if not r.error else f"{r.outcome}: {r.error}"
    if r.eval_error:
        result += f" ({r.eval_error})"
    qops = "-"
    if r.q:
        qops = f"Q {r.q['q']} / DQ {r.q['dq']}" + (f" (DynQ {r.q['dynq']})" if r.q["dynq"] else "")
        if r.q["qdq_in_subgraphs"]:
            qops += f", {r.q['qdq_in_subgraphs']} in subgraphs"
        qops += f"; reads DQ: {counter_text(r.q['consumers'], 5)}"
        if r.q.get("decoded"):
            qops += f"; integer weights decoded at load for: {counter_text(r.q['decoded'], 4)}"
        if r.eval:
            qops += f"; ORT integer kernels: {counter_text(r.eval['ort_integer'], 4)}"
    cos, sq, note = worst(r.eval)
    fid = "-" if r.eval is None else f"{fmt(cos, '.4f')} / {fmt(sq, '.1f')}" + (f" ({note})" if note else "")
    size = mb(r.size_mb) + (f" -> {mb(r.quant_mb)}" if r.quant_mb else "")
    lat = "-" if not r.eval else f"{r.eval['float_ms']:.2f} -> {r.eval['quant_ms']:.2f}"
    return [r.name, f"{r.nodes}: {r.top}", esc("; ".join(r.features) or "-"), esc(result), esc(qops), fid, size, lat,
            fmt(r.quantize_s, ".1f")]


COLUMNS = ["model", "nodes: top ops", "features", "ptq quantize", "quantized ops", "worst cos / SQNR dB",
           "MB float -> q", "ms float -> q", "quantize s"]


def cpu_line() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    amx = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_tile", "amx_int8", "amx_bf16"))
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return f"{harness.cpu_description()[:-1]}; {amx}; VNNI {'yes' if vnni else 'no'})"


def group_failures(results: list[Result]) -> dict[str, list[Result]]:
    groups: dict[str, list[Result]] = {}
    for r in results:
        if r.outcome == "quantized" and not r.eval_error:
            continue
        key = f"{r.outcome}: {r.error}" if r.error else f"{r.outcome}: {r.eval_error}"
        if r.outcome == "refused":  # one group per message, whatever node or tensor it names
            while (short := re.sub(r"\([^()]*\)|'[^']*'|\"[^\"]*\"", "…", key)) != key:
                key = short
        key = "nothing quantized (the model written back without a Q/DQ or integer op)" \
            if r.outcome == "nothing quantized" else key
        groups.setdefault(key, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def ran_with_lines(results: list[Result]) -> list[str]:
    """When rows come from runs with different ptqcli sources or timeouts (--merge), which rows ran how."""
    groups: dict[str, list[str]] = {}
    for r in results:
        groups.setdefault(r.ran_with, []).append(r.name)
    if len(groups) < 2:
        return []
    return [f"- rows run with {how}: {', '.join(names)}" for how, names in groups.items()]


def ptq_source_line(args) -> str:
    """ptqcli's source at the start of the run, and at the end when it changed meanwhile."""
    now = harness.ptq_source()
    return now if now == args.ptq_at_start else f"{args.ptq_at_start} at the start, {now} at the end of the run"


def write_report(results: list[Result], args, total_s: float) -> None:
    import onnxruntime

    counts = Counter(r.outcome if not r.eval_error else f"{r.outcome} (ORT failed on output)" for r in results)
    lines = [
        "# ptq quantize over a corpus of real ONNX graphs",
        "",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`; total {total_s / 60:.1f} min",
        *([f"- rows kept from the previous run (`--merge`): {', '.join(args.kept)}"] if args.kept else []),
        f"- CPU: {cpu_line()}, shared with other work",
        f"- ptqcli: {ptq_source_line(args)}; onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        *ran_with_lines(results),
        f"- `ptq quantize MODEL --data CALIB_DIR -o OUT.onnx`, default options, PTQ_DEBUG=1, timeout {args.timeout} s, "
        f"{args.mem_limit_gb:g} GB address-space limit; CALIB_DIR holds {args.calib} .npz files, one feed each "
        "(batch axis where the model has one, states and scalars as the model takes them)",
        f"- fidelity on {args.eval} held-out samples with default ORT session options: cosine of each output "
        "(mean over samples; the table shows the worst output) and SQNR = 10 log10(sum ref^2 / sum err^2) over all "
        "samples; integer outputs by agreement. Latency: batch 1, median of "
        f"{args.rounds} interleaved rounds x {args.latency_samples} samples, {args.threads} threads",
        f"- speech: {speech_source()}; images rendered with Pillow and DejaVu fonts",
        "- outcome: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + f" of {len(results)}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row_cells(r, True)) + " |" for r in results]
    lines += ["", "## Failures grouped by cause", ""]
    for key, rs in group_failures(results).items():
        lines.append(f"- **{key.replace('|', '/')}** ({len(rs)}): {', '.join(r.name for r in rs)}")
        for r in rs:
            if r.traceback_tail:
                lines.append(f"  - {r.name}: " + " / ".join(f"`{t}`" for t in r.traceback_tail))
            elif r.outcome in ("timeout", "OOM"):
                lines.append(f"  - {r.name}: peak RSS {fmt(r.peak_rss_mb, '.0f')} MB after {fmt(r.quantize_s, '.0f')} s")
            elif r.error and (r.outcome == "nothing quantized" or (r.outcome == "refused" and "…" in key)):
                lines.append(f"  - {r.name}: `{r.error}`")
    lines += ["", "## Corpus", "", "| model | source | what | MB | inputs | calibration / held-out inputs |",
              "|---|---|---|---:|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.source} | {r.what} | {mb(r.size_mb)} | {r.inputs.replace('|', '/')} | {r.input_note} |")
    lines += ["", "## Per-output fidelity of the quantized models", ""]
    for r in results:
        if not r.eval:
            continue
        parts = []
        for name, o in r.eval["outputs"].items():
            if "cos_mean" in o:
                parts.append(f"`{name}` cos {o['cos_mean']:.4f} (min {o['cos_min']:.4f}), SQNR {o['sqnr_db']:.1f} dB"
                             + ("" if o["finite"] else ", NON-FINITE"))
            elif "agreement" in o:
                parts.append(f"`{name}` agreement {o['agreement']:.1%}")
            else:
                parts.append(f"`{name}` {o['error']}")
        lines.append(f"- {r.name}: " + "; ".join(parts) + f"; ORT Q/DQ left {r.eval['ort_qdq_left']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    (RUNS / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 220))
    table = Table(title=f"ptq quantize over {len(results)} real ONNX graphs, {cpu_line()}")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for r in results:
        style = "green" if r.outcome == "quantized" and not r.eval_error else \
            ("yellow" if r.outcome in ("refused", "nothing quantized") else "red")
        table.add_row(*row_cells(r, False), style=style)
    console.print(table)


def previous_rows(now: list[str]) -> list[Result]:
    path = RUNS / "results.json"
    if not path.exists():
        return []
    return [Result(**row) for row in json.loads(path.read_text()) if row["name"] not in now]


def merged(kept: list[Result], fresh: list[Result]) -> list[Result]:
    """Kept and fresh rows in corpus order (fresh ones win)."""
    rows = {r.name: r for r in kept}
    rows.update({r.name: r for r in fresh})
    order = {e.name: i for i, e in enumerate(corpus.ENTRIES)}
    return sorted(rows.values(), key=lambda r: order.get(r.name, len(order)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated corpus names (bench/graph_corpus.py)")
    parser.add_argument("--skip-large", action="store_true", help="skip models over --large-mb")
    parser.add_argument("--large-mb", type=float, default=50.0)
    parser.add_argument("--with-optional", action="store_true", help="include optional entries (SmolLM2, 651 MB)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per ptq quantize (and per evaluation)")
    parser.add_argument("--calib", type=int, default=24, help="calibration samples per model")
    parser.add_argument("--eval", type=int, default=8, help="held-out samples per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds")
    parser.add_argument("--latency-samples", type=int, default=4)
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--ptq", type=Path, default=PTQ)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--merge", action="store_true",
                        help="keep the previous run's rows (bench/.cache/graphs/runs/results.json) of models not run now")
    parser.add_argument("--_eval", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._eval:
        e = corpus.BY_NAME[args._eval]
        work = RUNS / e.name
        print(json.dumps(child_eval(corpus.model_path(e), work / "quantized.onnx", work / "eval", args.threads,
                                    args.rounds, args.latency_samples)))
        return
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    try:
        chosen = corpus.entries(only, args.with_optional)
    except corpus.CorpusError as exc:
        parser.error(str(exc))
    start, results = time.perf_counter(), []
    args.ptq_at_start = harness.ptq_source()
    kept = previous_rows([e.name for e in chosen]) if args.merge else []
    args.kept = [r.name for r in kept]
    for e in chosen:
        try:
            path = corpus.build_one(e)
        except corpus.CorpusError as exc:
            print(f"[{e.name}] skipped: {exc}", flush=True)
            continue
        if args.skip_large and path.stat().st_size / 1e6 > args.large_mb:
            print(f"[{e.name}] skipped: {path.stat().st_size / 1e6:.0f} MB > --large-mb {args.large_mb:g}", flush=True)
            continue
        t0 = time.perf_counter()
        r = run_model(e, args)
        results.append(r)
        results = merged(kept, results)
        print(f"[{e.name}] {r.outcome}{': ' + r.error if r.error else ''}{' / ' + r.eval_error if r.eval_error else ''} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        write_report(results, args, time.perf_counter() - start)
    print_table(results)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
