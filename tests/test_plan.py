"""plan.json and scan.json: round trips, every block listed, budgets kept, refusals explained."""

from __future__ import annotations

import json

import pytest

from sensplan import ArtifactError, UserInputError
from sensplan._effects import n_remove_for
from sensplan.planner import Budget, Costs, Plan, assignments, make_plan
from sensplan.planner._costs import option_key
from sensplan.sensitivity import Scan
from tests.tables import synthetic_scan

MIXED = {"n_layers": 2, "nm_layers": ("cat",), "half_layers": ("l1",), "act_layers": ("fc",)}


def test_plan_round_trip_lists_every_block(tmp_path):
    scan = synthetic_scan(**MIXED).save(tmp_path / "scan.json")
    plan = make_plan(Scan.load(tmp_path / "scan.json"), [Budget.parse("size=0.4")])
    saved = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.data == json.loads(json.dumps(plan.data))
    assert loaded.sha256 == saved.sha256
    assert loaded.data["scan"]["sha256"] == scan.sha256
    assert loaded.data["task"] == scan.data["task"]
    blocks = {f"{r['axis']}:{r['unit']}" for r in scan.results}
    for variant in ("planned", "uniform"):
        alloc = loaded.variant(variant)
        assert set(alloc["choices"]) == blocks, variant
        assert set(alloc["unit_drops"]) == blocks
        for name, c in alloc["choices"].items():
            assert name == f"{c['axis']}:{c['unit']}"
            if c["method"] is None:
                assert (c["setting"], c["effect"], c["label"]) == ({}, {}, "none")
            elif c["kind"] == "group":
                assert c["channels"] == 8
        # the classifier's group is not a block, but the allocation says why
        assert alloc["skipped"] == {"prune": {"fc": "output layer"}}
    planned = loaded.variant("planned")
    assert planned["solver"]["optimal"]
    assert planned["predicted"]["size"] <= 0.4 * loaded.original["size"] * (1 + 1e-9)
    assert planned["predicted"]["size_fraction"] == pytest.approx(
        planned["predicted"]["size"] / loaded.original["size"])
    assert planned["predicted"]["score"] == pytest.approx(0.9 - planned["predicted"]["drop"])
    assert planned["predicted"]["drop"] == pytest.approx(sum(planned["unit_drops"].values()))


def test_assignments_group_the_chosen_settings_by_method():
    plan = make_plan(synthetic_scan(**MIXED), [Budget.parse("size=0.3")])
    alloc = plan.variant()
    got = assignments(alloc)
    chosen = [c for c in alloc["choices"].values() if c["method"]]
    assert chosen
    assert sum(len(units) for units in got.values()) == len(chosen)
    for c in chosen:
        assert got[c["method"]][c["unit"]] == c["setting"]


@pytest.mark.parametrize("budgets", [["macs=0.5"], ["size=0.25"], ["bops=0.2", "params=0.8"],
                                     ["size=4000", "macs=0.9"]])
@pytest.mark.parametrize("seed", range(2))
def test_both_allocations_keep_every_budget(budgets, seed):
    bs = [Budget.parse(b) for b in budgets]
    scan = synthetic_scan(seed=seed, **MIXED)
    plan = make_plan(scan, bs)
    assert [b["metric"] for b in plan.data["objective"]["budgets"]] == [b.metric for b in bs]
    cm = Costs(scan)
    for variant in ("planned", "uniform"):
        alloc = plan.variant(variant)
        for b in plan.data["objective"]["budgets"]:
            assert alloc["predicted"][b["metric"]] <= b["absolute"] * (1 + 1e-9), (variant, b)
        if variant == "planned":  # its prediction is the cost model's for its choices
            choice = cm.choice_of({k: _key(c) for k, c in alloc["choices"].items()})
            assert cm.evaluate(choice) == {m: alloc["predicted"][m] for m in cm.metrics}
    uniform = plan.variant("uniform")
    on_grid = all(c["setting"]["ratio"] in (0.25, 0.5) for c in uniform["choices"].values()
                  if c["kind"] == "group" and c["method"])
    if on_grid:  # else the uniform drop interpolates between scanned ratios the plan cannot use
        assert plan.variant()["predicted"]["drop"] <= uniform["predicted"]["drop"] + 1e-12


def _key(c) -> str:
    return option_key(c["method"], c["setting"])


