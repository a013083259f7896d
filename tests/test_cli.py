"""The CLI: every user mistake is one clear message and exit code 2, never a traceback."""

import json
import subprocess
import sys

import pytest
import torch

from sensplan.cli import main
from tests.conftest import seeded_model
from tests.tables import synthetic_scan


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(seeded_model("digits_cnn", width=8).state_dict(), path)
    return path


@pytest.mark.parametrize("argv,fragment", [
    (["scan", "--model", "torchvision:resnet19", "--data", "digits"], "Did you mean 'resnet18'"),
    (["scan", "--model", "sensplan:digits_cnn", "--weights", "missing.pt", "--data", "digits"], "does not exist"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "no/such/dir"], "neither an existing directory"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--bits", "8,x"], "comma-separated integers"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--ratios", "0.5,1.5"], "(0.0, 1.0)"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--model-arg", "width"], "KEY=VALUE"),
    (["plan", "--scan", "missing.json", "--budget", "macs=0.5"], "does not exist"),
    (["plan", "--scan", "scan.json", "--budget", "macs=half"], "Cannot read the budget"),
    (["plan", "--scan", "scan.json"], "Give a budget"),
    (["plan", "--scan", "scan.json", "--max-drop", "1%"], "--minimize"),
    (["plan", "--scan", "scan.json", "--max-drop", "150%"], "range [0.0, 1.0)"),
    (["report", "--scan", "scan.json", "--result", "no_such_dir"], "does not exist"),
    (["apply", "--model", "sensplan:digits_cnn", "--plan", "scan.json", "--data", "digits", "--out", "o"],
     "is not a sensplan.plan file"),
])
def test_user_mistakes_exit_2_with_one_message(tmp_path, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(tmp_path)
    synthetic_scan().save(tmp_path / "scan.json")
    code, out, err = run(argv, capsys)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_infeasible_budget_exits_2_and_names_the_reachable_cost(tmp_path, capsys):
    synthetic_scan().save(tmp_path / "scan.json")
    code, _, err = run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "macs=0.01",
                        "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 2 and "smallest reachable macs" in err
    assert not (tmp_path / "plan.json").exists()


def test_plan_writes_a_versioned_plan(tmp_path, capsys):
    synthetic_scan().save(tmp_path / "scan.json")
    code, out, err = run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=40%",
                          "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "sensplan.plan" and plan["schema_version"] == 1
    assert "planned" in err and "uniform" in err


def test_wrong_weights_for_the_model_exit_2(tmp_path, capsys, tiny_weights):
    code, _, err = run(["scan", "--model", "sensplan:digits_cnn", "--weights", str(tiny_weights),
                        "--data", "digits", "--out", str(tmp_path / "s.json")], capsys)
    assert code == 2 and "do not fit the model" in err and "--model-arg" in err
    assert not (tmp_path / "s.json").exists()


def test_apply_with_a_plan_for_another_model_exits_2(tmp_path, capsys, tiny_weights):
    synthetic_scan().save(tmp_path / "scan.json")
    assert run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "macs=0.8",
                "--out", str(tmp_path / "plan.json")], capsys)[0] == 0
    code, _, err = run(["apply", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights",
                        str(tiny_weights), "--plan", str(tmp_path / "plan.json"), "--data", "digits",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not have" in err and "measuring" not in err


def test_scan_plan_apply_report_chain(tmp_path, capsys, tiny_weights):
    common = ["--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(tiny_weights),
              "--data", "digits", "--samples", "200"]
    assert run(["scan", *common, "--bits", "8,4", "--ratios", "0.25,0.5", "--out", str(tmp_path / "scan.json")],
               capsys)[0] == 0
    assert run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "macs=0.7",
                "--out", str(tmp_path / "plan.json")], capsys)[0] == 0
    code, out, err = run(["apply", *common, "--plan", str(tmp_path / "plan.json"), "--no-timing",
                          "--out", str(tmp_path / "result")], capsys)
    assert code == 0, err
    assert (tmp_path / "result" / "model.sensplan").is_file()
    assert (tmp_path / "result" / "uniform" / "metrics.json").is_file()
    m = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert m["budgets"][0]["met"] and m["after"]["macs"] <= 0.7 * m["before"]["macs"]
    code, out, _ = run(["report", "--scan", str(tmp_path / "scan.json"), "--plan", str(tmp_path / "plan.json"),
                        "--result", str(tmp_path / "result"), "--out", str(tmp_path / "report")], capsys)
    assert code == 0 and (tmp_path / "report" / "report.html").is_file()


@pytest.mark.parametrize("verb", ["scan", "plan", "apply", "report", "run", "demo", "models"])
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sensplan " + verb in out
    if verb not in ("models",):
        assert "example" in out


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "sensplan", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("sensplan ")
    proc = subprocess.run([sys.executable, "-m", "sensplan", "plan", "--scan", "nope.json", "--budget", "macs=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
