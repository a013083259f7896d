"""The exact solver and the cost model on hand-built scan tables (no model, milliseconds each)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sensplan import BudgetError, InfeasibleBudgetError
from sensplan._effects import n_remove_for
from sensplan.planner import (
    AnalyticCosts,
    Budget,
    Costs,
    brute_force,
    make_plan,
    min_cost,
    solve,
    uniform_candidates,
    uniform_choice,
)
from sensplan.planner._costs import merged_effects, option_key
from sensplan.planner._solver import objective_table
from tests.tables import synthetic_scan

#: small instances brute force can enumerate (a few thousand choices each):
#: - "chain": three convs, two groups, a concatenating 1x1 conv with weight and sparsity options;
#: - "mixed": the head's input shrinks by 4 per channel, and four axes: weight (int or float16),
#:   sparsity (unstructured or 2:4) and activation bits
INSTANCES = {
    "chain": {},
    "mixed": {"n_layers": 2, "nm_layers": ("cat",), "half_layers": ("l1",), "act_layers": ("fc",)},
}
#: a larger instance with every axis and both sparse layouts (bitmask at 50/90%, CSR at 95%)
RICH = {"n_groups": 3, "n_layers": 3, "sparsity": (0.5, 0.9, 0.95), "sparse_layers": ("l2", "cat"),
        "nm_layers": ("cat",), "half_layers": ("l1",), "act_layers": ("l0", "fc")}

CASES = [["macs=0.6"], ["size=0.3"], ["bops=0.25"], ["params=0.7"], ["size=0.4", "macs=0.8"],
         ["macs=0.45", "bops=0.3"], ["size=3000", "params=0.8"]]


@pytest.fixture(params=["dense", "chain", "chain-x"])
def formulation(request, monkeypatch):
    """The MILP's two linearisations of a coupled term: z over the product of its options
    ("dense"), or a tensor train ("chain": from a z-block over its first two factors; "chain-x": from
    the first factor's choice alone). Both are exact; the brute-force tests run each."""
    from sensplan.planner import _solver

    if request.param == "dense":
        monkeypatch.setattr(_solver, "DENSE_MAX", 10**9)
    else:
        monkeypatch.setattr(_solver, "DENSE_MAX", 0)
        monkeypatch.setattr(_solver, "PAIR_MAX", 1024 if request.param == "chain" else 0)
    return request.param


def costs_of(instance: str, seed: int) -> Costs:
    return Costs(synthetic_scan(seed=seed, **INSTANCES[instance]))


def objective(cm: Costs, choice) -> float:
    table = objective_table(cm)
    return float(sum(table[i][o] for i, o in choice.items()))


def within(cm: Costs, costs, budgets) -> bool:
    return all(costs[b.metric] <= b.limit(cm.original) * (1 + 1e-9) for b in budgets)


def solved_and_brute_force(cm: Costs, budgets):
    """The MILP's solution and brute force's; (None, None) where no choice meets the budgets (then
    the MILP must say it is infeasible)."""
    ref = brute_force(cm, budgets)
    if ref is None:
        with pytest.raises(InfeasibleBudgetError):
            solve(cm, budgets)
        return None, None
    return solve(cm, budgets), ref


def test_the_instances_have_what_the_tests_claim():
    cm = costs_of("mixed", 0)
    axes = {b.unit: set() for b in cm.blocks}
    for b in cm.blocks:
        axes[b.unit].add(b.axis)
    assert axes["cat"] == {"weight", "sparsity"}
    assert axes["l1"] == {"channels", "weight"} and axes["fc"] == {"weight", "activation"}
    assert {o.method for b in cm.blocks for o in b.options} == {
        None, "prune", "weight_quant", "half", "sparsity", "sparsity_2_4", "act_quant"}
    shrinks = cm.scan.tensors
    assert shrinks["cat.weight"]["shrinks"] == {"l0": {"1": 1.0}, "l1": {"1": 1.0}}
    assert shrinks["fc.weight"]["shrinks"] == {"l1": {"1": 4.0}}
    assert "fc" not in {b.unit for b in cm.blocks if b.kind == "group"}  # the skipped classifier


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("budgets", CASES, ids=["+".join(c) for c in CASES])
def test_milp_matches_brute_force(instance, seed, budgets, formulation):
    cm = costs_of(instance, seed)
    bs = [Budget.parse(b) for b in budgets]
    got, ref = solved_and_brute_force(cm, bs)
    if got is None:
        return
    assert got.optimal
    assert objective(cm, got.choice) == pytest.approx(objective(cm, ref.choice), abs=1e-12)
    assert got.predicted_drop == pytest.approx(ref.predicted_drop, abs=1e-9)
    assert within(cm, got.costs, bs)
    assert got.costs == cm.evaluate(got.choice)
    assert got.predicted_drop == pytest.approx(cm.predicted_drop(got.choice))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("max_drop", [0.0, 0.02, 0.08])
@pytest.mark.parametrize("metric", ["macs", "size"])
@pytest.mark.parametrize("formulation", ["dense", "chain"], indirect=True)
def test_max_drop_mode_matches_brute_force(instance, seed, max_drop, metric, formulation):
    cm = costs_of(instance, seed)
    ref = brute_force(cm, [], max_drop=max_drop, minimize=metric)
    got = solve(cm, [], max_drop=max_drop, minimize=metric)
    assert ref is not None  # "no compression" always meets a max-drop
    assert got.predicted_drop <= max_drop + 1e-12
    assert got.costs[metric] == pytest.approx(ref.costs[metric], rel=1e-9)
    if max_drop == 0.0:  # nothing with a positive envelope drop may be chosen
        drops = cm.drop_table()
        assert all(drops[i][o] == 0.0 for i, o in got.choice.items())


def test_max_drop_mode_respects_a_budget_too():
    cm = costs_of("chain", 1)
    budget = [Budget.parse("macs=0.7")]
    least = solve(cm, budget).predicted_drop
    ref = brute_force(cm, budget, max_drop=least + 0.05, minimize="size")
    got = solve(cm, budget, max_drop=least + 0.05, minimize="size")
    assert ref is not None and within(cm, got.costs, budget)
    assert got.costs["size"] == pytest.approx(ref.costs["size"], rel=1e-9)
    assert got.predicted_drop <= least + 0.05 + 1e-12


def test_a_max_drop_below_what_the_budget_needs_is_explained():
    cm = costs_of("chain", 1)
    budget = [Budget.parse("macs=0.7")]
    least = solve(cm, budget).predicted_drop
    assert brute_force(cm, budget, max_drop=least / 2, minimize="size") is None
    with pytest.raises(InfeasibleBudgetError, match="max-drop") as e:
        solve(cm, budget, max_drop=least / 2, minimize="size")
    assert f"least predicted drop within the budget is {least:.4g}" in str(e.value)


@pytest.mark.parametrize("formulation", ["dense", "chain"], indirect=True)
def test_milp_on_a_larger_instance_beats_every_sampled_choice(formulation):
    cm = Costs(synthetic_scan(seed=7, ratios=(0.25, 0.5, 0.75), bits=(8, 6, 4, 2), **RICH))
    budget = [Budget.parse("size=0.3")]
    got = solve(cm, budget)
    assert got.optimal and within(cm, got.costs, budget)
    rng = np.random.default_rng(0)
    limit = budget[0].limit(cm.original)
    feasible = 0
    for _ in range(2000):
        choice = {i: int(rng.integers(len(b.options))) for i, b in enumerate(cm.blocks)}
        if cm.evaluate(choice)["size"] <= limit:
            feasible += 1
            assert objective(cm, choice) >= objective(cm, got.choice) - 1e-12
    assert feasible > 50


@pytest.mark.parametrize("seed", range(3))
def test_term_expansion_equals_direct_evaluation(seed):
    """``Costs.evaluate`` sums the expanded terms; ``AnalyticCosts.direct`` shrinks every tensor and
    prices it from its merged effect. They must agree for any choice."""
    scan = synthetic_scan(seed=seed, ratios=(0.25, 0.5, 0.75), **RICH)
    cm = Costs(scan)
    direct = AnalyticCosts(scan)
    rng = np.random.default_rng(seed)
    choices = [cm.no_compression(), {i: len(b.options) - 1 for i, b in enumerate(cm.blocks)}]
    choices += [{i: int(rng.integers(len(b.options))) for i, b in enumerate(cm.blocks)}
                for _ in range(300)]
    for choice in choices:
        removed = {b.unit: b.options[choice[i]].effect.get("removed", 0)
                   for i, b in enumerate(cm.blocks) if b.kind == "group"}
        want = direct.direct(removed, merged_effects(cm.blocks, choice))
        got = cm.evaluate(choice)
        for metric in AnalyticCosts.metrics:
            assert got[metric] == pytest.approx(want[metric], rel=1e-12, abs=1e-9), (metric, choice)


def test_original_costs_by_hand():
    cm = Costs(synthetic_scan(n_groups=1, n_layers=2, concat=False, sparse_layers=()))
    # l0: 8x3x3x3 weight + 8 bias + 8 BN scale; l1: 8x8x3x3 + 8 + 8; fc: 4x32 + 4.
    # Buffers (not parameters): two 8-element running means, two int64 counters.
    params = (216 + 8 + 8) + (576 + 8 + 8) + (128 + 4)
    assert cm.original["params"] == params
    assert cm.original["size"] == params * 4 + 2 * 8 * 4 + 2 * 8
    assert cm.original["macs"] == (216 + 576) * 16 + 128
    assert cm.original["bops"] == cm.original["macs"] * 32 * 32


def test_a_compressed_choice_by_hand():
    cm = Costs(synthetic_scan(n_groups=1, n_layers=2, concat=False, sparse_layers=()))
    options = cm.blocks[cm.index["channels:l0"]].options
    half = next(o for o in options if o.effect.get("removed") == 4)
    choice = cm.choice_of({"channels:l0": half.key, "weight:l1": 'weight_quant:{"bits":4}'})
    got = cm.evaluate(choice)
    # l0 keeps 4 output channels; l1 keeps 4 input channels, as 4-bit codes + 8 float32 scales
    l0, l1 = 4 * 27, 8 * 4 * 9
    assert got["params"] == (l0 + 4 + 4) + (l1 + 8 + 8) + (128 + 4)
    assert got["size"] == (l0 + 4 + 4 + 4) * 4 + 8 + (l1 * 4 / 8 + 8 * 4) + (8 + 8 + 8) * 4 + 8 \
        + (128 + 4) * 4
    assert got["macs"] == (l0 + l1) * 16 + 128
    assert got["bops"] == (l0 * 16 * 32 + l1 * 16 * 4 + 128 * 32) * 32


def test_a_concatenated_dim_loses_what_each_group_removes():
    scan = synthetic_scan()
    cm = Costs(scan)
    keys = {g: {o.effect.get("removed"): o.key
                for o in cm.blocks[cm.index[f"channels:{g}"]].options} for g in ("l0", "l1")}
    choice = cm.choice_of({"channels:l0": keys["l0"][4], "channels:l1": keys["l1"][2]})
    # l0 [4,3,3,3] + 4 + 4; l1 [6,4,3,3] + 6 + 6; l2 [8,6,3,3] + 8 + 8;
    # cat [8, 16 - 4 - 2, 1, 1] + 8; fc [4, 32] + 4
    assert cm.evaluate(choice)["params"] == (108 + 8) + (216 + 12) + (432 + 16) + (80 + 8) + 132
    assert cm.evaluate(choice)["macs"] == (108 + 216 + 432 + 80) * 16 + 128


def test_envelope_makes_drops_monotone_per_method_and_non_negative():
    cm = Costs(synthetic_scan(seed=1, **RICH))
    noisy = 0
    for b, env in zip(cm.blocks, cm.drop_table(), strict=True):
        assert env[0] == 0.0 and np.all(env >= 0)
        for method in {o.method for o in b.options[1:]}:
            idx = [i for i, o in enumerate(b.options) if o.method == method]
            assert np.all(np.diff(env[idx]) >= 0), (b.name, method)
            raw = [b.options[i].drop for i in idx]
            assert np.all(env[idx] >= np.maximum(raw, 0))
            noisy += bool(np.any(np.diff(raw) < 0) or min(raw) < 0)
    assert noisy > 0  # the table does have noise for the envelope to repair


def test_a_learned_surcharge_raises_the_prediction_it_was_learned_for():
    """Raw drops int8 0.02, int6 0.005, int4 0.05: the envelope makes int6 0.02. A plan at int6
    measured 0.03 teaches a surcharge of 0.01, and the corrected model must predict 0.03; added
    before the envelope, the surcharge vanished in the maximum with int8 (the prediction stayed 0.02)."""
    table = synthetic_scan(seed=0, bits=(8, 6, 4))
    drops = {8: 0.02, 6: 0.005, 4: 0.05}
    for r in table.results:
        if r["unit"] == "l0" and r["method"] == "weight_quant":
            r["drop"], r["drop_se"] = drops[r["setting"]["bits"]], 0.0
    cm = Costs(table)
    bi = cm.index["weight:l0"]
    keys = [o.key for o in cm.blocks[bi].options]
    int6 = keys.index(option_key("weight_quant", {"bits": 6}))
    assert cm.drop_table()[bi][int6] == pytest.approx(0.02)
    surcharge = np.zeros(len(keys))
    surcharge[int6] = 0.01
    corrected = cm.adjusted({bi: surcharge})
    assert corrected.drop_table()[bi][int6] == pytest.approx(0.03)
    int4 = keys.index(option_key("weight_quant", {"bits": 4}))
    assert corrected.drop_table()[bi][int4] == pytest.approx(0.05)  # still monotone, unchanged above
    # a negative surcharge lowers a prediction, never below zero nor below a milder option's
    int8 = keys.index(option_key("weight_quant", {"bits": 8}))
    down = np.zeros(len(keys))
    down[int8], down[int6] = -0.05, -0.05
    assert list(cm.adjusted({bi: down}).drop_table()[bi][[int8, int6, int4]]) == pytest.approx([0.0, 0.0, 0.05])
    down[int8] = 0.0
    assert cm.adjusted({bi: down}).drop_table()[bi][int6] == pytest.approx(0.02)


def test_infeasible_budget_states_the_smallest_reachable_cost():
    cm = costs_of("chain", 0)
    best = min_cost(cm, "macs").costs["macs"] / cm.original["macs"]
    assert 0 < best < 1
    with pytest.raises(InfeasibleBudgetError, match=r"smallest reachable macs") as e:
        solve(cm, [Budget.parse(f"macs={best / 2:.4f}")])
    assert f"({best:.3f} of the original)" in str(e.value)
    assert "Raise the budget" in str(e.value)


def test_min_cost_equals_brute_force_minimum():
    cm = costs_of("mixed", 0)
    for metric in AnalyticCosts.metrics:
        ref = brute_force(cm, [], max_drop=1.0, minimize=metric)
        assert min_cost(cm, metric).costs[metric] == pytest.approx(ref.costs[metric], rel=1e-9)


def test_budget_mode_does_not_compress_what_the_budget_does_not_need():
    cm = costs_of("mixed", 2)
    got = solve(cm, [Budget.parse("macs=0.8")])
    for i, b in enumerate(cm.blocks):
        if b.kind == "layer":  # bits, sparsity and activation bits do not change MACs
            assert got.choice[i] == 0, b.name
    assert any(got.choice[i] for i, b in enumerate(cm.blocks) if b.kind == "group")


@pytest.mark.parametrize("budget", ["macs=0.6", "size=0.3", "bops=0.2"])
@pytest.mark.parametrize("seed", range(2))
def test_uniform_plan_meets_the_budget_and_is_uniform(budget, seed):
    scan = synthetic_scan(seed=seed, **INSTANCES["mixed"])
    cm = Costs(scan)
    b = Budget.parse(budget)
    uni = uniform_choice(cm, [b])
    assert uni is not None
    assert within(cm, uni.costs, [b])
    # one ratio for every group, one option per layer axis (where the layer has it)
    for i, blk in enumerate(cm.blocks):
        if blk.kind == "group":
            assert uni.removed[blk.unit] == n_remove_for(uni.ratio, blk.channels)
        else:
            key = uni.layer_options[f"{blk.axis}:uniform"]
            keys = [o.key for o in blk.options]
            assert blk.options[uni.choice.get(i, 0)].key == (key if key in keys else "none")
    # off-grid ratios are costed exactly
    direct = AnalyticCosts(scan).direct(uni.removed, merged_effects(cm.blocks, uni.choice))
    for metric in AnalyticCosts.metrics:
        assert uni.costs[metric] == pytest.approx(direct[metric], rel=1e-12)
    on_grid = all(uni.removed[blk.unit] in [o.effect.get("removed", 0) for o in blk.options]
                  for blk in cm.blocks if blk.kind == "group")
    if on_grid:  # the optimum over the same options can only be better
        assert solve(cm, [b]).predicted_drop <= uni.predicted_drop + 1e-12
    # the least pruning that meets the budget with these layer options
    if uni.ratio > 0:
        smaller = {g: n_remove_for(uni.ratio - 0.01, 8) if uni.ratio > 0.01 else 0
                   for g in uni.removed}
        costs = AnalyticCosts(scan).direct(smaller, merged_effects(cm.blocks, uni.choice))
        assert costs[b.metric] > b.limit(cm.original)


def test_uniform_candidates_cover_each_layer_option_and_max_drop_holds():
    cm = costs_of("chain", 0)
    cands = uniform_candidates(cm, [Budget.parse("size=0.5")])
    assert len({tuple(sorted(c.layer_options.items())) for c in cands}) == len(cands)
    best = uniform_choice(cm, [Budget.parse("size=0.5")])
    assert best.predicted_drop == min(c.predicted_drop for c in cands)
    for max_drop in (0.0, 0.03):
        uni = uniform_choice(cm, [], max_drop=max_drop, minimize="size")
        assert uni is not None and uni.predicted_drop <= max_drop + 1e-12
        others = uniform_candidates(cm, [], max_drop=max_drop, minimize="size")
        assert uni.costs["size"] == min(c.costs["size"] for c in others)


def test_an_unreachable_uniform_budget_gives_none():
    cm = costs_of("chain", 0)
    assert uniform_choice(cm, [Budget.parse("params=0.01")]) is None


@pytest.mark.parametrize("text,metric,value,relative", [
    ("macs=0.5", "macs", 0.5, True), ("size=25%", "size", 0.25, True),
    ("size=2MB", "size", 2e6, False), ("size=1.5MiB", "size", 1.5 * 2**20, False),
    ("macs=20M", "macs", 20e6, False), ("bops<=0.1", "bops", 0.1, True),
    ("params=1", "params", 1.0, True), ("params=1000", "params", 1000.0, False),
    ("latency_ms=0.5", "latency_ms", 0.5, True),
])
def test_budget_parsing(text, metric, value, relative):
    b = Budget.parse(text)
    assert (b.metric, b.relative) == (metric, relative)
    assert b.value == pytest.approx(value)


@pytest.mark.parametrize("text,fragment", [
    ("macs", "Write METRIC=VALUE"), ("macs=150%", "range (0.0, 1.0]"),
    ("size=abc", "Cannot read"), ("size=3 parsecs", "Unknown unit"), ("size=3XB", "Unknown unit"),
    ("macs=0", "range (0.0, 1.0]"),
])
def test_bad_budgets_are_explained(text, fragment):
    with pytest.raises(BudgetError) as e:
        Budget.parse(text)
    assert fragment in str(e.value)


def test_a_budget_on_an_unknown_metric_names_the_known_ones():
    with pytest.raises(BudgetError, match=r"'latency' is not known.*size, macs, bops, params"):
        make_plan(synthetic_scan(), [Budget.parse("latency=0.5")])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("formulation", ["dense", "chain"], indirect=True)
def test_pair_penalties_are_priced_exactly(seed, formulation):
    """A learned penalty per pair of blocks at one option (errors that compound) is convex in their
    count; the MILP's tangent constraints price it exactly: same optimum as enumeration."""
    from collections import Counter

    from sensplan.planner._solver import CountPenalty, penalty

    cm = costs_of("mixed", seed)
    keys = Counter(o.key for b in cm.blocks for o in b.options[1:])
    common = [k for k, n in keys.most_common(2) if n >= 2]
    penalties = [CountPenalty(k, 0.01 * (j + 1)) for j, k in enumerate(common)]
    objective = objective_table(cm)

    def total(choice):
        return float(sum(objective[i][o] for i, o in choice.items())) + penalty(cm, choice, penalties)

    for budget in ("macs=0.7", "size=0.4"):
        b = [Budget.parse(budget)]
        got, ref = solve(cm, b, penalties=penalties), brute_force(cm, b, penalties=penalties)
        assert total(got.choice) == pytest.approx(total(ref.choice), abs=1e-9)
        assert got.predicted_drop == pytest.approx(cm.predicted_drop(got.choice) + penalty(cm, got.choice, penalties))
        assert within(cm, got.costs, b)
    # the penalties change the optimum somewhere: without them the solver uses the penalised options more
    plain = solve(cm, [Budget.parse("size=0.4")])
    assert sum(p.count(cm, plain.choice) for p in penalties) >= sum(
        p.count(cm, solve(cm, [Budget.parse("size=0.4")], penalties=penalties).choice) for p in penalties)


def test_a_coupled_term_over_three_blocks_becomes_a_chain_with_fewer_variables(monkeypatch):
    from sensplan.planner import _solver

    cm = Costs(synthetic_scan(seed=7, ratios=(0.25, 0.5, 0.75), bits=(8, 6, 4, 2), **RICH))
    monkeypatch.setattr(_solver, "DENSE_MAX", 10**9)
    dense = _solver._Problem(cm)
    monkeypatch.setattr(_solver, "DENSE_MAX", 0)
    chained = _solver._Problem(cm)
    assert not dense.chains and chained.chains
    assert all(len(f) > 2 for f in chained.chains)
    assert chained.n - chained.n_x < dense.n - dense.n_x
    # every chain reproduces its table exactly: the row of each metric, at every choice, equals the terms
    rng = np.random.default_rng(0)
    for _ in range(50):
        choice = {i: int(rng.integers(len(b.options))) for i, b in enumerate(cm.blocks)}
        x = np.zeros(chained.n)
        for i, o in choice.items():
            x[chained.col[i][o]] = 1.0
        for factors, z0 in chained.zoff.items():
            sizes = [chained.sizes[f] for f in factors]
            x[z0 + int(np.ravel_multi_index([choice[f] for f in factors], sizes))] = 1.0
        for chain in chained.chains.values():  # the states along the chain, w[a, o] = s[a] x[o]
            head = chain.factors[:chain.head]
            flat = int(np.ravel_multi_index([choice[f] for f in head], [chained.sizes[f] for f in head]))
            state = chain.cores[0][flat, 0, :]
            for j, core in enumerate(chain.cores[1:]):
                o = choice[chain.factors[chain.head + j]]
                x[chain.offsets[j] + np.arange(core.shape[1]) * core.shape[0] + o] = state
                state = state @ core[o]
        a, lo, hi = chained.structure()
        ax = a @ x
        assert np.all(ax >= lo - 1e-9) and np.all(ax <= hi + 1e-9)  # the rows hold at the integral point
        costs = cm.evaluate(choice)
        for metric in cm.metrics:
            row, const = chained.cost_row(metric)
            assert row @ x + const == pytest.approx(costs[metric], rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_a_dominated_option_is_never_needed(seed):
    """An option the reduction leaves out is matched or beaten, whatever the other blocks choose, by
    one it keeps: no larger objective, no larger cost, no new conflict."""
    from sensplan.planner._solver import undominated

    cm = Costs(synthetic_scan(seed=seed, ratios=(0.25, 0.5, 0.75), bits=(8, 6, 4, 2), **RICH))
    metrics = ["size", "macs"]
    objective = objective_table(cm)
    keep = undominated(cm, metrics, objective)
    assert sum(len(b.options) - len(k) for b, k in zip(cm.blocks, keep, strict=True)) > 0
    def conflicts_of(i, o):
        return {b for a, b in cm.conflicts if a == (i, o)} | {a for a, b in cm.conflicts if b == (i, o)}

    rng = np.random.default_rng(seed)
    contexts = [{i: int(rng.integers(len(b.options))) for i, b in enumerate(cm.blocks)} for _ in range(200)]
    for i, b in enumerate(cm.blocks):
        for o in set(range(len(b.options))) - set(keep[i].tolist()):
            def no_worse(a, i=i, o=o):
                if objective[i][a] > objective[i][o]:
                    return False
                if not conflicts_of(i, a) <= conflicts_of(i, o):
                    return False
                for ctx in contexts:
                    ca, co = cm.evaluate({**ctx, i: a}), cm.evaluate({**ctx, i: o})
                    if any(ca[m] > co[m] * (1 + 1e-12) + 1e-12 for m in metrics):
                        return False
                return True
            assert any(no_worse(int(a)) for a in keep[i]), (b.name, o)


def test_a_time_limit_still_gives_a_plan_within_budget_and_says_so():
    cm = Costs(synthetic_scan(seed=7, ratios=(0.25, 0.5, 0.75), bits=(8, 6, 4, 2), **RICH))
    budget = [Budget.parse("size=0.3")]
    got = solve(cm, budget, time_limit=1e-6)
    assert within(cm, got.costs, budget)
    assert not got.optimal and "not proven optimal" in got.status
    plan = make_plan(cm.scan, budget, time_limit=1e-6)
    assert plan.data["plans"]["planned"]["solver"]["optimal"] is False
    assert np.isfinite(plan.data["plans"]["planned"]["solver"]["gap"])


def test_the_solver_keeps_stdout_clean_of_highs_debug_lines(capfd):
    from sensplan.planner._solver import _quiet_stdout

    with _quiet_stdout():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
    print("after")
    assert capfd.readouterr().out == "after\n"


@pytest.mark.parametrize("budgets", CASES, ids=["+".join(c) for c in CASES])
def test_a_time_limit_gives_a_plan_wherever_one_exists(budgets):
    """Where the time runs out with no solution, the groups are fixed from the LP relaxation: at its
    largest share, else at the most compressive option it uses (a MACs budget depends on the groups
    alone, so the largest share is often infeasible)."""
    for seed in range(2):
        cm = costs_of("mixed", seed)
        bs = [Budget.parse(b) for b in budgets]
        if brute_force(cm, bs) is None:
            continue
        got = solve(cm, bs, time_limit=1e-6)
        assert within(cm, got.costs, bs) and cm.feasible(got.choice)


def test_solves_in_threads_leave_stdout_working(capfd):
    import threading

    cm = costs_of("chain", 0)

    def work():
        for _ in range(10):
            solve(cm, [Budget.parse("size=0.4")])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("visible after the threaded solves")
    assert capfd.readouterr().out == "visible after the threaded solves\n"


def test_the_solver_runs_without_a_python_stdout(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "stdout", None)
    got = solve(costs_of("chain", 0), [Budget.parse("size=0.4")])
    assert got.optimal


class _Coupled:
    """A plug-in metric over three blocks with raw values up to 1e12 and 0 for the original (so it
    cannot be put in units of the original cost)."""

    metrics = ("lat",)
    name = "lat"

    def __init__(self, table):
        self.table = table

    def terms(self, blocks):
        from sensplan.planner._costs import Term

        return {"lat": [Term((0, 1, 3), self.table)]}

    def describe(self):
        return {"name": "lat"}


def test_a_huge_plugin_metric_beside_size_stays_exact(formulation):
    rng = np.random.default_rng(0)
    for seed in range(3):
        table = rng.uniform(0, 1e12, (3, 3, 3))
        table[0, 0, 0] = 0.0
        cm = Costs(synthetic_scan(seed=seed), extra=[_Coupled(table)])
        for size in (0.3, 0.5):
            bs = [Budget("size", size, True), Budget("lat", 1e13, False)]
            ref = brute_force(cm, bs)
            got = solve(cm, bs)
            assert objective(cm, got.choice) == pytest.approx(objective(cm, ref.choice), abs=1e-12)


def test_near_equal_options_keep_one():
    """Options whose costs differ in the last digits: exact comparisons keep the cheapest (a
    tolerance made the relation cyclic and dropped all three)."""
    from sensplan.planner._costs import Term
    from sensplan.planner._solver import undominated

    class Near:
        metrics = ("lat",)
        name = "lat"

        def terms(self, blocks):
            return {"lat": [Term((2,), np.array([1 + 1.8e-12, 1 + 0.9e-12, 1.0])), Term((), np.array(10.0))]}

        def describe(self):
            return {"name": "lat"}

    cm = Costs(synthetic_scan(seed=0), extra=[Near()])
    keep = undominated(cm, ["lat"], [np.zeros(len(b.options)) for b in cm.blocks])
    assert keep[2].tolist() == [2]
    assert all(len(k) >= 1 for k in keep)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("budgets", CASES, ids=["+".join(c) for c in CASES])
def test_tied_blocks_choose_one_option_and_the_milp_still_matches_brute_force(seed, budgets, formulation):
    """--tie: the convs l0, l1, l2 choose one option per axis (their names differ only in the
    index the pattern matches); the MILP's tie rows give brute force's optimum over tied choices."""
    cm = Costs(synthetic_scan(seed=seed), tie=[r"(?<=^l)\d$"])
    assert [[cm.blocks[i].name for i in g] for g in cm.ties] == [
        ["channels:l0", "channels:l1"], ["weight:l0", "weight:l1", "weight:l2"]]
    bs = [Budget.parse(b) for b in budgets]
    got, ref = solved_and_brute_force(cm, bs)
    if got is None:
        return
    assert got.optimal and cm.feasible(got.choice)
    for group in cm.ties:
        assert len({cm.blocks[i].options[got.choice.get(i, 0)].key for i in group}) == 1
    assert objective(cm, got.choice) == pytest.approx(objective(cm, ref.choice), abs=1e-12)
    assert within(cm, got.costs, bs)
    # tying can only cost: the free optimum is at least as good
    free = solve(Costs(synthetic_scan(seed=seed)), bs)
    assert objective(cm, free.choice) <= objective(cm, got.choice) + 1e-12


def test_a_tie_pattern_that_ties_nothing_or_does_not_compile_is_one_clear_message():
    from sensplan import UserInputError

    with pytest.raises(UserInputError, match="--tie experts ties no two units of the scan"):
        Costs(synthetic_scan(), tie=["experts"])
    with pytest.raises(UserInputError, match=r"--tie l\(: not a regular expression"):
        Costs(synthetic_scan(), tie=["l("])


def test_a_tie_of_units_that_share_no_option_is_refused():
    """Channel groups of different widths scan different settings (their n_remove): tied, they
    could only stay uncompressed, so the tie is refused with the reason."""
    from sensplan import UserInputError

    cm = Costs(synthetic_scan(channels=8))
    widths = {b.unit: b.channels for b in cm.blocks if b.kind == "group"}
    table = synthetic_scan(channels=8)
    table.data["groups"]["l1"]["channels"] = 6  # another width: other n_remove at the same ratios
    for r in table.results:
        if r["unit"] == "l1" and r["method"] == "prune":
            r["setting"] = {**r["setting"], "n_remove": int(r["setting"]["n_remove"]) - 1}
    assert widths == {"l0": 8, "l1": 8}
    with pytest.raises(UserInputError, match=r"--tie ties l0 and l1 \(channels\), which share no scanned option"):
        Costs(table, tie=[r"(?<=^l)\d$"])


def test_the_time_limit_window_search_frees_a_tied_group_whole():
    """When the time limit runs out, windows of channel groups are re-solved with the others fixed;
    a window edge between tied groups would fix one and so hold the whole tie where it started."""
    from scipy.optimize import Bounds, LinearConstraint

    from sensplan.planner import _solver

    cm = Costs(synthetic_scan(seed=0), tie=[r"(?<=^l)\d$"])
    bs = [Budget.parse("macs=0.8")]
    best = solve(cm, bs)
    groups = [i for g in cm.ties for i in g if cm.blocks[i].kind == "group"]
    most = {i: len(cm.blocks[i].options) - 1 for i in groups}  # the most channels removed
    assert len(groups) == 2 and best.optimal and 0 < best.choice[groups[0]] < most[groups[0]]
    lim = _solver._limits(cm, bs)
    p = _solver._Problem(cm, list(lim), keep=_solver.undominated(cm, list(lim), _solver.objective_table(cm)))
    a, lo, hi = p.structure()
    row, const = p.cost_row("macs")
    constraints = [LinearConstraint(a, lo, hi), LinearConstraint(p._widen(row).reshape(1, -1), -np.inf,
                                                                  lim["macs"] - const + 1e-9)]
    integrality = np.zeros(p.n)
    integrality[: p.n_x] = 1
    cost = p._widen(p.drop_row(tiebreak=True))
    lower, upper = p._fixed({bi: list(p.keep[bi]).index(most[bi]) for bi in groups})  # feasible, not the best
    start = _solver._milp(cost, constraints=constraints, integrality=integrality, bounds=Bounds(lower, upper)).x
    x = p._improved(start, cost, constraints, integrality, seconds=10.0)
    picks = [int(p.keep[bi][int(np.argmax(x[p.offset[bi]: p.offset[bi] + p.sizes[bi]]))]) for bi in groups]
    assert picks == [best.choice[bi] for bi in groups]
