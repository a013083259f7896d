"""``sensplan frontier`` on the demo's digits CNN: a sweep of size budgets, predicted at every budget
and measured at three; every point's plan is a plan that applies; the report shows the frontier;
user mistakes exit 2 naming the flag; ``--measure 0`` needs no torch."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sensplan._errors import UserInputError
from sensplan._tables import Scan
from sensplan.cli import main
from sensplan.planner import Frontier, Plan, compress, make_frontier, measured_points, sweep_budgets
from sensplan.planner._demo import DEMO_MODEL, train_digits_model
from sensplan.sensitivity import ModelSpec, load_model
from tests.conftest import ROOT
from tests.test_torch_free import BLOCKER

POINTS, MEASURE = 5, 3
#: the demo's data: scanned on 300 test digits, recalibrated on training digits; the other 240 test
#: digits are held out, and the frontier is measured on them
DATA = ["--data", "digits:test", "--samples", "300", "--calib-data", "digits:train", "--calib-samples", "200"]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict[str, Path]:
    """The demo model trained briefly (3 epochs: about 97% top-1 on digits:test), its scan, and a
    frontier of size budgets: {"weights", "scan", "out", "stdout", "stderr"}."""
    d = tmp_path_factory.mktemp("frontier")
    torch.manual_seed(0)
    weights = d / "digits_cnn.pt"
    torch.save(train_digits_model(seed=0, epochs=3).state_dict(), weights)
    code, _, err = run(["scan", "--model", DEMO_MODEL, "--weights", str(weights), *DATA, "--bits", "8,4,2",
                        "--ratios", "0.25,0.5", "--threads", "1", "--out", str(d / "scan.json")])
    assert code == 0, err
    code, out, err = run(["frontier", "--scan", str(d / "scan.json"), "--metric", "size", "--points", str(POINTS),
                          "--measure", str(MEASURE), "--threads", "1", "--out", str(d / "frontier")])
    assert code == 0, err
    return {"weights": weights, "scan": d / "scan.json", "out": d / "frontier", "stdout": out, "stderr": err}


@pytest.fixture(scope="module")
def frontier(swept) -> dict:
    return dict(Frontier.load(swept["out"] / "frontier.json").data)


def test_the_sweep_runs_from_the_cheapest_cost_up_in_log_steps():
    assert sweep_budgets(1.0, 16.0, 4) == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert sweep_budgets(10.0, 100.0, 3, "linear") == pytest.approx([10.0, 40.0, 70.0])
    assert measured_points(8, 3) == [0, 4, 7]
    assert measured_points(5, 5) == [0, 1, 2, 3, 4]
    assert measured_points(8, 1) == [0] and measured_points(8, 0) == []


def test_points_are_ordered_by_cost_and_each_plan_keeps_its_budget(swept, frontier):
    points = frontier["points"]
    assert [p["index"] for p in points] == list(range(POINTS))
    budgets = [p["budget"]["absolute"] for p in points]
    assert budgets == sorted(budgets) and len(set(budgets)) == POINTS
    assert budgets[0] == pytest.approx(frontier["cheapest"])
    assert budgets[-1] < frontier["original"]["size"]
    for p in points:
        predicted = p["planned"]["predicted"]
        assert predicted["size"] <= p["budget"]["absolute"] * (1 + 1e-9)
        assert p["budget"]["fraction"] == pytest.approx(p["budget"]["absolute"] / frontier["original"]["size"])
    drops = [p["planned"]["predicted"]["drop"] for p in points]
    assert all(a >= b - 1e-12 for a, b in zip(drops, drops[1:], strict=False)), drops  # looser: never worse
    assert drops[0] > 0.05 > drops[-1]  # the sweep spans the knee: the cheapest plan breaks the model
    assert f"{swept['out'] / 'frontier.json'}" in swept["stdout"]
    assert "planned drop" in swept["stderr"] and "uniform drop" in swept["stderr"]


def test_the_planner_never_loses_to_uniform_on_prediction(frontier):
    compared = 0
    for p in frontier["points"]:
        uni = p["uniform"]
        if uni is None:
            continue
        assert uni["predicted"]["size"] <= p["budget"]["absolute"] * (1 + 1e-9)
        # the planner can choose the uniform allocation only where it prunes scanned fractions; an
        # off-grid fraction's drop interpolates between scanned ones (see test_plan.py)
        if uni["on_grid"]:
            compared += 1
            assert p["planned"]["predicted"]["drop"] <= uni["predicted"]["drop"] + 1e-12, p["index"]
    assert compared >= 2


def test_the_measured_points_have_measured_scores_and_costs(frontier):
    ms = frontier["measurement"]
    assert ms["points"] == measured_points(POINTS, MEASURE) == [0, 2, 4]
    assert ms["split"] == "held-out" and ms["n"] == 240 and "out of sample" in ms["measured_on"]
    assert ms["baseline"]["score"] > 0.9
    for p in frontier["points"]:
        for variant in ("planned", "uniform"):
            entry = p[variant]
            if entry is None:
                continue
            m = entry["measured"]
            if p["index"] not in ms["points"]:
                assert m is None
                continue
            assert 0.0 <= m["score"] <= 1.0 and m["n"] == 240
            assert m["drop"] == pytest.approx(ms["baseline"]["score"] - m["score"])
            assert m["drop_se"] >= 0.0
            predicted = entry["predicted"]
            assert m["macs"] == predicted["macs"] and m["params"] == predicted["params"]  # exact, as apply measures
            assert m["size"] == pytest.approx(predicted["size"], rel=0.01)  # packed parts round up to bytes
    tightest = frontier["points"][0]["planned"]["measured"]
    assert tightest["drop"] > frontier["points"][-1]["planned"]["measured"]["drop"]


def test_every_point_plan_loads_validates_and_applies(swept, frontier, tmp_path):
    model = load_model(ModelSpec(DEMO_MODEL), swept["weights"])
    example = torch.zeros(2, 1, 8, 8)
    for p in frontier["points"]:
        path = swept["out"] / p["plan"]["path"]
        plan = Plan.load(path)
        assert plan.sha256 == p["plan"]["sha256"]
        assert plan.variant()["predicted"]["drop"] == p["planned"]["predicted"]["drop"]
        assert run(["validate", str(swept["scan"]), str(path)])[0] == 0
        for variant in ("planned", "uniform"):
            if plan.data["plans"][variant] is not None:
                compressed, _ = compress(model, plan, variant, example)
                assert compressed.module(example).shape == (2, 10)
    tightest = swept["out"] / frontier["points"][0]["plan"]["path"]
    code, _, err = run(["apply", "--model", DEMO_MODEL, "--weights", str(swept["weights"]), *DATA, "--plan",
                        str(tightest), "--variants", "planned", "--no-timing", "--threads", "1", "--out",
                        str(tmp_path / "applied")])
    assert code == 0, err
    metrics = json.loads((tmp_path / "applied" / "metrics.json").read_text())
    assert metrics["budgets"][0]["met"]
    assert metrics["after"]["macs"] == frontier["points"][0]["planned"]["measured"]["macs"]


def test_the_png_is_a_valid_png(swept):
    from PIL import Image

    png = swept["out"] / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_the_report_shows_the_frontier(swept, tmp_path):
    code, _, err = run(["report", "--scan", str(swept["scan"]), "--frontier", str(swept["out"] / "frontier.json"),
                        "--out", str(tmp_path / "report")])
    assert code == 0, err
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Pareto frontier</h2>" in html and "240 held-out items" in html
    assert (tmp_path / "report" / "frontier.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,fragment", [
    (["--points", "1", "--measure", "0"], "--points must be >= 2"),
    (["--points", "4", "--measure", "5"], "--measure 5 is more than --points 4"),
    (["--metric", "sise"], "did you mean --metric size"),
    (["--out", "{scan}/frontier"], "is a file, not a directory. Choose another --out"),
])
def test_a_mistake_is_one_line_naming_the_flag_and_exit_2(swept, tmp_path, extra, fragment):
    argv = ["frontier", "--scan", str(swept["scan"]), "--metric", "size", "--out", str(tmp_path / "f")]
    argv += [a.format(scan=swept["scan"]) for a in extra]  # a later flag wins
    code, out, err = run(argv)
    assert code == 2 and out == ""
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f").exists()


def test_a_metric_the_scanned_methods_cannot_lower_is_refused(swept):
    quantized = Scan.load(swept["scan"]).restricted(["weight_quant"])  # weights alone: MACs stay as they are
    with pytest.raises(UserInputError, match=r"No scanned setting lowers macs.*Sweep another --metric \(size, "):
        make_frontier(quantized, "macs", 4)


def test_measure_0_needs_no_torch(swept, tmp_path):
    code = BLOCKER + textwrap.dedent(f"""
        from sensplan.cli import main
        code = main(["frontier", "--scan", {str(swept["scan"])!r}, "--metric", "bits", "--points", "3",
                     "--measure", "0", "--out", {str(tmp_path / "f")!r}])
        loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        sys.exit(code or (9 if loaded else 0))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "f" / "frontier.json").read_text())
    assert data["measurement"] is None and len(data["points"]) == 3
    assert all((tmp_path / "f" / p["plan"]["path"]).is_file() for p in data["points"])
    assert (tmp_path / "f" / "frontier.png").is_file()


