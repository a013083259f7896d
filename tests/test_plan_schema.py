"""plan.json's published JSON Schema, the checks built on it, and reading a version-1 plan.

Every plan checked here is written by the planner from a real scan of a tiny seeded model (a
ResNet, a two-layer toy for verification, a tiny Llama), through `sensplan plan` where the CLI
adds keys of its own (``runtime``).

A version-1 plan is made from a real version-2 plan by the inverse of the documented change
(docs/formats.md, "Version history"): each ``channels:G`` choice becomes ``prune[G] = {ratio,
n_remove, channels, status}`` (a group prune skipped: ``status: skipped`` with its reason), each
``weight:L`` choice ``quantize[L] = {bits}`` (32 for none), unit drops keyed ``prune:G`` /
``quantize:L``, ``score`` back to ``top1``, and the keys version 2 added are removed (task,
objective.signal and drop_map, cost_models, scope, runtime, the standard errors, the solver's
per-allocation record, the scan's sample and calibration records).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from sensplan._artifacts import file_sha256
from sensplan._errors import ArtifactError
from sensplan._plan_format import (
    PLAN_FORMAT,
    PLAN_SCHEMA_VERSION,
    migrate_plan,
    plan_schema,
    readable_versions,
    schema_problems,
)
from sensplan._validate import check_plan
from sensplan.cli import main
from sensplan.planner import Budget, Plan, Verifier, make_plan
from sensplan.sensitivity import ModelSpec, ScanConfig, scan
from tests.conftest import ROOT, seeded_model, self_labelled
from tests.test_cost_table import latency_table

SPEC = ModelSpec("sensplan:tiny_resnet")
SETTINGS = {"prune": [{"ratio": 0.25}, {"ratio": 0.5}], "weight_quant": [{"bits": 8}, {"bits": 4}],
            "act_quant": [{"calib": "minmax", "bits": 8}], "sparsity": [{"ratio": 0.5}]}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 64)
    calib = self_labelled(model, 32, seed=9)
    folder = tmp_path_factory.mktemp("resnet")
    table = scan(model, data, ScanConfig(SETTINGS), calib=calib, model_spec=SPEC, progress=False)
    table = table.save(folder / "scan.json")
    return {"model": model, "data": data, "calib": calib, "table": table, "dir": folder}


@pytest.fixture(scope="module")
def plans(resnet: dict[str, object]) -> dict[str, Path]:
    """name -> a plan.json the planner wrote from the ResNet's scan (the CLI's where it adds keys)."""
    folder: Path = resnet["dir"]  # type: ignore[assignment]
    table = resnet["table"]
    s = str(folder / "scan.json")
    out = {name: folder / f"{name}.json" for name in ("budget", "max_drop", "onnxruntime", "cost_table")}
    assert main(["plan", "--scan", s, "--budget", "size=0.3", "--no-verify", "--out", str(out["budget"])]) == 0
    assert main(["plan", "--scan", s, "--max-drop", "0.05", "--minimize", "macs", "--no-verify",
                 "--out", str(out["max_drop"])]) == 0
    assert main(["plan", "--scan", s, "--budget", "size=0.3", "--runtime", "onnxruntime", "--no-verify",
                 "--out", str(out["onnxruntime"])]) == 0
    (folder / "latency.json").write_text(json.dumps(latency_table(table)))
    assert main(["plan", "--scan", s, "--cost-table", str(folder / "latency.json"), "--budget", "latency_ms=0.8",
                 "--budget", "size=0.6", "--no-verify", "--out", str(out["cost_table"])]) == 0
    # no uniform allocation meets the budget: the planner writes null (the edit make_plan makes)
    made = make_plan(table, [Budget.parse("macs=0.5")])
    out["uniform_null"] = folder / "uniform_null.json"
    Plan({**made.data, "plans": {**made.data["plans"], "uniform": None}}).save(out["uniform_null"])
    return out


@pytest.fixture(scope="module")
def verified_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan measured before it was written (test_verify's exact two-layer toy)."""
    from tests.conftest import registered
    from tests.test_verify import Chain, Nudge, Placebo, margin_data

    folder = tmp_path_factory.mktemp("verified")
    with registered(Nudge, Placebo):
        model, data, held = Chain(), margin_data(200, 0), margin_data(200, 1)
        config = ScanConfig({"nudge": [{"sign": "same"}], "placebo": [{"level": 1}]})
        table = scan(model, data, config, progress=False).save(folder / "scan.json")
        plan = make_plan(table, [Budget.parse("size=12B")], signal="drop", rounds=2,
                         verifier=Verifier(model, data, None, held, report=margin_data(200, 2)))
    plan.save(folder / "plan.json")
    return folder / "plan.json"


