"""The planner checks its own prediction: it measures the plan, corrects the additive drop model and
solves again, measures the uniform candidates, and keeps the best measured candidate.

The model is tiny and exact: logits = fc2(fc1(x)) with both layers the 2x2 identity, and the label
says which of the two inputs is larger, by a margin of 0.35 to 0.55. Two toy methods, registered
here, perturb a layer's weight by adding a multiple of one input to the other output:

- ``nudge`` (8-bit weights): alone it shifts the first logit by at most 0.2 * 1.75 = 0.35, which no
  sample's margin is below, so each layer's scanned drop is exactly 0; on both layers the shifts
  add up to 0.4 * x1 >= 0.54 and flip most samples of one class. The additive model is provably wrong.
- ``nudge`` with ``sign=cancel`` adds all of input 1 on the first layer and takes it away again on the
  second: alone each layer flips many samples, together they cancel exactly (a drop of 0).
- ``placebo`` (16-bit weights) flips the few samples of the other class whose margin is below 0.3 * x0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sensplan import UserInputError
from sensplan.planner import Budget, Verifier, make_plan
from sensplan.sensitivity import ScanConfig, WeightMethod, scan
from sensplan.sensitivity._data import EvalSet
from tests.conftest import registered


class Nudge(WeightMethod):
    name = "nudge"
    axis = "weight"
    stage = 30
    default_settings = ({"sign": "same"},)
    setting_key = "sign"
    description = "adds 0.2 * input 1 to output 0 (toy)"

    def check_setting(self, setting):
        return {"sign": setting.get("sign", "same")}

    def label(self, setting):
        return f"nudge {setting['sign']}"

    def effect(self, setting, unit):
        return {"weight_bits": 8}

    def transform(self, ctx, layer, w, setting):
        out = w.detach().clone()
        if setting["sign"] == "cancel":
            out[0, 1] += 1.0 if layer == "fc1" else -1.0
        else:
            out[0, 1] += 0.2
        return out


class Placebo(WeightMethod):
    name = "placebo"
    axis = "weight"
    stage = 30
    default_settings = ({"level": 1},)
    setting_key = "level"
    description = "adds 0.3 * input 0 to output 1 (toy)"

    def check_setting(self, setting):
        return {"level": 1}

    def label(self, setting):
        return "placebo"

    def effect(self, setting, unit):
        return {"weight_bits": 16}

    def transform(self, ctx, layer, w, setting):
        out = w.detach().clone()
        out[1, 0] += 0.3
        return out


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 2, bias=False)
        self.fc2 = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(2))
            self.fc2.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def margin_data(n: int, seed: int) -> EvalSet:
    g = torch.Generator().manual_seed(seed)
    x0 = 1.0 + 0.2 * torch.rand(n, generator=g)
    d = 0.35 + 0.2 * torch.rand(n, generator=g)
    y = torch.arange(n) % 2  # class 1: x1 > x0
    x1 = torch.where(y == 1, x0 + d, x0 - d)
    return EvalSet(torch.stack([x0, x1], 1), y, ["0", "1"], {"spec": f"margins:{seed}", "n": n})


@pytest.fixture
def toys():
    with registered(Nudge, Placebo):
        yield


def _scan(model, data, nudge_sign="same"):
    config = ScanConfig({"nudge": [{"sign": nudge_sign}], "placebo": [{"level": 1}]})
    return scan(model, data, config, progress=False)


def _choices(plan):
    return {c["unit"]: c["method"] for c in plan.variant()["choices"].values() if c.get("method")}


def test_compounding_errors_are_measured_corrected_and_solved_again(toys):
    model, data, held = Chain(), margin_data(400, 0), margin_data(400, 1)
    table = _scan(model, data)
    drops = {(r["unit"], r["method"]): r["drop"] for r in table.results}
    assert drops[("fc1", "nudge")] == 0 and drops[("fc2", "nudge")] == 0  # each alone is free
    assert drops[("fc1", "placebo")] > 0

    # 12 bytes: both layers at 8 bits (8 B) or one at 8 and one at 16 bits (12 B)
    budget = [Budget.parse("size=12B")]
    unverified = make_plan(table, budget, signal="drop")  # the corrections are learned on drops
    assert _choices(unverified) == {"fc1": "nudge", "fc2": "nudge"}
    assert unverified.variant()["predicted"]["drop"] == 0

    report = margin_data(400, 2)
    plan = make_plan(table, budget, verifier=Verifier(model, data, None, held, report=report), rounds=3,
                     signal="drop")
    ver = plan.data["verification"]
    first = ver["rounds"][0]
    assert first["predicted"]["drop"] == 0
    assert first["sample"]["drop"] > 0.3  # the additive model missed half the samples
    assert not first["within_interval"]
    bucket = first["correction"][0]
    assert bucket["units"] == 2 and bucket["additive"] == 0 and bucket["joint"] > 0.3
    assert bucket["rate_per_pair"] == bucket["joint"]  # one pair of units
    second = ver["rounds"][1]
    # the corrected model prices the pair, and predicts the new plan within a few samples
    assert second["predicted"]["drop"] > 0
    assert abs(second["predicted"]["drop"] - second["sample"]["drop"]) < 0.03
    # the re-solved plan keeps one nudge and measures far better than the first round
    assert sorted(_choices(plan).values()) == ["nudge", "placebo"]
    assert plan.variant()["verified"]["held_out"]["drop"] < 0.05
    assert ver["winner"]["kind"] == "plan" and ver["winner"]["name"] != "plan round 1"
    # the corrected round's total includes what was learned: with the signal drop, it is the drop
    assert plan.variant()["predicted"]["signal_total"] == pytest.approx(plan.variant()["predicted"]["drop"])
    # the only uniform candidate within the budget is nudge everywhere: measured, and beaten
    assert [u["label"] for u in ver["uniform"]] == ["nudge same"]
    assert ver["vs_best_uniform"]["advantage"] > 0.3
    assert "wins" in ver["verdict"]
    # what to expect is measured where no correction or choice looked: the report split
    expected, verified = plan.variant()["expected"], plan.variant()["verified"]
    assert expected["measured_on"] == "report split (no choice touched it)"
    assert expected["drop"] == verified["report"]["drop"] and verified["report"]["n"] == 400
    assert ver["split"] == {"sample": 400, "held_out": 400, "report": 400}
    assert all(r["seconds"] >= 0 for r in ver["rounds"] if "seconds" in r)


def test_uniform_is_chosen_when_it_measures_better(toys):
    model, data, held = Chain(), margin_data(400, 0), margin_data(400, 1)
    table = _scan(model, data, nudge_sign="cancel")
    drops = {(r["unit"], r["method"]): r["drop"] for r in table.results}
    assert drops[("fc1", "nudge")] > 0.2 and drops[("fc2", "nudge")] > 0.2  # alone: harmful
    plan = make_plan(table, [Budget.parse("size=16B")], verifier=Verifier(model, data, None, held))
    ver = plan.data["verification"]
    # the solver's plan (placebo everywhere) is what the additive model likes best ...
    assert ver["rounds"][0]["predicted"]["drop"] < 0.1
    # ... but nudging both layers cancels exactly, and that uniform candidate is measured
    cancel = next(u for u in ver["uniform"] if u["label"] == "nudge cancel")
    assert cancel["held_out"]["drop"] == 0 and cancel["predicted"]["drop"] > 0.4
    assert ver["winner"] == {"name": "uniform nudge cancel", "kind": "uniform"}
    assert ver["verdict"].startswith("uniform wins")
    assert _choices(plan) == {"fc1": "nudge", "fc2": "nudge"}
    assert plan.variant()["verified"]["held_out"]["drop"] == 0
    assert plan.variant()["predicted"]["size"] <= 16


def test_the_report_shows_rounds_uniform_points_and_the_verdict(toys, tmp_path):
    from sensplan.reports import render_report

    model, data, held = Chain(), margin_data(400, 0), margin_data(400, 1)
    table = _scan(model, data).save(tmp_path / "scan.json")
    plan = make_plan(table, [Budget.parse("size=12B")], verifier=Verifier(model, data, None, held))
    plan = plan.save(tmp_path / "plan.json")
    doc = render_report(tmp_path / "scan.json", tmp_path / "report", plan=tmp_path / "plan.json").read_text()
    section = doc.split("<h2>Verification</h2>", 1)[1].split("<h2>", 1)[0]
    assert plan.data["verification"]["verdict"] in section
    assert "round 1" in section and "outside: corrected" in section and "uniform nudge same" in section
    assert (tmp_path / "report" / "verification.png").read_bytes().startswith(b"\x89PNG")


def test_max_drop_mode_and_a_single_round(toys):
    model, data, held = Chain(), margin_data(400, 0), margin_data(400, 1)
    table = _scan(model, data)
    plan = make_plan(table, [], max_drop=0.1, minimize="size", rounds=1,
                     verifier=Verifier(model, data, None, held))
    ver = plan.data["verification"]
    assert len(ver["rounds"]) == 1 and "correction" not in ver["rounds"][0]
    # placebo on both layers compounds as well (0.3 * x0 twice): every compressed candidate measured
    # here drops half the samples, far outside the max-drop, so the plan is to compress nothing
    assert ver["rounds"][0]["held_out"]["drop"] > 0.4
    assert {u["label"] for u in ver["uniform"]} == {"nudge same", "placebo", "no compression"}
    assert ver["winner"] == {"name": "uniform no compression", "kind": "uniform"}
    assert _choices(plan) == {} and plan.variant()["verified"]["held_out"]["drop"] == 0
    assert ver["cost_metric"] == "size" and ver["winner_cost"] == plan.variant()["predicted"]["size"]
    assert "no planned round measured within the max-drop" in ver["verdict"]


def test_the_held_out_split_is_disjoint_and_the_sample_is_the_scans(tmp_path):
    from sensplan.cli import main
    from sensplan.planner import verifier_from_scan
    from sensplan.sensitivity import Scan
    from tests.conftest import digits_model

    weights = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), weights)
    assert main(["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits", "--samples", "150", "--calib-samples", "100", "--bits", "8",
                 "--no-prune", "--out", str(tmp_path / "scan.json")]) == 0
    table = Scan.load(tmp_path / "scan.json")
    v, notes = verifier_from_scan(table, holdout_samples=None)
    assert not [n for n in notes if "rebuilt model scores" in n]  # it scores what the scan measured
    assert v.data.description["indices_sha256"] == table.data["data"]["indices_sha256"]
    assert v.calib.description["indices_sha256"] == table.data["calibration"]["indices_sha256"]
    sample, calib, held, report = (set(x.indices.tolist()) for x in (v.data, v.calib, v.held, v.report))
    parts = [sample, calib, held, report]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert abs(len(held) - len(report)) <= 1  # halves: choose on one, report on the other
    assert len(sample | calib | held | report) == table.data["data"]["n_available"]  # the rest is held out
    # --holdout-data naming the scan's own data still leaves the sample and calibration out
    v2, _ = verifier_from_scan(table, holdout="digits", holdout_samples=None)
    assert set(v2.held.indices.tolist()) | set(v2.report.indices.tolist()) == held | report


def test_with_the_data_used_up_the_note_names_the_calibration_that_took_it(tmp_path):
    """digits:test has 540 items: a 200-item sample leaves 340, and the default 500 calibration
    samples take them all. The note says so and names the scan's flags that leave items over."""
    from sensplan.cli import main
    from sensplan.planner import verifier_from_scan
    from sensplan.sensitivity import Scan
    from tests.conftest import digits_model

    weights = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), weights)
    assert main(["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits:test", "--samples", "200", "--bits", "8", "--no-prune",
                 "--out", str(tmp_path / "scan.json")]) == 0
    table = Scan.load(tmp_path / "scan.json")
    v, notes = verifier_from_scan(table, holdout_samples=100)
    assert v.held is None
    note = next(n for n in notes if "has no items outside" in n)
    n_calib = table.data["calibration"]["n"]
    assert n_calib == table.data["data"]["n_available"] - 200
    assert f"its sample took 200 and the calibration {n_calib}" in note
    assert "--calib-samples" in note and "--calib-data" in note and "--holdout-data" in note
    # a sample of everything: the calibration reuses it, so a smaller --calib-samples would free nothing
    assert main(["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits:test", "--samples", "2000", "--bits", "8", "--no-prune",
                 "--out", str(tmp_path / "all.json")]) == 0
    _, notes = verifier_from_scan(Scan.load(tmp_path / "all.json"), holdout_samples=100)
    note = next(n for n in notes if "has no items outside" in n)
    assert "its sample took" not in note and "--calib-samples" not in note


