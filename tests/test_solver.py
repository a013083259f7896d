import itertools

import numpy as np
import pytest

from sensplan import BudgetError, InfeasibleBudgetError
from sensplan.planner import Budget, CostModel, brute_force, min_cost, solve, uniform_choice
from tests.tables import synthetic_scan

CASES = [
    ["macs=0.6"], ["size=0.3"], ["bops=0.25"], ["params=0.7"], ["size=0.4", "macs=0.8"], ["macs=0.45", "bops=0.3"],
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budgets", CASES)
def test_milp_matches_brute_force(seed, budgets):
    cm = CostModel(synthetic_scan(seed=seed))
    bs = [Budget.parse(b) for b in budgets]
    ref = brute_force(cm, bs)
    if ref is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(cm, bs)
        return
    got = solve(cm, bs)
    assert got.predicted_drop == pytest.approx(ref.predicted_drop, abs=1e-9)
    for b in bs:
        assert got.costs[b.metric] <= b.limit(cm.original) * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_drop", [0.0, 0.02, 0.08])
@pytest.mark.parametrize("metric", ["macs", "size"])
def test_max_drop_mode_matches_brute_force(seed, max_drop, metric):
    cm = CostModel(synthetic_scan(seed=seed))
    ref = brute_force(cm, [], max_drop=max_drop, minimize=metric)
    got = solve(cm, [], max_drop=max_drop, minimize=metric)
    assert ref is not None
    assert got.predicted_drop <= max_drop + 1e-12
    assert got.costs[metric] == pytest.approx(ref.costs[metric], rel=1e-9)


def test_milp_on_a_larger_instance_beats_every_sampled_choice():
    cm = CostModel(synthetic_scan(n_groups=4, n_layers=5, ratios=(0.25, 0.5, 0.75), bits=(8, 6, 4, 2), seed=7))
    budget = [Budget.parse("size=0.3")]
    got = solve(cm, budget)
    rng = np.random.default_rng(0)
    limit = budget[0].limit(cm.original)
    for _ in range(3000):
        choice = {i: int(rng.integers(len(b.options))) for i, b in enumerate(cm.blocks)}
        if cm.evaluate(choice)["size"] <= limit:
            assert cm.predicted_drop(choice) >= got.predicted_drop - 1e-12


def test_costs_of_terms_equal_direct_evaluation():
    scan = synthetic_scan(n_groups=3, n_layers=4, seed=3)
    cm = CostModel(scan)
    for combo in itertools.islice(itertools.product(*[range(len(b.options)) for b in cm.blocks]), 0, None, 37):
        choice = dict(enumerate(combo))
        removed = {b.unit: b.options[o] for b, o in zip(cm.blocks, combo, strict=True) if b.kind == "prune"}
        bits = {b.unit: b.options[o] for b, o in zip(cm.blocks, combo, strict=True) if b.kind == "quantize"}
        direct = cm.evaluate_settings(removed, bits)
        for m, v in cm.evaluate(choice).items():
            assert v == pytest.approx(direct[m], rel=1e-12)


def test_original_costs_by_hand():
    cm = CostModel(synthetic_scan(n_groups=1, n_layers=2))
    # l0: 8x3x3x3 weight + 8 bias; l1: 8x8x3x3 + 8; two 8-element BN buffers (not parameters)
    assert cm.original["params"] == 8 * 27 + 8 + 8 * 72 + 8
    assert cm.original["size"] == (8 * 27 + 8 + 8 * 72 + 8 + 16) * 4
    assert cm.original["macs"] == (8 * 27 + 8 * 72) * 16
    assert cm.original["bops"] == cm.original["macs"] * 32 * 32


def test_envelope_makes_drops_monotone_and_non_negative():
    scan = synthetic_scan(seed=1)
    cm = CostModel(scan)
    for env in cm.drop_table():
        assert env[0] == 0.0
        assert np.all(np.diff(env) >= 0)


def test_infeasible_budget_states_the_smallest_reachable_cost():
    cm = CostModel(synthetic_scan())
    best = min_cost(cm, "macs").costs["macs"] / cm.original["macs"]
    with pytest.raises(InfeasibleBudgetError, match=r"smallest reachable macs") as e:
        solve(cm, [Budget.parse(f"macs={best / 2:.4f}")])
    assert f"{best:.3f} of the original" in str(e.value)


def test_budget_mode_does_not_compress_what_the_budget_does_not_need():
    cm = CostModel(synthetic_scan(seed=2))
    got = solve(cm, [Budget.parse("macs=0.8")])
    for i, b in enumerate(cm.blocks):
        if b.kind == "quantize":  # bits do not change MACs: they must stay float
            assert got.choice[i] == 0


@pytest.mark.parametrize("budget", ["macs=0.6", "size=0.3"])
def test_uniform_plan_meets_the_budget_and_is_uniform(budget):
    cm = CostModel(synthetic_scan(seed=0))
    b = Budget.parse(budget)
    uni = uniform_choice(cm, [b])
    assert uni is not None
    assert uni.costs[b.metric] <= b.limit(cm.original) * (1 + 1e-9)
    assert len(set(uni.layer_bits.values())) == 1
    assert len({round(k / 8, 6) for k in uni.removed.values()}) == 1
    assert solve(cm, [b]).predicted_drop <= uni.predicted_drop + 1e-12


@pytest.mark.parametrize("text,metric,value,relative", [
    ("macs=0.5", "macs", 0.5, True), ("size=25%", "size", 0.25, True), ("size=2MB", "size", 2e6, False),
    ("size=1.5MiB", "size", 1.5 * 2**20, False), ("macs=20M", "macs", 20e6, False), ("bops<=0.1", "bops", 0.1, True),
    ("params=1", "params", 1.0, True), ("params=1000", "params", 1000.0, False),
])
def test_budget_parsing(text, metric, value, relative):
    b = Budget.parse(text)
    assert (b.metric, b.relative) == (metric, relative)
    assert b.value == pytest.approx(value)


@pytest.mark.parametrize("text,fragment", [
    ("macs", "Write METRIC=VALUE"), ("latency=0.5", "must be one of"), ("macs=150%", "range (0.0, 1.0]"),
    ("size=abc", "Cannot read"), ("size=3 parsecs", "Unknown unit"), ("size=3XB", "Unknown unit"), ("macs=0", "range (0.0, 1.0]"),
])
def test_bad_budgets_are_explained(text, fragment):
    with pytest.raises(BudgetError) as e:
        Budget.parse(text)
    assert fragment in str(e.value)
