"""The executor does what the scan measured, costs what the plan predicted; its file reloads."""

from __future__ import annotations

import copy
import json
import struct
import zlib

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sensplan import ArtifactError, IncompatibleModelError
from sensplan.planner import (
    Budget,
    Costs,
    FineTuneConfig,
    Plan,
    apply_plan,
    compress,
    distill_,
    load_compressed,
    load_metrics,
    make_plan,
    missed_budgets,
    save_compressed,
)
from sensplan.planner._compressed import payload_size, read_header
from sensplan.planner._costs import option_key
from sensplan.sensitivity import ModelSpec, ScanConfig, count_macs, evaluate, get_task, scan
from sensplan.sensitivity._models import weights_digest
from tests.conftest import seeded_model, self_labelled

SPEC = ModelSpec("sensplan:tiny_resnet")
#: every built-in method, at settings that make each probe change predictions
SETTINGS = {
    "prune": [{"ratio": 0.25}, {"ratio": 0.5}, {"ratio": 0.75}],
    "weight_quant": [{"bits": 8}, {"bits": 4}, {"bits": 2}],
    "half": [{"dtype": "float16"}, {"dtype": "bfloat16"}],
    "sparsity": [{"ratio": 0.5}, {"ratio": 0.9}],
    "sparsity_2_4": [{"pattern": "2:4"}],
    "act_quant": [{"calib": "minmax", "bits": 8}, {"calib": "percentile", "bits": 4}],
}


@pytest.fixture(scope="module")
def setup():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 96)
    calib = self_labelled(model, 48, seed=9)
    table = scan(model, data, ScanConfig(SETTINGS), calib=calib, model_spec=SPEC, progress=False)
    return model, data, calib, table


def single_unit_plan(base: Plan, row) -> Plan:
    """``base`` with its planned allocation reduced to the one (unit, setting) of a scan row: the
    same edit a tool that writes plans by hand would make."""
    data = copy.deepcopy(dict(base.data))
    alloc = data["plans"]["planned"]
    for c in alloc["choices"].values():
        c.update(method=None, setting={}, label="none", effect={})
    alloc["choices"][f"{row['axis']}:{row['unit']}"].update(
        method=row["method"], setting=dict(row["setting"]), label=row["label"],
        effect=dict(row["effect"]))
    data["plans"]["uniform"] = None
    return Plan(data)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def test_the_scan_covers_every_builtin_method(setup):
    _, _, _, table = setup
    assert set(table.methods) == set(SETTINGS)
    for method, settings in SETTINGS.items():
        rows = [r for r in table.results if r["method"] == method]
        scanned = {json.dumps({k: r["setting"][k] for k in settings[0]}) for r in rows}
        assert scanned == {json.dumps(s) for s in settings}, method
    # the stem reads 3 input channels: no 2:4 layout, skipped with the reason
    assert "not a multiple of 4" in table.skipped()["sparsity_2_4"]["stem.0"]


@pytest.mark.parametrize("method", list(SETTINGS))
def test_executor_measures_exactly_what_the_scan_probe_measured(setup, method):
    """The scan's claim for one unit is the executor's result for a plan of that unit alone:
    same score to the last sample, same loss to float rounding."""
    model, data, calib, table = setup
    base = make_plan(table, [Budget.parse("size=0.99")])
    task = get_task("classification")
    rows = [r for r in table.results if r["method"] == method]
    assert rows and any(r["drop"] or r["loss_increase"] for r in rows), method  # probes bite
    for r in rows:
        plan = single_unit_plan(base, r)
        cm, history = compress(model, plan, "planned", data.example_input, calib=calib)
        assert history == []
        got = task.evaluate(cm.module, data, None)
        what = (r["unit"], r["label"])
        assert got.score == r["score"], what
        if method == "prune":  # removed channels change the float summation order a little
            assert got.loss == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), what
        else:  # the very same weights and hooks
            assert got.loss == r["loss"], what