def test_an_unverified_plan_still_carries_an_interval(toys):
    model, data = Chain(), margin_data(200, 0)
    plan = make_plan(_scan(model, data), [Budget.parse("size=16B")])
    p = plan.variant()["predicted"]
    lo, hi = p["drop_interval"]
    assert lo <= p["drop"] <= hi
    assert math.isclose(hi - p["drop"], 1.96 * p["drop_se"])
    assert "verification" not in plan.data


def test_sensplan_plan_verifies_on_the_scans_model_and_data_by_default(tmp_path, capsys):
    from sensplan.cli import main
    from tests.conftest import digits_model, seeded_model

    weights = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), weights)
    scan_args = ["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits", "--samples", "150", "--calib-samples", "100", "--bits", "8,2",
                 "--ratios", "0.5", "--out", str(tmp_path / "scan.json")]
    assert main(scan_args) == 0
    out = tmp_path / "plan.json"
    assert main(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.3",
                 "--verify-rounds", "2", "--holdout-samples", "200", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "round 1: predicted drop" in err and "verdict: " in err
    plan = json.loads(out.read_text())
    ver = plan["verification"]
    # --holdout-samples 200: chosen on 100 of them, what to expect measured on the other 100
    assert ver["split"] == {"sample": 150, "held_out": 100, "report": 100} and ver["chosen_on"] == "held-out split"
    assert 1 <= len(ver["rounds"]) <= 2 and ver["uniform"]
    verified = plan["plans"]["planned"]["verified"]
    assert verified["held_out"]["n"] == 100 and verified["report"]["n"] == 100
    assert plan["plans"]["planned"]["expected"]["drop"] == verified["report"]["drop"]
    # planning again (another process) measures nothing twice: scan.json.verified kept it all
    memo = tmp_path / "scan.json.verified"
    assert memo.is_file()
    again = ["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.3", "--verify-rounds", "2",
             "--holdout-samples", "200"]
    assert main([*again, "--out", str(tmp_path / "again.json")]) == 0
    redone = json.loads((tmp_path / "again.json").read_text())
    counts = redone["verification"]["measurements"]
    assert "measurements" not in counts and counts["measurements from an earlier run"] > 0
    assert redone["plans"]["planned"]["choices"] == plan["plans"]["planned"]["choices"]
    memo.unlink()
    assert main([*again, "--no-memo", "--out", str(tmp_path / "again.json")]) == 0
    assert not memo.exists()
    capsys.readouterr()

    # the checkpoint changed since the scan: verification refuses, naming the way out
    torch.save(seeded_model("digits_cnn", width=8, seed=1).state_dict(), weights)
    code = main(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.3", "--out",
                 str(tmp_path / "p2.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--no-verify" in err and "sha256" in err
    assert not (tmp_path / "p2.json").exists()
    assert main(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.3", "--no-verify",
                 "--out", str(tmp_path / "p2.json")]) == 0
    assert "verification" not in json.loads((tmp_path / "p2.json").read_text())


def test_verification_measures_in_the_scans_dtype_and_leaves_the_model_alone(tmp_path):
    from sensplan.cli import main
    from sensplan.planner import verifier_from_scan
    from sensplan.sensitivity import Scan
    from tests.conftest import digits_model, seeded_model

    weights = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), weights)
    assert main(["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits", "--samples", "150", "--calib-samples", "100", "--bits", "8",
                 "--no-prune", "--dtype", "bfloat16", "--out", str(tmp_path / "scan.json")]) == 0
    table = Scan.load(tmp_path / "scan.json")
    v, notes = verifier_from_scan(table, holdout_samples=200)
    assert v.dtype == torch.bfloat16
    # evaluated under bfloat16 autocast as the scan was, the rebuilt model scores what the scan measured
    assert not [n for n in notes if "rebuilt model scores" in n]
    assert v.baseline("classification")["sample"] == table.baseline["score"]

    model = seeded_model("digits_cnn", width=8).train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    Verifier(model, v.data, v.calib, v.held).baseline("classification")
    assert model.training
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_a_plan_ahead_of_uniform_within_noise_is_kept_and_called_close():
    """The winner is the least measured drop: the uniform side is the best of several candidates on
    the same split, so a head start for it (the old rule: a plan ahead by no more than one paired
    standard error was a tie, and uniform was kept) stacked a second bias on the winner's curse.
    A margin within one paired standard error is recorded as a close call; an exact tie goes to
    uniform."""
    from sensplan.planner._verify import Measured, _Pick, _within_noise

    def measured(wrong):
        per = torch.ones(1000)
        per[list(wrong)] = 0
        return Measured(drop=len(wrong) / 1000, se=0.0, score=1 - len(wrong) / 1000, n=1000, per_sample=per)

    # the plan gets 10 samples more right than uniform: 0.01 against a paired se of sqrt(9.9) / 1000
    assert _within_noise(measured([]), measured(range(10))) is None
    # 5 right that uniform gets wrong, 3 wrong that uniform gets right: 0.002 within sqrt(7.996) / 1000
    close = _within_noise(measured(range(100, 103)), measured(range(5)))
    assert close is not None and math.isclose(close["advantage"], 0.002)
    assert math.isclose(close["se"], math.sqrt(8 - 4 / 1000) / 1000)
    # without per-sample scores there is nothing to pair: nothing is called close
    assert _within_noise(Measured(0.0, 0.0, 1.0, 10), Measured(0.001, 0.0, 0.999, 10)) is None

    def cand(name, kind, m):
        return {"name": name, "kind": kind, "held": m, "sample": None, "costs": {"size": 1.0}}

    plan = cand("plan round 1", "plan", measured(range(100, 103)))
    uniforms = [cand("uniform int4", "uniform", measured(range(5))),
                cand("uniform int3", "uniform", measured(range(20)))]
    pick = _Pick([plan, *uniforms], "held", None, "size")
    assert pick.winner is plan and pick.best_uniform is uniforms[0]
    assert pick.close == {**close, "winner": "plan round 1", "runner_up": "uniform int4"}
    # uniform ahead within noise: it wins, called close the same way
    pick = _Pick([cand("plan round 1", "plan", measured(range(5))), *uniforms[1:],
                  cand("uniform int5", "uniform", measured(range(100, 103)))], "held", None, "size")
    assert pick.winner["name"] == "uniform int5" and pick.close["runner_up"] == "plan round 1"
    # the same samples wrong: an exact tie, and uniform is the simpler of the two
    pick = _Pick([cand("plan round 1", "plan", measured(range(5))), uniforms[0]], "held", None, "size")
    assert pick.winner is uniforms[0] and pick.close is not None and pick.close["advantage"] == 0.0


