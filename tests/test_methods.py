"""Every registered compression method, checked against the contract the pipeline relies on.

Parametrized over ``all_methods()``: a method added to the registry is tested here with no edit.

- (a) the probe restores the model bit-identically (state dict and outputs) for every unit;
- (b) probe == apply: a plan of one unit at one setting, applied by the executor, scores exactly
  what the scan's probe measured on the same data;
- (c) predicted costs == measured costs for a plan combining methods on one layer;
- (d) the compressed file reloads to the same outputs (activation quantization included);
- (e) sparse sizes are honest (the stated layout, a smaller file) and MACs are counted dense.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sensplan._effects import merge, sparse_layout
from sensplan.planner import (
    Budget,
    Plan,
    compress,
    load_compressed,
    make_plan,
    measure,
    save_compressed,
)
from sensplan.planner._apply import layer_effects
from sensplan.planner._compressed import _encode, read_header
from sensplan.planner._costs import Costs, option_key
from sensplan.planner._plan import _allocation
from sensplan.sensitivity import (
    MethodContext,
    ModelSpec,
    PruningGraph,
    ScanConfig,
    UnitInfo,
    all_methods,
    count_macs,
    get_task,
    scan,
)
from sensplan.sensitivity._scan import describe_model
from tests.conftest import seeded_model, self_labelled

ALL_METHODS = all_methods()
#: a unit to ask a method's effect about, outside a scan
A_CONV = UnitInfo("conv", "layer", (16, 16, 3, 3), "Conv2d", 16 * 16 * 9 * 64)
METHOD_IDS = [m.name for m in ALL_METHODS]
MODELS = ("tiny_resnet", "tiny_convnet")

#: settings the combined-plan and sparse-format tests need, beside each method's strongest
EXTRA = {"prune": [{"ratio": 0.5}],
         "weight_quant": [{"bits": 4}, {"bits": 3, "group": 32, "zero_point": True}, {"bits": 2, "zero_point": True},
                          {"bits": 5, "group": 32}],
         "sparsity": [{"ratio": 0.5}, {"ratio": 0.9}, {"ratio": 0.95}],
         "act_quant": [{"calib": "minmax", "bits": 8}]}


def strongest(method) -> dict:
    """The method's strongest default setting (the most destructive probe)."""
    return method.check_setting(max(method.default_settings, key=method.level))


def scan_settings() -> dict[str, list[dict]]:
    return {m.name: [strongest(m), *[m.check_setting(s) for s in EXTRA.get(m.name, [])]]
            for m in ALL_METHODS}


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    name = request.param
    spec = ModelSpec(f"sensplan:{name}")
    model = seeded_model(name)
    data = self_labelled(model, 96)
    calib = self_labelled(model, 48, seed=9)
    table = scan(model, data, ScanConfig(scan_settings()), calib=calib, model_spec=spec,
                 progress=False)
    base = make_plan(table, [Budget.parse("size=0.99")])
    return {"name": name, "spec": spec, "model": model, "data": data, "calib": calib,
            "table": table, "base": base, "costs": Costs(table)}


def plan_of(s, selected: dict[str, str]) -> Plan:
    """A plan whose planned allocation applies exactly ``selected`` (block name -> option key);
    every other block gets no compression. Its predictions come from the planner's own code."""
    cm, table = s["costs"], s["table"]
    choice = cm.choice_of(selected)
    alloc = _allocation(cm, choice, cm.evaluate(choice), cm.predicted_drop(choice), table)
    data = copy.deepcopy(dict(s["base"].data))
    data["plans"] = {"planned": alloc, "uniform": None}
    return Plan(data)


def block_name(row) -> str:
    return f"{row['axis']}:{row['unit']}"


def rows_of(s, method: str, setting: dict | None = None) -> list[dict]:
    rows = [r for r in s["table"].results if r["method"] == method]
    if setting is not None:
        rows = [r for r in rows if _matches(r["setting"], setting)]
    return rows


def _matches(row_setting: dict, setting: dict) -> bool:
    return all(row_setting.get(k) == v for k, v in setting.items())


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def method_context(model, data, calib) -> MethodContext:
    """The context the scanner builds (structure sections, pruning graph, check inputs)."""
    example = data.example_input
    layers, tensors, graph, error = describe_model(model, example)
    assert isinstance(graph, PruningGraph), error
    groups = {g: {"channels": graph.channels(g), "status": "skipped", "reason": ""}
              for g in graph.group_ids()}
    return MethodContext(model, example, layers, groups, tensors, calib=calib, eval_data=data,
                         check_inputs=data.x[:8], graph=graph, graph_error=error)


