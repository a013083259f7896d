"""Low-rank factorization: scanned, priced exactly (with pruning on the same layer too), applied as
two real layers, reloaded exactly; and the units and pairs it refuses, with the reasons.

The registry-parametrized contract (probe restores, probe == apply, reload) is in test_methods.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sensplan import ArtifactError
from sensplan.planner import (
    Budget,
    Costs,
    Plan,
    apply_plan,
    compress,
    load_compressed,
    make_plan,
    min_cost,
    option_key,
    solve,
    uniform_candidates,
)
from sensplan.planner._plan import _allocation
from sensplan.sensitivity import EvalSet, MethodContext, ModelSpec, ScanConfig, build_model, get_method, scan
from sensplan.sensitivity._scan import describe_model
from sensplan.sensitivity.methods.lowrank import rank_for
from tests.conftest import registered, seeded_model, self_labelled

SPEC = ModelSpec("sensplan:tiny_resnet", {"width": 16})


@pytest.fixture(scope="module")
def setup():
    model = seeded_model("tiny_resnet", width=16)
    data = self_labelled(model, 96)
    calib = self_labelled(model, 48, seed=9)
    cfg = ScanConfig({"prune": [{"ratio": 0.25}, {"ratio": 0.5}], "lowrank": [{"rank": 0.5}, {"rank": 0.25}],
                      "weight_quant": [{"bits": 4}], "sparsity": [{"ratio": 0.5}],
                      "act_quant": [{"calib": "minmax", "bits": 8}]})
    table = scan(model, data, cfg, calib=calib, model_spec=SPEC, progress=False)
    return {"model": model, "data": data, "calib": calib, "table": table, "costs": Costs(table),
            "base": make_plan(table, [Budget.parse("size=0.99")])}


def plan_of(s, selected: dict[str, str]) -> Plan:
    cm = s["costs"]
    choice = cm.choice_of(selected)
    alloc = _allocation(cm, choice, cm.evaluate(choice), cm.predicted_drop(choice), s["table"])
    data = copy.deepcopy(dict(s["base"].data))
    data["plans"] = {"planned": alloc, "uniform": None}
    return Plan(data)


def pruned_lowrank_layer(s) -> tuple[str, dict]:
    """A conv whose output group and input group are both scanned and that lowrank scanned."""
    table = s["table"]
    scanned = set(table.scanned_groups())
    for layer, info in table.layers.items():
        shrinks = table.tensors[info["weight"]]["shrinks"]
        groups = {d: g for g, dims in shrinks.items() if g in scanned for d in dims}
        if "0" in groups and "1" in groups and table.results_for(layer, "lowrank"):
            return layer, groups
    raise AssertionError("no layer pruned on both sides and factorized")


def test_pruning_and_factorizing_one_layer_costs_what_was_predicted(tmp_path, setup):
    s = setup
    table = s["table"]
    layer, groups = pruned_lowrank_layer(s)
    pick = {}
    for g in set(groups.values()):
        row = max(table.results_for(g, "prune"), key=lambda r: r["setting"]["n_remove"])
        pick[f"channels:{g}"] = option_key("prune", row["setting"])
    pick[f"rank:{layer}"] = option_key("lowrank", {"rank": 0.5})
    pick[f"weight:{layer}"] = option_key("weight_quant", {"bits": 4})
    plan = plan_of(s, pick)
    metrics = apply_plan(s["model"], plan, s["data"], tmp_path, calib=s["calib"], model_spec=SPEC, timing=False)
    for m in ("macs", "params", "bops"):
        assert metrics["comparison"][m]["measured"] == metrics["comparison"][m]["predicted"], m
    size = metrics["comparison"]["size"]
    assert 0 <= size["measured"] - size["predicted"] < 8, size
    assert metrics["after"]["reload_max_abs_diff"] == 0.0

    # the rank is taken on the pruned shape, and the two layers are real
    reloaded = load_compressed(tmp_path / "model.sensplan")
    first, second = reloaded.get_submodule(layer)
    shape = table.layers[layer]["weight_shape"]
    out = shape[0] - max(r["setting"]["n_remove"] for r in table.results_for(groups["0"], "prune"))
    inp = shape[1] - max(r["setting"]["n_remove"] for r in table.results_for(groups["1"], "prune"))
    rank = rank_for(0.5, out, inp * math.prod(shape[2:]))
    assert tuple(first.weight.shape) == (rank, inp, *shape[2:]) and tuple(second.weight.shape) == (out, rank, 1, 1)
    assert rank < rank_for(0.5, shape[0], shape[1] * math.prod(shape[2:]))


def test_with_fine_tuning_the_factors_are_trained_then_quantized(tmp_path, setup):
    """Structural methods run first (prune, then factorize, both finalized), distillation trains
    the factors, then int4 quantizes each of them: the costs are still the predicted ones."""
    from torch.utils.data import DataLoader, TensorDataset

    from sensplan.planner import FineTuneConfig

    s = setup
    table = s["table"]
    layer, groups = pruned_lowrank_layer(s)
    pick = {f"channels:{g}": option_key("prune", table.results_for(g, "prune")[0]["setting"])
            for g in set(groups.values())}
    pick.update({f"rank:{layer}": option_key("lowrank", {"rank": 0.5}),
                 f"weight:{layer}": option_key("weight_quant", {"bits": 4})})
    plan = plan_of(s, pick)
    loader = DataLoader(TensorDataset(s["data"].x, s["data"].y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    m = apply_plan(s["model"], plan, s["data"], tmp_path, calib=s["calib"], train_loader=loader,
                   finetune=FineTuneConfig(epochs=1, lr=0.001), model_spec=SPEC, timing=False)
    assert m["fine_tune"]["history"][0]["steps"] == len(loader)
    for k in ("macs", "params", "bops"):
        assert m["comparison"][k]["measured"] == m["comparison"][k]["predicted"], k
    assert 0 <= m["comparison"]["size"]["measured"] - m["comparison"]["size"]["predicted"] < 8
    assert m["after"]["reload_max_abs_diff"] == 0.0


def test_the_factors_are_the_truncated_svd_and_cut_the_costs(setup):
    s = setup
    layer = next(r["unit"] for r in s["table"].results if r["method"] == "lowrank")
    plan = plan_of(s, {f"rank:{layer}": option_key("lowrank", {"rank": 0.25})})
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"])
    first, second = cm.module.get_submodule(layer)
    w = s["model"].get_submodule(layer).weight.detach()
    mat = w.reshape(w.shape[0], -1).double()
    a, b = first.weight.detach(), second.weight.detach()
    product = b.reshape(w.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()
    sv = torch.linalg.svdvals(mat)
    r = first.weight.shape[0]
    assert r == rank_for(0.25, *mat.shape)
    # the best rank-r approximation: its error is the energy of the dropped singular values
    assert float(torch.linalg.matrix_norm(mat - product)) == pytest.approx(float(sv[r:].norm()), rel=1e-4)
    pred = plan.variant()["predicted"]
    assert pred["params"] < s["costs"].original["params"] and pred["macs"] < s["costs"].original["macs"]


def test_incompatible_methods_are_never_planned_together(setup):
    s = setup
    cm = s["costs"]
    assert set(s["table"].methods["lowrank"]["incompatible_with"]) == {"sparsity", "act_quant"}
    assert cm.conflicts

    def pairs(choice):
        per_unit: dict[str, set[str]] = {}
        for i, o in choice.items():
            if o:
                per_unit.setdefault(cm.blocks[i].unit, set()).add(str(cm.blocks[i].options[o].method))
        return {u for u, m in per_unit.items() if "lowrank" in m and m & {"sparsity", "act_quant"}}

    # the smallest file would factorize a layer and sparsify it too, were that allowed
    free = copy.copy(cm)
    free.conflicts = []
    assert pairs(min_cost(free, "size").choice)
    assert not pairs(min_cost(cm, "size").choice)
    assert not pairs(solve(cm, [Budget.parse("size=0.15")]).choice)
    unis = uniform_candidates(cm, [Budget.parse("size=0.5")])
    assert unis and not any(pairs(u.choice) for u in unis)


def test_a_hand_edited_incompatible_pair_is_refused(setup):
    s = setup
    layer = next(r["unit"] for r in s["table"].results if r["method"] == "lowrank")
    cm = s["costs"]
    plan = plan_of(s, {f"rank:{layer}": option_key("lowrank", {"rank": 0.5})})
    data = copy.deepcopy(dict(plan.data))
    sparse = next(o for o in cm.blocks[cm.index[f"sparsity:{layer}"]].options if o.method)
    data["plans"]["planned"]["choices"][f"sparsity:{layer}"].update(
        method="sparsity", setting=dict(sparse.setting), label=sparse.label, effect=dict(sparse.effect))
    with pytest.raises(ArtifactError, match="applies both lowrank and sparsity"):
        compress(s["model"], Plan(data), "planned", s["data"].example_input)


class Gained(nn.Linear):
    """A Linear with a learned gain of its own: two plain layers in its place would drop it."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


