"""A tiny Llama's 4-bit group-wise Linear weights on ONNX Runtime as MatMulNBits nodes carrying the
plan's own codes: planned for --runtime onnxruntime, applied, exported, and scored as torch scores
the compressed model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from sensplan.cli import main  # noqa: E402
from sensplan.planner._ort_nbits import nbits_tensors  # noqa: E402

from . import hf_tiny  # noqa: E402


def test_nbits_tensors_encode_the_plans_weights_exactly_for_ort():
    """Codes on sensplan's grid (symmetric and asymmetric, groups and per channel, a short last
    block) packed as MatMulNBits takes them: ORT multiplies by exactly those weights."""
    import torch

    from sensplan.sensitivity._quant import QFormat, dequantize_codes, quantize

    rng = np.random.default_rng(0)
    for bits, group, asym in ((4, 32, False), (4, 32, True), (2, 32, True), (8, 0, False), (4, 0, True)):
        w = torch.from_numpy(rng.standard_normal((24, 48)).astype(np.float32))
        q, s, z = quantize(w, QFormat(bits, group, asym))
        w = dequantize_codes(q, s, z, group).numpy()  # on the grid, as the executor leaves it
        b, scales, zp, diff = nbits_tensors(w, bits, group, not asym)
        assert diff == 0.0
        bs = group or 64
        inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(scales, "S")]
        if zp is not None:
            inits.append(onnx.numpy_helper.from_array(zp, "Z"))
        node = onnx.helper.make_node("MatMulNBits", ["A", "B", "S", *(["Z"] if zp is not None else [])], ["Y"],
                                     domain="com.microsoft", K=48, N=24, bits=bits, block_size=bs)
        f = onnx.TensorProto.FLOAT
        graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("A", f, ["n", 48])],
                                       [onnx.helper.make_tensor_value_info("Y", f, ["n", 24])], inits)
        opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
        model = onnx.helper.make_model(graph, ir_version=10, opset_imports=opsets)
        a = rng.standard_normal((3, 48)).astype(np.float32)
        y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
        np.testing.assert_allclose(y, a @ w.T, rtol=1e-5, atol=1e-5)


def test_a_llamas_4bit_group_weights_run_as_matmulnbits_with_the_plans_codes(tmp_path: Path) -> None:
    spec, _ = hf_tiny.text_model("llama", tmp_path, n=8)
    data = ["--data", f"text:{tmp_path / 'corpus.txt'}", "--seq-len", "16", "--samples", "16"]
    model = ["--model", f"hf:{tmp_path / 'llama'}"]
    assert main(["scan", *model, *data, "--task", "perplexity", "--methods", "weight_quant", "--setting",
                 "weight_quant=4g32,4ag32,3", "--out", str(tmp_path / "scan.json")]) == 0
    assert main(["plan", "--scan", str(tmp_path / "scan.json"), "--budget", "size=0.75", "--no-verify",
                 "--runtime", "onnxruntime", "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert any("int3" in d and "not 3-bit" in d for d in plan["runtime"]["not_offered"])
    planned = {c["unit"] for c in plan["plans"]["planned"]["choices"].values() if c["method"] == "weight_quant"}
    labels = {c["label"] for c in plan["plans"]["planned"]["choices"].values() if c["method"]}
    assert planned and labels <= {"int4g32", "int4ag32"}
    assert main(["apply", *model, *data, "--plan", str(tmp_path / "plan.json"), "--runtime", "onnxruntime",
                 "--variants", "planned", "--no-timing", "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    q = m["runtime"]["quantized"]
    assert set(q["nbits_layers"]) == planned and q["nbits_nodes"] == len(planned) and q["float_layers"] == {}
    assert all(v["bits"] == 4 and v["block_size"] == 32 and v["weight_max_abs_diff"] == 0.0
               for v in q["nbits_layers"].values())
    graph = onnx.load(str(tmp_path / "r" / "model.onnx")).graph
    nodes = {n.name for n in graph.node if n.op_type == "MatMulNBits"}
    assert nodes == {v["node"] for v in q["nbits_layers"].values()}
    # the plan's exact codes: ORT scores as torch scores the compressed model (measured 2026-12-07:
    # equal log-perplexity, logits within 1.2e-7)
    rt = m["runtime"]
    assert abs(rt["compressed"]["score"] - m["after"]["score"]) <= 1e-4 * abs(m["after"]["score"])
    assert rt["compressed"]["agreement_with_torch"]["max_abs_diff"] < 1e-4
    assert rt["compressed"]["file_bytes"] < rt["original"]["file_bytes"]

    # export: the same nodes, and the float model made MatMulNBits by the exported configuration
    from sensplan.planner.export import apply_matmul_nbits

    assert main(["export", "--plan", str(tmp_path / "plan.json"), "--to", "onnxruntime", *model,
                 "--out", str(tmp_path / "ort.json")]) == 0
    cfg = json.loads((tmp_path / "ort.json").read_text())
    assert {v["node"] for v in cfg["matmul_nbits"]["nodes"].values()} == nodes
    assert sum(len(g["nodes_to_include"]) for g in cfg["matmul_nbits"]["groups"]) == len(nodes)
    done = apply_matmul_nbits(tmp_path / cfg["onnx_model"], tmp_path / "nbits.onnx", cfg)
    assert set(done["layers"]) == planned and done["float_layers"] == {}
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (tmp_path / "r" / "model.onnx", tmp_path / "nbits.onnx")]
    shape = [d if isinstance(d, int) else 2 for d in sessions[0].get_inputs()[0].shape]
    x = np.ones(shape, dtype=np.int64)  # token ids (and a mask): ones are valid for both
    outs = [s.run(None, {"input": x})[0] for s in sessions]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_a_gemms_bias_of_shape_1_n_is_carried_and_a_computed_one_keeps_the_layer_float(tmp_path: Path) -> None:
    """MatMulNBits takes a bias of exactly [N]: a constant [1, N] (which Gemm broadcasts) is reshaped;
    a bias computed in the graph has no such form, so the layer stays float with the reason."""
    import torch

    from sensplan.planner._ort_nbits import apply_nbits
    from sensplan.sensitivity._quant import QFormat, dequantize_codes, quantize

    rng = np.random.default_rng(1)
    q, s, z = quantize(torch.from_numpy(rng.standard_normal((6, 40)).astype(np.float32)), QFormat(4, 32, False))
    w = dequantize_codes(q, s, z, 32).numpy()
    bias = rng.standard_normal((1, 6)).astype(np.float32)
    f = onnx.TensorProto.FLOAT
    a = rng.standard_normal((3, 40)).astype(np.float32)
    spec = {"layers": {"fc": {"node": "gemm", "bits": 4, "block_size": 32, "group_size": 32, "symmetric": True}}}
    for computed in (False, True):
        inits = [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(bias, "C0")]
        nodes = [onnx.helper.make_node("Identity", ["C0"], ["C"])] if computed else []
        nodes.append(onnx.helper.make_node("Gemm", ["A", "W", "C" if computed else "C0"], ["Y"], name="gemm",
                                           transB=1))
        graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("A", f, ["n", 40])],
                                       [onnx.helper.make_tensor_value_info("Y", f, ["n", 6])], inits)
        onnx.save(onnx.helper.make_model(graph, ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                  tmp_path / "src.onnx")
        done = apply_nbits(tmp_path / "src.onnx", tmp_path / "dst.onnx", spec)
        y = ort.InferenceSession(str(tmp_path / "dst.onnx"), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
        np.testing.assert_allclose(y, a @ w.T + bias, rtol=1e-5, atol=1e-5)
        ops = {n.op_type for n in onnx.load(str(tmp_path / "dst.onnx")).graph.node}
        if computed:
            assert "Gemm" in ops and "MatMulNBits" not in ops and "shape [N]" in done["float_layers"]["fc"]
        else:
            assert "MatMulNBits" in ops and done["layers"]["fc"]["weight_max_abs_diff"] == 0.0