# -- (a) probes are reversible ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("name", MODELS)
def test_probe_restores_the_model_bit_identically(method, name):
    model = seeded_model(name)
    data = self_labelled(model, 32)
    calib = self_labelled(model, 32, seed=9)
    ctx = method_context(model, data, calib)
    setting = strongest(method)
    units = [u for u, why in method.units(ctx, [setting]).items() if not why]
    assert units, f"{method.name} scans no unit of {name}"
    before, y0 = state_copy(model), outputs(model, data.x)
    for unit in units:
        for s in method.unit_settings(ctx, unit, [setting]):
            with method.probe(ctx, unit, s):
                changed = not torch.equal(outputs(model, data.x), y0)
            assert changed, f"the {method.name} probe of {unit} at {s} changed nothing"
            assert_state_equal(model, before)
            assert torch.equal(outputs(model, data.x), y0), (unit, s)
    # no hook or mode left behind: the model still runs exactly as before
    assert not model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_full_scan_with_every_method_restores_the_model(setup):
    # the module fixture scanned s["model"] with recalibration; it must be unchanged
    s = setup
    fresh = seeded_model(s["name"])
    self_labelled(fresh, 96)  # the same centring of the head as the fixture's model got
    assert_state_equal(s["model"], state_copy(fresh))
    assert torch.equal(outputs(s["model"], s["data"].x), outputs(fresh, s["data"].x))
    assert set(s["table"].methods) == set(METHOD_IDS)


# -- (b) probe == apply ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS, ids=METHOD_IDS)
def test_a_single_unit_plan_reproduces_the_probe_exactly(setup, method):
    """The scan's claim for one unit is the executor's result for a plan of that unit alone."""
    s = setup
    task = get_task(s["table"].data["task"]["name"])
    rows = rows_of(s, method.name)
    assert rows, f"{method.name} has no results on {s['name']}"
    for r in rows:
        plan = plan_of(s, {block_name(r): option_key(r["method"], r["setting"])})
        chosen = [c for c in plan.variant()["choices"].values() if c["method"]]
        assert [(c["unit"], c["method"]) for c in chosen] == [(r["unit"], method.name)]
        cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"])
        got = task.evaluate(cm.module, s["data"], None)
        what = (r["unit"], r["label"])
        assert got.score == r["score"], what
        assert got.loss == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), what


# -- (c) predicted == measured costs for methods combined on one layer ---------------------------
def combined_selection(s) -> tuple[str, dict[str, str]]:
    """Prune a layer's output group 50%, int4 weights, 50% sparsity, 8-bit inputs."""
    table = s["table"]
    scanned = set(table.scanned_groups())
    layer = next(u for u in table.layers if u in scanned)  # a layer rooting a scanned group
    n_remove = next(r["setting"]["n_remove"] for r in rows_of(s, "prune", {"ratio": 0.5})
                    if r["unit"] == layer)
    return layer, {
        f"channels:{layer}": option_key("prune", {"ratio": 0.5, "n_remove": n_remove}),
        f"weight:{layer}": option_key("weight_quant", {"bits": 4}),
        f"sparsity:{layer}": option_key("sparsity", {"ratio": 0.5}),
        f"activation:{layer}": option_key("act_quant", {"calib": "minmax", "bits": 8}),
    }


def stored_parts(cm) -> int:
    """Parts (mask, values, scales, ...) of the specially stored tensors: each is padded to a
    whole byte, so the payload may exceed the prediction by less than a byte per part, plus the
    rounding of the kept-value count to an integer."""
    entries, _, _ = _encode(cm)
    return sum(len(e["parts"]) for e in entries.values() if e["layout"] != "raw")