def test_max_drop_mode_keeps_a_candidate_only_when_confidently_within_it():
    """The cheapest candidate under the max-drop by its point estimate alone may have been lucky: of
    a dozen candidates, one usually is. A candidate counts when its drop plus 1.645 standard errors
    (one-sided 95%) is within the max-drop."""
    from sensplan.planner._verify import Measured, _Pick, within_max_drop

    def cand(name, kind, drop, se, cost):
        m = Measured(drop, se, 1 - drop, 2000)
        return {"name": name, "kind": kind, "held": m, "sample": None, "costs": {"size": cost}}

    lucky = cand("plan round 1", "plan", 0.009, 0.003, 100.0)   # 0.009 + 1.645 * 0.003 = 0.0139
    safe = cand("uniform int8", "uniform", 0.004, 0.002, 150.0)   # 0.004 + 1.645 * 0.002 = 0.0073
    assert not within_max_drop(lucky["held"], 0.01) and within_max_drop(safe["held"], 0.01)
    pick = _Pick([lucky, safe], "held", 0.01, "size")
    assert pick.winner is safe
    # with nothing confidently within it, the least drop is kept
    worse = cand("uniform int4", "uniform", 0.02, 0.001, 50.0)
    assert _Pick([lucky, worse], "held", 0.01, "size").winner is lucky