def test_help_ends_with_an_example():
    code, out, _ = run(["frontier", "--help"])
    assert code == 0 and out.startswith("usage: sensplan frontier")
    example = out[out.rindex("\nexample"):]
    assert all(line.lstrip().startswith("sensplan ") for line in example.strip().splitlines()[1:])


def test_validate_checks_a_frontier_and_its_point_plans(swept, tmp_path):
    import shutil

    assert run(["validate", str(swept["out"] / "frontier.json")])[0] == 0
    copy = tmp_path / "frontier"
    shutil.copytree(swept["out"], copy)
    plan = copy / "points" / "01" / "plan.json"
    plan.write_text(plan.read_text().replace('"planned"', '"planned" ', 1))  # a plan edited after the sweep
    code, out, _ = run(["validate", str(copy / "frontier.json")])
    assert code == 2 and "point 1's plan 'points/01/plan.json' changed since the frontier was made" in out


def test_a_frontier_with_tie_gives_tied_units_one_option_at_every_budget(tmp_path):
    from sensplan.planner import Costs
    from tests.tables import synthetic_scan

    table = synthetic_scan(seed=1)
    table.save(tmp_path / "scan.json")
    front = make_frontier(Scan.load(tmp_path / "scan.json"), "macs", 3, tie=[r"(?<=^l)\d$"])
    cm = Costs(table, tie=[r"(?<=^l)\d$"])
    for plan in front.plans:
        assert plan.data["objective"]["tie"]["groups"] == [[cm.blocks[i].name for i in g] for g in cm.ties]
        choices = plan.variant("planned")["choices"]
        for group in plan.data["objective"]["tie"]["groups"]:
            assert len({json.dumps([choices[b]["method"], choices[b]["setting"]]) for b in group}) == 1
    code, _, err = run(["frontier", "--scan", str(tmp_path / "scan.json"), "--metric", "macs", "--measure", "0",
                        "--tie", "experts", "--out", str(tmp_path / "f")])
    assert code == 2 and "--tie experts ties no two units of the scan" in err

