"""Plug-ins are found, not listed: built-ins by their package, other packages' by entry points; and
no planner, executor, container or core module branches on a method's name."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sensplan.sensitivity import METHODS, all_methods

ROOT = Path(__file__).resolve().parents[1]

#: modules that must never name a method: the planner (decisions, executor, container), the
#: report and the torch-free core (the CLI's flag shortcuts such as --bits are its own business)
NAME_FREE = [*sorted((ROOT / "planner").glob("*.py")), *sorted((ROOT / "planner" / "export").glob("*.py")),
             *sorted((ROOT / "reports").glob("*.py")),
             *sorted(p for p in (ROOT / "sensplan").glob("*.py")
                     # version-1 plans named their two methods in the format itself (prune and
                     # quantize maps): the migration to version 2 must write those names
                     if p.name != "_plan_format.py")]


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String constants of a module, docstrings left out (prose may name a method)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("path", NAME_FREE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_planner_executor_container_or_core_module_names_a_method(path):
    names = {m.name for m in all_methods()}
    found = [(line, value) for line, value in _string_constants(path) if value in names]
    assert not found, f"{path.name} branches on method names at {found}: ask the method instead"


def test_the_check_catches_a_method_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docstrings may say prune."""\n\ndef f(m):\n    return m.name == "prune"\n')
    assert _string_constants(bad) == [(4, "prune")]


