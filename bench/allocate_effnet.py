"""Top-1, top-1 agreement and KL for uniform W8/W4/W3 and the ILP and greedy mixes at the uniform-W4 size.

The same code path as `ptq allocate --pareto` (solve, plan_for, QDQ export, evaluate), keeping the
whole fidelity record rather than only the top-1 the sweep's CSV holds:

    python bench/allocate_effnet.py RUN_DIR EVAL_DATA EVAL_SAMPLES

RUN_DIR is a `ptq calibrate` run whose sensitivity `ptq allocate` has already cached.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptqcli.allocate.sensitivity import Candidate  # noqa: E402
from ptqcli.allocate.stage import AllocationConfig, Budget, layer_options, load_context, plan_for, solve  # noqa: E402
from ptqcli.export.measures import weight_storage  # noqa: E402
from ptqcli.export.qdq import export_qdq  # noqa: E402
from ptqcli.stages import eval_source, evaluate  # noqa: E402


def measure(ctx, name: str, choice: dict, eval_data: str, samples: int, damage: str | None = None) -> int:
    started = time.perf_counter()
    plan = plan_for(ctx, choice)
    source, skip, held_out = eval_source(plan, eval_data)
    fidelity = evaluate(ctx.graph, export_qdq(ctx.graph, plan), plan, source, skip, held_out, samples)
    out = next(iter(fidelity.outputs.values()))
    size = weight_storage(ctx.graph, plan)["quantized_bytes"]
    print(f"{name}\tsize={size}\ttop1={100 * fidelity.accuracy['quantized']:.2f}"
          f"\tfloat_top1={100 * fidelity.accuracy['float']:.2f}\tagree={100 * out['top1_agreement']:.2f}"
          f"\tkl={out['kl']:.5f}\tdamage={damage}\t{time.perf_counter() - started:.0f}s", flush=True)
    return size


def main() -> None:
    run, eval_data, samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx = load_context(run)
    cfg = AllocationConfig(samples=32)  # the CLI's default candidates: weights 8/4/3/2 bits, A8
    options = layer_options(ctx, cfg)
    sizes = {}
    for fmt in ("int8", "int4", "int3"):
        choice = {node: (opts[0].label if len(opts) == 1 else Candidate(fmt, 8).label) for node, opts in options.items()}
        sizes[fmt] = measure(ctx, f"uniform {fmt}", choice, eval_data, samples)
    for method in ("ilp", "greedy"):
        solution, _, _ = solve(ctx, Budget("size", float(sizes["int4"])), cfg, method=method)
        measure(ctx, f"{method} @ W4 size ({sizes['int4']} B)", solution.choice, eval_data, samples,
                f"{solution.damage:.5f} ({solution.status})")


if __name__ == "__main__":
    main()
