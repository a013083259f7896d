"""User mistakes: each is one clear line on stderr and exit code 2, and nothing already written is lost.

Every case runs ``sensplan.cli.main`` in-process with a pre-populated ``--out`` directory and checks
that every file there (and every input file) is byte-identical afterwards. The last tests interrupt
each verb while it writes, and SIGKILL one, and check that the previous artifact is intact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sensplan.cli import build_parser, main
from tests.conftest import ROOT, digits_model, seeded_model

#: small and fast: the digits CNN at width 8 on 100 digits
DIGITS = ["--model", "sensplan:digits_cnn", "--model-arg", "width=8", "--weights", "{ws}/w.pt",
          "--data", "digits", "--samples", "100", "--calib-samples", "50", "--threads", "1"]
#: the 4-class tiny conv net on image folders (give --data)
IMAGES = ["--model", "sensplan:tiny_convnet", "--weights", "{ws}/tc.pt", "--samples", "0",
          "--calib-samples", "8", "--threads", "1"]
SCAN = ["scan", "--bits", "8", "--ratios", "0.5", "--out", "{out}/scan.json"]
PLAN = ["plan", "--scan", "{ws}/scan.json", "--out", "{out}/plan.json"]
APPLY = ["apply", *DIGITS, "--plan", "{ws}/plan.json", "--no-timing", "--out", "{out}"]
RUN = ["run", *DIGITS, "--bits", "8", "--ratios", "0.5", "--no-timing", "--out", "{out}"]


def _flags(verb: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices[verb]._option_string_actions)  # type: ignore[union-attr]


#: plan measures its result on the scan's model unless told not to (where this sensplan can)
NO_VERIFY = ["--no-verify"] if "--no-verify" in _flags("plan") else []


# -- the workspace -------------------------------------------------------------------------------
def _images(root: Path, classes: int, per_class: int = 3, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _edited(src: Path, dst: Path, edit) -> None:
    obj = json.loads(src.read_text())
    edit(obj)
    dst.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Every input the cases need: weights, a real scan and plan, image folders, broken files."""
    from sensplan._tables import Scan
    from sensplan.planner import Budget, make_plan

    ws = tmp_path_factory.mktemp("ws")
    torch.save(digits_model().state_dict(), ws / "w.pt")
    torch.save(seeded_model("tiny_convnet").state_dict(), ws / "tc.pt")
    broken = digits_model().state_dict()
    broken["stem.0.weight"][0, 0, 0, 0] = float("nan")  # a checkpoint saved after training diverged
    torch.save(broken, ws / "nan.pt")
    # untrained: it answers one class for every digit (top-1 0.10)
    torch.save(seeded_model("digits_cnn", width=8).state_dict(), ws / "chance.pt")
    argv = [a.format(ws=ws, out=ws) for a in ["scan", *DIGITS, "--bits", "8", "--ratios", "0.5",
                                              "--out", "{ws}/scan.json"]]
    assert main(argv) == 0
    make_plan(Scan.load(ws / "scan.json"), [Budget.parse("macs=0.8")]).save(ws / "plan.json")

    # image folders: 4 classes (the model's), 6, 2, and 4 with a truncated JPEG / a non-image
    for name, n in (("img4", 4), ("img6", 6), ("img2", 2)):
        _images(ws / name, n)
    shutil.copytree(ws / "img4", ws / "trunc")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(ws / "full.jpg", quality=90)
    (ws / "trunc" / "c1" / "cut.jpg").write_bytes((ws / "full.jpg").read_bytes()[:120])
    shutil.copytree(ws / "img4", ws / "notimg")
    (ws / "notimg" / "c2" / "notes.png").write_text("these are my notes, not an image\n")

    # class maps
    (ws / "map_big.json").write_text(json.dumps({"c0": 0, "c1": 7}))
    (ws / "map_missing.json").write_text(json.dumps({"c0": 0}))
    (ws / "map_neg.json").write_text(json.dumps({"c0": -1, "c1": 2}))
    (ws / "map_bad.json").write_text("c0 -> 0\n")
    (ws / "map_digits.json").write_text(json.dumps({str(i): i + 1 for i in range(10)}))

    # model factories and weights files that are not what they claim
    (ws / "factories.py").write_text("def boom(**kwargs):\n    raise RuntimeError('no GPU here')\n\n"
                                     "def not_a_model():\n    return 42\n\n"
                                     "import torch\n\n"
                                     "class Heads(torch.nn.Module):\n"
                                     "    def __init__(self):\n"
                                     "        super().__init__()\n"
                                     "        self.fc = torch.nn.Linear(64, 10)\n"
                                     "    def forward(self, x):\n"
                                     "        return {'logits': self.fc(x.flatten(1)), 'aux': x}\n\n"
                                     "def dict_out():\n    return Heads()\n\n"
                                     "built = Heads()\n")
    torch.save({"fc.weight": torch.randn(10, 64), "fc.bias": torch.zeros(10)}, ws / "heads.pt")
    (ws / "random.pt").write_bytes(np.random.default_rng(1).bytes(3000))
    (ws / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2), ws / "whole.pt")
    (ws / "cut.pt").write_bytes((ws / "w.pt").read_bytes()[:3000])
    (ws / "wdir").mkdir()

    # damaged artifacts
    scan = ws / "scan.json"
    _edited(scan, ws / "scan_nodrop.json", lambda o: o["results"][0].pop("drop"))
    _edited(scan, ws / "scan_nulldrop.json", lambda o: o["results"][0].update(drop=None))
    _edited(scan, ws / "scan_strdrop.json", lambda o: o["results"][0].update(drop="0.1"))
    _edited(scan, ws / "scan_dictresults.json", lambda o: o.update(results={}))
    _edited(scan, ws / "scan_measured_nothing.json", lambda o: o.update(results=[]))
    _edited(scan, ws / "scan_nomacs.json", lambda o: next(iter(o["layers"].values())).pop("macs"))
    _edited(scan, ws / "scan_nometric.json", lambda o: o["task"].pop("metric"))
    (ws / "scan_cut.json").write_text(scan.read_text()[:500])
    plan = ws / "plan.json"
    _edited(plan, ws / "plan_nullpred.json", lambda o: o["plans"]["planned"].update(predicted=None))
    _edited(plan, ws / "plan_str.json", lambda o: o["plans"].update(planned="x"))

    def _set(kind, method, setting):
        def edit(o):
            c = next(c for c in o["plans"]["planned"]["choices"].values() if c["kind"] == kind)
            c.update(method=method, setting=setting(c))
        return edit

    _edited(plan, ws / "plan_bits1.json", _set("layer", "weight_quant", lambda c: {"bits": 1}))
    _edited(plan, ws / "plan_prune_all.json",
            _set("group", "prune", lambda c: {"ratio": 0.5, "n_remove": int(c["channels"])}))
    state = torch.load(ws / "w.pt")
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, ws / "w_other.pt")
    (ws / "bad_result").mkdir()
    (ws / "bad_result" / "metrics.json").write_text(json.dumps(
        {"format": "sensplan.metrics", "schema_version": 2, "before": {"score": 0.5}, "after": None,
         "predicted": {}, "plan": {}, "variant": "planned"}))
    return ws