class Mixed(nn.Module):
    """A grouped conv, a plain conv, attention (whose out_proj forward never runs), an unused
    Linear, a Linear subclass with a gain and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gained = Gained(16, 16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.tiny = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.grouped(self.stem(x)).flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.tiny(self.head(self.gained(t.mean(1))))


def test_units_it_cannot_factorize_are_skipped_with_the_reason():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(4, 3, 8, 8)
    layers, tensors, graph, error = describe_model(model, x[:1])
    ctx = MethodContext(model, x[:1], layers, {}, tensors, graph=graph, graph_error=error)
    method = get_method("lowrank")
    units = method.units(ctx, [{"rank": 0.5}])
    assert units["stem"] == "" and units["head"] == ""
    assert "grouped convolution (groups=4)" in units["grouped"]
    assert "covers Linear and Conv2d layers, not MultiheadAttention" in units["attn"]
    assert "forward never runs" in units["attn.out_proj"]  # used through its weight
    assert "unused" not in units  # a layer that never runs has no MACs: it is no unit at all
    assert "Gained subclasses Linear" in units["gained"] and "drop that" in units["gained"]
    assert "no scanned rank stores fewer values" in units["tiny"]  # 4 x 4 at rank 2: 16 values either way


def test_only_ranks_that_store_fewer_values_are_offered(setup):
    ctx_layers = {"square": {"weight_shape": [64, 64]}, "wide": {"weight_shape": [16, 256]}}
    ctx = MethodContext(nn.Identity(), torch.zeros(1), ctx_layers, {}, {})
    method = get_method("lowrank")
    settings = [{"rank": 0.75}, {"rank": 0.5}, {"rank": 0.25}]
    # 64 x 64 at 75%: 48 * 128 values > 4096; at 50%: 32 * 128 = 4096 (not fewer); at 25%: fewer
    assert method.unit_settings(ctx, "square", settings) == [{"rank": 0.25}]
    # 16 x 256: rank 12 * 272 < 4096 already at 75%
    assert method.unit_settings(ctx, "wide", settings) == settings


def _random_data(model: nn.Module, n: int, px: int) -> EvalSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, px, px, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return EvalSet(x, y, [str(i) for i in range(10)], {"spec": "synthetic", "n": n, "indices_sha256": "0"},
                   np.arange(n))


@pytest.fixture(scope="module")
def squeezenet():
    """Fire modules concatenate two branches: the next squeeze conv's inputs come from two groups."""
    torch.manual_seed(0)
    spec = ModelSpec("torchvision:squeezenet1_0", {"num_classes": 10})
    model = build_model(spec)
    data = _random_data(model, 8, 64)
    cfg = ScanConfig({"prune": [{"ratio": 0.5}], "lowrank": [{"rank": 0.25}]}, check_samples=2)
    return model, data, scan(model, data, cfg, model_spec=spec, progress=False), spec