def _size_tolerance(path) -> float:
    """Bytes the container may differ from the prediction: each specially stored part (codes,
    mask, indices, scales) is padded to a whole byte, and a sparse weight keeps a whole number of
    values where the plan priced ``density * numel`` (at most half a value either way)."""
    header, _ = read_header(path)
    tol = 0.0
    for e in header["tensors"].values():
        if e["layout"] == "raw":
            continue
        tol += len(e["parts"])
        if e["layout"] in ("bitmask", "csr"):
            tol += e["bits"] / 16
    return tol


@pytest.mark.parametrize("variant", ["planned", "uniform"])
@pytest.mark.parametrize("budget", ["macs=0.6", "size=0.2", "params=0.5", "bops=0.2",
                                   "size=0.4,macs=0.8", "bits=5", "bits=6,macs=0.8"])
def test_measured_costs_equal_the_plans_prediction(tmp_path, setup, budget, variant):
    model, data, calib, table = setup
    before = weights_digest(model)
    plan = make_plan(table, [Budget.parse(b) for b in budget.split(",")]).save(tmp_path / "p.json")
    m = apply_plan(model, plan, data, tmp_path / "out", variant=variant, calib=calib,
                   model_spec=SPEC, timing=False)
    assert weights_digest(model) == before  # the user's model is never modified
    pred = plan.variant(variant)["predicted"]
    for metric in ("macs", "params", "bops"):
        assert m["after"][metric] == pred[metric], metric
        assert m["comparison"][metric]["measured"] == m["after"][metric]
    payload = m["after"]["payload_bytes"]
    tol = _size_tolerance(tmp_path / "out" / "model.sensplan")
    assert abs(payload - pred["size"]) <= tol, (payload, pred["size"], tol)
    if tol == 0:  # nothing packed below a byte: the prediction is exact
        assert payload == pred["size"]
    # bits: the stored bits of every scanned layer's weights per original weight (all in scope here)
    assert plan.data["scope"]["out_of_scope"] == {} and plan.original["bits"] == pytest.approx(32.0)
    assert abs(m["after"]["bits"] - pred["bits"]) <= 8 * tol / plan.data["scope"]["weights"] + 1e-9
    assert all(b["met"] for b in m["budgets"]) and missed_budgets(m) == []
    # the file holds what was promised, plus a header
    assert 0 < m["after"]["file_bytes"] - payload < 4096
    assert m["after"]["reload_max_abs_diff"] == 0.0
    assert m["before"]["score"] == 1.0 and m["before"]["macs"] == plan.original["macs"]
    assert m["before"]["payload_bytes"] == plan.original["size"]
    assert load_metrics(tmp_path / "out")["variant"] == variant
    assert Plan.load(tmp_path / "out" / "plan.json").data == plan.data


@pytest.mark.parametrize("choices", [
    {"channels:block.conv1": ("prune", {"ratio": 0.5}), "weight:down.0": ("half", {})},
    {"weight:block.conv2": ("weight_quant", {"bits": 8}), "channels:down.0": ("prune", {})},
])
def test_sizes_are_exact_without_sub_byte_packing(tmp_path, setup, choices):
    """Float16 weights, int8 codes and pruning store exactly the predicted bytes."""
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("size=0.99")])
    data_ = copy.deepcopy(dict(plan.data))
    alloc = data_["plans"]["planned"]
    for c in alloc["choices"].values():
        c.update(method=None, setting={}, label="none", effect={})
    for block, (method, want) in choices.items():
        unit = block.split(":", 1)[1]
        row = next(r for r in table.results if r["unit"] == unit and r["method"] == method
                   and all(r["setting"].get(k) == v for k, v in want.items()))
        alloc["choices"][block].update(method=method, setting=row["setting"], effect=row["effect"])
    cm = Costs(table)
    choice = cm.choice_of({b: option_key(c["method"], c["setting"])
                           for b, c in alloc["choices"].items()})
    predicted = cm.evaluate(choice)
    compressed, _ = compress(model, Plan(data_), "planned", data.example_input, calib=calib)
    size = save_compressed(compressed, tmp_path / "m.sensplan")
    assert compressed.payload_bytes() == predicted["size"] == payload_size(tmp_path / "m.sensplan")
    assert compressed.sizes() == (size, predicted["size"]) and size == (tmp_path / "m.sensplan").stat().st_size
    assert sum(p.numel() for p in compressed.module.parameters()) == predicted["params"]


