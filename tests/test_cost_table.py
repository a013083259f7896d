"""Measured cost tables (``TableCosts``): a hand-written latency table planned against."""

from __future__ import annotations

import json

import pytest

from sensplan import ArtifactError, BudgetError, UserInputError
from sensplan.planner import Budget, Costs, TableCosts, brute_force, make_plan
from sensplan.planner._costs import option_key
from sensplan.sensitivity import ModelSpec, ScanConfig, scan
from tests.conftest import seeded_model, self_labelled
from tests.tables import synthetic_scan

SPEC = ModelSpec("sensplan:tiny_resnet")


@pytest.fixture(scope="module")
def table_scan():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 64)
    cfg = ScanConfig({"prune": [{"ratio": 0.25}, {"ratio": 0.5}],
                      "weight_quant": [{"bits": 8}, {"bits": 4}]})
    return scan(model, data, cfg, model_spec=SPEC, progress=False)


def prune_key(table, unit: str, ratio: float) -> str:
    row = next(r for r in table.results
               if r["unit"] == unit and r["method"] == "prune" and r["setting"]["ratio"] == ratio)
    return option_key("prune", row["setting"])


def latency_table(table) -> dict:
    """Per-unit latencies in ms: each pruned group gets faster; int8 weights speed up the head
    (an integer runtime), int4 less so (unpacking); ``pool`` is a unit no block decides."""
    groups = {"stem.0": (0.30, 0.22, 0.15), "block.conv1": (0.20, 0.15, 0.10),
              "down.0": (0.25, 0.19, 0.12)}
    entries = {u: {"axis": "channels",
                   "costs": {"none": none, prune_key(table, u, 0.25): p25,
                             prune_key(table, u, 0.5): p50}}
               for u, (none, p25, p50) in groups.items()}
    entries["head"] = {"axis": "weight",
                       "costs": {"none": 0.05, option_key("weight_quant", {"bits": 8}): 0.02,
                                 option_key("weight_quant", {"bits": 4}): 0.04}}
    entries["pool"] = {"axis": "channels", "costs": {"none": 0.02}}
    return {"format": "sensplan.cost_table", "schema_version": 1, "metric": "latency_ms",
            "unit": "ms", "overhead": 0.1, "entries": entries}


def write(tmp_path, obj, name: str = "latency.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def by_hand(obj: dict, alloc) -> float:
    """The overhead plus every entry's cost at the option the allocation chose for its unit."""
    total = obj["overhead"]
    for unit, e in obj["entries"].items():
        c = alloc["choices"].get(f"{e['axis']}:{unit}")
        key = option_key(c["method"], c["setting"]) if c is not None else "none"
        total += e["costs"].get(key, e["costs"]["none"])
    return total


def test_a_plan_for_a_latency_budget_meets_it_and_predicts_the_table_sum(tmp_path, table_scan):
    obj = latency_table(table_scan)
    table = TableCosts.load(write(tmp_path, obj))
    assert (table.metric, table.unit, table.overhead) == ("latency_ms", "ms", 0.1)
    plan = make_plan(table_scan, [Budget.parse("latency_ms=0.6")], cost_models=[table])
    original = 0.1 + 0.30 + 0.20 + 0.25 + 0.05 + 0.02
    assert plan.original["latency_ms"] == pytest.approx(original)
    budget = plan.data["objective"]["budgets"][0]
    assert budget["metric"] == "latency_ms" and budget["absolute"] == pytest.approx(0.6 * original)
    alloc = plan.variant()
    predicted = alloc["predicted"]["latency_ms"]
    assert predicted <= 0.6 * original + 1e-9
    assert predicted == pytest.approx(by_hand(obj, alloc), abs=1e-12)
    assert alloc["predicted"]["latency_ms_fraction"] == pytest.approx(predicted / original)
    # the budget forces heavy pruning: at least two groups lose half their channels
    halved = [c for c in alloc["choices"].values()
              if c["method"] == "prune" and c["setting"]["ratio"] == 0.5]
    assert len(halved) >= 2
    assert {"name": "table", "metrics": ["latency_ms"], "unit": "ms",
            "path": str(tmp_path / "latency.json"), "overhead": 0.1} in plan.data["cost_models"]
    # the uniform baseline is priced by the same table
    uniform = plan.variant("uniform")
    assert uniform["predicted"]["latency_ms"] == pytest.approx(by_hand(obj, uniform), abs=1e-12)


@pytest.mark.parametrize("budgets", [["latency_ms=0.6"], ["latency_ms=0.7", "size=0.5"],
                                     ["latency_ms=0.8", "macs=0.7"]])
def test_brute_force_agrees_with_the_milp(tmp_path, table_scan, budgets):
    table = TableCosts.load(write(tmp_path, latency_table(table_scan)))
    bs = [Budget.parse(b) for b in budgets]
    plan = make_plan(table_scan, bs, cost_models=[table])
    cm = Costs(table_scan, [table])
    best = brute_force(cm, bs)
    assert best is not None
    alloc = plan.variant()
    assert alloc["predicted"]["drop"] == pytest.approx(best.predicted_drop, abs=1e-12)
    milp = cm.choice_of({name: option_key(c["method"], c["setting"])
                         for name, c in alloc["choices"].items()})
    assert cm.predicted_drop(milp) == pytest.approx(best.predicted_drop, abs=1e-12)
    for b in bs:  # both choices are within every budget, as the table prices them
        limit = b.limit(cm.original) * (1 + 1e-9)
        assert alloc["predicted"][b.metric] <= limit and best.costs[b.metric] <= limit
        assert cm.evaluate(milp)[b.metric] == pytest.approx(alloc["predicted"][b.metric])


def test_a_budget_on_a_table_metric_needs_the_table(table_scan):
    with pytest.raises(BudgetError, match="cost-table"):
        make_plan(table_scan, [Budget.parse("latency_ms=0.6")])


def test_a_table_metric_may_not_shadow_a_built_in_metric(tmp_path, table_scan):
    obj = {**latency_table(table_scan), "metric": "macs"}
    with pytest.raises(ArtifactError, match="must be a new name"):
        TableCosts.load(write(tmp_path, obj))
    with pytest.raises(ArtifactError, match="must be a new name"):
        TableCosts("size", 0.0, {})


def test_two_tables_with_one_metric_are_refused(tmp_path, table_scan):
    a = TableCosts.load(write(tmp_path, latency_table(table_scan), "a.json"))
    b = TableCosts.load(write(tmp_path, latency_table(table_scan), "b.json"))
    with pytest.raises(ArtifactError, match="Two cost models provide the metric 'latency_ms'"):
        make_plan(table_scan, [Budget.parse("latency_ms=0.6")], cost_models=[a, b])


def _malformed(table_scan) -> dict[str, object]:
    good = latency_table(table_scan)
    first = next(iter(good["entries"]))
    return {
        "not json": "{not json",
        "wrong format": {**good, "format": "sensplan.scan"},
        "future version": {**good, "schema_version": 2},
        "no entries": {k: v for k, v in good.items() if k != "entries"},
        "no metric": {k: v for k, v in good.items() if k != "metric"},
        "entries a list": {**good, "entries": [1, 2]},
        "entry without costs": {**good, "entries": {first: {"axis": "channels"}}},
        "non-numeric cost": {**good, "entries": {first: {"costs": {"none": "fast"}}}},
        "non-numeric overhead": {**good, "overhead": "small"},
        "empty metric": {**good, "metric": ""},
    }


MALFORMED = ["not json", "wrong format", "future version", "no entries", "no metric",
             "entries a list", "entry without costs", "non-numeric cost", "non-numeric overhead",
             "empty metric"]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_tables_raise_artifact_errors(tmp_path, table_scan, case):
    path = write(tmp_path, _malformed(table_scan)[case])
    with pytest.raises(ArtifactError):
        TableCosts.load(path)


def test_a_missing_table_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError):
        TableCosts.load(tmp_path / "nope.json")