def test_pair_penalties_are_fitted_where_the_units_drops_were_measured():
    """A bucket of units whose joint drop on the scan's sample is just the sum of their drops has no
    interaction to learn, whatever the held-out split says: there every unit is off by the same
    amount (the winner's curse, the split's shift), which grows with the units, not with the pairs.
    That excess becomes a surcharge per unit; fitted as pairs it over-penalised large buckets."""
    from sensplan.planner import Costs
    from sensplan.planner._plan import allocation
    from sensplan.planner._verify import Measured, _Correction
    from tests.tables import synthetic_scan

    table = synthetic_scan(n_groups=0, n_layers=6, bits=(8, 4), concat=False, seed=3)
    cm = Costs(table)
    int4 = 'weight_quant:{"bits":4}'
    choice = {i: [o.key for o in b.options].index(int4) for i, b in enumerate(cm.blocks) if b.axis == "weight"}
    alloc = allocation(cm, choice, table)
    scanned = cm.drop_table()
    shift = 0.004  # per unit, on the held-out split only

    class Measuring:
        def measure(self, data, alloc, *, held=True, sample=True):
            units = [cm.index[n] for n, c in alloc["choices"].items() if c["method"]]
            add = sum(scanned[i][choice[i]] for i in units)
            return (Measured(add, 0.0, 1 - add, 1000) if sample else None,
                    Measured(add + shift * len(units), 0.0, 1 - add, 1000) if held else None)

    corr = _Correction(cm, cm)
    held_drop = sum(scanned[i][o] for i, o in choice.items()) + shift * len(choice)
    records = corr.learn(choice, alloc, held_drop, {}, Measuring())
    assert records[0]["split"] == "scan sample" and records[0]["units"] == len(choice)
    assert corr.rates[int4] == 0.0 and corr.penalties() == []
    assert corr.per_unit[int4] == pytest.approx(shift)


