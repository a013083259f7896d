import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sensplan import IncompatibleModelError
from sensplan.planner import (
    Budget,
    FineTuneConfig,
    Plan,
    apply_plan,
    compress,
    distill_,
    load_compressed,
    load_metrics,
    make_plan,
)
from sensplan.sensitivity import ModelSpec, ScanConfig, count_macs, evaluate, scan
from sensplan.sensitivity._models import weights_digest
from tests.conftest import seeded_model, self_labelled

SPEC = ModelSpec("sensplan:tiny_resnet")


@pytest.fixture(scope="module")
def setup():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 96)
    calib = self_labelled(model, 48, seed=9)
    table = scan(model, data, ScanConfig(bits=(8, 4, 2), ratios=(0.25, 0.5, 0.75)), calib=calib,
                 model_spec=SPEC, progress=False)
    return model, data, calib, table


@pytest.mark.parametrize("budget", ["macs=0.6", "size=0.3", "params=0.5", "bops=0.2"])
def test_measured_costs_equal_the_plans_prediction(tmp_path, setup, budget):
    model, data, calib, table = setup
    before = weights_digest(model)
    plan = make_plan(table, [Budget.parse(budget)]).save(tmp_path / "plan.json")
    m = apply_plan(model, plan, data, tmp_path / "out", calib=calib, model_spec=SPEC, timing=False)
    assert weights_digest(model) == before  # the user's model is never modified
    for metric in ("macs", "params", "size", "bops"):
        assert m["comparison"][metric]["ratio"] == pytest.approx(1.0, abs=1e-6), metric
    assert all(b["met"] for b in m["budgets"])
    # the file holds what was promised, plus a small header
    assert 0 < m["after"]["file_bytes"] - m["after"]["payload_bytes"] < 4096
    assert m["after"]["reload_max_abs_diff"] == 0.0
    assert load_metrics(tmp_path / "out")["variant"] == "planned"
    assert Plan.load(tmp_path / "out" / "plan.json").data == plan.data


def _single_unit_plan(table, base: Plan, unit: str, kind: str, setting) -> Plan:
    data = copy.deepcopy(dict(base.data))
    alloc = data["plans"]["planned"]
    for e in alloc["prune"].values():
        e.update(n_remove=0, ratio=0.0)
    for e in alloc["quantize"].values():
        e["bits"] = 32
    if kind == "prune":
        alloc["prune"][unit].update(n_remove=setting, ratio=0.5)
    else:
        alloc["quantize"][unit]["bits"] = setting
    return Plan(data)


def test_executor_measures_exactly_what_the_scan_probe_measured(setup):
    """The scan's claim for one unit is the executor's result for a plan of that unit alone."""
    model, data, calib, table = setup
    base = make_plan(table, [Budget.parse("macs=0.9")])
    checked = 0
    for r in table.results:
        setting = r["n_remove"] if r["kind"] == "prune" else r["bits"]
        if r["kind"] == "quantize" and r["bits"] != 2:
            continue
        plan = _single_unit_plan(table, base, r["unit"], r["kind"], setting)
        cm, _ = compress(model, plan, "planned", data.example_input, calib=calib)
        got = evaluate(cm.module, data)
        assert got.top1 == pytest.approx(r["top1"], abs=1e-9), (r["unit"], setting)
        assert got.loss == pytest.approx(r["loss"], rel=1e-4, abs=1e-5), (r["unit"], setting)
        checked += 1
    assert checked >= 9


def test_compressed_file_round_trip_without_the_original_factory_object(tmp_path, setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("size=0.3")])
    m = apply_plan(model, plan, data, tmp_path, calib=calib, model_spec=SPEC, timing=False)
    rebuilt = load_compressed(tmp_path / "model.sensplan")  # built from the spec recorded in the file
    assert evaluate(rebuilt, data).top1 == pytest.approx(m["after"]["top1"])
    assert sum(count_macs(rebuilt, data.example_input).values()) == m["after"]["macs"]
    with pytest.raises(IncompatibleModelError, match="not the architecture"):
        load_compressed(tmp_path / "model.sensplan", seeded_model("tiny_resnet", width=16))


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
    assert m["fine_tune"]["history"][-1]["epoch"] == 2
    assert m["after_without_finetune"]["top1"] <= 1.0
    assert m["comparison"]["macs"]["ratio"] == pytest.approx(1.0)


def test_latency_is_measured(tmp_path, setup):
    model, data, calib, table = setup
    plan = make_plan(table, [Budget.parse("macs=0.6")])
    m = apply_plan(model, plan, data, tmp_path, model_spec=SPEC, timing=True)
    for side in ("before", "after"):
        lat = m[side]["latency"]
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["iters"] >= 10