@pytest.fixture
def out(ws, tmp_path) -> Path:
    """An --out directory holding the files of an earlier run, which no mistake may touch."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ws / "scan.json", out / "scan.json")
    shutil.copy(ws / "scan.json.journal", out / "scan.json.journal")
    shutil.copy(ws / "plan.json", out / "plan.json")
    (out / "metrics.json").write_text('{"an": "older result"}\n')
    (out / "model.sensplan").write_bytes(b"SENSPLAN older model")
    (out / "report.html").write_text("<html>an older report</html>\n")
    (out / "notes.txt").write_text("a file, where a directory might go\n")
    (out / "a_dir").mkdir()
    (out / "a_dir" / "keep.txt").write_text("keep me\n")
    (out / "locked").mkdir()
    (out / "locked" / "keep.txt").write_text("keep me too\n")
    return out


def _snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


# -- the cases -----------------------------------------------------------------------------------
CASES = [
    # images that cannot be read, and class folders that do not fit the model
    ("truncated-jpeg", [*SCAN, *IMAGES, "--data", "{ws}/trunc"], ["cut.jpg", "--skip-bad-images"]),
    ("not-an-image", [*SCAN, *IMAGES, "--data", "{ws}/notimg"], ["notes.png", "--skip-bad-images"]),
    ("bad-image-in-apply", [*APPLY, "--data", "{ws}/notimg"], ["notes.png", "--skip-bad-images"]),
    ("more-folders-than-outputs", [*SCAN, *IMAGES, "--data", "{ws}/img6"],
     ["has 6 classes", "4 outputs", "--class-map"]),
    ("fewer-folders-than-outputs", [*SCAN, *IMAGES, "--data", "{ws}/img2"],
     ["has 2 classes", "--class-map", "--task agreement"]),
    ("class-map-past-the-outputs", [*SCAN, *IMAGES, "--data", "{ws}/img2",
                                    "--class-map", "{ws}/map_big.json"], ["'c1' to output 7"]),
    ("class-map-lacks-a-folder", [*SCAN, *IMAGES, "--data", "{ws}/img2",
                                  "--class-map", "{ws}/map_missing.json"], ["lacks 1 class", "'c1'"]),
    ("class-map-negative", [*SCAN, *IMAGES, "--data", "{ws}/img2", "--class-map", "{ws}/map_neg.json"],
     ["--class-map", "integer >= 0"]),
    ("class-map-not-json", [*SCAN, *IMAGES, "--data", "{ws}/img2", "--class-map", "{ws}/map_bad.json"],
     ["--class-map", "not valid JSON"]),
    ("class-map-missing", [*SCAN, *IMAGES, "--data", "{ws}/img2", "--class-map", "{ws}/nope.json"],
     ["--class-map", "does not exist"]),
    ("class-map-in-apply", [*APPLY, "--class-map", "{ws}/map_digits.json"], ["'9' to output 10"]),
    ("train-folders-do-not-fit", [*APPLY, "--train-data", "{ws}/img6"],
     ["--train-data", "has 6 classes", "10 outputs"]),
    ("model-does-not-fit-the-data", [*SCAN, *DIGITS[:6], "--data", "{ws}/img4", "--threads", "1"],
     ["cannot run on the data", "channels"]),
    ("mean-std-per-channel", [*SCAN, *IMAGES, "--data", "{ws}/img4", "--mean", "0.5,0.5",
                              "--std", "0.2,0.2"], ["3 channels", "--mean and --std have 2 values"]),
    ("mean-std-on-the-0-255-scale", [*SCAN, *IMAGES, "--data", "{ws}/img4", "--mean", "123,117,104",
                                     "--std", "58,57,57"], ["0-255 scale", "divide them by 255"]),
    ("crop-larger-than-the-images", [*SCAN, *IMAGES, "--data", "{ws}/img4", "--crop", "64"],
     ["--crop 64 is larger than an image (8x8)", "zero-padded", "--resize 64"]),
    ("resize-on-digits", [*SCAN, *DIGITS, "--resize", "16"], ["--resize and --crop", "digits"]),
    # numbers out of range
    ("negative-seed", [*SCAN, *DIGITS, "--seed", "-1"], ["--seed must be >= 0"]),
    ("negative-samples", [*SCAN, *DIGITS, "--samples", "-5"], ["--samples must be >= 0"]),
    ("negative-calib-samples", [*SCAN, *DIGITS, "--calib-samples", "-3"],
     ["--calib-samples must be > 0. Got -3"]),
    ("zero-calib-samples", [*APPLY, "--calib-samples", "0"], ["--calib-samples must be > 0"]),
    ("zero-batch-size", [*SCAN, *DIGITS, "--batch-size", "0"], ["--batch-size must be >= 1"]),
    ("samples-in-float-notation", [*SCAN, *DIGITS, "--samples", "1e3"],
     ["--samples: invalid int value: '1e3'", "sensplan scan --help"]),
    ("std-value-starting-with-a-dash", [*SCAN, *DIGITS, "--std", "-1,1,1"], ["--std=VALUE"]),
    ("holdout-of-one-item", [*PLAN, "--budget", "macs=0.7", "--holdout-samples", "1"],
     ["--holdout-samples 1 is too few", "at least 50", "--no-verify"]),
    ("plan-out-with-a-trailing-slash", [*PLAN[:-1], "{out}/newdir/", "--budget", "macs=0.7"],
     ["ends with '/'", "names a file"]),
    ("zero-check-samples", [*SCAN, *DIGITS, "--check-samples", "0"], ["--check-samples must be >= 1"]),
    ("fast-measured-below-two", [*SCAN, *DIGITS, "--fast", "--fast-measured", "1"],
     ["--fast-measured must be >= 2. Got 1"]),
    ("negative-cache-mb", [*SCAN, *DIGITS, "--cache-mb", "-1"], ["--cache-mb must be >= 0. Got -1"]),
    ("zero-workers", [*SCAN, *DIGITS, "--workers", "0"], ["--workers must be >= 1. Got 0"]),
    ("weights-with-nan", [*SCAN, *[a.replace("w.pt", "nan.pt") for a in DIGITS]],
     ["outputs on the data are not finite", "check --weights"]),
    ("weights-at-chance-level", [*SCAN, *[a.replace("w.pt", "chance.pt") for a in DIGITS]],
     ["top-1 on the data is 0.100, within one standard error (0.030) of always answering the most common "
      "class (0.100 of 100 samples)", "--weights", "--mean/--std",
      "--task agreement"]),
    ("zero-train-samples", [*APPLY, "--train-data", "digits:train", "--train-samples", "0"],
     ["--train-samples must be >= 1"]),
    ("negative-epochs", [*APPLY, "--train-data", "digits:train", "--epochs", "-1"],
     ["--epochs must be >= 0"]),
    ("train-data-is-the-evaluation-data", [*APPLY, "--train-data", "digits"],
     ["--train-data digits is the data the model is measured on (--data digits)", "training split"]),
    ("train-folder-spelled-otherwise", [*APPLY[:APPLY.index("--data")], "--data", "{ws}/img4",
                                        *APPLY[APPLY.index("--data") + 2:], "--train-data", "{ws}/img4/"],
     ["is the data the model is measured on", "training split"]),
    ("demo-negative-epochs", ["demo", "--epochs", "-1", "--out", "{out}"], ["--epochs must be >= 0"]),
    # models and weights
    ("factory-raises", [*SCAN, "--model", "{ws}/factories.py:boom", "--data", "digits"],
     ["factories.py:boom", "RuntimeError: no GPU here", "--model-arg"]),
    ("factory-returns-no-module", [*SCAN, "--model", "{ws}/factories.py:not_a_model", "--data",
                                   "digits"], ["not a torch.nn.Module"]),
    ("model-instance-with-model-args", [*SCAN, "--model", "{ws}/factories.py:built", "--model-arg", "width=8",
                                        "--data", "digits"], ["is a model (a Heads)", "needs a factory"]),
    ("cost-table-missing", [*PLAN, "--cost-table", "{ws}/nope.json", "--budget", "latency=0.8", "--no-verify"],
     ["nope.json' does not exist", "sensplan profile --scan SCAN"]),  # and not the knock-on 'unknown metric'
    ("model-returns-a-dict", [*SCAN, "--model", "{ws}/factories.py:dict_out", "--weights", "{ws}/heads.pt",
                              "--data", "digits"],
     ["it returned a dict with the keys 'logits', 'aux'", "out['logits']"]),
    ("random-bytes-as-weights", [*SCAN, *DIGITS[:4], "--weights", "{ws}/random.pt", "--data", "digits"],
     ["not a PyTorch checkpoint", "random.pt"]),
    ("empty-weights", [*SCAN, *DIGITS[:4], "--weights", "{ws}/empty.pt", "--data", "digits"],
     ["is empty (0 bytes)"]),
    ("cut-off-weights", [*SCAN, *DIGITS[:4], "--weights", "{ws}/cut.pt", "--data", "digits"],
     ["damaged or truncated zip archive"]),
    ("whole-pickled-model-as-weights", [*SCAN, *DIGITS[:4], "--weights", "{ws}/whole.pt", "--data",
                                        "digits"], ["torch.nn.modules.linear.Linear", "--allow-pickle"]),
    ("weights-is-a-directory", [*SCAN, *DIGITS[:4], "--weights", "{ws}/wdir", "--data", "digits"],
     ["is a directory"]),
    ("unpickle-random-bytes", [*SCAN, "--model", "pickle:{ws}/random.pt", "--allow-pickle", "--data",
                               "digits"], ["Cannot unpickle"]),
    # damaged artifacts, caught on load with the checks of `sensplan validate`
    ("scan-without-drop", [*PLAN, "--budget", "macs=0.5"], ["results[0] has no 'drop'"]),
    ("scan-with-null-drop", [*PLAN, "--budget", "macs=0.5"], ["results[0] has no 'drop'"]),
    ("scan-with-text-drop", [*PLAN, "--budget", "macs=0.5"], ["results[0].drop is '0.1', not a number"]),
    ("scan-results-not-a-list", [*PLAN, "--budget", "macs=0.5"], ["'results' must be a list"]),
    ("scan-layer-without-macs", [*PLAN, "--budget", "macs=0.5"], ["lacks a numeric 'macs'"]),
    ("scan-without-metric", ["report", "--scan", "{ws}/scan_nometric.json", "--out", "{out}"],
     ["task.metric.name"]),
    ("scan-cut-off", [*PLAN, "--budget", "macs=0.5"], ["is not valid JSON"]),
    ("scan-measured-nothing", [*PLAN, "--budget", "macs=0.5"], ["measured no unit", "--methods"]),
    ("plan-as-scan", ["report", "--scan", "{ws}/plan.json", "--out", "{out}"],
     ["is not a sensplan.scan file"]),
    ("plan-without-prediction", [*APPLY, "--plan", "{ws}/plan_nullpred.json"],
     ["plans.planned.predicted is null, not an object"]),
    ("plan-edited-to-1-bit", [*APPLY, "--plan", "{ws}/plan_bits1.json"],
     ["sets weight_quant on", "{'bits': 1}", "not a valid setting", "sensplan plan"]),
    ("plan-edited-to-prune-every-channel", [*APPLY, "--plan", "{ws}/plan_prune_all.json"],
     ["removes", "channels of group", "keep at least one", "sensplan plan"]),
    ("apply-with-other-weights", [*APPLY, "--weights", "{ws}/w_other.pt"],
     ["--weights", "w_other.pt) are not the ones the plan was made from", "Pass the scan's --weights"]),
    ("apply-without-the-plans-weights", [a for a in APPLY if a not in ("--weights", "{ws}/w.pt")],
     ["The plan was made from a scan of the weights", "pass them with --weights"]),
    ("plan-allocation-not-an-object", ["report", "--scan", "{ws}/scan.json", "--plan",
                                       "{ws}/plan_str.json", "--out", "{out}"], ["not an object"]),
    ("metrics-without-after", ["report", "--scan", "{ws}/scan.json", "--plan", "{ws}/plan.json",
                               "--result", "{ws}/bad_result", "--out", "{out}"],
     ["after.score must be a number"]),
    # budgets
    ("budget-above-one", [*PLAN, "--budget", "macs=2"], ["absolute 2 MACs", "macs=0.5 or macs=50%"]),
    ("budget-size-without-unit", [*PLAN, "--budget", "size=100"], ["absolute 100 bytes", "size=2MB"]),
    ("budget-negative", [*PLAN, "--budget", "macs=-0.5"], ["negative", "macs=0.5"]),
    ("budget-twice", [*PLAN, "--budget", "macs=0.5", "--budget", "macs=0.6"],
     ["--budget macs=0.5 and --budget macs=0.6 both limit macs"]),
    ("budget-twice-other-forms", [*PLAN, "--budget", "size=50%", "--budget", "size=2MB"],
     ["both limit size"]),
    ("max-drop-above-one", [*PLAN, "--max-drop", "2", "--minimize", "size"], ["--max-drop must be"]),
    ("run-budget-negative", [*RUN, "--budget", "macs=-1"], ["negative"]),
    ("run-budget-twice", [*RUN, "--budget", "macs=0.5", "--budget", "macs=0.3"], ["both limit macs"]),
    ("demo-budget-twice", ["demo", "--budget", "size=0.5", "--budget", "size=0.4", "--out", "{out}"],
     ["both limit size"]),
    # output paths, checked before any work
    ("scan-out-is-a-directory", [*SCAN[:-1], "{out}/a_dir", *DIGITS], ["is an existing directory"]),
    ("plan-out-under-a-file", [*PLAN[:-1], "{out}/notes.txt/plan.json", "--budget", "macs=0.5"],
     ["is a file, not a directory"]),
    ("apply-out-is-a-file", [*APPLY[:-1], "{out}/notes.txt"], ["is an existing file"]),
    ("report-out-read-only", ["report", "--scan", "{ws}/scan.json", "--out", "{out}/locked/report"],
     ["is not writable"]),
    ("run-result-is-a-file", [*RUN[:-1], "{out}/run", "--budget", "macs=0.5"],
     ["result is an existing file"]),
    ("demo-plan-is-a-directory", ["demo", "--out", "{out}/demo"], ["plan.json is an existing directory"]),
    ("plan-out-is-the-scan", ["plan", "--scan", "{out}/scan.json", "--out", "{out}/scan.json",
                              "--budget", "macs=0.5"], ["is also the --scan file"]),
    ("scan-out-is-the-weights", [*SCAN[:-1], "{out}/model.sensplan", *DIGITS[:4], "--weights",
                                 "{out}/model.sensplan", "--data", "digits"], ["is also the --weights file"]),
    # the user's flags, not the library's parameters
    ("bits-out-of-range", [*SCAN, *DIGITS, "--bits", "9"], ["--bits 9: "]),
    ("ratio-out-of-range", [*SCAN, *DIGITS, "--ratios", "1.5"], ["--ratios 1.5: "]),
]
#: the damaged scan each --scan case of `plan` reads
SCAN_FILES = {"scan-without-drop": "scan_nodrop", "scan-with-null-drop": "scan_nulldrop",
              "scan-with-text-drop": "scan_strdrop", "scan-results-not-a-list": "scan_dictresults",
              "scan-layer-without-macs": "scan_nomacs", "scan-cut-off": "scan_cut",
              "scan-measured-nothing": "scan_measured_nothing"}


@pytest.mark.parametrize("argv,fragments", [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_a_mistake_is_one_line_exit_2_and_nothing_is_lost(request, ws, out, monkeypatch, capsys, argv,
                                                          fragments):
    case = request.node.callspec.id
    argv = [a.format(ws=ws, out=out) for a in argv]
    if case in SCAN_FILES:
        argv[argv.index("--scan") + 1] = str(ws / f"{SCAN_FILES[case]}.json")
    if argv[0] == "plan" and case != "holdout-of-one-item":  # that one is about verification
        argv += NO_VERIFY
    if case == "run-result-is-a-file":
        (out / "run").mkdir()
        (out / "run" / "result").write_text("a file where the result directory goes\n")
    if case == "demo-plan-is-a-directory":
        (out / "demo" / "plan.json").mkdir(parents=True)
    locked = out / "locked"
    real_access = os.access

    def access(path, mode, **kwargs):  # root may write anywhere: pretend `locked` is read-only
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.chdir(out)
    before = _snapshot(out, ws)

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"sensplan {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert "parameter of" not in err
    if case == "random-bytes-as-weights":
        assert "--allow-pickle" not in err  # never advise unpickling a damaged file
    assert _snapshot(out, ws) == before  # nothing changed, nothing added


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


# -- the new flags do what they say --------------------------------------------------------------
def test_skip_bad_images_leaves_them_out_and_counts_them(ws, tmp_path, capsys):
    out = tmp_path / "scan.json"
    argv = ["scan", *IMAGES, "--data", "{ws}/notimg", "--skip-bad-images", "--bits", "8",
            "--no-prune", "--out", str(out)]
    code = main([a.format(ws=ws) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--skip-bad-images: left out 1 unreadable image(s) of --data" in err and "notes.png" in err
    data = json.loads(out.read_text())["data"]
    assert data["unreadable_skipped"] == 1 and data["n"] == 12 and data["skip_unreadable"] is True


def test_a_class_map_maps_folders_to_outputs(ws, tmp_path, capsys):
    (tmp_path / "map.json").write_text(json.dumps(["c0", "x", "c1", "y"]))  # outputs 0 and 2
    out = tmp_path / "scan.json"
    argv = ["scan", *IMAGES, "--data", "{ws}/img2", "--class-map", str(tmp_path / "map.json"),
            "--bits", "8", "--no-prune", "--out", str(out)]
    code = main([a.format(ws=ws) for a in argv])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())["data"]
    assert data["class_map"] == {"c0": 0, "x": 1, "c1": 2, "y": 3}


def test_artifacts_get_the_users_umask(tmp_path):
    from sensplan._artifacts import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"format": "x"})
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"format": "x"})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


# -- interrupted while writing -------------------------------------------------------------------
KILLED = {
    "scan": ([*SCAN, *DIGITS], "scan.json"),
    "plan": ([*PLAN, "--budget", "macs=0.8"], "plan.json"),
    "apply": ([*APPLY, "--variants", "planned"], "model.sensplan"),
    "report": (["report", "--scan", "{ws}/scan.json", "--out", "{out}"], "report.html"),
    "run": ([*RUN, "--budget", "macs=0.8"], "scan.json"),
}


@pytest.mark.parametrize("verb", list(KILLED))
def test_an_interrupt_while_writing_leaves_the_previous_artifact_intact(ws, out, monkeypatch, capsys,
                                                                         verb):
    """Ctrl-C in the middle of writing the verb's first artifact: half of the new bytes are on disk
    (in the temporary file) when it comes. The old file must be whole, and no temporary file left."""
    import sensplan._artifacts as artifacts

    argv, name = KILLED[verb]
    argv = [a.format(ws=ws, out=out) for a in argv] + (NO_VERIFY if verb == "plan" else [])
    before = _snapshot(out)

    class Half:
        """The temporary file: the first write gets half of its bytes through, then Ctrl-C."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt

        def __getattr__(self, name):
            return getattr(self.f, name)

    def interrupted_writes(path, writer):
        return real(path, lambda f: writer(Half(f)))

    real = artifacts.atomic_write
    monkeypatch.setattr(artifacts, "atomic_write", interrupted_writes)
    monkeypatch.setattr(artifacts, "atomic_write_bytes",
                        lambda path, data: interrupted_writes(path, lambda f: f.write(data)))
    for module in ("sensplan.planner._compressed", "sensplan.reports._render"):
        mod = sys.modules.get(module) or __import__(module, fromlist=["_"])
        for attr in ("atomic_write", "atomic_write_bytes"):
            if hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, getattr(artifacts, attr))

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    after = _snapshot(out)
    assert after[str(out / name)] == before[str(out / name)]
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [p for p in out.rglob("*.tmp")]


def test_sigkill_while_writing_leaves_the_previous_scan_intact(ws, out):
    """A real SIGKILL while scan.json is half written: the old scan.json is whole."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import sensplan._artifacts as artifacts
real = artifacts.atomic_write

def killed(path, writer):
    class Half:
        def __init__(self, f):
            self.f = f
        def __getattr__(self, name):
            return getattr(self.f, name)
        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real(path, lambda f: writer(Half(f)))

artifacts.atomic_write = killed
from sensplan.cli import main
sys.exit(main({[a.format(ws=ws, out=out) for a in [*SCAN, *DIGITS]]!r}))
"""
    before = (out / "scan.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "scan.json").read_bytes() == before
    assert json.loads((out / "scan.json").read_text())["format"] == "sensplan.scan"
    # the half-written temporary file is hidden beside it; the finished probes are in the journal
    assert [p.name for p in out.glob(".scan.json.*.tmp")]


def test_an_artifact_written_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    from sensplan._artifacts import atomic_write_bytes

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "scan.json").write_text("old")
    link = tmp_path / "scan.json"
    link.symlink_to(tmp_path / "real" / "scan.json")
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and (tmp_path / "real" / "scan.json").read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["scan.json"]  # no temporary left