def test_the_held_out_split_excludes_the_sample_however_its_folder_is_spelled(tmp_path, monkeypatch):
    """``--data imgs``, ``--holdout-data imgs/`` or the absolute path, or a symlink to the folder:
    the same images, so the scan's sample and calibration stay out of the held-out split (compared
    as spelled, they did not, and the "held-out" verdict was measured on the scan's own images)."""
    from PIL import Image

    from sensplan.cli import main
    from sensplan.planner import verifier_from_scan
    from sensplan.sensitivity import Scan
    from tests.conftest import seeded_model

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    (tmp_path / "link").symlink_to(tmp_path / "imgs")
    torch.save(seeded_model("tiny_convnet").state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["scan", "--model", "sensplan:tiny_convnet", "--weights", "w.pt", "--data", "imgs",
                 "--samples", "40", "--calib-samples", "20", "--bits", "8", "--no-prune", "--threads", "1",
                 "--out", "scan.json"]) == 0
    table = Scan.load("scan.json")
    for spelled in ("imgs/", str(tmp_path / "imgs"), "link", "./imgs"):
        v, _ = verifier_from_scan(table, holdout=spelled, holdout_samples=None)
        used = set(v.data.indices.tolist()) | set(v.calib.indices.tolist())
        held = set(v.held.indices.tolist()) | (set(v.report.indices.tolist()) if v.report is not None else set())
        assert len(held) == 120 - len(used) and not held & used, spelled


