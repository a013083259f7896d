"""The CLI: user mistakes are one clear message and exit code 2; a missed budget exits 3; every verb
parses and calls the library."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sensplan._artifacts import write_json
from sensplan.cli import main
from sensplan.sensitivity.methods import all_methods
from tests.conftest import digits_model

FAST = ["--samples", "200", "--calib-samples", "100", "--threads", "1"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def model_args(weights):
    return ["--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", str(weights),
            "--data", "digits", *FAST]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(digits_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def planned(tmp_path_factory, weights):
    """scan -> plan, once for the module: {"scan": path, "plan": path}."""
    d = tmp_path_factory.mktemp("planned")
    files = {"scan": d / "scan.json", "plan": d / "plan.json"}
    assert main(["scan", *model_args(weights), "--bits", "8,4", "--ratios", "0.5",
                 "--out", str(files["scan"])]) == 0
    assert main(["plan", "--scan", str(files["scan"]), "--budget", "macs=0.7",
                 "--out", str(files["plan"])]) == 0
    return files


@pytest.fixture(scope="module")
def chain(planned, weights):
    """scan -> plan -> apply: {"scan": path, "plan": path, "result": directory}."""
    result = planned["plan"].parent / "result"
    assert main(["apply", *model_args(weights), "--plan", str(planned["plan"]), "--no-timing",
                 "--out", str(result)]) == 0
    return {**planned, "result": result}


@pytest.fixture
def scan_file(planned, tmp_path):
    """A copy of a real scan.json in tmp_path (and its plan.json beside it)."""
    shutil.copy(planned["plan"], tmp_path / "plan.json")
    return Path(shutil.copy(planned["scan"], tmp_path / "scan.json"))


@pytest.mark.parametrize("argv,fragment", [
    (["scan", "--model", "torchvision:resnet19", "--data", "digits"], "Did you mean 'resnet18'"),
    (["scan", "--model", "sensplan:digits_cnn", "--weights", "missing.pt", "--data", "digits"],
     "does not exist"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "no/such/dir"],
     "--data: The data spec 'no/such/dir' is neither an existing directory"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--bits", "8,x"],
     "--bits 8,x: "),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--ratios", "0.5,1.5"],
     "--ratios 0.5,1.5: The 'ratio' setting of prune must be a fraction in (0, 1), e.g. prune=0.5. "
     "Got 1.5"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--model-arg", "width"],
     "KEY=VALUE"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--samples", "-1"],
     "--samples must be >= 0 (0 = all). Got -1."),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--calib-samples", "0"],
     "--calib-samples must be > 0. Got 0."),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--methods", "prun"],
     "Did you mean 'prune'"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--setting", "sparsity=0.5"],
     "Add it with --methods prune,weight_quant,sparsity"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--setting", "sparsity"],
     "--setting takes METHOD=V1,V2"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--setting", "prune=0.5",
      "--ratios", "0.2"], "both set the settings of prune"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--no-prune",
      "--ratios", "0.5"],
     "--ratios 0.5 sets the settings of prune, but --no-prune removes prune"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--no-prune", "--no-quantize"],
     "Nothing is left to scan"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--task", "agreemnt"],
     "Did you mean 'agreement'"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--device", "gpu"],
     "--device takes cpu, cuda, cuda:N or mps"),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--threads", "0"],
     "--threads must be >= 1. Got 0."),
    (["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--batch-size", "0"],
     "--batch-size must be >= 1"),
    (["plan", "--scan", "missing.json", "--budget", "macs=0.5"], "does not exist"),
    (["plan", "--scan", "scan.json", "--budget", "macs=half"], "Cannot read the budget"),
    (["plan", "--scan", "scan.json"], "Give a budget"),
    (["plan", "--scan", "scan.json", "--max-drop", "1%"], "--minimize"),
    (["plan", "--scan", "scan.json", "--max-drop", "150%"], "range [0.0, 1.0)"),
    (["plan", "--scan", "scan.json", "--budget", "latency_ms=0.5"], "needs its --cost-table"),
    (["plan", "--scan", "scan.json", "--budget", "macs=0.5", "--cost-table", "missing.json"],
     "--cost-table missing.json: "),
    (["plan", "--scan", "scan.json", "--budget", "macs=0.5", "--time-limit", "0"],
     "--time-limit must be > 0"),
    (["plan", "--scan", "scan.json", "--max-drop", "0.01", "--minimize", "speed"],
     "--minimize speed: unknown metric"),
    (["report", "--scan", "scan.json", "--result", "no_such_dir"], "does not exist"),
    (["apply", "--model", "sensplan:digits_cnn", "--plan", "scan.json", "--data", "digits",
      "--out", "o"], "is not a sensplan.plan file"),
    (["apply", "--model", "sensplan:digits_cnn", "--plan", "plan.json", "--data", "digits",
      "--epochs", "2", "--out", "o"], "--epochs only matters when fine-tuning"),
    (["apply", "--model", "sensplan:digits_cnn", "--plan", "plan.json", "--data", "digits",
      "--variants", "best", "--out", "o"], "--variants takes"),
    (["apply", "--model", "sensplan:digits_cnn", "--plan", "plan.json", "--data", "digits",
      "--train-data", "digits:train", "--alpha", "2", "--out", "o"], "--alpha must be in"),
    (["validate", "missing.json"], "1 problem(s)"),
    (["models", "resnet*"], "No sensplan model matches 'resnet*'. Known: "),
])
def test_user_mistakes_exit_2_with_one_message(scan_file, tmp_path, monkeypatch, capsys, argv,
                                               fragment):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert "parameter of" not in err  # the user's flags, not the library's parameters
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    code, _, err = run(["scan", "--model", "sensplan:digits_cnn", "--data", "digits",
                        "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and "--device cpu" in err


def test_global_verbose_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    for argv in (["--verbose", "plan", "--scan", missing, "--budget", "macs=0.5"],
                 ["plan", "--scan", missing, "--budget", "macs=0.5", "--verbose"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "Traceback" in err and "does not exist" in err
    code, _, err = run(["plan", "--scan", missing, "--budget", "macs=0.5"], capsys)
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["scan", "--model", "sensplan:digits_cnn", "--data", "digits", "--sample", "200"],
    ["plan", "--scan", "scan.json", "--budg", "macs=0.5"],
    ["--verb", "plan", "--scan", "scan.json", "--budget", "macs=0.5"],
])
def test_flag_prefixes_are_rejected(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "--help" in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no usage block


def test_run_reports_every_problem_before_any_work(tmp_path, capsys, weights):
    out = tmp_path / "run"
    code, _, err = run(["run", *model_args(weights), "--budget", "macs=half", "--variants", "best",
                        "--train-data", "no/such/dir", "--bits", "9", "--out", str(out)], capsys)
    assert code == 2
    assert "4 problems" in err
    for fragment in ("Cannot read the budget", "--variants takes", "--train-data: ", "--bits 9: "):
        assert fragment in err
    assert not out.exists()


def test_run_checks_cost_tables_and_finetune_flags_before_the_scan(tmp_path, capsys, weights):
    table = tmp_path / "latency.json"
    table.write_text(json.dumps({"format": "sensplan.cost_table", "schema_version": 1}))
    out = tmp_path / "run"
    code, _, err = run(["run", *model_args(weights), "--budget", "macs=0.5", "--cost-table",
                        str(table), "--train-data", "digits:train", "--lr", "0",
                        "--out", str(out)], capsys)
    assert code == 2 and "2 problems" in err
    assert "--cost-table" in err and "--lr must be > 0" in err
    assert not out.exists()


# -- output paths --------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_output_paths_exit_2_and_leave_files_untouched(scan_file, tmp_path, capsys, weights):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_bytes(b"keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "scan.json").write_bytes(b"an old scan")
    (run_dir / "result").write_bytes(b"a file where a directory goes")
    before = _snapshot(tmp_path)
    cases = [
        (["scan", *model_args(weights), "--out", str(tmp_path / "a_dir")],
         "is an existing directory"),
        (["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "macs=0.8",
          "--out", str(tmp_path / "a_file" / "plan.json")], "is a file, not a directory"),
        (["apply", *model_args(weights), "--plan", str(tmp_path / "plan.json"),
          "--out", str(tmp_path / "a_file")], "is an existing file"),
        (["report", "--scan", str(tmp_path / "scan.json"), "--out", str(tmp_path / "a_file")],
         "is an existing file"),
        (["run", *model_args(weights), "--budget", "macs=0.5", "--out", str(run_dir)],
         "result is an existing file"),
    ]
    for argv, fragment in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, err
        assert fragment in err and "Choose another --out" in err, err
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file", "plan.json", "run",
                                                          "scan.json"]


def test_a_read_only_folder_is_refused(scan_file, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, **kwargs):  # root may write anywhere: pretend the folder is read-only
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    code, _, err = run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "macs=0.8",
                        "--out", str(locked / "sub" / "plan.json")], capsys)
    assert code == 2 and f"the directory {locked} is not writable" in err
    assert not (locked / "sub").exists()


# -- the verbs -----------------------------------------------------------------------------------
def test_infeasible_budget_exits_2_and_names_the_reachable_cost(scan_file, tmp_path, capsys):
    code, _, err = run(["plan", "--scan", str(scan_file), "--budget", "macs=0.01",
                        "--out", str(tmp_path / "new_plan.json")], capsys)
    assert code == 2 and "smallest reachable macs" in err
    assert not (tmp_path / "new_plan.json").exists()


def test_plan_writes_a_versioned_plan(scan_file, tmp_path, capsys):
    code, out, err = run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=40%",
                          "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "sensplan.plan"
    assert "planned" in err and "uniform" in err and "not proven optimal" not in err
    assert out.strip() == str(tmp_path / "plan.json")


def test_plan_says_when_the_solve_is_not_proven_optimal(scan_file, tmp_path, monkeypatch, capsys):
    import sensplan.planner
    from sensplan.planner import Plan

    real = sensplan.planner.make_plan

    def stopped_early(*args, **kwargs):
        plan = real(*args, **kwargs)
        data = json.loads(json.dumps(plan.data))
        data["plans"]["planned"]["solver"] = {"status": "not proven optimal (time limit reached)",
                                              "optimal": False, "gap": 0.03}
        return Plan(data)

    monkeypatch.setattr(sensplan.planner, "make_plan", stopped_early)
    code, _, err = run(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "macs=0.8",
                        "--time-limit", "5", "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 0 and "not proven optimal" in err and "--time-limit" in err


def test_wrong_weights_for_the_model_exit_2(tmp_path, capsys, weights):
    code, _, err = run(["scan", "--model", "sensplan:digits_cnn", "--weights", str(weights),
                        "--data", "digits", "--out", str(tmp_path / "s.json")], capsys)
    assert code == 2 and "do not fit the model" in err and "--model-arg" in err
    assert not (tmp_path / "s.json").exists()


def test_apply_with_a_plan_for_another_model_exits_2(scan_file, tmp_path, capsys, weights):
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["model"].update(weights=None, weights_sha256=None)  # as if scanned with random weights
    (tmp_path / "plan_random.json").write_text(json.dumps(plan))
    code, _, err = run(["apply", "--model", "sensplan:digits_cnn", "--data", "digits", *FAST,
                        "--plan", str(tmp_path / "plan_random.json"), "--out", str(tmp_path / "o")],
                       capsys)
    assert code == 2 and "architecture digest" in err and "measuring" not in err


def test_scan_plan_apply_report_chain(chain, tmp_path, capsys):
    scan = json.loads(chain["scan"].read_text())
    assert set(scan["methods"]) == {"prune", "weight_quant"}
    bits = {r["setting"].get("bits") for r in scan["results"] if r["method"] == "weight_quant"}
    assert bits == {8, 4}
    assert scan["provenance"]["torch_threads"] == 1
    assert (chain["result"] / "model.sensplan").is_file()
    assert (chain["result"] / "uniform" / "metrics.json").is_file()
    m = json.loads((chain["result"] / "metrics.json").read_text())
    assert m["budgets"][0]["met"] and m["after"]["macs"] <= 0.7 * m["before"]["macs"]
    code, out, err = run(["report", "--scan", str(chain["scan"]), "--plan", str(chain["plan"]),
                          "--result", str(chain["result"]), "--out", str(tmp_path / "report")],
                         capsys)
    assert code == 0, err
    assert (tmp_path / "report" / "report.html").is_file()


def test_validate_and_report_on_a_good_chain_and_a_broken_one(chain, tmp_path, capsys):
    files = [str(chain["scan"]), str(chain["plan"]), str(chain["result"])]
    code, out, err = run(["validate", *files], capsys)
    assert code == 0, out + err
    assert out.splitlines() == [f"{f}: OK" for f in files]

    other = json.loads(chain["scan"].read_text())
    other["provenance"]["seconds"] += 1.0  # another scan: another digest
    write_json(tmp_path / "other_scan.json", other)
    assert run(["plan", "--scan", str(tmp_path / "other_scan.json"), "--budget", "macs=0.7",
                "--out", str(tmp_path / "other_plan.json")], capsys)[0] == 0
    code, out, err = run(["validate", str(chain["scan"]), str(tmp_path / "other_plan.json")],
                         capsys)
    assert code == 2
    assert f"{chain['scan']}: OK" in out
    assert f"{tmp_path / 'other_plan.json'}: was made from a scan" in out
    assert "digest chain broken" in out and "1 problem(s)" in err

    report = ["report", "--scan", str(chain["scan"]), "--plan", str(tmp_path / "other_plan.json"),
              "--out", str(tmp_path / "report")]
    code, _, err = run(report, capsys)
    assert code == 2 and "--force" in err
    code, _, err = run([*report, "--force"], capsys)
    assert code == 0, err
    assert (tmp_path / "report" / "report.html").is_file()


def test_apply_with_a_missed_budget_writes_its_files_and_exits_3(chain, tmp_path, capsys, weights):
    plan = json.loads(chain["plan"].read_text())
    plan["objective"]["budgets"][0]["absolute"] = 1.0  # no model has 1 MAC
    write_json(tmp_path / "plan.json", plan)
    out = tmp_path / "result"
    code, stdout, err = run(["apply", *model_args(weights), "--plan", str(tmp_path / "plan.json"),
                             "--variants", "planned", "--no-timing", "--out", str(out)], capsys)
    assert code == 3, err
    assert "budget missed: planned: macs: measured" in err and "MISSED" in err
    assert "    top1 drop: predicted " in err  # beside the measured one
    assert (out / "metrics.json").is_file() and (out / "model.sensplan").is_file()
    assert stdout.strip() == str(out)
    # the uniform allocation over its budget beside a plan within it: a note, and the run succeeds
    plan["objective"]["budgets"][0]["absolute"] = json.loads((out / "metrics.json").read_text())["budgets"][0][
        "measured"]
    plan["plans"]["uniform"].update(choices={}, unit_drops={})  # the original's MACs
    write_json(tmp_path / "plan.json", plan)
    code, stdout, err = run(["apply", *model_args(weights), "--plan", str(tmp_path / "plan.json"),
                             "--no-timing", "--out", str(tmp_path / "both")], capsys)
    assert code == 0, err
    uniform = json.loads((tmp_path / "both" / "uniform" / "metrics.json").read_text())["budgets"][0]
    assert uniform["met"] is False, uniform
    assert "note: measured over its budget (a comparison, not the plan): uniform: macs: measured" in err
    assert "budget missed" not in err


def test_methods_lists_every_method_and_task(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    names = [m.name for m in all_methods()]
    assert {"prune", "weight_quant", "sparsity", "sparsity_2_4", "half", "act_quant"} <= set(names)
    for m in all_methods():
        assert f"  {m.name}" in out and m.description in out
    assert "prune=0.1,0.2" in out and "weight_quant=8,6,4,3,2" in out
    assert "classification:" in out and "agreement:" in out


def test_help_states_the_methods_real_defaults(capsys):
    assert main(["scan", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    defaults = {m.name: m for m in all_methods() if m.default_on}
    assert f"(default: {','.join(sorted(defaults))})" in out
    bits = ",".join(str(s["bits"]) for s in defaults["weight_quant"].default_settings)
    assert f"--setting weight_quant=B1,B2 (default {bits})" in out
    wq = defaults["weight_quant"]
    for_transformers = ",".join(wq.label(s).removeprefix("int") for s in wq.transformer_settings)
    assert f"With --model hf:... the default is {for_transformers}" in out
    ratios = [s["ratio"] for s in defaults["prune"].default_settings]
    assert ratios[:2] == [0.1, 0.2] and ratios[-1] == 0.8


def test_scan_with_another_method_and_its_settings(tmp_path, capsys, weights):
    out = tmp_path / "scan.json"
    code, _, err = run(["scan", *model_args(weights), "--methods", "sparsity",
                        "--setting", "sparsity=0.5,0.9", "--dtype", "bfloat16", "--device", "cpu",
                        "--out", str(out)], capsys)
    assert code == 0, err
    scan = json.loads(out.read_text())
    assert set(scan["methods"]) == {"sparsity"}
    assert {r["setting"]["ratio"] for r in scan["results"]} == {0.5, 0.9}
    assert scan["provenance"]["dtype"] == "bfloat16" and scan["provenance"]["device"] == "cpu"


def test_scan_with_the_agreement_task_then_plan(tmp_path, capsys, weights):
    out = tmp_path / "scan.json"
    code, _, err = run(["scan", *model_args(weights), "--task", "agreement", "--no-prune",
                        "--bits", "8,4", "--out", str(out)], capsys)
    assert code == 0, err
    scan = json.loads(out.read_text())
    assert scan["task"]["name"] == "agreement" and scan["baseline"]["score"] == 1.0
    assert "baseline agreement 1.0000" in err
    code, _, err = run(["plan", "--scan", str(out), "--budget", "size=0.5",
                        "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 0, err


def test_a_fast_scan_then_plan(tmp_path, capsys, weights):
    out = tmp_path / "scan.json"
    code, _, err = run(["scan", *model_args(weights), "--bits", "8,4", "--ratios", "0.25,0.5", "--fast",
                        "--fast-measured", "3", "--out", str(out)], capsys)
    assert code == 0, err
    scan = json.loads(out.read_text())
    assert f"({len(scan['results']) - 3} estimated by --fast, 3 measured)" in err
    assert sum(1 for r in scan["results"] if r.get("map_point")) == 3
    assert sum(1 for r in scan["results"] if r.get("estimated")) == len(scan["results"]) - 3
    code, _, err = run(["plan", "--scan", str(out), "--budget", "size=0.5",
                        "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["objective"]["signal"] == "fisher"
    assert "verification" in plan  # the estimate is checked by measurement
    code, _, err = run(["plan", "--scan", str(out), "--budget", "size=0.5", "--signal", "drop",
                        "--out", str(tmp_path / "plan2.json")], capsys)
    assert code == 2 and "--signal fisher" in err
    code, _, err = run(["report", "--scan", str(out), "--plan", str(tmp_path / "plan.json"),
                        "--out", str(tmp_path / "report")], capsys)
    assert code == 0, err
    html = (tmp_path / "report" / "report.html").read_text()
    assert "A fast scan:" in html and f"{len(scan['results']) - 3} of its {len(scan['results'])} probes" in html


def test_run_writes_everything_into_one_directory(tmp_path, capsys, weights):
    out = tmp_path / "run"
    code, stdout, err = run(["run", *model_args(weights), "--bits", "8,4", "--ratios", "0.5",
                             "--budget", "size=0.5", "--variants", "planned", "--no-timing",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    for step in ("== scan ==", "== plan ==", "== apply ==", "== report =="):
        assert step in err
    assert "scan: " in err  # periodic progress lines, since stderr is not a terminal
    assert (out / "report" / "report.html").is_file()
    files = [str(out / "scan.json"), str(out / "plan.json"), str(out / "result")]
    assert run(["validate", *files], capsys)[0] == 0


def test_an_interrupted_scan_says_how_to_resume_and_resumes(tmp_path, monkeypatch, capsys,
                                                            weights):
    from sensplan._journal import Journal

    real_append = Journal.append
    appended = []

    def append_then_interrupt(self, *args, **kwargs):  # Ctrl-C after the third finished probe
        real_append(self, *args, **kwargs)
        appended.append(args)
        if len(appended) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "append", append_then_interrupt)
    out = tmp_path / "scan.json"
    argv = ["scan", *model_args(weights), "--bits", "8,4", "--ratios", "0.5", "--no-resume",
            "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 130
    assert f"3 finished probe(s) are saved in {out}.journal" in err
    resume = err.strip().splitlines()[-1].strip()
    assert resume == "sensplan " + " ".join(a for a in argv if a != "--no-resume")
    assert not out.exists()

    monkeypatch.setattr(Journal, "append", real_append)
    code, _, err = run(shlex.split(resume)[1:], capsys)
    assert code == 0, err
    assert "(3 reused from the journal)" in err
    assert json.loads(out.read_text())["provenance"]["probes_from_journal"] == 3


@pytest.mark.parametrize("verb", [None, "scan", "plan", "apply", "report", "run", "demo",
                                  "validate", "methods", "models"])
def test_every_help_ends_with_an_example(verb, capsys):
    assert main([verb, "--help"] if verb else ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sensplan" + (f" {verb}" if verb else ""))
    example = out[out.rindex("\nexample"):]
    assert example.rstrip().splitlines()[-1].lstrip().startswith(("sensplan ", "--", "#"))
    assert "sensplan " in example


def test_the_cli_imports_no_torch_and_the_console_script_works():
    code = "import sys, sensplan.cli; sensplan.cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sensplan", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("sensplan ")
    proc = subprocess.run([sys.executable, "-m", "sensplan", "plan", "--scan", "nope.json",
                           "--budget", "macs=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_the_scanner_imports_torch_pruning_only_to_build_a_pruning_graph():
    # Torch-Pruning imports timm where it is installed: seconds of every command's start
    code = ("import sys, torch, sensplan.sensitivity as s\n"
            "print('torch_pruning' in sys.modules)\n"
            "s.PruningGraph(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),"
            " torch.zeros(1, 3))\n"
            "print('torch_pruning' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "True"], proc.stderr


def test_check_samples_sets_the_safety_checks_input_and_is_recorded(tmp_path, capsys, weights, monkeypatch):
    from sensplan.sensitivity import _groups

    seen: list[int] = []
    real = _groups.check_group

    def spy(model, graph, gid, n_remove, inputs, *a, **k):
        seen.append(len(inputs))
        return real(model, graph, gid, n_remove, inputs, *a, **k)

    monkeypatch.setattr(_groups, "check_group", spy)  # read by Method.checked_groups at each call
    statuses = []
    for n in ("1", "8"):
        out = tmp_path / f"scan{n}.json"
        code, _, err = run(["scan", *model_args(weights), "--no-quantize", "--ratios", "0.5",
                            "--check-samples", n, "--out", str(out)], capsys)
        assert code == 0, err
        scan = json.loads(out.read_text())
        assert scan["config"]["check_samples"] == int(n)
        statuses.append({g: v["status"] for g, v in scan["groups"].items()})
    assert seen and set(seen[: len(seen) // 2]) == {1} and set(seen[len(seen) // 2:]) == {8}
    assert statuses[0] == statuses[1] and "scanned" in statuses[0].values()


def test_apply_accepts_the_scans_weights_from_another_file_and_refuses_other_values(tmp_path, capsys, weights):
    """A plan from a Python-API scan (no weights path) of a trained model applies with those weights
    saved anywhere: the check compares the values' digest, not the file."""
    from sensplan.planner import Budget, make_plan
    from sensplan.sensitivity import DataSpec, ModelSpec, ScanConfig, load_eval_set, scan

    model = digits_model()
    model.load_state_dict(torch.load(weights))
    data = load_eval_set(DataSpec.parse("digits"), 100, seed=0)
    table = scan(model, data, ScanConfig.of(bits=(4,), ratios=(0.5,)), progress=False,
                 model_spec=ModelSpec("sensplan:digits_cnn", {"width": 8}))
    assert table.data["model"]["weights"] is None and table.data["model"]["weights_digest"]
    make_plan(table, [Budget.parse("size=0.5")]).save(tmp_path / "plan.json")
    resaved = tmp_path / "again.pt"
    torch.save({"state_dict": model.state_dict()}, resaved)  # the same values, another file
    argv = ["apply", "--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--data", "digits",
            *FAST, "--plan", str(tmp_path / "plan.json"), "--no-timing", "--variants", "planned"]
    code, _, err = run([*argv, "--weights", str(resaved), "--out", str(tmp_path / "ok")], capsys)
    assert code in (0, 3), err  # 3: a budget missed by the measurement is not a weights problem
    other = tmp_path / "other.pt"
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}, other)
    code, _, err = run([*argv, "--weights", str(other), "--out", str(tmp_path / "no")], capsys)
    assert code == 2 and "are not the ones the plan was made from" in err
    assert not (tmp_path / "no").exists()


def test_run_with_a_tie_that_matches_no_two_modules_stops_before_the_scan(tmp_path, capsys):
    from sensplan.cli import main

    code = main(["run", "--model", "sensplan:digits_cnn", "--data", "digits", "--samples", "50",
                 "--budget", "macs=0.5", "--tie", "experts", "--no-timing", "--out", str(tmp_path / "r")])
    assert code == 2 and "--tie experts matches no two modules of the model" in capsys.readouterr().err
    assert not (tmp_path / "r" / "scan.json").exists()


def test_a_budget_the_original_already_meets_is_noted(chain, tmp_path, capsys):
    """macs=1 asks for nothing; size=1e12 is an absolute value that was probably meant as a fraction."""
    code, _, err = run(["plan", "--scan", str(chain["scan"]), "--budget", "macs=1", "--budget", "size=1e12",
                        "--no-verify", "--out", str(tmp_path / "plan.json")], capsys)
    assert code == 0, err
    assert "note: the original model already meets --budget macs=1 (it costs" in err
    assert "nothing needs compressing for it" in err
    assert "--budget size=1e+12" in err and "read as an absolute value, not a fraction" in err