def test_the_uniform_allocation_stores_off_grid_ratios_as_channel_counts():
    scan = synthetic_scan()
    plan = make_plan(scan, [Budget.parse("macs=0.6")])
    uniform = plan.variant("uniform")
    ratio = uniform["uniform"]["ratio"]
    assert n_remove_for(ratio, 8) == 3  # between the scanned 2 and 4 channels
    cm = Costs(scan)
    drop = 0.0
    for name, c in uniform["choices"].items():
        if c["kind"] == "group":
            assert c["method"] == "prune" and c["effect"] == {"removed": 3}
            assert c["setting"] == {"ratio": ratio, "n_remove": 3}
            assert c["label"] == f"prune {ratio:.0%} (3 ch)"
            envelope = cm.drop_table()[cm.index[name]]
            drop += (envelope[1] + envelope[2]) / 2  # linear in channels: 3 is half-way
        else:
            assert c["method"] is None
    assert uniform["predicted"]["drop"] == pytest.approx(drop, abs=1e-12)
    assert uniform["predicted"]["macs"] <= 0.6 * plan.original["macs"] * (1 + 1e-9)


def test_max_drop_plan_records_its_objective():
    plan = make_plan(synthetic_scan(), [], max_drop=0.05, minimize="size")
    obj = plan.data["objective"]
    assert (obj["mode"], obj["max_drop"], obj["minimize"], obj["budgets"]) == \
        ("max_drop", 0.05, "size", [])
    assert plan.variant()["predicted"]["drop"] <= 0.05 + 1e-12
    assert plan.variant()["predicted"]["size"] < plan.original["size"]
    uniform = plan.variant("uniform")
    assert uniform is not None and uniform["predicted"]["drop"] <= 0.05 + 1e-12


def test_a_plan_needs_an_objective():
    with pytest.raises(UserInputError, match="Give a budget"):
        make_plan(synthetic_scan(), [])
    with pytest.raises(UserInputError, match="--minimize"):
        make_plan(synthetic_scan(), [], max_drop=0.01)


def test_a_missing_variant_names_the_ones_there():
    plan = make_plan(synthetic_scan(), [Budget.parse("macs=0.7")])
    data = dict(plan.data, plans={"planned": plan.variant(), "uniform": None})
    with pytest.raises(UserInputError, match="no 'uniform' allocation; it has planned"):
        Plan(data).variant("uniform")


def test_plan_of_wrong_version_is_refused(tmp_path):
    plan = make_plan(synthetic_scan(), [Budget.parse("macs=0.7")])
    data = dict(plan.data, schema_version=99)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        Plan.load(tmp_path / "p.json")


def test_a_plan_without_choices_is_refused(tmp_path):
    plan = make_plan(synthetic_scan(), [Budget.parse("macs=0.7")])
    data = json.loads(json.dumps(plan.data))
    del data["plans"]["planned"]["choices"]
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a valid plan.*lacks 'choices'"):
        Plan.load(tmp_path / "p.json")


def test_scan_file_is_not_a_plan(tmp_path):
    synthetic_scan().save(tmp_path / "scan.json")
    with pytest.raises(ArtifactError, match="is not a sensplan.plan file"):
        Plan.load(tmp_path / "scan.json")


def test_scan_round_trip(tmp_path):
    scan = synthetic_scan(**MIXED)
    saved = scan.save(tmp_path / "scan.json")
    loaded = Scan.load(tmp_path / "scan.json")
    assert loaded.data == json.loads(json.dumps(scan.data))
    assert loaded.sha256 == saved.sha256
    assert loaded.skipped_groups() == {"fc": "output layer"}
    assert loaded.scanned_groups() == ["l0", "l1"]
    assert loaded.metric.name == "top1" and loaded.metric.higher_is_better


def test_a_scan_row_naming_an_unknown_unit_is_refused(tmp_path):
    data = json.loads(json.dumps(synthetic_scan().data))
    data["results"][0]["unit"] = "nowhere"
    (tmp_path / "scan.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a valid scan.*'nowhere'.*sensplan validate"):
        Scan.load(tmp_path / "scan.json")


def test_a_restricted_scan_plans_with_the_named_methods_only():
    scan = synthetic_scan(**MIXED)
    only_bits = scan.restricted(["weight_quant"])
    plan = make_plan(only_bits, [Budget.parse("size=0.4")])
    methods = {c["method"] for c in plan.variant()["choices"].values()}
    assert methods <= {None, "weight_quant"} and "weight_quant" in methods
    with pytest.raises(ArtifactError, match="no results for nope; it scanned prune"):
        scan.restricted(["nope"])


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text("old")
    plan = make_plan(synthetic_scan(), [Budget.parse("macs=0.7")])
    import sensplan._artifacts as art

    def broken(obj):
        raise RuntimeError("disk full")

    monkeypatch.setattr(art, "dumps", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plan.save(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
