"""``sensplan export``: every exporter on a CNN plan (pruning, per-channel int weights, int8 inputs)
and on a transformer plan (head/MLP pruning, group-wise int weights), checked against what the
target tool does with the file: Torch-Pruning's own pruner replays the channels sensplan's executor
removes, ONNX Runtime's quantize_static quantizes exactly the plan's int8 layers at the plan's scales,
compressed-tensors validates the llm-compressor recipe, and the name patterns of ModelOpt, GPTQModel,
AutoRound and NNCF resolve, by each tool's documented matching rule, to the plan's per-layer formats.
"""

from __future__ import annotations

import ast
import copy
import csv
import fnmatch
import json
import re

import pytest
import torch

from sensplan._errors import IncompatibleModelError, UserInputError
from sensplan._tables import Scan
from sensplan.cli import main
from sensplan.planner import Budget, Plan, compress, make_plan
from sensplan.planner._costs import Costs, option_key
from sensplan.planner.export import EXPORTERS, export_plan, load_exporters, replay_torch_pruning
from sensplan.sensitivity import ModelSpec, ScanConfig, scan
from tests.conftest import CIFAR_RESNET, RESNET20_JPEG, needs_shared, seeded_model, self_labelled

SPEC = ModelSpec("sensplan:tiny_resnet")
CNN_SETTINGS = {"prune": [{"ratio": 0.25}, {"ratio": 0.5}], "weight_quant": [{"bits": 8}, {"bits": 4}],
                "act_quant": [{"calib": "minmax", "bits": 8}]}


def hand_plan(table, picks) -> Plan:
    """A plan whose choices are exactly ``picks`` ([(unit, method, setting subset)]), the rest none."""
    base = make_plan(table, [Budget.parse("size=0.99")])
    data = copy.deepcopy(dict(base.data))
    alloc = data["plans"]["planned"]
    for c in alloc["choices"].values():
        c.update(method=None, setting={}, label="none", effect={})
    for unit, method, setting in picks:
        r = next(r for r in table.results if r["unit"] == unit and r["method"] == method
                 and all(r["setting"].get(k) == v for k, v in setting.items())
                 and len(r["setting"]) == len(setting) + ("n_remove" in r["setting"] and "n_remove" not in setting))
        alloc["choices"][f"{r['axis']}:{unit}"].update(method=method, setting=dict(r["setting"]), label=r["label"],
                                                         effect=dict(r["effect"]))
    data["plans"]["uniform"] = None
    return Plan(data, "0" * 64, "plan.json")


@pytest.fixture(scope="module")
def cnn():
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 48)
    calib = self_labelled(model, 32, seed=9)
    table = scan(model, data, ScanConfig(CNN_SETTINGS), calib=calib, model_spec=SPEC, progress=False)
    groups = [g for g in table.groups if any(r["unit"] == g and r["method"] == "prune" for r in table.results)]
    return model, data, calib, table, groups


def test_the_built_in_exporters_are_registered():
    names = set(load_exporters().names())
    assert {"torch-pruning", "onnxruntime", "modelopt", "llm-compressor", "gptqmodel", "autoround", "nncf",
            "csv"} <= names
    assert all(EXPORTERS.origin(n) == "built-in" for n in names)
    with pytest.raises(UserInputError, match="Did you mean 'modelopt'"):
        EXPORTERS.get("modelop")


# -- csv ------------------------------------------------------------------------------------------
def test_csv_has_one_row_per_block_with_its_effect(cnn, tmp_path):
    model, data, calib, table, groups = cnn
    layers = list(table.layers)
    plan = hand_plan(table, [(groups[0], "prune", {"ratio": 0.5}), (layers[0], "weight_quant", {"bits": 4}),
                             (layers[0], "act_quant", {"calib": "minmax", "bits": 8})])
    export_plan(plan, "csv", tmp_path / "plan.csv")
    rows = list(csv.DictReader((tmp_path / "plan.csv").read_text().splitlines()))
    choices = plan.variant()["choices"]
    assert [r["block"] for r in rows] == list(choices)
    by = {r["block"]: r for r in rows}
    g = by[f"channels:{groups[0]}"]
    assert int(g["n_remove"]) == choices[f"channels:{groups[0]}"]["effect"]["removed"] > 0
    assert float(g["removed_fraction"]) == pytest.approx(int(g["n_remove"]) / int(g["channels"]))
    assert by[f"weight:{layers[0]}"]["weight_bits"] == "4" and by[f"weight:{layers[0]}"]["weight_dtype"] == "int"
    assert by[f"activation:{layers[0]}"]["act_bits"] == "8"
    assert all(r["method"] == "" for b, r in by.items() if not choices[b]["method"])
    assert json.loads(by[f"weight:{layers[0]}"]["setting"]) == {"bits": 4}


def test_csv_names_never_run_as_spreadsheet_formulas(cnn, tmp_path):
    model, data, calib, table, groups = cnn
    layers = list(table.layers)
    plan = hand_plan(table, [(layers[0], "weight_quant", {"bits": 4})])
    data_ = copy.deepcopy(dict(plan.data))
    c = data_["plans"]["planned"]["choices"][f"weight:{layers[0]}"]
    c["label"] = '=HYPERLINK("http://x","int4")'
    export_plan(Plan(data_), "csv", tmp_path / "plan.csv")
    row = next(r for r in csv.DictReader((tmp_path / "plan.csv").read_text().splitlines())
               if r["block"] == f"weight:{layers[0]}")
    assert row["label"] == "'" + c["label"] and row["weight_bits"] == "4"


