"""The Pareto view: measured quality against weight size for ILP mixes, uniform widths and greedy.

Every point is a plan that was exported and evaluated in ORT, not a proxy estimate.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

from ..errors import PtqError
from ..export.fidelity import headline
from ..export.measures import weight_storage
from ..export import container
from ..stages import evaluate, eval_source
from ..rundir import Run
from ..parallel import run_all
from .stage import AllocationConfig, Budget, layer_options, load_base, plan_for, solve
from .sensitivity import Candidate


@dataclass(frozen=True)
class Point:
    method: str  # ilp | greedy | uniform
    label: str
    budget_bytes: float | None
    size_bytes: int
    damage: float
    quality: float  # percent: accuracy if labelled, else top-1 agreement with float
    metric: str


def _quality(fidelity) -> tuple[float, str]:
    value, label = headline(fidelity.accuracy, fidelity.outputs)
    return value, label if "x100" in label else f"{label} %"


def _measure(ctx: Run, choice: dict[str, str], eval_data: str | None, eval_samples: int) -> tuple[int, float, str]:
    plan = plan_for(ctx, choice)
    source, skip, held_out = eval_source(plan, eval_data, ctx.graph)
    if source is None:
        raise PtqError("the Pareto view needs evaluation data: pass --eval-data")
    # Measured as `ptq export` writes it: codes in the container ORT's integer kernels take.
    fidelity = evaluate(ctx.graph, container.export(ctx.graph, plan)[0], plan, source, skip, held_out, eval_samples)
    quality, metric = _quality(fidelity)
    return weight_storage(ctx.graph, plan)["quantized_bytes"], quality, metric


def _measure_in_task(job: tuple[str, dict[str, str], str | None, int]) -> tuple[int, float, str]:
    """One Ray task of the sweep: the run read from its directory, one plan exported and evaluated."""
    run_dir, choice, eval_data, eval_samples = job
    return _measure(load_base(run_dir), choice, eval_data, eval_samples)


def sweep(ctx: Run, cfg: AllocationConfig, eval_data: str | None, eval_samples: int, points: int = 6,
          advance: Callable[[int], None] = lambda n: None) -> list[Point]:
    """Uniform widths, then ILP and greedy mixes at budgets spread between them, each plan exported
    and evaluated; on Ray (cfg.workers) the evaluations run as tasks, each reading the run itself,
    with the same points as one process gives."""
    options = layer_options(ctx, cfg)
    uniform = [f for f in ("int8", "int4", "int3") if f in cfg.weight_formats]
    plans: list[tuple[str, str, float | None, dict[str, str], float]] = []  # method, label, budget, choice, damage
    for fmt in uniform:
        choice = {node: (opts[0].label if len(opts) == 1 else Candidate(fmt, 8).label) for node, opts in options.items()}
        plans.append(("uniform", fmt, None, choice, _damage(ctx, cfg, choice)))
    # Budgets from the uniform plans' sizes (no evaluation needed to know a plan's size).
    budgets = [float(weight_storage(ctx.graph, plan_for(ctx, choice))["quantized_bytes"]) for *_, choice, _ in plans]
    low = min(budgets) * 0.8
    budgets += [low + (max(budgets) - low) * k / (points - 1) for k in range(points)]
    for budget in sorted(set(budgets)):
        for method in ("ilp", "greedy"):
            try:
                solution, _, _ = solve(ctx, Budget("size", budget), cfg, method=method)
            except PtqError:
                continue  # below the smallest feasible size
            plans.append((method, f"{budget / 1e3:.1f} kB", budget, solution.choice, solution.damage))
    if cfg.workers.ray is None:
        measured = run_all(lambda p: _measure(ctx, p[3], eval_data, eval_samples), plans, cfg.workers, advance)
    else:
        jobs = [(str(ctx.path), choice, eval_data, eval_samples) for *_, choice, _ in plans]
        measured = run_all(_measure_in_task, jobs, cfg.workers, advance)
    return [Point(method, label, budget, size, damage, quality, metric)
            for (method, label, budget, _, damage), (size, quality, metric) in zip(plans, measured)]


def _damage(ctx: Run, cfg: AllocationConfig, choice: dict[str, str]) -> float:
    from .stage import damage_table

    table = damage_table(ctx, layer_options(ctx, cfg), cfg)
    return sum(table[node][label] for node, label in choice.items())


def sweep_size(cfg: AllocationConfig, points: int) -> int:
    """Evaluations a sweep makes, for the progress bar."""
    uniform = len([f for f in ("int8", "int4", "int3") if f in cfg.weight_formats])
    return uniform + 2 * (points + uniform)


def to_csv(points: list[Point]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "label", "budget_bytes", "size_bytes", "damage_proxy", "quality", "metric"])
    for p in points:
        writer.writerow([p.method, p.label, "" if p.budget_bytes is None else f"{p.budget_bytes:.0f}", p.size_bytes,
                         f"{p.damage:.6g}", f"{p.quality:.3f}", p.metric])
    return buf.getvalue()


_COLORS = {"ilp": (220, 90, 40), "greedy": (70, 120, 200), "uniform": (40, 150, 80)}


def to_png(points: list[Point], title: str) -> bytes:
    """Quality (y) against weight size (x): a line per method, uniform widths as labelled dots."""
    width, height, left, right, top, bottom = 760, 420, 64, 24, 36, 48
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p.size_bytes for p in points]
    ys = [p.quality for p in points]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = max(0.0, min(ys) - 2), min(100.0, max(ys) + 2)
    if y1 <= y0:
        y1 = y0 + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(30, 30, 30))
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.text((6, at(x0, y)[1] - 6), f"{y:.1f}", fill=(30, 30, 30), font=font)
        x = x0 + (x1 - x0) * k / 4
        draw.text((at(x, y0)[0] - 14, height - bottom + 6), f"{x / 1e3:.0f}kB", fill=(30, 30, 30), font=font)
    for method, color in _COLORS.items():
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.size_bytes)
        coords = [at(p.size_bytes, p.quality) for p in mine]
        if len(coords) > 1 and method != "uniform":
            draw.line(coords, fill=color, width=2)
        for p, (cx, cy) in zip(mine, coords):
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)
            if method == "uniform":
                draw.text((cx + 6, cy - 14), p.label, fill=color, font=font)
    legend = "  ".join(f"{m}" for m in _COLORS)
    draw.text((left, 12), f"{title}   ({legend}: orange ILP, blue greedy, green uniform)", fill=(30, 30, 30), font=font)
    draw.text((left, height - 18), f"weight size; y: {points[0].metric}", fill=(30, 30, 30), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def best_at(points: list[Point], size: int, method: str) -> Point | None:
    """The best point of a method that fits in `size` bytes."""
    fitting = [p for p in points if p.method == method and p.size_bytes <= size]
    return max(fitting, key=lambda p: p.quality) if fitting else None

