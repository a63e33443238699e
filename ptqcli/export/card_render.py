"""Human-readable renderings of a quantization card: Markdown and a PNG of bits and SQNR per layer."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

from .fidelity import OUTPUT_KIND_LABELS, pooled_positions


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def render_markdown(card: dict, plot_name: str) -> str:
    m, t, r = card["model"], card["tradeoffs"], card["results"]
    cal, lat, size, bops = card["calibration"], r["latency"], r["size"], r["bops"]
    lines = [
        f"# Quantization card: {m['output']['path']}",
        "",
        f"ptqcli {card['tool']['version']}, card version {card['card_version']}.",
        "",
        "## Model",
        f"- input: `{m['input']['path']}` (sha256 `{m['input']['sha256'][:16]}...`, {m['input']['bytes']:,} bytes)",
        f"- output: `{m['output']['path']}` (sha256 `{m['output']['sha256'][:16]}...`, {m['output']['bytes']:,} bytes),"
        f" {m['format'].upper()}, opset {m['opset']}",
        *_native_lines(m.get("native")),
        *_container_lines(m.get("container")),
        "",
        "## Trade-offs",
        "| choice | value |",
        "|---|---|",
    ]
    for key, value in t.items():
        if key == "float_nodes":
            value = ", ".join(f"{k} ({v})" for k, v in value.items()) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"| {key.replace('_', ' ')} | {value} |")
    lines += [
        "",
        "## Calibration",
        f"{cal['kind']} data from `{cal['source']}`, {cal['samples']} samples, range method {cal['method']}.",
        "",
        "## Results",
    ]
    ev = r["evaluation"]
    if ev:
        where = "held-out" if ev["held_out"] else "calibration (no held-out data)"
        lines.append(f"Measured on {ev['samples']} {where} samples from `{ev['source']}`, ORT default session (kernel path).")
        lines.append("")
    if r["accuracy"]:
        a = r["accuracy"]
        lines.append(f"- top-1 accuracy: float {_pct(a['float'])}, quantized {_pct(a['quantized'])}"
                     f" (drop {a['drop_points']:+.2f} points)")
    for name, o in r["outputs"].items():
        lines.append(_output_line(name, o))
    lines += [
        f"- weights: {size['float_bytes']:,} bytes float -> {size['quantized_bytes']:,} bytes"
        f" ({_num(size['compression'], '{:.2f}')}x)",
        (f"- bit-operations per sample: {bops['float']:.3e} float -> {bops['quantized']:.3e}"
         f" ({_num(bops['reduction'], '{:.1f}')}x)" if bops["float"] else
         "- bit-operations per sample: not counted (no layer output shapes were measured)"),
        _latency_line(lat),
        f"- ORT kernels: {', '.join(f'{k} x{v}' for k, v in r['kernel_ops'].items())}",
        *([f"- in float between a DequantizeLinear and a QuantizeLinear: {ops_summary(r['float_between_qdq'])}"]
          if r.get("float_between_qdq") else []),
        "",
        "## Layers",
        f"![bits and SQNR per layer]({plot_name})",
        "",
        "| # | node | op | params | format | granularity | rounding | stored as | ORT runs | weight SQNR dB | output SQNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(card["layers"]):
        lines.append(f"| {i} | {row['node']} | {row['op_type']} | {row['params']:,} | {row['format']}{' (binary input)' if row.get('binary_input') else ''} |"
                     f" {row['granularity']} | {row['rounding']} | {row.get('container', '-')} | {row.get('kernel', '-')} |"
                     f" {_num(row['weight_sqnr_db'], '{:.1f}')} |"
                     f" {_num(row['output_sqnr_db'], '{:.1f}')} |")
    lines += ["", "## Recipe", "```json", _json(card["recipe"]), "```", ""]
    return "\n".join(lines)


def container_summary(c: dict) -> str:
    """One line on how the sub-8-bit weight codes are stored and what that costs or saves."""
    parts = []
    if c["int8"] and c.get("widened_at", "file") == "load":
        parts.append(f"{len(c['int8'])} sub-8-bit layers stored as int4 and widened to int8 codes when ORT loads the "
                     f"model (a Cast it folds, +{c['extra_bytes']:,} bytes), for its integer kernels")
    elif c["int8"]:
        parts.append(f"{len(c['int8'])} sub-8-bit layers stored as 8-bit codes for ORT's integer kernels "
                     f"(+{c['extra_bytes']:,} bytes)")
    if c.get("indexed"):
        parts.append(f"{len(c['indexed'])} level-set layers as 4-bit indices decoded at load "
                     f"(-{c['saved_bytes']:,} bytes)")
    if c.get("decoded"):
        parts.append(f"{len(c['decoded'])} layers that run in float (weight-only, or no integer kernel) decoded to "
                     "float weights when ORT loads the model")
    if c["smallest"]:
        parts.append(f"{len(c['smallest'])} in their smallest container")
    if c.get("bias_fused"):
        parts.append(f"{len(c['bias_fused'])} integer MatMuls adding their bias in the kernel (MatMulIntegerToFloat)")
    return f"weight containers ({c['mode']}): " + ", ".join(parts)


def container_news(c: dict | None) -> bool:
    """Does the card's container record say more than that every weight kept its plain codes?"""
    return bool(c) and any(c.get(key) for key in ("int8", "smallest", "indexed", "decoded", "bias_fused"))


def _container_lines(c: dict | None) -> list[str]:
    """How sub-8-bit weight codes are stored, and what that costs."""
    if not container_news(c):
        return []
    lines = [f"- {container_summary(c)}"]
    lines += [f"  - read as 8-bit but not fused: {node} ({kernel})" for node, kernel in c.get("not_fused", {}).items()]
    return lines