@pytest.fixture(scope="module")
def transformer_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama's plan: head and MLP groups, perplexity as the task."""
    pytest.importorskip("transformers")
    from sensplan.sensitivity import load_model
    from tests import hf_tiny

    folder = tmp_path_factory.mktemp("llama")
    spec, data = hf_tiny.text_model("llama", folder, n=8)
    config = ScanConfig({"prune": [{"ratio": 0.5}], "weight_quant": [{"bits": 8}, {"bits": 4}]}, task="perplexity")
    table = scan(load_model(spec), data, config, model_spec=spec, progress=False).save(folder / "scan.json")
    make_plan(table, [Budget.parse("size=0.7")]).save(folder / "plan.json")
    return folder / "plan.json"


# -- the schema itself ----------------------------------------------------------------------------
def test_the_schema_is_draft_2020_12_and_states_the_writers_format_and_version():
    from jsonschema import Draft202012Validator

    schema = plan_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["format"] == {"const": PLAN_FORMAT}
    assert schema["properties"]["schema_version"] == {"const": PLAN_SCHEMA_VERSION}
    # docs/plan.schema.json is the package's file (a link): the published schema is the one checked
    assert (ROOT / "docs" / "plan.schema.json").read_bytes() == \
        (ROOT / "sensplan" / "schemas" / "plan.schema.json").read_bytes()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"schemas/*.json"' in pyproject and '"jsonschema>=' in pyproject


def test_the_schema_names_every_key_formats_md_documents_for_plan_json():
    text = (ROOT / "docs" / "formats.md").read_text()
    section = text.split("## `plan.json`", 1)[1].split("\n## ", 1)[0]
    tables = re.findall(r"((?:^\|.*\|\n)+)", section, flags=re.M)
    top, alloc = tables[0], tables[1]

    def keys(table: str) -> set[str]:
        first = [row.split("|")[1] for row in table.splitlines()[2:]]
        return {k for cell in first for k in re.findall(r"`([a-z_.]+)`", cell)}

    schema = plan_schema()
    for key in keys(top):
        head, _, rest = key.partition(".")
        assert head in schema["properties"], key
        if rest:
            assert rest in schema["properties"][head]["properties"], key
    allocation = schema["$defs"]["allocation"]["properties"]
    assert keys(alloc) <= set(allocation), keys(alloc) - set(allocation)
    choice = schema["$defs"]["choice"]
    assert set(choice["required"]) == {"unit", "axis", "kind", "method", "setting", "label", "effect"}
    assert choice["properties"]["kind"] == {"enum": ["group", "layer"]}