def test_predicted_costs_equal_measured_costs_for_combined_methods(tmp_path, setup):
    s = setup
    layer, selected = combined_selection(s)
    plan = plan_of(s, selected)
    alloc = plan.variant()
    assert {c["method"] for c in alloc["choices"].values() if c["unit"] == layer and c["method"]} \
        == {"prune", "weight_quant", "sparsity", "act_quant"}
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"],
                     model_spec=s["spec"])
    file_bytes = save_compressed(cm, tmp_path / "model.sensplan")
    got = measure(cm.module, s["data"], file_bytes, effects=layer_effects(alloc), timing=False)
    pred = alloc["predicted"]
    assert got["macs"] == pred["macs"]
    assert got["params"] == pred["params"]
    assert got["bops"] == pred["bops"]
    assert pred["macs"] < s["costs"].original["macs"]  # the pruning did cut MACs
    payload = cm.payload_bytes()
    diff = payload - pred["size"]
    print(f"{s['name']}: payload {payload} B, predicted {pred['size']} B, difference {diff} B")
    assert 0 <= diff < stored_parts(cm) + 1, (payload, pred["size"])
    # the weight holds exactly the kept values the prediction counted, not more
    w = cm.module.get_parameter(s["table"].layers[layer]["weight"])
    header, _ = read_header(tmp_path / "model.sensplan")
    entry = header["tensors"][s["table"].layers[layer]["weight"]]
    assert entry["nnz"] == round(0.5 * w.numel())
    assert 0 < file_bytes - payload < 4096  # the header


@pytest.mark.parametrize("method", ALL_METHODS, ids=METHOD_IDS)
def test_predicted_costs_equal_measured_for_every_method_with_pruning(setup, method):
    """Every method at its strongest setting on every unit it scanned, with every scanned group
    pruned by half too (a layer method then prices the pruned shapes), costs what was predicted."""
    s = setup
    selected = whole_method_selection(s, method)
    # 2:4 after input pruning is the known bug below; a group method prunes the groups itself
    if method.unit_kind == "layer" and method.name != "sparsity_2_4":
        for r in rows_of(s, "prune", {"ratio": 0.5}):
            selected[block_name(r)] = option_key("prune", r["setting"])
    plan = plan_of(s, selected)
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"])
    got = measure(cm.module, s["data"], 0, effects=layer_effects(plan.variant()), timing=False)
    pred = plan.variant()["predicted"]
    for m in ("macs", "params", "bops"):
        assert got[m] == pred[m], (m, got[m], pred[m])
    entries, _, _ = _encode(cm)
    special = sum(1 for e in entries.values() if e["layout"] != "raw")
    # whole bytes per packed part, and under one value per tensor where sparsity rounds the count kept
    assert abs(cm.payload_bytes() - pred["size"]) <= stored_parts(cm) + 4 * special, (cm.payload_bytes(), pred["size"])


@pytest.mark.xfail(strict=True, reason="known bug: after its input group is pruned to a channel "
                   "count that is not a multiple of 4, a 2:4 layer stores padded groups of 4 (2 "
                   "values each), which the analytic size model (density 2/4 of numel) does not "
                   "count; the file exceeds the predicted size")
def test_2_4_sparsity_after_input_pruning_costs_what_was_predicted(setup):
    s = setup
    table = s["table"]
    for r in rows_of(s, "sparsity_2_4"):
        layer = r["unit"]
        shrinks = table.tensors[table.layers[layer]["weight"]]["shrinks"]
        for gid, dims in shrinks.items():
            prunes = [p for p in rows_of(s, "prune") if p["unit"] == gid and "1" in dims
                      and (table.groups[gid]["channels"] - p["setting"]["n_remove"]) % 4]
            if prunes:
                break
        if prunes:
            break
    assert prunes, "no 2:4 layer whose input group can be pruned to a non-multiple of 4"
    plan = plan_of(s, {block_name(r): option_key(r["method"], r["setting"]),
                       block_name(prunes[0]): option_key("prune", prunes[0]["setting"])})
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"])
    pred = plan.variant()["predicted"]["size"]
    assert 0 <= cm.payload_bytes() - pred < stored_parts(cm) + 1, (cm.payload_bytes(), pred)


def test_sparse_int2_weights_store_exactly_the_priced_values(tmp_path, setup):
    """2-bit codes round small kept weights to zero (here next to an outlier in the channel's
    range); the file still holds exactly the priced count of values, zeros included."""
    s = setup
    table = s["table"]
    layer = max(table.layers, key=lambda u: math.prod(table.layers[u]["weight_shape"]))
    key = table.layers[layer]["weight"]
    model = copy.deepcopy(s["model"])
    with torch.no_grad():
        w = model.get_parameter(key)
        w[0].view(-1)[0] = 50 * w.abs().max()
    plan = plan_of(s, {f"sparsity:{layer}": option_key("sparsity", {"ratio": 0.5}),
                       f"weight:{layer}": option_key("weight_quant", {"bits": 2})})
    cm, _ = compress(model, plan, "planned", s["data"].example_input, calib=s["calib"])
    entries, _, _ = _encode(cm)
    numel = math.prod(table.layers[layer]["weight_shape"])
    nonzero = int((cm.module.get_parameter(key) != 0).sum())
    assert nonzero < numel // 2  # quantization did zero some kept values
    assert entries[key]["nnz"] == numel // 2
    pred = plan.variant()["predicted"]["size"]
    assert 0 <= cm.payload_bytes() - pred < stored_parts(cm) + 1
    save_compressed(cm, tmp_path / "m.sensplan")
    reloaded = load_compressed(tmp_path / "m.sensplan", seeded_model(s["name"]))
    assert torch.equal(outputs(reloaded, s["data"].x), outputs(cm.module, s["data"].x))


