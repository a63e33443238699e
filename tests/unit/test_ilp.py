"""The allocation integer program against brute force, at budget breakpoints, and when infeasible."""

import numpy as np
import pytest

from ptqcli.allocate.ilp import brute_force, greedy, min_cost, min_damage, smallest_cost
from ptqcli.errors import PtqError

OPTIONS = ("W8", "W4", "W3", "W2")
BITS = {"W8": 8, "W4": 4, "W3": 3, "W2": 2}


def _instance(seed: int, layers: int = 5):
    rng = np.random.default_rng(seed)
    params = rng.integers(100, 5000, layers)
    sens = rng.uniform(0.1, 3.0, layers)
    damage = {f"l{i}": {o: float(sens[i] * 4.0 ** -BITS[o] * 1000 + rng.uniform(0, 0.01)) for o in OPTIONS}
              for i in range(layers)}
    cost = {f"l{i}": {o: float(params[i] * BITS[o] / 8) for o in OPTIONS} for i in range(layers)}
    return damage, cost


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_across_budgets(seed):
    damage, cost = _instance(seed)
    lo, hi = smallest_cost(cost), sum(max(v.values()) for v in cost.values())
    for budget in np.linspace(lo, hi, 7):
        solution = min_damage(damage, cost, budget)
        best, _ = brute_force(damage, cost, budget)
        assert solution.optimal
        assert solution.cost <= budget + 1e-6
        assert solution.damage == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_exact_budget_breakpoint():
    """Two layers; the budget that just affords lifting the sensitive layer to 8 bits."""
    damage = {"a": {"W8": 0.0, "W4": 10.0}, "b": {"W8": 0.0, "W4": 1.0}}
    cost = {"a": {"W8": 100.0, "W4": 50.0}, "b": {"W8": 100.0, "W4": 50.0}}
    at = min_damage(damage, cost, 150.0)
    assert at.choice == {"a": "W8", "b": "W4"} and at.cost == 150.0
    below = min_damage(damage, cost, 149.999)
    assert below.choice == {"a": "W4", "b": "W4"}
    above = min_damage(damage, cost, 200.0)
    assert above.choice == {"a": "W8", "b": "W8"}
    just_below_all8 = min_damage(damage, cost, 199.999)
    assert just_below_all8.choice == {"a": "W8", "b": "W4"}


def test_fixed_cost_counts_against_the_budget():
    damage = {"a": {"W8": 0.0, "W4": 1.0}}
    cost = {"a": {"W8": 8.0, "W4": 4.0}}
    assert min_damage(damage, cost, 18.0, fixed=10.0).choice == {"a": "W8"}
    assert min_damage(damage, cost, 17.9, fixed=10.0).choice == {"a": "W4"}


def test_infeasible_budget_names_the_smallest_feasible_one():
    damage, cost = _instance(0)
    floor = smallest_cost(cost)
    with pytest.raises(PtqError, match=f"smallest possible is {floor:,.6g}"):
        min_damage(damage, cost, floor - 1.0)
    with pytest.raises(PtqError, match="infeasible"):
        greedy(damage, cost, floor - 1.0)


def test_reverse_problem_minimises_cost_under_a_damage_budget():
    damage, cost = _instance(3)
    target = sum(v["W4"] for v in damage.values())
    solution = min_cost(damage, cost, target)
    assert solution.damage <= target + 1e-9
    assert solution.cost <= sum(v["W4"] for v in cost.values())
    with pytest.raises(PtqError, match="infeasible"):
        min_cost(damage, cost, -1.0)


def test_greedy_is_feasible_and_never_better_than_the_ilp():
    for seed in range(5):
        damage, cost = _instance(seed, layers=6)
        budget = sum(v["W4"] for v in cost.values())
        g, ilp = greedy(damage, cost, budget), min_damage(damage, cost, budget)
        assert g.cost <= budget + 1e-9
        assert ilp.damage <= g.damage + 1e-12


def test_pinned_layers_have_one_option():
    damage = {"first": {"W8": 0.5}, "mid": {"W8": 0.0, "W2": 5.0}}
    cost = {"first": {"W8": 8.0}, "mid": {"W8": 8.0, "W2": 2.0}}
    assert min_damage(damage, cost, 10.0).choice == {"first": "W8", "mid": "W2"}
