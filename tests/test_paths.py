"""Paths recorded in artifacts work from any working directory: the weights and a model's factory
file are recorded with their resolved path and digest, looked for beside the artifact first, and a
file that moved is named with the fix."""

from __future__ import annotations

import shutil
import textwrap

import pytest
import torch

from sensplan import ModelSpecError
from sensplan.cli import main
from sensplan.planner import load_compressed
from tests.conftest import fit_digits

NET = '''
    from torch import nn


    def tiny(num_classes=10):
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))
'''
FAST = ["--samples", "150", "--calib-samples", "60", "--threads", "1"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with a model file and weights, scanned and applied from inside it with
    relative paths; the test then works from another folder."""
    a, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (a / "weights").mkdir(parents=True)
    elsewhere.mkdir()
    (a / "net.py").write_text(textwrap.dedent(NET))
    monkeypatch.chdir(a)
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("net_for_paths", a / "net.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(fit_digits(module.tiny()).state_dict(), a / "weights" / "w.pt")  # above chance
    model = ["--model", "net.py:tiny", "--weights", "weights/w.pt", "--data", "digits", *FAST]
    assert main(["scan", *model, "--bits", "8,4", "--ratios", "0.5", "--out", "scan.json"]) == 0
    assert main(["plan", "--scan", "scan.json", "--budget", "size=0.5", "--no-verify", "--out", "plan.json"]) == 0
    assert main(["apply", *model, "--plan", "plan.json", "--no-timing", "--out", "result"]) == 0
    monkeypatch.chdir(elsewhere)
    return a


def test_a_plan_verifies_from_another_folder(project, capsys):
    assert main(["plan", "--scan", str(project / "scan.json"), "--budget", "size=0.5", "--verify-rounds", "1",
                 "--holdout-samples", "200", "--threads", "1", "--out", "plan.json"]) == 0
    assert "verdict:" in capsys.readouterr().err


def test_moved_weights_are_named_with_the_fix(project, capsys):
    shutil.move(project / "weights" / "w.pt", project / "w-moved.pt")
    assert main(["plan", "--scan", str(project / "scan.json"), "--budget", "size=0.5", "--out", "plan.json"]) == 2
    err = capsys.readouterr().err
    assert "needs the weights the scan measured, 'weights/w.pt'" in err and "Pass --weights FILE" in err
    assert "in none of these places" in err and "where they were (" in err
    # the same weights beside the scan are found by name
    shutil.copy(project / "w-moved.pt", project / "w.pt")
    assert main(["plan", "--scan", str(project / "scan.json"), "--budget", "size=0.5", "--verify-rounds", "1",
                 "--holdout-samples", "200", "--threads", "1", "--out", "plan.json"]) == 0


def test_a_compressed_model_loads_from_another_folder(project):
    model = load_compressed(project / "result" / "model.sensplan")
    assert isinstance(model, torch.nn.Sequential)


def test_a_moved_model_file_is_named_with_the_fix_and_found_beside_the_file(project):
    shutil.move(project / "net.py", project / "net-old.py")
    with pytest.raises(ModelSpecError) as e:
        load_compressed(project / "result" / "model.sensplan")
    msg = str(e.value)
    assert "'net.py'" in msg and "Copy it beside" in msg and "load_compressed(path, model)" in msg
    assert "where it was (" in msg and "in none of these places" in msg
    shutil.copy(project / "net-old.py", project / "result" / "net.py")
    assert isinstance(load_compressed(project / "result" / "model.sensplan"), torch.nn.Sequential)
