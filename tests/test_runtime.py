"""The applied plan on ONNX Runtime: real pruned shapes, the plan's int8 layers as QDQ nodes, scored
and timed against the original; options without a kernel dropped at plan time; timing hygiene."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from sensplan.planner import Budget, Plan, apply_plan, make_plan
from sensplan.planner._runtime import (
    compare_latency,
    kernel_problem,
    load_warning,
    runtime_options,
    time_interleaved,
)
from sensplan.sensitivity import ModelSpec, ScanConfig, scan
from tests.conftest import seeded_model, self_labelled

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SPEC = ModelSpec("sensplan:tiny_resnet")
SETTINGS = {
    "prune": [{"ratio": 0.25}, {"ratio": 0.5}],
    "weight_quant": [{"bits": 8}, {"bits": 4}],
    "act_quant": [{"calib": "minmax", "bits": 8}],
    "sparsity": [{"ratio": 0.5}],
}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = seeded_model("tiny_resnet")
    data = self_labelled(model, 96)
    calib = self_labelled(model, 48, seed=9)
    table = scan(model, data, ScanConfig(SETTINGS), calib=calib, model_spec=SPEC, progress=False)
    return model, data, calib, table


def mixed_plan(table, int8_layers: list[str], pruned: dict[str, float]) -> Plan:
    """A plan by hand: ``int8_layers`` with 8-bit weights and activations, ``pruned`` groups at the
    given ratio, the rest untouched (the edit a tool writing plans would make)."""
    base = make_plan(table, [Budget.parse("size=0.99")])
    data = copy.deepcopy(dict(base.data))
    alloc = data["plans"]["planned"]
    for c in alloc["choices"].values():
        c.update(method=None, setting={}, label="none", effect={})
    rows = {(r["unit"], r["method"], json.dumps(r["setting"], sort_keys=True)): r for r in table.results}
    picks = [(u, "weight_quant", {"bits": 8}) for u in int8_layers]
    picks += [(u, "act_quant", {"calib": "minmax", "bits": 8}) for u in int8_layers]
    for g, ratio in pruned.items():
        picks.append(next((g, "prune", r["setting"]) for r in table.results
                          if r["unit"] == g and r["method"] == "prune" and r["setting"]["ratio"] == ratio))
    for unit, method, setting in picks:
        r = next(v for k, v in rows.items() if k[0] == unit and k[1] == method
                 and all(v["setting"].get(a) == b for a, b in setting.items()))
        alloc["choices"][f"{r['axis']}:{unit}"].update(method=method, setting=dict(r["setting"]),
                                                         label=r["label"], effect=dict(r["effect"]))
    data["plans"]["uniform"] = None
    return Plan(data)


def test_a_pruned_mixed_int8_plan_runs_on_onnxruntime_and_agrees_with_torch(setup, tmp_path):
    model, data, calib, table = setup
    layers = list(table.layers)
    groups = [g for g in table.groups if any(r["unit"] == g and r["method"] == "prune" for r in table.results)]
    int8 = layers[: len(layers) // 2]
    plan = mixed_plan(table, int8, {groups[0]: 0.5})
    m = apply_plan(model, plan, data, tmp_path, calib=calib, runtime="onnxruntime", latency_batch=4,
                   model_spec=SPEC)
    rt = m["runtime"]
    path = tmp_path / "model.onnx"
    assert path.exists() and rt["compressed"]["file_bytes"] == path.stat().st_size
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    # the pruned shapes are real: each weight has the torch module's shape
    from sensplan.planner import load_compressed

    reloaded = load_compressed(tmp_path / "model.sensplan", copy.deepcopy(model))
    torch_shapes = {n + ".weight": tuple(mod.weight.shape) for n, mod in reloaded.named_modules()
                    if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    float_shapes = {k: tuple(v.dims) for k, v in inits.items() if k in torch_shapes}
    assert float_shapes == {k: v for k, v in torch_shapes.items() if k in float_shapes}
    assert any(v != tuple(seeded_model("tiny_resnet").get_submodule(k[:-7]).weight.shape)
               for k, v in torch_shapes.items())  # something was pruned
    # the plan's int8 layers are QDQ with int8 weights and the plan's activation scale; the rest float
    assert rt["quantized"]["int8_nodes"] == len(int8)
    q_weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and "bias" not in n.input[0]}
    for layer in layers:
        quantized = any(w.startswith(layer + ".weight") for w in q_weights)
        assert quantized == (layer in int8), layer
        if layer in int8:
            w = next(inits[w] for w in q_weights if w.startswith(layer + ".weight"))
            assert w.data_type == onnx.TensorProto.INT8
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the activations are quantized
    # ORT runs the file and agrees with the torch model it came from
    assert rt["compressed"]["agreement_with_torch"]["top1_agreement"] >= 0.9
    assert rt["original"]["agreement_with_torch"]["top1_agreement"] == 1.0
    assert rt["original"]["agreement_with_torch"]["max_abs_diff"] < 1e-3
    assert abs(rt["compressed"]["score"] - m["after"]["score"]) <= 0.1
    assert set(rt["latency"]["batches"]) == {"1", "4"}
    for b in rt["latency"]["batches"].values():
        assert b["original"]["iters"] == b["compressed"]["iters"] >= 10
    assert set(rt["speedup"]) == {"batch 1", "batch 4"}
    # torch timing is interleaved too, and the load is recorded
    assert m["timing"]["batches"]["1"]["original"]["iters"] == m["timing"]["batches"]["1"]["compressed"]["iters"]
    assert "loadavg_1m" in m["timing"]["load_before"]
    # the report shows the runtime's numbers beside torch's
    from sensplan.reports import render_report

    html = render_report(table, tmp_path / "report", plan=plan, result=tmp_path, force=True).read_text()
    assert "on ONNX Runtime" in html and "speed-up" in html and "model.onnx" in html


def test_the_plans_activation_parameters_reach_the_onnx_file(setup, tmp_path):
    model, data, calib, table = setup
    layer = list(table.layers)[1]
    plan = mixed_plan(table, [layer], {})
    apply_plan(model, plan, data, tmp_path, calib=calib, runtime="onnxruntime", latency_batch=2, timing=False)
    header = json.loads(json.dumps(load_records(tmp_path / "model.sensplan")))
    qp = header["act_quant"][layer]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    scales = sorted(float(inits[n.input[1]]) for n in graph.node
                    if n.op_type == "QuantizeLinear" and inits[n.input[1]].ndim == 0)
    assert any(abs(s - qp["scale"]) <= 1e-6 * qp["scale"] for s in scales)


def load_records(path) -> dict:
    from sensplan.planner._compressed import read_header

    header, _ = read_header(path, payload=False)
    return dict(header["records"])


def test_options_without_an_onnxruntime_kernel_are_dropped_with_the_reason(setup):
    _, _, _, table = setup
    kept, dropped = runtime_options(table, "onnxruntime")
    methods = {r["method"] for r in kept.results}
    assert "sparsity" not in methods and {"prune", "weight_quant", "act_quant"} <= methods
    # 4-bit weights stay only on Linear layers (MatMulNBits); a Conv's are dropped
    linear = {u for u, info in table.layers.items() if info["type"] == "Linear"}
    assert linear and all(r["setting"].get("bits") == 8 or r["unit"] in linear
                          for r in kept.results if r["method"] == "weight_quant")
    assert {r["unit"] for r in kept.results if r["method"] == "weight_quant" and r["setting"]["bits"] == 4} == linear
    reasons = {d["method"]: d["reason"] for d in dropped}
    assert "sparse" in reasons["sparsity"] and "4-bit weights of a Conv2d" in reasons["weight_quant"]
    same, none = runtime_options(table, "torch")
    assert same is table and none == []
    assert kernel_problem("onnxruntime", {"weight_dtype": "float16", "weight_bits": 16})
    assert kernel_problem("onnxruntime", {"act_bits": 4})
    assert kernel_problem("onnxruntime", {"weight_dtype": "int", "weight_bits": 8, "group_size": 32}, "Conv2d")
    w4 = {"weight_dtype": "int", "weight_bits": 4, "group_size": 32, "zero_point_bits": 4}
    assert kernel_problem("onnxruntime", w4, "Linear") is None
    assert "not 3-bit" in kernel_problem("onnxruntime", {**w4, "weight_bits": 3}, "Linear")
    assert kernel_problem("onnxruntime", {"removed": 3}) is None


def test_on_onnxruntime_8_bit_activations_go_only_with_8_bit_weights(setup):
    """ORT runs a layer in int8 only with int8 weights and activations; a Linear's 4-bit weights run
    as MatMulNBits with float activations. So the 8-bit activation option conflicts with float
    weights and with 4-bit weights, and 8-bit weights conflict with float activations."""
    from sensplan.planner import Costs

    _, _, _, table = setup
    kept, _ = runtime_options(table, "onnxruntime")
    cm = Costs(kept, signal="drop")
    linear = next(u for u, info in table.layers.items() if info["type"] == "Linear")
    w = cm.index[next(b.name for b in cm.blocks if b.unit == linear and b.axis == "weight")]
    a = cm.index[next(b.name for b in cm.blocks if b.unit == linear and b.axis == "activation")]
    conflicts = {frozenset(pair) for pair in cm.conflicts}
    bits = {k: o.effect.get("weight_bits") for k, o in enumerate(cm.blocks[w].options)}
    assert {4, 8} <= set(bits.values()) and len(cm.blocks[a].options) > 1
    for ka in range(1, len(cm.blocks[a].options)):  # every 8-bit activation option
        for kw, b in bits.items():
            assert (frozenset({(a, ka), (w, kw)}) in conflicts) == (b != 8), (ka, kw, b)
    for kw, b in bits.items():
        assert (frozenset({(w, kw), (a, 0)}) in conflicts) == (b == 8)
    # a rule without its allowed keys (as written before they were recorded): only 'none' is refused
    from sensplan._tables import Scan

    older = Scan({**kept.data, "requires": [r[:4] for r in kept.data["requires"]]}, kept.sha256, kept.path)
    old_conflicts = {frozenset(pair) for pair in Costs(older, signal="drop").conflicts}
    for ka in range(1, len(cm.blocks[a].options)):
        assert {kw for kw in bits if frozenset({(a, ka), (w, kw)}) in old_conflicts} == {0}


def test_interleaved_timing_runs_each_model_alike_and_flags_a_loaded_machine():
    calls: list[str] = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2,
                         min_iters=5, max_iters=7, max_seconds=0.0)
    assert t["a"]["iters"] == t["b"]["iters"] == 5
    assert calls[4:] == ["a", "b"] * 5  # after the warm-ups, round by round
    idle = {"loadavg_1m": 0.1, "cores": 4}
    busy = {"loadavg_1m": 7.5, "cores": 4}
    steady = {"m": {"p50_ms": 1.0, "p95_ms": 1.2}}
    assert load_warning(idle, idle, 1, steady) is None
    assert "load average was 7.5" in load_warning(idle, busy, 1, steady)
    # /proc/stat samples: 3 of 4 cores busy, this process 1 of them -> 2 cores of other work
    a = {**idle, "_cpu": [0.0, 0.0, 0.0]}
    b = {**idle, "_cpu": [10.0, 30.0, 10.0]}
    assert "other processes kept 2.0 of 4 cores busy" in load_warning(a, b, 2, steady)
    assert load_warning(a, b, 1, steady) is None  # 3 spare cores: 2 busy leaves room
    assert "p95 more than twice" in load_warning(idle, idle, 1, {"m": {"p50_ms": 1.0, "p95_ms": 3.0}})
    r = compare_latency({"x": lambda v: v.sum(), "y": lambda v: v.mean()}, np.ones((1, 3)), [1, 2], threads=1,
                        max_seconds=0.0)
    assert set(r["batches"]) == {"1", "2"} and r["threads"] == 1


def test_plan_for_onnxruntime_offers_only_options_with_a_kernel_and_says_which_it_left_out(setup, tmp_path, capsys):
    from sensplan.cli import main

    _, _, _, table = setup
    scan_path = tmp_path / "scan.json"
    table.save(scan_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "--scan", str(scan_path), "--budget", "size=0.3", "--no-verify", "--runtime",
                 "onnxruntime", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "(sparsity) on 5 unit(s): ONNX Runtime has no sparse kernel" in err
    plan = Plan.load(out)
    for name in ("planned", "uniform"):
        alloc = plan.data["plans"][name]
        if alloc is None:
            continue
        for c in alloc["choices"].values():
            assert c["method"] != "sparsity"
            assert c["method"] != "weight_quant" or c["setting"]["bits"] == 8 or c["unit"] == "head"
        # ORT computes in int8 only with both: 8-bit weights and 8-bit activations come together
        # (a Linear's 4-bit weights run as MatMulNBits, whatever its activations)
        nbits = {c["unit"] for c in alloc["choices"].values() if c["method"] == "weight_quant"
                 and c["setting"]["bits"] != 8}
        by_layer = {}
        for c in alloc["choices"].values():
            if c["kind"] == "layer" and c["method"] and c["unit"] not in nbits:
                by_layer.setdefault(c["unit"], set()).add(c["method"])
        assert any("weight_quant" in m for m in by_layer.values())
        assert all(("weight_quant" in m) == ("act_quant" in m) for m in by_layer.values()), by_layer
    assert plan.data["runtime"]["name"] == "onnxruntime" and plan.data["runtime"]["not_offered"]
    # the same scan planned for torch may use them
    torch_plan = tmp_path / "torch.json"
    assert main(["plan", "--scan", str(scan_path), "--budget", "size=0.3", "--no-verify", "--out",
                 str(torch_plan)]) == 0
    assert "runtime" not in Plan.load(torch_plan).data


@pytest.mark.parametrize(("argv", "message"), [
    (["--runtime", "tensorrt"], "--runtime takes one of torch, onnxruntime. Got 'tensorrt'"),
    (["--latency-batch", "0"], "--latency-batch must be"),
])
def test_apply_runtime_mistakes_name_the_flag(argv, message, tmp_path, capsys):
    from sensplan.cli import main

    code = main(["apply", "--model", "sensplan:tiny_resnet", "--plan", str(tmp_path / "missing.json"),
                 "--data", "digits:test", "--out", str(tmp_path / "out"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


class _Tokens(torch.nn.Module):
    """Linear layers on 3-D input (batch, positions, features), as in a transformer: the exporter
    folds their transposed weights into new initializers, so only its name metadata finds them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(1)