# -- torch-pruning --------------------------------------------------------------------------------
def test_torch_pruning_replay_matches_the_executor(cnn, tmp_path):
    model, data, calib, table, groups = cnn
    plan = hand_plan(table, [(groups[0], "prune", {"ratio": 0.5}), (groups[-1], "prune", {"ratio": 0.25})])
    x = data.x[:1]
    export_plan(plan, "torch-pruning", tmp_path / "tp.json", model=model, example_input=x)
    spec = json.loads((tmp_path / "tp.json").read_text())
    assert spec["target"] == "torch-pruning" and len(spec["groups"]) == 2
    assert spec["pruning_ratio_dict"] == {g["root"]: g["n_remove"] / g["channels"] for g in spec["groups"]}
    # the indices are Torch-Pruning's own GroupMagnitudeImportance ranking on the unpruned weights
    import torch_pruning as tp

    ref = copy.deepcopy(model).eval()
    dg = tp.DependencyGraph().build_dependency(ref, example_inputs=x)
    mods = dict(ref.named_modules())
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    for g in spec["groups"]:
        root = mods[g["root"]]
        full = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, list(range(g["channels"])))
        scores = imp(full)
        assert g["idxs"] == sorted(torch.argsort(scores, stable=True)[: g["n_remove"]].tolist())
    # replayed with Torch-Pruning's pruner: the executor's shapes and outputs (no recalibration)
    replayed = replay_torch_pruning(copy.deepcopy(model), tmp_path / "tp.json", x)
    cm, _ = compress(model, plan, "planned", x)
    ours = cm.module.state_dict()
    theirs = replayed.state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert any(theirs[k].shape != v.shape for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(replayed(data.x), cm.module(data.x), atol=1e-5)


def test_torch_pruning_refuses_quantization_unless_told_to_drop_it(cnn, tmp_path):
    model, data, calib, table, groups = cnn
    layer = list(table.layers)[1]
    plan = hand_plan(table, [(groups[0], "prune", {"ratio": 0.5}), (layer, "weight_quant", {"bits": 4})])
    with pytest.raises(UserInputError, match=r"cannot express 1 choice.*weight:.*--drop-unsupported"):
        export_plan(plan, "torch-pruning", tmp_path / "tp.json", model=model, example_input=data.x[:1])
    assert not (tmp_path / "tp.json").exists()
    out = export_plan(plan, "torch-pruning", tmp_path / "tp.json", drop_unsupported=True, model=model,
                      example_input=data.x[:1])
    assert [d.block for d in out.dropped] == [f"weight:{layer}"]
    assert any(n.startswith("without the 1 dropped choice(s)") for n in out.notes), out.notes


def test_a_dropped_export_says_what_the_rest_costs_against_the_budget(cnn, tmp_path):
    """With the plan's scan at hand, the note prices what the target gets: the kept choices, the
    dropped ones left as they are. Here the dropped 4-bit layer leaves the size above the budget."""
    model, data, calib, table, groups = cnn
    layer = list(table.layers)[1]
    table.save(tmp_path / "scan.json")
    plan = hand_plan(Scan.load(tmp_path / "scan.json"),
                     [(groups[0], "prune", {"ratio": 0.5}), (layer, "weight_quant", {"bits": 4})])
    plan.data["scan"].update(path=str(tmp_path / "scan.json"), sha256=Scan.load(tmp_path / "scan.json").sha256)
    with_both = Costs(table).evaluate(Costs(table).choice_of(
        {b: option_key(c["method"], c["setting"]) for b, c in plan.variant()["choices"].items()}))
    plan.data["objective"]["budgets"] = [{"metric": "size", "absolute": with_both["size"]}]
    out = export_plan(plan, "torch-pruning", tmp_path / "tp.json", drop_unsupported=True, model=model,
                      example_input=data.x[:1])
    note = next(n for n in out.notes if n.startswith("without the 1 dropped choice(s)"))
    assert "size " in note and "NOT met" in note, note
    # planned with --max-drop: no budget, the minimised metric is priced
    plan.data["objective"].update(budgets=[], minimize="size")
    out = export_plan(plan, "torch-pruning", tmp_path / "tp.json", drop_unsupported=True, model=model,
                      example_input=data.x[:1])
    note = next(n for n in out.notes if n.startswith("without the 1 dropped choice(s)"))
    assert note.split(": ", 1)[1].startswith("size ") and "NOT met" not in note, note
    spec = json.loads((tmp_path / "tp.json").read_text())
    assert spec["dropped"][0]["block"] == f"weight:{layer}" and len(spec["groups"]) == 1


def test_a_uniform_allocation_between_the_scanned_ratios_is_priced_too(cnn, tmp_path):
    """The uniform baseline prunes every group by one ratio on a fine grid, mostly between the
    scanned ones: the note computes those costs tensor by tensor, as the baseline's own are, and
    compares them with what the plan predicted."""
    from sensplan.planner.export._core import reached_without

    _, _, _, table, _ = cnn
    table.save(tmp_path / "scan.json")
    scan_ = Scan.load(tmp_path / "scan.json")
    plan = make_plan(scan_, [Budget.parse("macs=0.6")])
    uni = plan.variant("uniform")
    scanned = {r["setting"].get("n_remove") for r in scan_.results if r["method"] == "prune"}
    assert any(c["kind"] == "group" and c["setting"]["n_remove"] not in scanned for c in uni["choices"].values())
    macs = uni["predicted"]["macs"]
    note = reached_without(plan, "uniform", set())
    assert note.split(": ", 1)[1].startswith(f"macs {macs:.6g} ") and f"against the plan's {macs:.6g}" in note, note
    assert note.endswith("still met"), note
    # without one group's pruning the MACs rise above the budget
    group = next(b for b, c in uni["choices"].items() if c["kind"] == "group")
    note = reached_without(plan, "uniform", {group})
    assert float(note.split("macs ", 1)[1].split(" ", 1)[0]) > macs and note.endswith("NOT met"), note


# -- onnxruntime ----------------------------------------------------------------------------------
def test_onnxruntime_config_quantizes_exactly_the_plans_int8_layers(cnn, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from onnxruntime.quantization import quantize_static

    from sensplan.planner.export import quantize_static_kwargs

    model, data, calib, table, groups = cnn
    layers = list(table.layers)
    int8, int4 = layers[:3], layers[3]
    picks = [(groups[0], "prune", {"ratio": 0.5}), (int4, "weight_quant", {"bits": 4})]
    picks += [(u, "weight_quant", {"bits": 8}) for u in int8]
    picks += [(u, "act_quant", {"calib": "minmax", "bits": 8}) for u in int8]
    plan = hand_plan(table, picks)
    with pytest.raises(UserInputError, match="no ONNX Runtime kernel computes with 4-bit weights"):
        export_plan(plan, "onnxruntime", tmp_path / "ort.json", model=model, example_input=data.x[:1], calib=calib)
    out = export_plan(plan, "onnxruntime", tmp_path / "ort.json", drop_unsupported=True, model=model,
                      example_input=data.x[:1], calib=calib)
    assert [d.block for d in out.dropped] == [f"weight:{int4}"]
    cfg = json.loads((tmp_path / "ort.json").read_text())
    assert set(cfg["layers"]) == set(int8) and cfg["float_layers"] == {}
    float_onnx = tmp_path / cfg["onnx_model"]
    assert float_onnx.is_file()
    # ORT's own quantizer, fed the exported configuration
    x = calib.x.numpy()
    reader = _Reader(x)
    quantize_static(str(float_onnx), str(tmp_path / "int8.onnx"), reader, **quantize_static_kwargs(cfg))
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    deq_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    for layer in layers:
        quantized = any(w.startswith(layer + ".weight") for w in deq_inputs)
        assert quantized == (layer in int8), layer
    # the int8 layers' inputs carry the plan's activation scale and zero point (the executor's)
    cm, _ = compress(model, plan_without(plan, f"weight:{int4}"), "planned", data.x[:1], calib=calib)
    act = dict(cm.records)[_act_method(cm.records)]
    by_output = {o: n for n in graph.node for o in n.output}
    weighted = {n.name: n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    for layer in int8:
        node = weighted[cfg["layers"][layer]["node"]]
        dq = by_output[node.input[0]]
        assert dq.op_type == "DequantizeLinear"
        assert float(inits[dq.input[1]]) == pytest.approx(act[layer]["scale"], rel=1e-6)
        assert int(inits[dq.input[2]]) == act[layer]["zero_point"]
    # the float layers (the excluded nodes) read float inputs
    for name in cfg["quantize_static"]["nodes_to_exclude"]:
        producer = by_output.get(weighted[name].input[0])
        assert producer is None or producer.op_type != "DequantizeLinear", name
    assert len(cfg["quantize_static"]["nodes_to_exclude"]) == len(layers) - len(int8)


def plan_without(plan: Plan, block: str) -> Plan:
    data = copy.deepcopy(dict(plan.data))
    data["plans"]["planned"]["choices"][block].update(method=None, setting={}, label="none", effect={})
    return Plan(data)


def _act_method(records) -> str:
    return next(name for name, rec in records if rec and all("scale" in v for v in rec.values()))


class _Reader:
    def __init__(self, x):
        self.batches = iter([{"input": x[i:i + 16]} for i in range(0, len(x), 16)])

    def get_next(self):
        return next(self.batches, None)


# -- a transformer plan -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from sensplan.sensitivity import load_model
    from tests import hf_tiny

    spec, data = hf_tiny.text_model("llama", tmp_path_factory.mktemp("llama"), n=4)
    model = load_model(spec)
    cfg = ScanConfig({"prune": [{"ratio": 0.5}], "weight_quant": [{"bits": 8}, {"bits": 4, "group": 32},
                                                                   {"bits": 4, "group": 32, "zero_point": True}]},
                     task="perplexity", units=("*layers.0.*",), check_samples=2)
    table = scan(model, data, cfg, model_spec=spec, progress=False)
    blocks = make_plan(table, [Budget.parse("size=0.99")]).variant()["choices"]
    layers = [u for u in table.layers if f"weight:{u}" in blocks]  # the scanned ones
    picks = [(layers[0], "weight_quant", {"bits": 8})]
    picks += [(u, "weight_quant", {"bits": 4, "group": 32}) for u in layers[1:4]]
    picks += [(layers[4], "weight_quant", {"bits": 4, "group": 32, "zero_point": True})]  # layers[5:] stay float
    assert len(layers) == 7
    group = next(g for g in table.groups if g.endswith("mlp.gate_proj"))
    plan = hand_plan(table, [*picks, (group, "prune", {"ratio": 0.5})])
    hf_names = {n for n, _ in model.model.named_modules()}
    expected = {}  # HF module name -> (bits, group size, symmetric) or None (float)
    for u in layers:
        e = plan.variant()["choices"][f"weight:{u}"]["effect"]
        expected[u.removeprefix("model.")] = ((e["weight_bits"], e.get("group_size", 0), not e.get("zero_point_bits"))
                                              if e else None)
    return plan, expected, hf_names, f"weight:{layers[0]}", group


def test_llm_compressor_recipe_validates_and_targets_the_plans_layers(llama, tmp_path):
    yaml = pytest.importorskip("yaml")
    plan, expected, hf_names, _, group = llama
    with pytest.raises(UserInputError, match="does not remove channels"):
        export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml")
    export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml", drop_unsupported=True)
    text = (tmp_path / "recipe.yaml").read_text()
    assert f"# dropped: channels:{group}" in text
    mod = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    got = {}
    for g in mod["config_groups"].values():
        w = g["weights"]
        for t in g["targets"]:
            assert t in hf_names
            got[t] = (w["num_bits"], w.get("group_size") or 0, w["symmetric"])
            assert w["strategy"] == ("group" if w.get("group_size") else "channel")
    assert got == {k: v for k, v in expected.items() if v}
    assert set(mod["ignore"]) >= {k for k, v in expected.items() if not v} | {"lm_head"}
    ct = pytest.importorskip("compressed_tensors.quantization")
    cfg = ct.QuantizationConfig(config_groups={k: ct.QuantizationScheme.model_validate(v)
                                               for k, v in mod["config_groups"].items()}, ignore=mod["ignore"])
    assert len(cfg.config_groups) == 3


def _gptq_resolve(cfg: dict, name: str):
    """GPTQModel's documented rule: the first dynamic key that re.match()es the name wins; '-:' skips
    the module, '+:' (or no prefix) overrides the base fields."""
    base = (cfg["bits"], cfg["group_size"], cfg["sym"])
    for key, over in cfg["dynamic"].items():
        sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
        if re.match(pattern, name):
            if sign == "-":
                return None
            return (over.get("bits", base[0]), over.get("group_size", base[1]), over.get("sym", base[2]))
    return base


def test_gptqmodel_and_autoround_give_every_layer_its_planned_format(llama, tmp_path):
    plan, expected, hf_names, _, _ = llama
    export_plan(plan, "gptqmodel", tmp_path / "gptq.json", drop_unsupported=True)
    cfg = json.loads((tmp_path / "gptq.json").read_text())["quantize_config"]
    export_plan(plan, "autoround", tmp_path / "ar.json", drop_unsupported=True)
    ar = json.loads((tmp_path / "ar.json").read_text())
    for name, want in expected.items():
        assert name in hf_names
        as_gptq = None if want is None else (want[0], want[1] or -1, want[2])
        assert _gptq_resolve(cfg, name) == as_gptq, name
        lc = ar["layer_config"][name]
        assert (lc == {"bits": 16}) if want is None else (lc == {"bits": want[0], "group_size": want[1] or -1,
                                                                  "sym": want[2]})
    assert (cfg["bits"], cfg["group_size"]) == (4, 32)  # the most common format is the base


def test_modelopt_config_names_each_quantizer(llama, cnn, tmp_path):
    plan, expected, hf_names, _, _ = llama
    export_plan(plan, "modelopt", tmp_path / "mo.py", drop_unsupported=True)
    text = (tmp_path / "mo.py").read_text()
    assigned = {t.id: ast.literal_eval(n.value) for n in ast.parse(text).body if isinstance(n, ast.Assign)
                for t in n.targets}  # a valid Python module of literals
    config = assigned["CONFIG"]
    assert [d["block"] for d in assigned["DROPPED"]]  # the pruning and the zero-point layer
    quant_cfg = config["quant_cfg"]
    assert list(quant_cfg)[0] == "default" and quant_cfg["default"] == {"enable": False}
    quantizers = [f"{n}.weight_quantizer" for n in hf_names if n] + [f"{n}.input_quantizer" for n in hf_names if n]
    for name, want in expected.items():
        q = f"{name}.weight_quantizer"
        matches = [p for p in quant_cfg if p != "default" and fnmatch.fnmatch(q, p)]
        if want is None or not want[2]:  # float, or zero points ModelOpt's int quantizer lacks (dropped)
            assert not matches
            continue
        assert [p for p in quant_cfg if p != "default" and any(fnmatch.fnmatch(x, p) for x in quantizers)]
        attrs = quant_cfg[matches[-1]]
        assert attrs["num_bits"] == want[0]
        assert attrs.get("block_sizes") == ({-1: want[1]} if want[1] else None)
    # the CNN plan: per-channel int8 weights and 8-bit inputs, as JSON
    model, data, calib, table, groups = cnn
    layer = list(table.layers)[0]
    cnn_plan = hand_plan(table, [(layer, "weight_quant", {"bits": 8}),
                                 (layer, "act_quant", {"calib": "minmax", "bits": 8})])
    export_plan(cnn_plan, "modelopt", tmp_path / "mo.json")
    qc = json.loads((tmp_path / "mo.json").read_text())["quant_cfg"]
    assert qc[f"{layer}.weight_quantizer"] == {"num_bits": 8, "axis": 0, "enable": True}
    assert qc[f"{layer}.input_quantizer"] == {"num_bits": 8, "axis": None, "enable": True}


def test_nncf_maps_a_mixed_plan_to_a_ratio_and_ignored_scope(llama, tmp_path):
    plan, expected, hf_names, _, _ = llama
    with pytest.raises(UserInputError, match="does not remove channels"):
        export_plan(plan, "nncf", tmp_path / "nncf.json", drop_unsupported=False)
    out = export_plan(plan, "nncf", tmp_path / "nncf.json", drop_unsupported=True)
    assert sum("one 4-bit scheme" in d.why for d in out.dropped) == 1
    doc = json.loads((tmp_path / "nncf.json").read_text())
    args = doc["compress_weights"]
    assert (args["mode"], args["group_size"], args["backup_mode"]) == ("INT4_SYM", 32, "INT8_SYM")
    # one int8 and three int4 layers kept (the asymmetric int4 layer is dropped): the ratio by layer count
    # when the plan's scan is not found, here 3 / 4
    assert args["ratio"] == pytest.approx(3 / 4) and doc["ratio_counted_by"].startswith("layers")
    assert doc["exact"] is False and out.notes
    floats = [n for n, v in expected.items() if v is None]
    assert len(floats) == 2 and set(doc["ignored_modules"]) >= set(floats)


def test_layers_the_plan_does_not_list_stay_float_in_every_target(llama, tmp_path):
    """The llama plan scans layers.0 only (``units``): layers.1 and the LM head have no choice, so the
    plan leaves them float. GPTQModel, AutoRound and NNCF quantize every layer not excluded, so each
    export must exclude them; llm-compressor and ModelOpt must not target them."""
    plan, expected, hf_names, _, _ = llama
    linear = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")
    unlisted = sorted(n for n in hf_names if linear.match(n) and n not in expected) + ["lm_head"]
    assert len(unlisted) == 8  # layers.1's seven projections and the head
    export_plan(plan, "gptqmodel", tmp_path / "gptq.json", drop_unsupported=True)
    gptq = json.loads((tmp_path / "gptq.json").read_text())["quantize_config"]
    export_plan(plan, "autoround", tmp_path / "ar.json", drop_unsupported=True)
    ar = json.loads((tmp_path / "ar.json").read_text())["layer_config"]
    export_plan(plan, "nncf", tmp_path / "nncf.json", drop_unsupported=True)
    ignored = json.loads((tmp_path / "nncf.json").read_text())["ignored_modules"]
    export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml", drop_unsupported=True)
    yaml = pytest.importorskip("yaml")
    mod = yaml.safe_load((tmp_path / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"]
    targets = {t for g in mod["QuantizationModifier"]["config_groups"].values() for t in g["targets"]}
    for name in unlisted:
        assert _gptq_resolve(gptq, name) is None, name
        assert ar[name] == {"bits": 16}, name
        assert name in ignored, name
        assert name not in targets


# -- torch-pruning on transformers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_heads(tmp_path_factory):
    """The tiny grouped-query Llama (4 query heads on 2 KV heads of 8 dims, MLP width 48) scanned for
    pruning in both layers, and the save_pretrained folder it was loaded from."""
    pytest.importorskip("transformers")
    from sensplan.sensitivity import load_model
    from tests import hf_tiny

    root = tmp_path_factory.mktemp("llama_heads")
    spec, data = hf_tiny.text_model("llama", root, n=4)
    model = load_model(spec)
    table = scan(model, data, ScanConfig({"prune": [{"ratio": 0.5}, {"ratio": 0.25}]}, task="perplexity",
                                         check_samples=2), model_spec=spec, progress=False)
    return model, data, table, root / "llama"


def _linear_shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_torch_pruning_replays_transformer_heads_and_mlp_channels_on_the_from_pretrained_model(llama_heads,
                                                                                               tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch_pruning as tp

    from sensplan.sensitivity import channel_graph

    model, data, table, folder = llama_heads
    heads = sorted(g for g in table.groups if g.endswith("self_attn.q_proj"))
    mlps = sorted(g for g in table.groups if g.endswith("mlp.gate_proj"))
    assert len(heads) == len(mlps) == 2
    plan = hand_plan(table, [(heads[1], "prune", {"ratio": 0.25}), (mlps[0], "prune", {"ratio": 0.5}),
                             (mlps[1], "prune", {"ratio": 0.25})])
    x = data.x[:1]
    export_plan(plan, "torch-pruning", tmp_path / "tp.json", model=model, example_input=x)
    spec = json.loads((tmp_path / "tp.json").read_text())
    by = {g["root"]: g for g in spec["groups"]}
    assert set(by) == {g.removeprefix("model.") for g in (heads[1], mlps[0], mlps[1])}  # the user's names
    assert spec["pruning_ratio_dict"] == {} and spec["importance"]["criterion"].startswith("L2 norm")
    # the executor's selection, on the unpruned weights
    graph = channel_graph(model, x)
    for gid in (heads[1], mlps[0], mlps[1]):
        g = by[gid.removeprefix("model.")]
        assert g["idxs"] == graph.select(gid, g["n_remove"]) and g["ratio"] == g["n_remove"] / g["channels"]
    # one KV head: its 8 key and value rows, the 16 rows of the 2 query heads that read it, and the
    # output projection's 16 columns
    h = by[heads[1].removeprefix("model.")]
    assert (h["kind"], h["channels"], h["n_remove"], h["block"]) == ("heads", 2, 1, "model.layers.1.self_attn")
    kv = h["idxs"][0]
    members = {m["module"].rpartition(".")[2]: m for m in h["members"]}
    assert {k: (m["side"], m["size"]) for k, m in members.items()} == {
        "q_proj": ("out", 32), "k_proj": ("out", 16), "v_proj": ("out", 16), "o_proj": ("in", 32)}
    assert members["k_proj"]["idxs"] == members["v_proj"]["idxs"] == list(range(8 * kv, 8 * kv + 8))
    assert members["q_proj"]["idxs"] == members["o_proj"]["idxs"] == list(range(16 * kv, 16 * kv + 16))
    assert h["attributes"] == {}  # Llama's attention reads its head count from the projections' shapes
    m0 = by[mlps[0].removeprefix("model.")]
    assert (m0["kind"], m0["channels"], m0["n_remove"]) == ("mlp", 48, 24)
    assert [(m["module"], m["side"], m["idxs"]) for m in m0["members"]] == [
        (f"model.layers.0.mlp.{n}", side, m0["idxs"]) for n, side in
        (("gate_proj", "out"), ("up_proj", "out"), ("down_proj", "in"))]
    # replayed on the user's model, from_pretrained, with Torch-Pruning's functions: the executor's
    # shapes and logits
    cm, _ = compress(model, plan, "planned", x)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert replay_torch_pruning(hf, tmp_path / "tp.json") is hf
    assert _linear_shapes(hf) == _linear_shapes(cm.module.model) != _linear_shapes(model.model)
    ids, mask = data.x[:, 0].long(), data.x[:, 1].long()
    with torch.no_grad():
        ours = cm.module(data.x)
        assert torch.allclose(hf(input_ids=ids, attention_mask=mask, use_cache=False).logits, ours, atol=1e-5)
    # the documented snippet, with torch and torch_pruning only
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    modules = dict(plain.named_modules())
    for g in spec["groups"]:
        for m in g["members"]:
            prune = tp.prune_linear_out_channels if m["side"] == "out" else tp.prune_linear_in_channels
            prune(modules[m["module"]], m["idxs"])
        for attr, value in g["attributes"].items():
            setattr(modules[g["block"]], attr, value)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask, use_cache=False).logits, ours, atol=1e-5)
    # a second replay finds the model pruned already: one clear refusal, nothing changed
    with pytest.raises(IncompatibleModelError, match="replay on the unpruned model"):
        replay_torch_pruning(hf, tmp_path / "tp.json")
    assert _linear_shapes(hf) == _linear_shapes(cm.module.model)


def test_torch_pruning_sets_the_head_attributes_sensplan_lowers(tmp_path):
    """BERT's self-attention keeps num_attention_heads and all_head_size: the file states their new
    values, and the replay on BertForSequenceClassification.from_pretrained matches sensplan's own
    removal (TransformerGraph.prune_)."""
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from sensplan.planner.export.torch_pruning import _transformer_group
    from sensplan.sensitivity import channel_graph, load_model
    from tests import hf_tiny

    folder = hf_tiny.save("bert", tmp_path / "bert")
    model = load_model(ModelSpec(f"hf:{folder}"))
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    graph = channel_graph(model, x[:1])
    gid = next(g for g in graph.group_ids() if g.endswith("layer.0.attention.self.query"))
    request = SimpleNamespace(target_name=lambda u: u.removeprefix("model."))
    entry = _transformer_group(request, model, graph, gid, 1)  # 1 of 4 heads
    assert entry["block"] == "bert.encoder.layer.0.attention.self"
    assert entry["attributes"] == {"num_attention_heads": 3, "all_head_size": 24}
    assert [(m["module"].rpartition(".")[2], m["side"], len(m["idxs"])) for m in entry["members"]] == [
        ("query", "out", 8), ("key", "out", 8), ("value", "out", 8), ("dense", "in", 8)]
    ours = copy.deepcopy(model)
    channel_graph(ours, x[:1]).prune_(gid, entry["idxs"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    replay_torch_pruning(hf, {"target": "torch-pruning", "groups": [entry]})
    assert _linear_shapes(hf) == _linear_shapes(ours.model)
    block = hf.get_submodule(entry["block"])
    assert (block.num_attention_heads, block.all_head_size) == (3, 24)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ours(x), atol=1e-5)


def test_torch_pruning_refuses_gpt2_conv1d_groups_with_the_reason(tmp_path):
    """GPT-2's c_attn/c_proj/c_fc are Conv1D in the user's model (weights stored transposed): Torch-Pruning's
    linear functions would cut the wrong dimension, so their groups are refused, or dropped and listed."""
    pytest.importorskip("transformers")
    from sensplan.sensitivity import load_model
    from tests import hf_tiny

    spec, data = hf_tiny.text_model("gpt2", tmp_path, n=2)
    model = load_model(spec)
    table = scan(model, data, ScanConfig({"prune": [{"ratio": 0.5}]}, task="perplexity", units=("*h.0.*",),
                                         check_samples=2), model_spec=spec, progress=False)
    pruned = sorted({r["unit"] for r in table.results if r["method"] == "prune"})
    assert {g.rpartition(".")[2] for g in pruned} == {"c_attn", "c_fc"}
    plan = hand_plan(table, [(g, "prune", {"ratio": 0.5}) for g in pruned])
    with pytest.raises(UserInputError, match=r"cannot express 2 choice.*GPT-2's Conv1D.*no pruning function"):
        export_plan(plan, "torch-pruning", tmp_path / "tp.json", model=model, example_input=data.x[:1])
    assert not (tmp_path / "tp.json").exists()
    out = export_plan(plan, "torch-pruning", tmp_path / "tp.json", drop_unsupported=True, model=model,
                      example_input=data.x[:1])
    assert sorted(d.block for d in out.dropped) == [f"channels:{g}" for g in pruned]
    assert json.loads((tmp_path / "tp.json").read_text())["groups"] == [] and out.notes


def test_a_file_written_beside_out_never_replaces_one_of_the_users(cnn, tmp_path):
    """onnxruntime writes <out stem>.onnx beside --out: an existing file there that an earlier export
    to the same --out did not write (the user's own model.onnx, or the plan) is refused before any
    work; the export's own earlier file is replaced."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, data, calib, table, groups = cnn
    layer = list(table.layers)[0]
    plan = hand_plan(table, [(layer, "weight_quant", {"bits": 8}),
                             (layer, "act_quant", {"calib": "minmax", "bits": 8})])
    theirs = tmp_path / "model.onnx"
    theirs.write_bytes(b"the user's own deployed model")
    calls = []

    def loader():
        calls.append(1)
        from sensplan.planner.export import LoadedModel

        return LoadedModel(model, data.x[:1], calib)

    with pytest.raises(UserInputError, match=r"--out .*model\.json: the onnxruntime export also writes .*model\.onnx "
                                             r"beside it, and that file exists.*Choose another --out"):
        export_plan(plan, "onnxruntime", tmp_path / "model.json", model_loader=loader)
    assert theirs.read_bytes() == b"the user's own deployed model" and not (tmp_path / "model.json").exists()
    assert not calls  # refused before the model was loaded
    # the plan itself, named like the .onnx: refused from the command line too (exit 2, one line)
    Plan(plan.data).save(tmp_path / "p.onnx")
    assert main(["export", "--plan", str(tmp_path / "p.onnx"), "--to", "onnxruntime",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert json.loads((tmp_path / "p.onnx").read_text())["format"] == "sensplan.plan"
    # an export's own .onnx is replaced when the export is made again
    export_plan(plan, "onnxruntime", tmp_path / "ort.json", model_loader=loader)
    first = (tmp_path / "ort.onnx").stat().st_mtime_ns
    export_plan(plan, "onnxruntime", tmp_path / "ort.json", model_loader=loader)
    assert (tmp_path / "ort.onnx").stat().st_mtime_ns >= first and len(calls) == 2


def test_the_modelopt_python_module_parses_whatever_the_plan_path(cnn, tmp_path):
    model, data, calib, table, groups = cnn
    layer = list(table.layers)[0]
    plan = hand_plan(table, [(layer, "weight_quant", {"bits": 8})])
    odd = 'C:\\Users\\me\\"""plan\n.json'  # a backslash escape, a docstring's quotes, a newline
    plan = Plan(plan.data, plan.sha256, odd)
    export_plan(plan, "modelopt", tmp_path / "mo.py")
    text = (tmp_path / "mo.py").read_text()
    assigned = {t.id: ast.literal_eval(n.value) for n in ast.parse(text).body if isinstance(n, ast.Assign)
                for t in n.targets}
    assert assigned["SOURCE"]["plan"]["path"] == odd
    assert assigned["CONFIG"]["quant_cfg"][f"{layer}.weight_quantizer"] == {"num_bits": 8, "axis": 0, "enable": True}
    export_plan(plan, "llm-compressor", tmp_path / "r.yaml")
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["quant_stage"]


def test_llm_targets_refuse_a_cnn_plan(cnn, tmp_path):
    model, data, calib, table, groups = cnn
    plan = hand_plan(table, [(list(table.layers)[0], "weight_quant", {"bits": 4})])
    for target in ("gptqmodel", "autoround"):
        with pytest.raises(UserInputError, match="is for Hugging Face transformers"):
            export_plan(plan, target, tmp_path / "x.json")


# -- the command line ---------------------------------------------------------------------------
def test_cli_exports_lists_and_refuses_with_exit_2(cnn, tmp_path, capsys):
    model, data, calib, table, groups = cnn
    plan = hand_plan(table, [(groups[0], "prune", {"ratio": 0.5}), (list(table.layers)[0], "weight_quant",
                                                                     {"bits": 4})])
    path = tmp_path / "plan.json"
    Plan(plan.data).save(path)
    assert main(["export", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "torch-pruning:" in listed and "(needs the model)" in listed
    assert main(["export", "--plan", str(path), "--to", "csv", "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == len(plan.variant()["choices"]) + 1
    assert main(["export", "--plan", str(path), "--to", "modelopt", "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot express 1 choice" in err and "--drop-unsupported" in err and len(err.strip().splitlines()) == 1
    assert main(["export", "--plan", str(path), "--to", "modelopt", "--drop-unsupported",
                 "--out", str(tmp_path / "m.json")]) == 0
    err = capsys.readouterr().err
    assert "dropped (--drop-unsupported) 1 choice(s): " in err and "\n  channels:" in err
    assert "note: without the 1 dropped choice(s)" in err
    # torch-pruning from the CLI rebuilds the plan's model (sensplan:tiny_resnet, random weights)
    assert main(["export", "--plan", str(path), "--to", "torch-pruning", "--drop-unsupported",
                 "--out", str(tmp_path / "tp.json")]) == 0
    assert len(json.loads((tmp_path / "tp.json").read_text())["groups"]) == 1
    assert main(["export", "--plan", str(path), "--to", "nope", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    # no uniform allocation met the budget (null): the flag to change, and to what
    Plan({**plan.data, "plans": {**plan.data["plans"], "uniform": None}}).save(tmp_path / "unull.json")
    assert main(["export", "--plan", str(tmp_path / "unull.json"), "--to", "csv", "--variant", "uniform",
                 "--out", str(tmp_path / "u.csv")]) == 2
    err = capsys.readouterr().err
    assert "--variant uniform: the plan has no uniform allocation" in err and "--variant planned" in err
    assert not (tmp_path / "u.csv").exists()


def test_exporting_needs_no_torch_for_file_only_targets(cnn, tmp_path):
    from tests.test_torch_free import run_blocked

    model, data, calib, table, groups = cnn
    plan = hand_plan(table, [(list(table.layers)[0], "weight_quant", {"bits": 4})])
    Plan(plan.data).save(tmp_path / "plan.json")
    code = ("import sys\nfrom sensplan.cli import main\n"
            "codes = [main(['export', '--plan', sys.argv[1] + '/plan.json', '--to', t, '--out', sys.argv[1] + '/' + t])"
            " for t in ('csv', 'modelopt', 'llm-compressor', 'nncf')]\n"
            "print('EXIT', codes, [m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_pruning')])\n")
    proc = run_blocked(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "EXIT [0, 0, 0, 0] []"


def test_a_third_party_exporter_registers_by_name(tmp_path, cnn):
    from sensplan.planner.export import Exported, Exporter

    class Count(Exporter):
        name = "count-layers"

        def export(self, request):
            return Exported(str(len(request.layers(all_layers=False))))

    EXPORTERS.add("count-layers", Count())
    try:
        model, data, calib, table, groups = cnn
        plan = hand_plan(table, [(u, "weight_quant", {"bits": 8}) for u in list(table.layers)[:2]])
        export_plan(plan, "count-layers", tmp_path / "n.txt")
        assert (tmp_path / "n.txt").read_text() == "2"
    finally:
        EXPORTERS.remove("count-layers")


@pytest.mark.shared
@needs_shared
def test_torch_pruning_replay_on_the_real_resnet20(tmp_path):
    import numpy as np

    from sensplan.sensitivity import EvalSet, load_model

    spec = ModelSpec(f"{CIFAR_RESNET}:resnet20")
    model = load_model(spec, str(RESNET20_JPEG))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    data = EvalSet(x, y, [str(i) for i in range(10)], {"spec": "synthetic", "kind": "synthetic", "n": 16, "seed": 0,
                                                        "input_shape": [3, 32, 32]}, np.arange(16))
    table = scan(model, data, ScanConfig({"prune": [{"ratio": 0.5}]}, check_samples=2), model_spec=spec,
                 progress=False)
    pruned = sorted({r["unit"] for r in table.results})
    assert len(pruned) >= 5
    plan = hand_plan(table, [(g, "prune", {"ratio": 0.5}) for g in pruned])
    export_plan(plan, "torch-pruning", tmp_path / "tp.json", model=model, example_input=x[:1])
    replayed = replay_torch_pruning(load_model(spec, str(RESNET20_JPEG)), tmp_path / "tp.json", x[:1])
    cm, _ = compress(model, plan, "planned", x[:1])
    assert ({k: v.shape for k, v in replayed.state_dict().items()}
            == {k: v.shape for k, v in cm.module.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(replayed(x), cm.module(x), atol=1e-4)


def test_a_plan_that_quantizes_nothing_is_not_a_recipe_to_quantize_everything(cnn, tmp_path):
    """NNCF compresses every layer it is not told to skip, and llm-compressor needs a config group:
    a pruning-only plan has nothing to give them."""
    model, data, calib, table, groups = cnn
    plan = hand_plan(table, [(groups[0], "prune", {"ratio": 0.5})])
    for target in ("nncf", "llm-compressor"):
        out = tmp_path / f"x.{target}"
        with pytest.raises(UserInputError, match=r"quantizes no layer .* nothing to export.*--to torch-pruning"):
            export_plan(plan, target, out, drop_unsupported=True)
        assert not out.exists()
