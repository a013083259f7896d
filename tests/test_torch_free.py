"""The planner needs numpy and scipy only: planning from files works where torch cannot import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sensplan.sensitivity import ModelSpec, ScanConfig, scan
from tests.conftest import ROOT, seeded_model, self_labelled

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = ("torch", "torch_pruning", "torchvision")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the planner must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
    for mod in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[mod]
""")

PLANNING = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import sensplan
    import sensplan.planner
    from sensplan._tables import Scan
    from sensplan.planner import Budget, Plan, TableCosts, make_plan

    out = Path(sys.argv[1])
    table = Scan.load(out / "scan.json")
    plan = make_plan(table, [Budget.parse("macs=0.6"), Budget.parse("size=0.5")])
    plan.save(out / "plan.json")
    loaded = Plan.load(out / "plan.json")
    latency = TableCosts.load(out / "latency.json")
    timed = make_plan(table, [Budget.parse("latency_ms=0.9")], cost_models=[latency])
    try:
        sensplan.planner.compress  # an executor name: it needs torch
        executor = "imported"
    except ImportError:
        executor = "refused"
    print(json.dumps({
        "torch_loaded": sorted(m for m in sys.modules
                               if m.split(".")[0] in ("torch", "torch_pruning", "torchvision")),
        "macs_fraction": loaded.variant()["predicted"]["macs_fraction"],
        "size_fraction": loaded.variant()["predicted"]["size_fraction"],
        "same": loaded.data == plan.data,
        "latency": timed.variant()["predicted"]["latency_ms"],
        "executor": executor,
        "version": sensplan.__version__,
    }))
""")


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_free")
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 48)
    cfg = ScanConfig({"prune": [{"ratio": 0.25}, {"ratio": 0.5}],
                      "weight_quant": [{"bits": 8}, {"bits": 4}]})
    table = scan(model, data, cfg, model_spec=ModelSpec("sensplan:tiny_resnet"), progress=False)
    table.save(out / "scan.json")
    latency = {"format": "sensplan.cost_table", "schema_version": 1, "metric": "latency_ms",
               "overhead": 0.5, "entries": {"head": {"axis": "weight", "costs": {
                   "none": 0.5, 'weight_quant:{"bits":8}': 0.1}}}}
    (out / "latency.json").write_text(json.dumps(latency))
    return out


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_the_blocker_really_blocks_torch():
    proc = run_blocked("import torch")
    assert proc.returncode != 0
    assert "torch is blocked" in proc.stderr


def test_planning_from_files_works_without_torch(scan_dir):
    proc = run_blocked(PLANNING, str(scan_dir))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch_loaded"] == []
    assert got["same"] is True
    assert got["macs_fraction"] <= 0.6 + 1e-9 and got["size_fraction"] <= 0.5 + 1e-9
    assert got["latency"] == pytest.approx(0.6)  # int8 head: 0.5 + 0.1, within 0.9 * 1.0
    assert got["executor"] == "refused"
    assert (scan_dir / "plan.json").is_file()


CLI_PLAN = textwrap.dedent("""
    import sys
    from sensplan.cli import main
    code = main(["plan", "--scan", sys.argv[1] + "/scan.json", "--budget", "macs=0.6", "--no-verify",
                 "--out", sys.argv[1] + "/cli-plan.json"])
    loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "torch_pruning", "torchvision")]
    print("EXIT", code, loaded)
""")


def test_sensplan_plan_no_verify_runs_without_torch(scan_dir):
    proc = run_blocked(CLI_PLAN, str(scan_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "EXIT 0 []"
    plan = json.loads((scan_dir / "cli-plan.json").read_text())
    assert "verification" not in plan and plan["plans"]["planned"]["predicted"]["drop_interval"]