def test_linear_layers_on_3d_input_run_in_int8_on_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = _Tokens().eval()
    data = self_labelled(model, 64, shape=(5, 8))
    cfg = ScanConfig({"weight_quant": [{"bits": 8}], "act_quant": [{"calib": "minmax", "bits": 8}]})
    table = scan(model, data, cfg, calib=data, progress=False)
    plan = mixed_plan(table, ["a", "b"], {})
    m = apply_plan(model, plan, data, tmp_path, calib=data, runtime="onnxruntime", latency_batch=2, timing=False)
    q = m["runtime"]["quantized"]
    assert q["int8_nodes"] == 2 and q["float_layers"] == {}
    assert m["runtime"]["compressed"]["agreement_with_torch"]["top1_agreement"] >= 0.9


def test_peak_memory_is_the_sessions_own_even_from_a_large_process(tmp_path):
    """The child that measures a session's peak memory reads its own high-water mark: Linux's
    ru_maxrss starts from the parent's at fork, so from a process larger than the session (this
    one has torch loaded) it measured 0 MiB."""
    from onnx import TensorProto, helper, numpy_helper

    from sensplan.planner._onnx import peak_memory_mb

    w = numpy_helper.from_array(np.ones((2560, 4096), dtype=np.float32), "w")  # 40 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["out"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2560])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 4096])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    ballast = torch.ones(200 * 2 ** 20 // 4)  # make sure this process is far larger than the session
    peak = peak_memory_mb(path, torch.zeros(1, 2560), 8, 1)
    del ballast
    assert peak is not None and peak >= 35, peak
