"""Release gates over quantization cards, and the difference between two cards."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import from_mapping
from ..errors import PtqError
from .fidelity import headline


@dataclass(frozen=True)
class GateLimits:
    """Thresholds; None means "not checked". Drops and regressions are in percentage points."""

    max_drop: float | None = None
    min_agreement: float | None = None
    min_compression: float | None = None
    max_latency_ms: float | None = None
    max_regression: float | None = None
    max_ppl_increase: float | None = None  # percent of the float model's perplexity
    min_speedup: float | None = None  # float latency over quantized latency, batch 1, as the card measured them

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise PtqError(f"gate limit {f.name} must be a non-negative number (got {value!r})")


@dataclass(frozen=True)
class Check:
    name: str
    limit: str
    actual: str
    passed: bool


def limits_from(mapping: dict) -> GateLimits:
    return from_mapping(GateLimits, mapping, "gate limits")


def quality(card: dict) -> tuple[float, str] | None:
    """The card's headline quality in percent (see export/fidelity.headline)."""
    return headline(card["results"]["accuracy"], card["results"]["outputs"])


def _drop(card: dict) -> tuple[float, str] | None:
    results = card["results"]
    if results["accuracy"]:
        return results["accuracy"]["drop_points"], "accuracy drop vs float"
    q = quality(card)
    if q is None:
        return None
    return 100 - q[0], "disagreement with float" if q[1] == "top-1 agreement" else f"100 - {q[1]}"


def run_gate(card: dict, limits: GateLimits, baseline: dict | None = None) -> list[Check]:
    checks: list[Check] = []

    def check(name: str, limit: str, value: float | None, ok, fmt: str) -> None:
        if value is None:
            checks.append(Check(name, limit, "not measured", False))
        else:
            checks.append(Check(name, limit, fmt.format(value), bool(ok(value))))

    broken = sum(m.get("non_finite", 0) for m in card["results"]["outputs"].values())
    if broken:  # whatever the limits: a model that writes NaN where float does not is not shippable
        checks.append(Check("finite outputs", "no NaN or infinity where float's are finite",
                            f"{broken:,} non-finite values", False))
    if limits.max_drop is not None:
        drop = _drop(card)
        check(f"max-drop ({drop[1] if drop else 'accuracy'})", f"<= {limits.max_drop:.2f} pts",
              drop[0] if drop else None, lambda v: v <= limits.max_drop, "{:.2f} pts")
    if limits.min_agreement is not None:
        agreement = next((100 * o["top1_agreement"] for o in card["results"]["outputs"].values()
                          if "top1_agreement" in o), None)
        check("min-agreement (top-1 vs float)", f">= {limits.min_agreement:.2f}%", agreement,
              lambda v: v >= limits.min_agreement, "{:.2f}%")
    if limits.min_compression is not None:
        check("min-compression (weights)", f">= {limits.min_compression:.2f}x",
              card["results"]["size"]["compression"], lambda v: v >= limits.min_compression, "{:.2f}x")
    if limits.max_latency_ms is not None:
        check("max-latency-ms (batch 1)", f"<= {limits.max_latency_ms:.3f} ms",
              card["results"]["latency"]["quantized_ms"], lambda v: v <= limits.max_latency_ms, "{:.3f} ms")
    if limits.min_speedup is not None:
        check("min-speedup (float ms / quantized ms, batch 1)", f">= {limits.min_speedup:.2f}x",
              card["results"]["latency"].get("speedup"), lambda v: v >= limits.min_speedup, "{:.2f}x")
    if limits.max_ppl_increase is not None:
        lm = next((o for o in card["results"]["outputs"].values() if "perplexity_float" in o), None)
        increase = 100 * (lm["perplexity_quantized"] / lm["perplexity_float"] - 1) if lm else None
        check("max-ppl-increase (next-token perplexity)", f"<= {limits.max_ppl_increase:.2f}%", increase,
              lambda v: v <= limits.max_ppl_increase, "{:+.2f}%")
    if baseline is not None:
        allowed = limits.max_regression if limits.max_regression is not None else 0.0
        now, before = quality(card), quality(baseline)
        regression = before[0] - now[0] if now and before else None
        check(f"max-regression vs baseline ({now[1] if now else 'quality'})", f"<= {allowed:.2f} pts",
              regression, lambda v: v <= allowed, "{:+.2f} pts")
    elif limits.max_regression is not None:
        raise PtqError("--max-regression needs --baseline OLD_CARD.json")
    if not checks:
        raise PtqError("no gate limits given: pass --max-drop, --min-agreement, --min-compression, "
                       "--max-latency-ms, --min-speedup or --baseline (or a --limits TOML file)")
    return checks


# ---- card diff ---------------------------------------------------------------------------------

_VOLATILE = ("model/input/path", "model/output/path")


def flatten(doc, prefix: str = "") -> dict[str, object]:
    """Nested dicts to {"a/b/c": leaf}; layer lists keyed by node name so reordering is not a change."""
    out: dict[str, object] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(doc, list) and doc and all(isinstance(x, dict) and "node" in x for x in doc):
        for x in doc:
            out.update(flatten({k: v for k, v in x.items() if k != "node"}, f"{prefix}{x['node']}/"))
    else:
        out[prefix.rstrip("/")] = doc
    return out


def diff_cards(a: dict, b: dict) -> list[tuple[str, object, object]]:
    fa, fb = flatten(a), flatten(b)
    rows = []
    for key in sorted(set(fa) | set(fb)):
        if key in _VOLATILE:
            continue
        va, vb = fa.get(key, "(absent)"), fb.get(key, "(absent)")
        if va != vb:
            rows.append((key, va, vb))
    return rows