# -- real plans meet it ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["budget", "max_drop", "onnxruntime", "cost_table", "uniform_null"])
def test_every_kind_of_real_plan_meets_the_schema_and_validates_with_its_scan(plans, resnet, name, capsys):
    obj = json.loads(plans[name].read_text())
    assert schema_problems(obj) == [] and check_plan(obj) == []
    code, out, _ = _cli(["validate", str(resnet["dir"] / "scan.json"), str(plans[name])], capsys)
    assert code == 0 and out.count(": OK") == 2, out
    # what each one exercises
    if name == "max_drop":
        assert obj["objective"]["mode"] == "max_drop" and obj["objective"]["minimize"] == "macs"
    if name == "onnxruntime":
        assert obj["runtime"]["name"] == "onnxruntime" and obj["runtime"]["not_offered"]
    if name == "cost_table":
        assert "latency_ms" in obj["original"] and any(c["name"] == "table" for c in obj["cost_models"])
    if name == "uniform_null":
        assert obj["plans"]["uniform"] is None


def test_a_verified_plan_meets_the_schema(verified_plan):
    obj = json.loads(verified_plan.read_text())
    assert "verification" in obj and obj["plans"]["planned"]["verified"]["report"]["n"] == 200
    assert schema_problems(obj) == [] and check_plan(obj) == []
    assert Plan.load(verified_plan).data == obj


def test_a_transformer_plan_meets_the_schema(transformer_plan):
    obj = json.loads(transformer_plan.read_text())
    assert obj["task"]["name"] == "perplexity"
    assert any(c["kind"] == "group" for c in obj["plans"]["planned"]["choices"].values())  # heads, MLP
    assert schema_problems(obj) == [] and check_plan(obj) == []


# -- violations: one line each, with the JSON path ------------------------------------------------
def test_each_violation_is_one_line_naming_its_json_path(plans, tmp_path, capsys):
    obj = json.loads(plans["budget"].read_text())
    choices = obj["plans"]["planned"]["choices"]
    group = next(k for k, c in choices.items() if c["kind"] == "group")
    layer = next(k for k, c in choices.items() if c["kind"] == "layer")
    choices[layer]["kind"] = "grp"
    del choices[group]["channels"]
    choices[group].update(method=None, setting={"ratio": 0.5}, label="none", effect={})
    del obj["plans"]["planned"]["predicted"]["drop"]
    obj["plans"]["uniform"] = "x"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    code, out, err = _cli(["validate", str(bad)], capsys)
    assert code == 2 and "problem(s) found" in err
    lines = out.splitlines()
    assert f"{bad}: plans.planned.choices[{layer!r}].kind: 'grp' is not one of ['group', 'layer']" in lines
    assert f"{bad}: plans.planned.choices[{group!r}] lacks 'channels'" in lines
    assert f"{bad}: plans.planned.choices[{group!r}].setting is {{'ratio': 0.5}}; it must be empty where " \
           f"method is null (no compression)" in lines
    assert f"{bad}: plans.planned.predicted lacks 'drop'" in lines
    assert f"{bad}: plans.uniform is 'x', not an object or null" in lines
    assert len(lines) == 5, out
    # loading names the first, and the count of the rest
    with pytest.raises(ArtifactError, match=r"not a valid plan: plans.planned.choices.* \(and 4 more"):
        Plan.load(bad)


def test_what_the_schema_cannot_say_is_checked_beside_it(plans):
    obj = json.loads(plans["budget"].read_text())
    choices = obj["plans"]["planned"]["choices"]
    key = next(iter(choices))
    choices["weight:elsewhere"] = choices.pop(key)
    obj["original"]["size"] = float("nan")  # Python's JSON reader accepts NaN; JSON has none
    assert schema_problems(obj) == []
    problems = check_plan(obj)
    assert "original.size is nan, not a finite number (sensplan writes null for that)" in problems
    assert any(p.startswith("plans.planned.choices['weight:elsewhere'] is the choice of") for p in problems)
    assert any(p.startswith(f"plans.planned.unit_drops names {key!r}") for p in problems)


