"""The bit-allocation integer program, over plain numbers (Hubara et al., "Improving post
training neural quantization: layer-wise calibration and integer programming").

One binary variable per (layer, option), exactly one option per layer. Either minimise the
summed damage under a cost budget, or minimise the cost under a damage budget. Costs and
damages are additive over layers; a constant cost (parameters no option changes) may be added.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import pulp

from ..errors import PtqError

Table = dict[str, dict[str, float]]  # layer -> option -> value


@dataclass(frozen=True)
class Solution:
    choice: dict[str, str]
    damage: float
    cost: float
    status: str  # "optimal", "feasible (time limit)" ...
    solver: str

    @property
    def optimal(self) -> bool:
        return self.status == "optimal"


def _check(damage: Table, cost: Table) -> None:
    if set(damage) != set(cost):
        raise PtqError("damage and cost tables name different layers")
    for layer in damage:
        if not damage[layer] or set(damage[layer]) != set(cost[layer]):
            raise PtqError(f"layer {layer}: damage and cost name different options")


def smallest_cost(cost: Table, fixed: float = 0.0) -> float:
    return fixed + sum(min(options.values()) for options in cost.values())


def largest_useful_cost(cost: Table, fixed: float = 0.0) -> float:
    return fixed + sum(max(options.values()) for options in cost.values())


def _solver(time_limit: float | None):
    """HiGHS when installed (faster on big instances), CBC (shipped with pulp) otherwise."""
    available = pulp.listSolvers(onlyAvailable=True)
    if "HiGHS" in available:
        return pulp.HiGHS(msg=False, timeLimit=time_limit), "HiGHS"
    if "COIN_CMD" in available:
        return pulp.COIN_CMD(msg=False, timeLimit=time_limit), "CBC"
    with warnings.catch_warnings():
        # pulp 3.3 announces the bundled CBC's move to an extra; it is still the one that ships.
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit), "CBC"


def _variables(problem: pulp.LpProblem, damage: Table) -> dict[tuple[str, str], pulp.LpVariable]:
    # Names by position: layer names may hold characters the LP file format rejects.
    make = getattr(problem, "add_variable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return {
            (layer, option): (make(f"x_{i}_{j}", cat="Binary") if make else pulp.LpVariable(f"x_{i}_{j}", cat="Binary"))
            for i, layer in enumerate(damage)
            for j, option in enumerate(damage[layer])
        }


def _solve(problem: pulp.LpProblem, x, damage: Table, cost: Table, fixed: float,
           time_limit: float | None) -> Solution:
    for layer in damage:
        problem += pulp.lpSum(x[layer, o] for o in damage[layer]) == 1
    solver, name = _solver(time_limit)
    problem.solve(solver)
    status = pulp.LpStatus[problem.status]
    if status == "Infeasible":
        raise PtqError("the integer program is infeasible")
    if status != "Optimal":
        raise PtqError(f"the solver stopped without a solution ({status})")
    choice = {layer: max(damage[layer], key=lambda o: x[layer, o].value() or 0.0) for layer in damage}
    # pulp reports "Optimal" for a time-limited integer-feasible stop too; sol_status tells them apart.
    proven = problem.sol_status == pulp.LpSolutionOptimal
    return Solution(
        choice=choice,
        damage=sum(damage[layer][choice[layer]] for layer in damage),
        cost=fixed + sum(cost[layer][choice[layer]] for layer in damage),
        status="optimal" if proven else "feasible (stopped by the time limit; not proven optimal)",
        solver=name,
    )


def min_damage(damage: Table, cost: Table, budget: float, fixed: float = 0.0,
               time_limit: float | None = None, unit: str = "") -> Solution:
    """Least total damage with total cost <= budget."""
    _check(damage, cost)
    floor = smallest_cost(cost, fixed)
    if budget < floor - 1e-9 * max(1.0, abs(floor)):
        raise PtqError(f"budget {budget:,.6g}{unit} is infeasible: the smallest possible is {floor:,.6g}{unit}")
    problem = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = _variables(problem, damage)
    problem += pulp.lpSum(damage[l][o] * x[l, o] for l, o in x)
    problem += pulp.lpSum(cost[l][o] * x[l, o] for l, o in x) <= budget - fixed
    return _solve(problem, x, damage, cost, fixed, time_limit)


def min_cost(damage: Table, cost: Table, max_damage: float, fixed: float = 0.0,
             time_limit: float | None = None) -> Solution:
    """Least total cost with total damage <= max_damage."""
    _check(damage, cost)
    floor = sum(min(options.values()) for options in damage.values())
    if max_damage < floor:
        raise PtqError(f"damage budget {max_damage:.6g} is infeasible: the smallest possible is {floor:.6g}")
    problem = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = _variables(problem, damage)
    problem += pulp.lpSum(cost[l][o] * x[l, o] for l, o in x)
    problem += pulp.lpSum(damage[l][o] * x[l, o] for l, o in x) <= max_damage
    return _solve(problem, x, damage, cost, fixed, time_limit)


def greedy(damage: Table, cost: Table, budget: float, fixed: float = 0.0) -> Solution:
    """The baseline: start every layer at its costliest option; while over budget, take the step
    down that adds the least damage per unit of cost saved."""
    _check(damage, cost)
    choice = {layer: max(cost[layer], key=lambda o: (cost[layer][o], -damage[layer][o])) for layer in cost}

    def total() -> float:
        return fixed + sum(cost[l][choice[l]] for l in cost)

    while total() > budget + 1e-9:
        best, best_rate = None, None
        for layer in cost:
            here = choice[layer]
            for option in cost[layer]:
                saved = cost[layer][here] - cost[layer][option]
                if saved <= 0:
                    continue
                rate = (damage[layer][option] - damage[layer][here]) / saved
                if best_rate is None or rate < best_rate:
                    best, best_rate = (layer, option), rate
        if best is None:
            raise PtqError(f"budget {budget:,.6g} is infeasible: the smallest possible is {smallest_cost(cost, fixed):,.6g}")
        choice[best[0]] = best[1]
    return Solution(choice, sum(damage[l][choice[l]] for l in cost), total(), "greedy", "greedy")


def brute_force(damage: Table, cost: Table, budget: float, fixed: float = 0.0) -> tuple[float, dict[str, str]] | None:
    """Every combination: the reference for tests on small instances."""
    layers = list(damage)
    best = None
    for combo in itertools.product(*(list(damage[l]) for l in layers)):
        c = fixed + sum(cost[l][o] for l, o in zip(layers, combo))
        if c > budget + 1e-9:
            continue
        d = sum(damage[l][o] for l, o in zip(layers, combo))
        if best is None or d < best[0] - 1e-12:
            best = (d, dict(zip(layers, combo)))
    return best