def test_activation_ranges_are_calibrated_on_the_recalibrated_model(setup):
    """Input quantization measures its ranges on the model as the executor leaves it: with the
    other methods applied and BatchNorm recalibrated (measured before the recalibration, the ranges
    were those of statistics about to change)."""
    from sensplan.sensitivity import install_input_quant  # noqa: F401 - the quantizer the record feeds
    from sensplan.sensitivity._quant import act_qparams
    from sensplan.sensitivity.methods.act_quant import activation_ranges

    s = setup
    table = s["table"]
    head = [u for u, v in table.layers.items() if v["type"] == "Linear"][-1]
    others = {block_name(r): option_key("prune", r["setting"]) for r in rows_of(s, "prune", {"ratio": 0.5})}
    others.update({f"weight:{u}": option_key("weight_quant", {"bits": 2}) for u in table.layers})
    act = option_key("act_quant", {"calib": "minmax", "bits": 8})
    with_act = plan_of(s, {**others, f"activation:{head}": act})
    cm, _ = compress(s["model"], with_act, "planned", s["data"].example_input, calib=s["calib"])
    recorded = dict(cm.records)["act_quant"][head]
    without, _ = compress(s["model"], plan_of(s, others), "planned", s["data"].example_input, calib=s["calib"])
    r = activation_ranges(without.module, [head], s["calib"].x[:512])[head]
    want = act_qparams(r["min"], r["max"], 8)  # (channels removed, not zeroed: equal up to rounding)
    assert recorded["zero_point"] == want["zero_point"]
    assert recorded["scale"] == pytest.approx(want["scale"], rel=1e-6)


# -- (d) the file reloads to the same outputs -----------------------------------------------------
def whole_method_selection(s, method) -> dict[str, str]:
    """The method at its strongest setting on every unit it scanned."""
    rows = rows_of(s, method.name)
    top = {}
    for r in rows:
        if block_name(r) not in top or r["level"] > top[block_name(r)]["level"]:
            top[block_name(r)] = r
    return {b: option_key(r["method"], r["setting"]) for b, r in top.items()}


@pytest.mark.parametrize("fmt", [{"bits": 3, "group": 32, "zero_point": True}, {"bits": 2, "zero_point": True},
                                 {"bits": 5, "group": 32}], ids=["int3ag32", "int2a", "int5g32"])
def test_finer_weight_formats_with_every_group_pruned_cost_what_was_predicted_and_reload(tmp_path, setup, fmt):
    """Group-wise scales (a row of in-channels x kernel cut in groups of 32, the last one shorter,
    and fewer after the input group is pruned) and zero points: the container stores what the
    planner priced, and reloads to the executor's outputs."""
    s = setup
    rows = rows_of(s, "weight_quant", fmt)
    assert rows
    selected = {block_name(r): option_key("weight_quant", r["setting"]) for r in rows}
    for r in rows_of(s, "prune", {"ratio": 0.5}):
        selected[block_name(r)] = option_key("prune", r["setting"])
    sparse_layer = rows[0]["unit"]
    selected[f"sparsity:{sparse_layer}"] = option_key("sparsity", {"ratio": 0.9})  # quantized + sparse
    plan = plan_of(s, selected)
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"],
                     model_spec=s["spec"])
    file_bytes = save_compressed(cm, tmp_path / "m.sensplan")
    pred = plan.variant()["predicted"]
    payload = cm.payload_bytes()
    assert 0 <= payload - pred["size"] <= stored_parts(cm) + 4, (payload, pred["size"])
    header, _ = read_header(tmp_path / "m.sensplan")
    entries = [header["tensors"][s["table"].layers[r["unit"]]["weight"]] for r in rows]
    assert all(e.get("group_size", 0) == fmt.get("group", 0) for e in entries)
    assert all(("zero_points" in e["part_names"]) == bool(fmt.get("zero_point")) for e in entries)
    y = outputs(cm.module, s["data"].x)
    assert torch.equal(outputs(load_compressed(tmp_path / "m.sensplan"), s["data"].x), y)
    assert file_bytes > payload