def test_compressed_file_round_trip_without_the_original_factory_object(tmp_path, setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("size=0.3"), Budget.parse("macs=0.7")])
    m = apply_plan(model, plan, data, tmp_path, calib=calib, model_spec=SPEC, timing=False)
    rebuilt = load_compressed(tmp_path / "model.sensplan")  # built from the spec in the file
    assert evaluate(rebuilt, data).top1 == m["after"]["score"]
    assert sum(count_macs(rebuilt, data.example_input).values()) == m["after"]["macs"]
    given = load_compressed(tmp_path / "model.sensplan", seeded_model("tiny_resnet", seed=7))
    assert torch.equal(outputs(given, data.x), outputs(rebuilt, data.x))
    cm, _ = compress(model, plan, "planned", data.example_input, calib=calib)
    assert torch.equal(outputs(rebuilt, data.x), outputs(cm.module, data.x))
    with pytest.raises(IncompatibleModelError, match="not the architecture"):
        load_compressed(tmp_path / "model.sensplan", seeded_model("tiny_resnet", width=16))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("size=0.3")])
    cm, _ = compress(model, plan, "planned", data.example_input, calib=calib, model_spec=SPEC)
    path = tmp_path_factory.mktemp("container") / "model.sensplan"
    save_compressed(cm, path)
    return path, path.read_bytes()


def _write(tmp_path, raw: bytes):
    path = tmp_path / "bad.sensplan"
    path.write_bytes(raw)
    return path


def _rewrite_header(raw: bytes, edit) -> bytes:
    (hlen,) = struct.unpack("<Q", raw[12:20])
    header = json.loads(zlib.decompress(raw[20:20 + hlen]))
    edit(header)
    head = zlib.compress(json.dumps(header).encode())
    return raw[:12] + struct.pack("<Q", len(head)) + head + raw[20 + hlen:]


def _first_key(header, layout: str, part: str | None = None) -> str:
    return next(k for k, e in header["tensors"].items()
                if e["layout"] == layout and (part is None or part in e.get("part_names", [])))


@pytest.mark.parametrize("damage,fragment", [
    (lambda raw: raw[:-1], "is truncated: its tensors need"),
    (lambda raw: raw[: len(raw) // 2], "is truncated"),
    (lambda raw: raw[:15], "is truncated (only 15 bytes)"),
    (lambda raw: raw[:5], "is truncated (only 5 bytes)"),
    (lambda raw: b"", "is truncated (only 0 bytes)"),
    (lambda raw: raw[:30], "is truncated: its header needs"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "not a sensplan compressed model (bad magic bytes)"),
    (lambda raw: raw[:8] + struct.pack("<I", 1) + raw[12:], "container version 1; this sensplan "
                                                           "reads versions 3 and 4"),
    (lambda raw: raw[:20] + bytes(40) + raw[60:], "has a corrupt header"),
    (lambda raw: _rewrite_header(raw, lambda h: h.pop("tensors")), "has a corrupt header"),
    (lambda raw: _rewrite_header(raw, lambda h: h.update(format="other")), "has a corrupt header"),
    (lambda raw: _rewrite_header(raw, lambda h: h["tensors"][_first_key(h, "raw")].update(
        shape=[999])), "is corrupt: a tensor cannot be decoded"),
    (lambda raw: _rewrite_header(raw, lambda h: h["tensors"][_first_key(h, "dense", "scales")].update(
        part_names=["values"])), "is corrupt: a tensor cannot be decoded"),
])
def test_a_damaged_file_is_an_artifact_error_that_says_so(tmp_path, saved, damage, fragment):
    path, raw = saved
    bad = _write(tmp_path, damage(raw))
    with pytest.raises(ArtifactError) as e:
        load_compressed(bad, seeded_model("tiny_resnet"))
    assert fragment in str(e.value)
    assert str(bad) in str(e.value)
    assert load_compressed(path, seeded_model("tiny_resnet"))  # the original still loads


def test_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist. Create it with `sensplan apply`"):
        load_compressed(tmp_path / "nope.sensplan")


def test_plan_for_another_architecture_is_refused(setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("macs=0.6")])
    with pytest.raises(IncompatibleModelError, match="architecture digest"):
        compress(seeded_model("tiny_convnet"), plan, "planned", data.example_input)


def test_distillation_fine_tuning_moves_the_student_toward_the_teacher(setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("macs=0.5")])
    cm_raw, _ = compress(model, plan, "planned", data.example_input)
    teacher_digest = weights_digest(model)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    student = cm_raw.module

    def gap() -> float:  # KL(teacher || student) at the distillation temperature
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(torch.log_softmax(student(data.x) / 4, 1),
                                                    torch.log_softmax(model(data.x) / 4, 1),
                                                    log_target=True, reduction="batchmean"))

    gap_before, top1_before = gap(), evaluate(student, data).top1
    history = distill_(student, model, loader, FineTuneConfig(epochs=6, lr=0.001), progress=False)
    assert len(history) == 6 and history[-1]["steps"] == 6 * len(loader)
    assert gap() < 0.7 * gap_before
    assert evaluate(student, data).top1 > top1_before
    assert weights_digest(model) == teacher_digest
    assert not student.training