@pytest.mark.slow
def test_a_factorized_layer_after_a_concatenation_is_priced_exactly(tmp_path, squeezenet):
    model, data, table, spec = squeezenet
    concat_inputs = [u for u, info in table.layers.items()
                     if len([g for g, d in table.tensors[info["weight"]]["shrinks"].items() if "1" in d]) > 1
                     and table.results_for(u, "lowrank")]
    assert concat_inputs, "a squeeze conv reads a concatenation of two groups"
    cm = Costs(table)
    assert not cm.dropped
    pick = {f"rank:{u}": option_key("lowrank", {"rank": 0.25}) for u in concat_inputs}
    for g in table.scanned_groups():
        row = table.results_for(g, "prune")[0]
        pick[f"channels:{g}"] = option_key("prune", row["setting"])
    choice = cm.choice_of(pick)
    alloc = _allocation(cm, choice, cm.evaluate(choice), cm.predicted_drop(choice), table)
    base = make_plan(table, [Budget.parse("size=0.99")], time_limit=30)
    plan = Plan({**copy.deepcopy(dict(base.data)), "plans": {"planned": alloc, "uniform": None}})
    m = apply_plan(model, plan, data, tmp_path, timing=False, model_spec=spec)
    for metric in ("macs", "params", "bops"):
        assert m["comparison"][metric]["measured"] == pytest.approx(m["comparison"][metric]["predicted"],
                                                                    rel=1e-12), metric
    assert m["comparison"]["size"]["measured"] == pytest.approx(m["comparison"]["size"]["predicted"], abs=8)