def test_a_plan_of_a_future_version_is_one_clear_message(plans, tmp_path, capsys):
    obj = json.loads(plans["budget"].read_text())
    obj["schema_version"] = PLAN_SCHEMA_VERSION + 1
    future = tmp_path / "future.json"
    future.write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match=f"schema_version {PLAN_SCHEMA_VERSION + 1}: a newer sensplan wrote "
                                            f"it.*Upgrade sensplan"):
        Plan.load(future)
    code, out, _ = _cli(["validate", str(future)], capsys)
    assert code == 2 and len(out.splitlines()) == 1 and "a newer sensplan wrote it" in out
    with pytest.raises(ArtifactError, match="a newer sensplan wrote it"):
        migrate_plan(obj)


# -- version 1 -------------------------------------------------------------------------------------
def to_version_1(v2: dict, scan_groups: dict) -> dict:
    """The inverse of the documented change from version 1 to 2 (module docstring)."""
    old = copy.deepcopy(v2)
    for k in ("task", "cost_models", "scope", "runtime"):
        old.pop(k, None)
    for k in ("signal", "drop_map"):
        old["objective"].pop(k)
    old["scan"] = {k: v for k, v in old["scan"].items() if k not in ("sample", "calibration")}
    old["scan"]["baseline"] = {("top1" if k == "score" else k): v for k, v in old["scan"]["baseline"].items()}
    old["solver"] = {k: old["solver"][k] for k in ("method", "seconds")}
    old["original"] = {k: v for k, v in old["original"].items() if k != "bits"}
    for name, alloc in old["plans"].items():
        if alloc is None:
            continue
        prune, quantize = {}, {}
        for c in alloc["choices"].values():
            if c["axis"] == "channels":
                s = c["setting"]
                prune[c["unit"]] = {"ratio": float(s.get("ratio", 0.0)), "n_remove": int(s.get("n_remove", 0)),
                                    "channels": c["channels"], "status": "scanned"}
            else:
                assert c["axis"] == "weight" and c["method"] in (None, "weight_quant")
                quantize[c["unit"]] = {"bits": c["setting"]["bits"] if c["method"] else 32}
        for gid, why in alloc["skipped"].get("prune", {}).items():
            prune[gid] = {"ratio": 0.0, "n_remove": 0, "channels": scan_groups[gid]["channels"],
                          "status": "skipped", "reason": why}
        pred = {("top1" if k == "score" else k): v for k, v in alloc["predicted"].items()
                if k not in ("drop_se", "drop_interval", "bits", "bits_fraction")}
        unit_drops = {k.replace("channels:", "prune:", 1).replace("weight:", "quantize:", 1): v
                      for k, v in alloc["unit_drops"].items()}
        new = {"prune": prune, "quantize": quantize, "predicted": pred, "unit_drops": unit_drops}
        if "uniform" in alloc:
            key = alloc["uniform"]["layer_options"].get("weight:uniform", "none")
            bits = 32 if key == "none" else json.loads(key.split(":", 1)[1])["bits"]
            new["uniform"] = {"ratio": alloc["uniform"]["ratio"], "bits": bits}
        old["plans"][name] = new
    old["schema_version"] = 1
    return old