def _output_line(name: str, o: dict) -> str:
    """One output's fidelity in words: class scores lead with top-1 agreement, embeddings with cosine."""
    kind = OUTPUT_KIND_LABELS.get(o.get("kind"))
    parts = []
    if "perplexity_float" in o:
        parts.append(f"perplexity {o['perplexity_float']:.3f} float, {o['perplexity_quantized']:.3f} quantized "
                     f"over {o['tokens']} next tokens, KL {o['next_token_kl']:.4f}")
    if "top1_agreement" in o:
        parts.append(f"top-1 agreement {_pct(o['top1_agreement'])}, KL {o['kl']:.5f}")
    parts.append(f"cosine mean {o['cosine']:.5f}" + (f", min {o['cosine_min']:.5f}" if o.get("cosine_min") is not None else ""))
    if "pooled_cosine" in o:
        parts.append(f"pooled over {pooled_positions(o['pooled_over'])}: cosine mean {o['pooled_cosine']:.5f},"
                     f" min {o['pooled_cosine_min']:.5f}")
    parts.append("identical to float (no SQNR)" if o["sqnr_db"] is None else f"SQNR {o['sqnr_db']:.2f} dB")
    return f"- output `{name}`{f' ({kind})' if kind else ''}: " + "; ".join(parts)


def ops_summary(counts: dict, limit: int | None = None) -> str:
    """"HardSigmoid x28, Mul x28": op counts, the most frequent first (the first `limit`, then "...")."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{op} x{n}" for op, n in ranked[:limit])
    return shown + (", ..." if limit is not None and len(ranked) > limit else "")


def _latency_line(lat: dict) -> str:
    where = f"batch {lat['batch']}, {lat['cpu']}"
    if lat["float_ms"] is None or lat["quantized_ms"] is None:
        return f"- latency ({where}): not measured"
    how = ""
    if lat.get("runs"):
        burst = lat.get("runs_per_turn", 1)
        each = f"{lat['runs']} turns of {burst} runs" if burst > 1 else f"{lat['runs']} runs"
        how = (f"; median of {each} each, float and quantized taking turns (threads sleeping between runs) on"
               f" {lat['samples']} {'real' if lat.get('real_samples') else 'all-zero'} sample(s)")
    speedup = f", speed-up {lat['speedup']:.2f}x" if lat.get("speedup") is not None else ""
    return (f"- latency ({where}): float {lat['float_ms']:.3f} ms, quantized {lat['quantized_ms']:.3f} ms"
            f"{speedup}{how}")


def _json(doc) -> str:
    import json

    return json.dumps(doc, indent=1)


# ---- plot ---------------------------------------------------------------------------------------

_W_MIN, _H = 640, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 56, 36, 40
_BITS_AXIS = 8
_BAR, _BAR_FLOAT, _LINE, _GRID, _TEXT = (70, 120, 200), (190, 190, 190), (220, 90, 40), (225, 225, 225), (30, 30, 30)


def render_plot(card: dict) -> bytes:
    """Bars: weight bits per layer (left axis); dots and line: output SQNR in dB (right axis)."""
    layers = card["layers"]
    n = max(len(layers), 1)
    width = min(max(_W_MIN, _LEFT + _RIGHT + 14 * n), 4000)
    img = Image.new("RGB", (width, _H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    plot_w, plot_h = width - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    sqnrs = [row["output_sqnr_db"] for row in layers if row["output_sqnr_db"] is not None]
    sqnr_top = max(10.0, 10 * (int(max(sqnrs, default=0) // 10) + 1))

    def y_bits(b: float) -> float:
        return _TOP + plot_h * (1 - min(b, _BITS_AXIS) / _BITS_AXIS)

    def y_sqnr(s: float) -> float:
        return _TOP + plot_h * (1 - max(min(s, sqnr_top), 0) / sqnr_top)

    for b in range(0, _BITS_AXIS + 1, 2):
        draw.line([(_LEFT, y_bits(b)), (width - _RIGHT, y_bits(b))], fill=_GRID)
        draw.text((_LEFT - 24, y_bits(b) - 6), str(b), fill=_BAR, font=font)
    for k in range(0, 5):
        s = sqnr_top * k / 4
        draw.text((width - _RIGHT + 6, y_sqnr(s) - 6), f"{s:.0f}", fill=_LINE, font=font)
    step = plot_w / n
    points = []
    for i, row in enumerate(layers):
        x0 = _LEFT + i * step + step * 0.15
        x1 = _LEFT + (i + 1) * step - step * 0.15
        color = _BAR if row["bits"] <= _BITS_AXIS else _BAR_FLOAT
        draw.rectangle([x0, y_bits(row["bits"]), x1, y_bits(0)], fill=color)
        if row["output_sqnr_db"] is not None:
            points.append(((x0 + x1) / 2, y_sqnr(row["output_sqnr_db"])))
        if n <= 40 or i % max(1, n // 40) == 0:
            draw.text(((x0 + x1) / 2 - 4, _H - _BOTTOM + 4), str(i), fill=_TEXT, font=font)
    if len(points) > 1:
        draw.line(points, fill=_LINE, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_LINE)
    draw.rectangle([_LEFT, _TOP, width - _RIGHT, _H - _BOTTOM], outline=_TEXT)
    draw.text((_LEFT, 10), "weight bits per layer (bars, left)  |  output SQNR dB (line, right)", fill=_TEXT, font=font)
    draw.text((_LEFT, _H - 16), "layer index (see the card's layer table)", fill=_TEXT, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _native_lines(native: dict | None) -> list[str]:
    if not native:
        return []
    lines = ["- ptqcli operators: " + ", ".join(f"{node} -> {op}" for node, op in native["replaced"].items())]
    lines += [f"- kept as QDQ: {node} ({why})" for node, why in native["kept"].items()]
    return lines