def test_a_race_stops_a_uniform_candidate_clearly_worse_than_the_plan_and_changes_no_verdict(toys, monkeypatch):
    import sensplan.planner._verify as verify_mod

    model, data, held = Chain(), margin_data(400, 0), margin_data(2400, 1)
    table = _scan(model, data)
    raced = make_plan(table, [Budget.parse("size=16B")], verifier=Verifier(model, data, None, held))
    z = verify_mod.RACE_Z
    monkeypatch.setattr(verify_mod, "RACE_Z", math.inf)  # no race: every candidate measured in full
    full = make_plan(table, [Budget.parse("size=16B")], verifier=Verifier(model, data, None, held))
    rv, fv = raced.data["verification"], full.data["verification"]
    stopped = [u for u in rv["uniform"] if u["held_out"].get("stopped_early")]
    assert stopped and rv["measurements"]["candidates stopped early"] == len(stopped)
    for u in stopped:  # measured on the stratified first quarter, clearly worse than the plan there
        assert u["held_out"]["n"] == 600
        s = u["held_out"]["stopped_early"]
        assert s["worse_by"] - z * s["se"] > verify_mod.TOLERANCE
        whole = next(f for f in fv["uniform"] if f["label"] == u["label"])["held_out"]
        assert whole["n"] == 2400 and whole["drop"] > min(r["held_out"]["drop"] for r in rv["rounds"])
    assert rv["winner"] == fv["winner"] and _choices(raced) == _choices(full)
    assert raced.variant()["verified"] == full.variant()["verified"]


