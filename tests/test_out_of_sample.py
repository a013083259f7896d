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


def test_apply_measures_the_report_half_no_choice_touched(ws, capsys):
    args = _scan(ws, "150", "scan.json")
    assert main(["plan", "--scan", str(ws / "scan.json"), "--budget", "size=0.5", "--verify-rounds", "1",
                 "--holdout-samples", "200", "--out", str(ws / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["apply", *args, "--plan", str(ws / "plan.json"), "--no-timing", "--variants", "planned",
                 "--out", str(ws / "result")]) == 0
    assert "note: --samples 150 is not used: apply measures on the report half" in capsys.readouterr().err
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
                 "--calib-samples", "50", "--train-data", "digits:test", "--out", str(ws / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--model-arg only matters with --model" in err
    assert "--resize, --calib-samples only shape --data; without --data, apply measures on the scan's data" in err
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
        # as many as with --data given: apply's --samples (default 2000), drawn outside
        assert metrics["after"]["n"] == len(load_eval_set(DataSpec.parse("digits"), None)) - 150 - 100
        # other weights given without --model, for a plan that names no file (weights set in Python):
        # refused by the digest of their values
        plan = json.loads((ws / "plan5.json").read_text())
        for k in ("weights", "weights_resolved", "weights_sha256"):
            plan["model"].pop(k, None)
        (ws / "nofile.json").write_text(json.dumps(plan))
        torch.save(digits_model(seed=3).state_dict(), ws / "other.pt")
        assert main(["apply", "--plan", str(ws / "nofile.json"), "--weights", str(ws / "other.pt"), "--no-timing",
                     "--out", str(ws / "other")]) == 2
        assert "are not the ones the plan was made from" in capsys.readouterr().err
        assert not (ws / "other").exists()
    finally:
        (ws / "moved.pt").rename(ws / "w.pt")


def test_without_data_the_training_data_is_read_as_the_scans_data_was(tmp_path):
    """apply --train-data without --data: the scan's preprocessing, class map and unreadable-image
    handling (text: its tokenizer and window length) apply to it, as they did to the scan's data;
    the flags that would say them are refused without --data."""
    import argparse

    from sensplan.cli._common import data_spec
    from sensplan.sensitivity import Preprocess

    recorded = DataSpec("imagefolder", str(tmp_path / "test"), "", Preprocess(resize=40, crop=32),
                        (("cat", 1), ("dog", 0)), True)
    args = argparse.Namespace(recorded_data=recorded, resize=None, crop=None, mean=None, std=None, class_map=None)
    (tmp_path / "train").mkdir()
    spec = data_spec(str(tmp_path / "train"), args, "--train-data")
    assert (spec.preprocess, spec.class_map, spec.skip_unreadable) == (recorded.preprocess, recorded.class_map, True)
    text = DataSpec("text", str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tok"), seq_len=32)
    args.recorded_data = text
    spec = data_spec(f"jsonl:{tmp_path / 'train.jsonl'}:text:label", args, "--train-data")
    assert (spec.kind, spec.tokenizer, spec.seq_len, spec.label_field) == ("jsonl", text.tokenizer, 32, "label")