@pytest.mark.slow
def test_an_option_too_costly_to_price_exactly_is_left_out_with_the_reason(monkeypatch, squeezenet):
    _, _, table, _ = squeezenet
    import sensplan.planner._costs as costs

    monkeypatch.setattr(costs, "JOINT_LIMIT", 1)
    cm = Costs(table)
    assert "lowrank" in cm.dropped
    unit, reason = next(iter(cm.dropped["lowrank"].items()))
    assert "channel groups (a concatenation)" in reason and "not planned" in reason
    assert all(o.method != "lowrank" for o in cm.blocks[cm.index[f"rank:{unit}"]].options)
    plan = make_plan(table, [Budget.parse("size=0.9")], time_limit=30)
    assert plan.variant()["skipped"]["lowrank"][unit] == reason


def test_validate_reprices_a_plan_against_its_scan(tmp_path, setup):
    """A plan edited by hand is caught by `sensplan validate scan.json plan.json`: an option the scan
    never measured, or a choice whose predicted costs no longer add up."""
    import json

    from sensplan._validate import validate_files

    s = setup
    table = s["table"].save(tmp_path / "scan.json")
    layer = next(r["unit"] for r in table.results if r["method"] == "lowrank")
    plan = make_plan(table, [Budget.parse("size=0.99")])
    plan.data["plans"]["planned"] = plan_of(s, {f"rank:{layer}": option_key("lowrank", {"rank": 0.5})}
                                            ).variant()
    plan.save(tmp_path / "plan.json")
    assert validate_files([str(tmp_path / "scan.json"), str(tmp_path / "plan.json")]) == []

    edited = json.loads((tmp_path / "plan.json").read_text())
    c = edited["plans"]["planned"]["choices"][f"weight:{layer}"]
    c.update(method="weight_quant", setting={"bits": 4}, label="int4",
             effect={"weight_bits": 4, "weight_dtype": "int", "scale_bits": 32})
    (tmp_path / "stale.json").write_text(json.dumps(edited))
    problems = validate_files([str(tmp_path / "scan.json"), str(tmp_path / "stale.json")])
    assert any("predicts size" in p and "but its choices cost" in p for p in problems), problems

    edited["plans"]["planned"]["choices"][f"rank:{layer}"]["setting"] = {"rank": 0.9}
    (tmp_path / "unscanned.json").write_text(json.dumps(edited))
    problems = validate_files([str(tmp_path / "scan.json"), str(tmp_path / "unscanned.json")])
    assert any('lowrank:{"rank":0.9}' in p and "the scan did not measure" in p for p in problems), problems


def test_a_group_and_a_layer_of_one_name_are_two_units_for_the_pair_check():
    """Groups are named by their root layer: group "conv" (pruned) and layer "conv" (a method that
    refuses to follow a structural change on its own unit) are two units, as the planner sees them."""
    from sensplan.planner._apply import _check_pairs
    from sensplan.sensitivity import WeightMethod

    class Fussy(WeightMethod):
        name = "fussy"
        axis = "weight"

        def can_follow(self, other):
            return not other.structural

    with registered(Fussy):
        choice = {"unit": "conv", "setting": {}, "label": "", "effect": {}}
        alloc = {"choices": {"channels:conv": {**choice, "axis": "channels", "kind": "group", "method": "prune"},
                             "weight:conv": {**choice, "axis": "weight", "kind": "layer", "method": "fussy"}}}
        _check_pairs("planned", alloc)  # no error: not one unit
        alloc["choices"]["rank:conv"] = {**choice, "axis": "rank", "kind": "layer", "method": "lowrank"}
        with pytest.raises(ArtifactError, match="applies both fussy and lowrank to 'conv'"):
            _check_pairs("planned", alloc)