def test_fine_tuned_apply_records_both_accuracies(tmp_path, setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("macs=0.5")])
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    m = apply_plan(model, plan, data, tmp_path, calib=calib, train_loader=loader,
                   finetune=FineTuneConfig(epochs=2, lr=0.001), model_spec=SPEC, timing=False)
    assert [h["epoch"] for h in m["fine_tune"]["history"]] == [1, 2]
    # without fine-tuning it is exactly the executor's plain result, the one the scan predicts
    raw, _ = compress(model, plan, "planned", data.example_input, calib=calib)
    plain = evaluate(raw.module, data)
    assert m["after_without_finetune"]["score"] == plain.top1
    assert m["after_without_finetune"]["loss"] == pytest.approx(plain.loss, rel=1e-6)
    assert m["comparison"]["drop_without_finetune"]["measured"] == pytest.approx(1.0 - plain.top1)
    # fine-tuning changed the weights, not the architecture
    assert m["after"]["loss"] != pytest.approx(plain.loss, rel=1e-6)
    assert m["after"]["macs"] == plan.variant()["predicted"]["macs"]


def test_a_missed_budget_is_reported():
    metrics = {"budgets": [
        {"metric": "macs", "absolute": 100.0, "measured": 90.0, "met": True},
        {"metric": "size", "absolute": 1000.0, "measured": 1500.0, "met": False},
        {"metric": "latency_ms", "absolute": 1.0, "measured": None, "met": None}]}
    assert missed_budgets(metrics) == ["size: measured 1500 > budget 1000"]
    # a fraction of the original (here a latency of 2 ms): as fractions, not as the absolute values
    metrics = {"budgets": [{"metric": "latency", "value": 0.5, "kind": "fraction", "absolute": 1.0,
                            "measured": 1.5, "met": False}]}
    assert missed_budgets(metrics) == ["latency: measured 0.75 of the original > budget 0.5"]


def test_latency_is_measured(tmp_path, setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("macs=0.6")])
    m = apply_plan(model, plan, data, tmp_path, model_spec=SPEC, timing=True)
    for side in ("before", "after"):
        lat = m[side]["latency"]
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["iters"] >= 10
        assert lat["device"] == "cpu" and lat["threads"] == torch.get_num_threads()


def test_a_failure_while_apply_measures_leaves_the_previous_result_whole(tmp_path, setup, monkeypatch):
    import sensplan.planner._apply as apply_mod

    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("macs=0.8")])
    apply_plan(model, plan, data, tmp_path, calib=calib, model_spec=SPEC, timing=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"model.sensplan", "metrics.json", "plan.json"}

    def broken(*a, **k):
        raise RuntimeError("the measurement failed")

    monkeypatch.setattr(apply_mod, "measure", broken)
    with pytest.raises(RuntimeError, match="measurement failed"):
        apply_plan(model, make_plan(table, [Budget.parse("macs=0.6")]), data, tmp_path, calib=calib,
                   model_spec=SPEC, timing=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no .partial left either