@pytest.mark.parametrize("method", ALL_METHODS, ids=METHOD_IDS)
def test_compressed_file_reloads_to_the_same_outputs(tmp_path, setup, method):
    s = setup
    plan = plan_of(s, whole_method_selection(s, method))
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"],
                     model_spec=s["spec"])
    save_compressed(cm, tmp_path / "m.sensplan")
    y = outputs(cm.module, s["data"].x)
    assert not torch.equal(y, outputs(s["model"], s["data"].x))
    from_spec = load_compressed(tmp_path / "m.sensplan")
    assert torch.equal(outputs(from_spec, s["data"].x), y)
    given = load_compressed(tmp_path / "m.sensplan", seeded_model(s["name"], seed=123))
    assert torch.equal(outputs(given, s["data"].x), y)


def test_combined_plan_reloads_with_activation_quantization(tmp_path, setup):
    s = setup
    layer, selected = combined_selection(s)
    plan = plan_of(s, selected)
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"],
                     model_spec=s["spec"])
    save_compressed(cm, tmp_path / "m.sensplan")
    header, _ = read_header(tmp_path / "m.sensplan")
    assert set(dict(header["records"])["act_quant"]) == {layer}
    reloaded = load_compressed(tmp_path / "m.sensplan")
    assert reloaded.get_submodule(layer)._forward_pre_hooks  # the input quantizer is back
    y = outputs(cm.module, s["data"].x)
    assert torch.equal(outputs(reloaded, s["data"].x), y)


# -- (e) sparse formats and dense MACs ------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.9, 0.95])
def test_unstructured_sparsity_is_stored_in_the_stated_layout_and_shrinks_the_file(
        tmp_path, setup, ratio):
    s = setup
    table = s["table"]
    layer = max(table.layers, key=lambda u: math.prod(table.layers[u]["weight_shape"]))
    info = table.layers[layer]
    key, shape = info["weight"], info["weight_shape"]
    row_len, numel = math.prod(shape[1:]), math.prod(shape)
    plan = plan_of(s, {f"sparsity:{layer}": option_key("sparsity", {"ratio": ratio})})
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"],
                     model_spec=s["spec"])
    save_compressed(cm, tmp_path / "m.sensplan")
    header, _ = read_header(tmp_path / "m.sensplan")
    effect = merge([{"density": 1.0 - ratio, "sparse_format": "auto"}])
    layout = sparse_layout(effect, row_len)
    # float32 values: a bitmask is smaller at 90% sparsity, CSR at 95%
    assert layout == {0.9: "bitmask", 0.95: "csr"}[ratio]
    entry = header["tensors"][key]
    assert entry["layout"] == layout
    kept = int((cm.module.get_parameter(key) != 0).sum())
    assert entry["nnz"] == kept == math.floor((1.0 - ratio) * numel + 0.5)
    stored = sum(n for _, n in entry["parts"])
    expected = {"bitmask": math.ceil(numel / 8) + 4 * kept,
                "csr": 4 * (shape[0] + 1) + 2 * kept + 4 * kept}[layout]
    assert stored == expected
    # the file shrinks by exactly what the dense weight cost minus what the sparse one costs
    empty = plan_of(s, {})
    dense, _ = compress(s["model"], empty, "planned", s["data"].example_input, calib=s["calib"],
                        model_spec=s["spec"])
    assert dense.payload_bytes() - cm.payload_bytes() == 4 * numel - stored
    pred = plan.variant()["predicted"]
    assert abs(cm.payload_bytes() - pred["size"]) < 4


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m.unit_kind == "layer"
                                    and merge([m.effect(strongest(m), A_CONV)])["density"] < 1.0],
                         ids=lambda m: m.name)
def test_sparsity_methods_do_not_change_macs(setup, method):
    s = setup
    plan = plan_of(s, whole_method_selection(s, method))
    pred = plan.variant()["predicted"]
    original = s["costs"].original
    assert pred["macs"] == original["macs"]
    assert pred["size"] < original["size"]
    cm, _ = compress(s["model"], plan, "planned", s["data"].example_input, calib=s["calib"])
    assert sum(count_macs(cm.module, s["data"].example_input).values()) == original["macs"]