def test_an_entry_on_an_axis_the_scan_did_not_decide_is_a_constant(tmp_path, table_scan):
    """``block.conv2`` has only a weight block; its measured sparsity entry still costs 'none'."""
    obj = latency_table(table_scan)
    obj["entries"]["block.conv2"] = {"axis": "sparsity", "costs": {"none": 0.07}}
    table = TableCosts.load(write(tmp_path, obj))
    cm = Costs(table_scan, [table])
    assert cm.original["latency_ms"] == pytest.approx(0.92 + 0.07)


def test_an_entry_without_an_axis_is_counted_once(tmp_path, table_scan):
    """``down.0`` is decided on two axes (channels, weight); an entry naming prune options
    prices the channel block alone, and its 'none' cost is counted once."""
    obj = latency_table(table_scan)
    del obj["entries"]["down.0"]["axis"]
    table = TableCosts.load(write(tmp_path, obj))
    cm = Costs(table_scan, [table])
    assert cm.original["latency_ms"] == pytest.approx(0.92)
    halved = cm.choice_of({"channels:down.0": prune_key(table_scan, "down.0", 0.5)})
    assert cm.evaluate(halved)["latency_ms"] == pytest.approx(0.92 - 0.25 + 0.12)


def test_an_entry_naming_options_of_two_axes_needs_an_axis(tmp_path, table_scan):
    obj = latency_table(table_scan)
    entry = obj["entries"]["down.0"]
    del entry["axis"]
    entry["costs"][option_key("weight_quant", {"bits": 8})] = 0.2
    table = TableCosts.load(write(tmp_path, obj))
    with pytest.raises(ArtifactError, match="'down.0' names options of several axes"):
        make_plan(table_scan, [Budget.parse("latency_ms=0.6")], cost_models=[table])


def test_a_table_that_names_none_of_the_scans_units_is_refused():
    """A table profiled from another model prices every plan alike (a trial's ConvNeXt table on its
    own small model: predicted 18.9 ms for a model of 1.9 ms): one message, naming the fix."""
    other = TableCosts("latency", 0.5, {"features.0": {"unit": "features.0", "costs": {"none": 1.0}},
                                        "features.3": {"unit": "features.3", "axis": "channels",
                                                       "costs": {"none": 2.0}}}, "ms", "convnext.json")
    with pytest.raises(UserInputError, match=r"--cost-table convnext.json prices none of this scan's units .*"
                                             r"sensplan profile --scan"):
        Costs(synthetic_scan(), [other])
    mine = TableCosts("latency", 0.5, {"l0": {"unit": "l0", "costs": {"none": 1.0}}}, "ms", "mine.json")
    assert Costs(synthetic_scan(), [mine]).original["latency"] == pytest.approx(1.5)  # a unit it names: priced
    # a table of pruned widths (joint entries over channel groups) on a scan of the same model that
    # quantizes only: its entries still name the scan's layers
    widths = TableCosts("latency", 0.5, {"layer:l1": {"unit": "l1", "factors": [["l0", "channels"]],
                                                      "options": [["none", "prune:ratio=0.5"]], "costs": [2.0, 1.0]}},
                        "ms", "widths.json")
    assert Costs(synthetic_scan(n_groups=0), [widths]).original["latency"] == pytest.approx(2.5)