def test_a_verifier_measures_each_candidate_once_across_budgets_and_plans(toys):
    model, data, held = Chain(), margin_data(400, 0), margin_data(400, 1)
    table = _scan(model, data)
    verifier = Verifier(model, data, None, held)
    first = make_plan(table, [Budget.parse("size=12B")], verifier=verifier)
    again = make_plan(table, [Budget.parse("size=12B")], verifier=verifier)
    assert first.data["verification"]["measurements"]["measurements"] > 0
    assert "measurements" not in again.data["verification"]["measurements"]
    assert again.data["verification"]["measurements"]["measurements reused"] > 0
    strip = ("seconds", "uniform_seconds", "measurements")

    def timeless(v):
        return {k: [{a: b for a, b in r.items() if a != "seconds"} for r in x] if k == "rounds" else x
                for k, x in v.items() if k not in strip}

    assert timeless(again.data["verification"]) == timeless(first.data["verification"])


def test_a_memo_file_gives_a_fresh_verifier_what_an_earlier_one_measured(toys, tmp_path):
    """`sensplan plan` keeps verification's measurements beside scan.json: a later run (a fresh
    verifier, as a new process has) measures nothing it measured before, and decides the same;
    other held-out data (or another model) starts the file again."""
    model, data, held = Chain(), margin_data(400, 0), margin_data(400, 1)
    table = _scan(model, data)
    memo = tmp_path / "scan.json.verified"
    first_v = Verifier(model, data, None, held, memo=memo)
    first = make_plan(table, [Budget.parse("size=12B")], verifier=first_v)
    first_v.close()
    measured = first.data["verification"]["measurements"]["measurements"]
    assert measured > 0 and memo.is_file()
    again_v = Verifier(model, data, None, held, memo=memo)
    again = make_plan(table, [Budget.parse("size=12B")], verifier=again_v)
    again_v.close()
    counts = again.data["verification"]["measurements"]
    assert "measurements" not in counts
    assert counts["measurements from an earlier run"] == counts["measurements reused"] > 0
    strip = ("seconds", "uniform_seconds", "measurements")

    def timeless(v):
        return {k: [{a: b for a, b in r.items() if a != "seconds"} for r in x] if k == "rounds" else x
                for k, x in v.items() if k not in strip}

    assert timeless(again.data["verification"]) == timeless(first.data["verification"])
    assert again.variant()["choices"] == first.variant()["choices"]
    # the per-sample scores came back exactly: paired comparisons (a race, a close call) hold
    key = next(k for k in again_v._memo if k[1] == "held")
    assert torch.equal(again_v._memo[key].per_sample.cpu(), first_v._memo[key].per_sample.cpu())
    other_v = Verifier(model, data, None, margin_data(400, 2), memo=memo)
    other = make_plan(table, [Budget.parse("size=12B")], verifier=other_v)
    other_v.close()
    counts = other.data["verification"]["measurements"]
    assert counts["measurements"] > 0 and "measurements from an earlier run" not in counts
    # the same positions with other contents (an edited held-out file): not the same data
    edited = margin_data(400, 2)
    edited = EvalSet(edited.x.flip(0), edited.y, edited.classes, edited.description)
    assert edited.description == margin_data(400, 2).description
    edited_v = Verifier(model, data, None, edited, memo=memo)
    counts = make_plan(table, [Budget.parse("size=12B")], verifier=edited_v).data["verification"]["measurements"]
    edited_v.close()
    assert "measurements from an earlier run" not in counts
    # two plans at once with other held-out data: the second starts the file again, and what the
    # first appends after that is not read as the second's
    a_v = Verifier(model, data, None, held, memo=memo)
    b_v = Verifier(model, data, None, margin_data(400, 2), memo=memo)
    make_plan(table, [Budget.parse("size=12B")], verifier=a_v)
    a_v.close()
    b_v.close()
    c_v = Verifier(model, data, None, margin_data(400, 2), memo=memo)
    counts = make_plan(table, [Budget.parse("size=12B")], verifier=c_v).data["verification"]["measurements"]
    c_v.close()
    assert "measurements from an earlier run" not in counts and counts["measurements"] > 0


