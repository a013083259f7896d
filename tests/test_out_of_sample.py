"""apply measures where the plan was not chosen: the report half of the verification's held-out
split, else the items outside the scan's sample and calibration; in-sample only when nothing is
left, and metrics.json says which."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sensplan.cli import main
from sensplan.planner import scan_sample, split_held
from sensplan.sensitivity import DataSpec, load_eval_set
from tests.conftest import digits_model

MODEL = ["--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--threads", "1"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("oos")
    torch.save(digits_model().state_dict(), ws / "w.pt")
    return ws


def _scan(ws, samples: str, out: str) -> list[str]:
    args = [*MODEL, "--weights", str(ws / "w.pt"), "--data", "digits", "--samples", samples,
            "--calib-samples", "100"]
    assert main(["scan", *args, "--bits", "8,4", "--ratios", "0.5", "--out", str(ws / out)]) == 0
    return args


def test_apply_measures_the_report_half_no_choice_touched(ws):
    args = _scan(ws, "150", "scan.json")
    assert main(["plan", "--scan", str(ws / "scan.json"), "--budget", "size=0.5", "--verify-rounds", "1",
                 "--holdout-samples", "200", "--out", str(ws / "plan.json")]) == 0
    assert main(["apply", *args, "--plan", str(ws / "plan.json"), "--no-timing", "--variants", "planned",
                 "--out", str(ws / "result")]) == 0
    metrics = json.loads((ws / "result" / "metrics.json").read_text())
    assert metrics["measured_on"].startswith("the report half of the held-out split (100 items")
    assert metrics["after"]["n"] == metrics["before"]["n"] == 100
    # the very items the plan's expected drop was measured on, and none the scan or the choice saw
    plan = json.loads((ws / "plan.json").read_text())
    assert plan["plans"]["planned"]["verified"]["report"]["n"] == 100
    table = json.loads((ws / "scan.json").read_text())
    sample, calib, exclude, dspec = scan_sample(table["data"], table["calibration"], "")
    draw = plan["verification"]["held_out_draw"]
    held, report = split_held(load_eval_set(dspec, draw["n"], draw["seed"], exclude=exclude), draw["split_seed"], [])
    assert not set(report.indices.tolist()) & (set(exclude.tolist()) | set(held.indices.tolist()))


def test_an_unverified_plan_is_measured_outside_the_scans_sample(ws):
    args = _scan(ws, "150", "scan2.json")
    assert main(["plan", "--scan", str(ws / "scan2.json"), "--budget", "size=0.5", "--no-verify",
                 "--out", str(ws / "plan2.json")]) == 0
    assert main(["apply", *args, "--plan", str(ws / "plan2.json"), "--no-timing", "--variants", "planned",
                 "--out", str(ws / "result2")]) == 0
    metrics = json.loads((ws / "result2" / "metrics.json").read_text())
    total = len(load_eval_set(DataSpec.parse("digits"), None))
    assert metrics["measured_on"].endswith("items of --data outside the scan's sample and calibration (out of sample)")
    assert metrics["after"]["n"] == min(150, total - 150 - 100)  # apply's --samples, drawn outside


def test_with_nothing_left_outside_the_sample_the_numbers_say_they_are_in_sample(ws, capsys):
    args = _scan(ws, "0", "scan3.json")  # --samples 0: the whole data set is the sample
    assert main(["plan", "--scan", str(ws / "scan3.json"), "--budget", "size=0.5", "--no-verify",
                 "--out", str(ws / "plan3.json")]) == 0
    assert main(["apply", *args, "--plan", str(ws / "plan3.json"), "--no-timing", "--variants", "planned",
                 "--out", str(ws / "result3")]) == 0
    metrics = json.loads((ws / "result3" / "metrics.json").read_text())
    assert metrics["measured_on"].startswith("the scan's sample (in-sample")
    assert "the measured numbers are in-sample" in capsys.readouterr().err
    assert np.isfinite(metrics["after"]["score"])


def test_apply_without_model_or_data_takes_both_from_the_plan(ws, capsys):
    """plan.json records the model (spec, weights and digest) and the scan's data: apply rebuilds
    them and measures exactly what it measures when they are given."""
    args = _scan(ws, "150", "scan4.json")
    assert main(["plan", "--scan", str(ws / "scan4.json"), "--budget", "size=0.5", "--verify-rounds", "1",
                 "--holdout-samples", "200", "--out", str(ws / "plan4.json")]) == 0
    common = ["--plan", str(ws / "plan4.json"), "--no-timing", "--variants", "planned", "--threads", "1"]
    assert main(["apply", *args, *common, "--out", str(ws / "given")]) == 0
    capsys.readouterr()
    assert main(["apply", *common, "--out", str(ws / "recorded")]) == 0
    err = capsys.readouterr().err
    assert "model: sensplan:digits_cnn, as the plan records it" in err
    assert "data: digits:test, as the plan records it" in err
    given, recorded = (json.loads((ws / d / "metrics.json").read_text()) for d in ("given", "recorded"))
    for side in ("before", "after"):
        assert recorded[side]["score"] == given[side]["score"] and recorded[side]["n"] == given[side]["n"] == 100
    assert recorded["measured_on"].startswith("the report half of the held-out split (100 items of the scan's data")


def test_apply_without_model_or_data_refuses_flags_that_only_shape_them(ws, capsys):
    _scan(ws, "150", "scan5.json")
    assert main(["plan", "--scan", str(ws / "scan5.json"), "--budget", "size=0.5", "--no-verify",
                 "--out", str(ws / "plan5.json")]) == 0
    assert main(["apply", "--plan", str(ws / "plan5.json"), "--model-arg", "width=8", "--resize", "8",
                 "--samples", "50", "--train-data", "digits:test", "--out", str(ws / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--model-arg only matters with --model" in err
    assert "--resize, --samples only shape --data; without --data, apply measures on the scan's data" in err
    assert "--train-data digits:test is the data the model is measured on (the scan's data digits:test)" in err
    assert not (ws / "refused").exists()
    # the recorded weights file moved: one line naming the fix; --weights finds it (checked by sha256)
    (ws / "w.pt").rename(ws / "moved.pt")
    try:
        assert main(["apply", "--plan", str(ws / "plan5.json"), "--no-timing", "--variants", "planned",
                     "--out", str(ws / "moved")]) == 2
        assert "Applying the plan needs the weights the scan measured" in capsys.readouterr().err
        assert main(["apply", "--plan", str(ws / "plan5.json"), "--weights", str(ws / "moved.pt"), "--no-timing",
                     "--variants", "planned", "--threads", "1", "--out", str(ws / "moved")]) == 0
        metrics = json.loads((ws / "moved" / "metrics.json").read_text())
        assert metrics["measured_on"].endswith("items of the scan's data outside the scan's sample and calibration "
                                               "(out of sample)")
        assert metrics["after"]["n"] == min(150, len(load_eval_set(DataSpec.parse("digits"), None)) - 150 - 100)
    finally:
        (ws / "moved.pt").rename(ws / "w.pt")