def test_every_module_of_the_methods_package_registers_a_built_in_method():
    import pkgutil

    import sensplan.sensitivity.methods as pkg

    modules = {i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_")}
    owners = {type(m).__module__.rpartition(".")[2] for m in all_methods()
              if METHODS.origin(m.name) == "built-in"}
    assert modules and modules <= owners


THIRD_PARTY = '''
    """A package that adds a method, a task and a cost model to sensplan by entry points."""
    import numpy as np
    import torch
    from torch import nn

    from sensplan._metric import Metric
    from sensplan.planner import Term
    from sensplan.sensitivity import Task, TaskResult, WeightMethod
    from sensplan.sensitivity.tasks import run_batches


    class AbsmaxQuant(WeightMethod):
        """Per-channel symmetric integer weights, scale = max |w| / qmax."""
        name = "absmax_quant"
        axis = "weight"
        stage = 30
        default_settings = ({"bits": 8}, {"bits": 4})
        setting_key = "bits"
        description = "per-channel symmetric integer weights, scale = max|w| (third party)"

        def check_setting(self, setting):
            bits = setting["bits"]
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"The 'bits' setting of absmax_quant must be an int in 2..8. Got {bits!r}.")
            return {"bits": bits}

        def label(self, setting):
            return f"absmax int{setting['bits']}"

        def level(self, setting):
            return 32.0 - setting["bits"]

        def effect(self, setting, unit):
            return {"weight_bits": setting["bits"], "weight_dtype": "int", "scale_bits": 32}

        def transform(self, ctx, layer, w, setting):
            qmax = 2 ** (setting["bits"] - 1) - 1
            amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
            scale = (amax / qmax).view(-1, *[1] * (w.dim() - 1))
            return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


    class Top3(Task):
        name = "top3"
        metric = Metric("top3", higher_is_better=True, unit="fraction")
        needs_labels = True
        description = "top-3 accuracy (third party)"

        def evaluate(self, model, data, state, batch_size=500, device=None, dtype=None):
            hits, loss = [], 0.0
            for logits, y, _ in run_batches(model, data, batch_size, device, dtype):
                hits.append((logits.topk(3, dim=1).indices == y[:, None]).any(dim=1).float())
                loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            per = torch.cat(hits)
            return TaskResult(float(per.sum()) / len(data), loss / len(data), len(data), per)


    class FloatLayers:
        """How many layers keep float32 weights."""
        name = "float_layers"
        metrics = ("float_layers",)

        def __init__(self, scan):
            self.scan = scan

        def terms(self, blocks):
            return {"float_layers": [Term((i,), np.array([1.0] + [0.0] * (len(b.options) - 1)))
                                     for i, b in enumerate(blocks) if b.kind == "layer" and b.axis == "weight"]}

        def describe(self):
            return {"name": "float_layers", "metrics": ["float_layers"], "units": {"float_layers": "count"}}


    class Broken:
        def __init__(self):
            raise RuntimeError("this plug-in cannot start")


    class NoScan:
        """A cost model that forgot to take the scan."""
        name = "noscan"
        metrics = ("noscan",)


    class WrongTerms(FloatLayers):
        """A cost model whose tables are one entry short."""
        name = "wrongterms"
        metrics = ("wrongterms",)

        def terms(self, blocks):
            return {"wrongterms": [Term((i,), np.zeros(len(b.options) - 1)) for i, b in enumerate(blocks)]}


    from sensplan.sensitivity import METHODS


    @METHODS.register
    class Twice(AbsmaxQuant):
        """Registered by its decorator on import, and by an entry point too."""
        name = "twice_quant"
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny third-party distribution on a path of its own: a module and its entry points."""
    root = tmp_path_factory.mktemp("site")
    (root / "sensplan_absmax.py").write_text(textwrap.dedent(THIRD_PARTY))
    info = root / "sensplan_absmax-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sensplan-absmax\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[sensplan.methods]\nabsmax_quant = sensplan_absmax:AbsmaxQuant\nbroken = sensplan_absmax:Broken\n"
        "twice_quant = sensplan_absmax:Twice\n\n"
        "[sensplan.tasks]\ntop3 = sensplan_absmax:Top3\n\n"
        "[sensplan.cost_models]\nfloat_layers = sensplan_absmax:FloatLayers\nnoscan = sensplan_absmax:NoScan\n"
        "wrongterms = sensplan_absmax:WrongTerms\n")
    return root


def sensplan(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sensplan", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_a_third_party_package_adds_a_method_a_task_and_a_cost_model(site, tmp_path):
    listed = sensplan(site, tmp_path, "methods")
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert "  absmax_quant\n" in out
    assert "from: entry point absmax_quant = sensplan_absmax:AbsmaxQuant (sensplan-absmax 0.1)" in out
    assert "top3: top-3 accuracy (third party) [from: entry point top3" in out
    assert "float_layers (plan --cost-model float_layers): float_layers [from: entry point" in out
    # a broken plug-in is named, and the rest of sensplan works
    assert "broken = sensplan_absmax:Broken: RuntimeError: this plug-in cannot start" in out
    # registered by its own decorator and by an entry point: one method, from the entry point
    assert "  twice_quant\n" in out and "twice_quant = sensplan_absmax:Twice:" not in out
    assert "from: entry point twice_quant = sensplan_absmax:Twice" in out

    fast = ["--samples", "120", "--calib-samples", "60", "--threads", "1", "--check-samples", "2"]
    scanned = sensplan(site, tmp_path, "scan", "--model", "sensplan:digits_cnn", "--model-arg", "width=8",
                       "--data", "digits", *fast, "--methods", "absmax_quant,prune", "--ratios", "0.5",
                       "--task", "top3", "--out", "scan.json")
    assert scanned.returncode == 0, scanned.stderr
    table = json.loads((tmp_path / "scan.json").read_text())
    assert table["task"]["name"] == "top3"
    rows = [r for r in table["results"] if r["method"] == "absmax_quant"]
    assert {r["unit"] for r in rows} == set(table["layers"])

    planned = sensplan(site, tmp_path, "plan", "--scan", "scan.json", "--cost-model", "float_layers",
                       "--budget", "float_layers=20%", "--no-verify", "--out", "plan.json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    chosen = plan["plans"]["planned"]["choices"]
    floats = [c for c in chosen.values() if c["axis"] == "weight" and not c["method"]]
    assert len(floats) <= 1 and plan["plans"]["planned"]["predicted"]["float_layers"] == len(floats)
    assert {c["method"] for c in chosen.values() if c["axis"] == "weight"} >= {"absmax_quant"}

    # a cost model that cannot start, or whose terms do not fit: one line naming it, exit 2
    for model, fragment in (("noscan", "The cost model 'noscan' (entry point noscan = sensplan_absmax:NoScan"),
                            ("wrongterms", "The cost model 'wrongterms' gave terms sensplan cannot use")):
        bad = sensplan(site, tmp_path, "plan", "--scan", "scan.json", "--cost-model", model, "--budget",
                       "size=0.9", "--no-verify", "--out", "bad.json")
        assert bad.returncode == 2 and fragment in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # the plan names a method this installation does not have: said so, not taken for a typo
    missing = sensplan(tmp_path, tmp_path, "apply", "--model", "sensplan:digits_cnn", "--model-arg", "width=8",
                       "--data", "digits", *fast[:-2], "--plan", "plan.json", "--no-timing", "--out", "res")
    assert missing.returncode == 2
    assert "The plan uses the compression method 'absmax_quant', which is not installed here" in missing.stderr


def test_a_closed_pipe_ends_quietly(tmp_path):
    done = subprocess.run(f"{sys.executable} -m sensplan methods | head -n 1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("compression methods")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