def test_a_version_1_plan_loads_validates_and_applies_as_its_version_2_form(resnet, tmp_path, capsys):
    from sensplan.planner import compress

    table = resnet["table"].restricted(["prune", "weight_quant"])  # what version 1 could plan
    v2 = make_plan(table, [Budget.parse("size=0.4")]).save(tmp_path / "v2.json")
    v1 = to_version_1(json.loads((tmp_path / "v2.json").read_text()), table.groups)
    (tmp_path / "v1.json").write_text(json.dumps(v1, indent=2))
    before = (tmp_path / "v1.json").read_bytes()

    # migrating is pure, and gives back what version 1 recorded, in version 2's form
    migrated = migrate_plan(v1)
    assert v1["schema_version"] == 1 and "choices" not in v1["plans"]["planned"]
    assert migrated["schema_version"] == PLAN_SCHEMA_VERSION and migrated["migrated"]["from"] == 1
    for name in ("planned", "uniform"):
        new, was = migrated["plans"][name], v2.data["plans"][name]
        assert new["choices"] == was["choices"]
        assert new["unit_drops"] == was["unit_drops"]
        assert new["skipped"].get("prune") == was["skipped"].get("prune")
        v2_only = ("drop_se", "drop_interval", "bits", "bits_fraction")
        assert {k: v for k, v in new["predicted"].items() if k not in v2_only} == \
            {k: v for k, v in was["predicted"].items() if k not in v2_only}
        assert new["predicted"]["drop_se"] is None  # version 1 recorded none: unknown, not zero
    assert migrated["plans"]["uniform"]["uniform"] == v2.data["plans"]["uniform"]["uniform"]
    assert migrated["task"] == {"name": "classification", "metric": v2.data["task"]["metric"]}
    assert migrated["scan"]["baseline"]["score"] == v2.data["scan"]["baseline"]["score"]
    assert check_plan(migrated) == []

    # Plan.load reads it, says so, leaves the file alone, and keeps the file's digest for the chain
    loaded = Plan.load(tmp_path / "v1.json")
    assert "migrated in memory from version 1" in capsys.readouterr().err
    assert (tmp_path / "v1.json").read_bytes() == before
    assert loaded.sha256 == file_sha256(tmp_path / "v1.json") and loaded.data["scan"]["sha256"] == table.sha256

    # validate: the chain scan -> plan holds, and the choices re-price to the same costs by the scan
    code, out, _ = _cli(["validate", str(resnet["dir"] / "scan.json"), str(tmp_path / "v1.json")], capsys)
    assert code == 0 and f"{tmp_path / 'v1.json'}: OK" in out and "migrated in memory from version 1" in out
    # ... and --migrate writes the version-2 form elsewhere, which validates on its own
    code, out, _ = _cli(["validate", str(tmp_path / "v1.json"), "--migrate", str(tmp_path / "v1_as_v2.json")], capsys)
    assert code == 0 and "schema_version 1, migrated" in out
    written = json.loads((tmp_path / "v1_as_v2.json").read_text())
    assert written == json.loads(json.dumps(migrated)) and check_plan(written) == []
    assert (tmp_path / "v1.json").read_bytes() == before

    # applied, the two forms make the same model
    model, calib = resnet["model"], resnet["calib"]
    example = resnet["data"].x[:2]
    a, _ = compress(model, v2, "planned", example, calib=calib, progress=False)
    b, _ = compress(model, loaded, "planned", example, calib=calib, progress=False)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_older_version_has_a_chain_of_steps_to_the_current_one():
    assert readable_versions() == tuple(range(1, PLAN_SCHEMA_VERSION + 1))
    with pytest.raises(ArtifactError, match="schema_version 0, which no sensplan wrote"):
        migrate_plan({"format": PLAN_FORMAT, "schema_version": 0})


def test_migrate_mistakes_name_the_fix(plans, tmp_path, capsys):
    code, _, err = _cli(["validate", str(plans["budget"]), str(plans["max_drop"]), "--migrate",
                         str(tmp_path / "o.json")], capsys)
    assert code == 2 and "give one plan FILE, not 2 files" in err
    code, _, err = _cli(["validate", str(plans["budget"]), "--migrate", str(plans["budget"])], capsys)
    assert code == 2 and "never rewrites the plan it reads" in err
    code, out, _ = _cli(["validate", str(plans["budget"]), "--migrate", str(tmp_path / "copy.json")], capsys)
    assert code == 0 and "already current, copied" in out
    # OUT a directory, or under a file: one line naming --migrate, exit 2, no traceback
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path / "a_dir", tmp_path / "a_file" / "p.json"):
        code, out, err = _cli(["validate", str(plans["budget"]), "--migrate", str(bad)], capsys)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "--migrate" in err and "Choose another --migrate" in err
    assert (tmp_path / "a_file").read_text() == "x"