@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_memo_record_gives_back_the_per_sample_scores_exactly(dtype):
    from sensplan.planner._verify import Measured, _measured_from_record, _measured_record

    per = (torch.arange(12).reshape(3, 4) % 3 == 0) if dtype == torch.bool else \
        (torch.arange(12, dtype=torch.float64).reshape(3, 4) / 7).to(dtype)
    back = _measured_from_record(json.loads(json.dumps(_measured_record(Measured(0.1, 0.01, 0.9, 3, per)))), "cpu")
    assert (back.drop, back.se, back.score, back.n) == (0.1, 0.01, 0.9, 3)
    assert back.per_sample.shape == per.shape and torch.equal(back.per_sample.to(per.dtype), per)
    assert back.per_sample.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)  # numpy has no bf16


def test_every_head_of_the_held_out_split_is_stratified():
    from sensplan.planner._verify import _interleaved

    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)  # sorted by class, as a folder is
    ds = EvalSet(torch.arange(1000.0)[:, None], labels, ["a", "b", "c"], {"spec": "s", "n": 1000}, np.arange(1000))
    mixed = _interleaved(ds)
    assert sorted(mixed.indices.tolist()) == list(range(1000))
    assert torch.equal(mixed.x[:, 0].long(), torch.as_tensor(mixed.indices))
    for n in (100, 250, 500):
        counts = torch.bincount(mixed.y[:n], minlength=3).tolist()
        assert all(abs(c - n * share) <= 1 for c, share in zip(counts, (0.6, 0.3, 0.1), strict=True))


def test_plan_workers_measure_the_uniform_candidates_as_one_process_does(tmp_path, capsys):
    """`sensplan plan --workers 2`: the uniform candidates go to two spawned processes that rebuild
    the verifier from scan.json; every measurement in plan.json equals the single process's."""
    from sensplan.cli import main
    from tests.conftest import digits_model

    weights = tmp_path / "w.pt"
    torch.save(digits_model().state_dict(), weights)
    assert main(["scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
                 "--data", "digits", "--samples", "150", "--calib-samples", "100", "--bits", "8,4,2",
                 "--ratios", "0.25,0.5", "--threads", "1", "--out", str(tmp_path / "scan.json")]) == 0
    plans = {}
    for workers in (1, 2):
        out = tmp_path / f"plan{workers}.json"
        assert main(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.3", "--threads", "1",
                     "--verify-rounds", "1", "--holdout-samples", "200", "--workers", str(workers),
                     "--no-memo", "--out", str(out)]) == 0  # the second run measures again, on workers
        plans[workers] = json.loads(out.read_text())
    one, two = plans[1]["verification"], plans[2]["verification"]
    assert len(one["uniform"]) >= 2  # something to spread
    assert two["measurements"].get("measurements on workers", 0) >= 2
    assert "measurements on workers" not in one["measurements"]
    assert [u["held_out"] for u in two["uniform"]] == [u["held_out"] for u in one["uniform"]]
    assert two["verdict"] == one["verdict"]
    assert plans[2]["plans"]["planned"]["verified"] == plans[1]["plans"]["planned"]["verified"]
    assert main(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.3", "--workers", "0",
                 "--out", str(tmp_path / "p0.json")]) == 2
    assert "--workers" in capsys.readouterr().err

    # planning again with the same verifier: what it measured is reused, nothing goes to the workers
    from sensplan._tables import Scan
    from sensplan.planner import verifier_from_scan

    table = Scan.load(tmp_path / "scan.json")
    verifier, _ = verifier_from_scan(table, holdout_samples=200, workers=2)
    try:
        first = make_plan(table, [Budget.parse("size=0.3")], verifier=verifier, rounds=1).data["verification"]
        again = make_plan(table, [Budget.parse("size=0.3")], verifier=verifier, rounds=1).data["verification"]
    finally:
        verifier.close()
    assert [u["held_out"] for u in again["uniform"]] == [u["held_out"] for u in first["uniform"]]
    assert "measurements on workers" not in again["measurements"] and again["measurements"]["measurements reused"]

    # scan.json rewritten after the verifier read it: the workers refuse, in one line
    verifier, _ = verifier_from_scan(table, holdout_samples=200, workers=2)
    (tmp_path / "scan.json").write_text((tmp_path / "scan.json").read_text() + "\n")
    try:
        with pytest.raises(UserInputError, match="changed since planning started"):
            make_plan(table, [Budget.parse("size=0.3")], verifier=verifier, rounds=1)
    finally:
        verifier.close()
