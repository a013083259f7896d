"""The plan's int8 layers as an ONNX Runtime ``quantize_static`` configuration: one code path for
``sensplan apply --runtime onnxruntime`` and ``sensplan export --to onnxruntime``.

:func:`quant_config` reads an exported ONNX graph (torch's dynamo exporter: weight initializers keep
their module names) and the plan's per-layer states (:func:`int8_layers`) and activation parameters,
and returns plain JSON-able data: the nodes to quantize (the int8 layers and the glue operators
between them), the nodes left float, and the ``TensorQuantOverrides`` that pin each int8 layer's
input to the plan's scale and zero point. :func:`quantize_static_kwargs` turns it into ORT's keyword
arguments, and :func:`run_quantize_static` runs the quantizer with them.

Torch-free: ``onnx`` and ``onnxruntime`` (the ``ort`` extra) are imported by the functions that need
them, when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from sensplan._errors import IncompatibleModelError, first_line

#: non-weight operators whose int8 form ORT runs between quantized layers (see :func:`quant_config`)
GLUE_OPS = ("Add", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape",
            "Concat", "Clip")
#: the weighted operators a layer becomes in the exported graph
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
#: the global options of every quantization the plan asks of ORT: QDQ nodes, symmetric int8 weights
#: per output channel, asymmetric uint8 activations (the plan's act_quant parameters where pinned,
#: else ORT's own min/max calibration)
STATIC_OPTIONS: dict[str, Any] = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
                                  "weight_type": "QInt8", "calibrate_method": "MinMax"}


def layer_nodes(graph: Any, modules: Collection[str] = ()) -> dict[str, tuple[str, str, str]]:
    """Module name -> (node name, op type, activation input) for each weighted node of an
    exported graph (Conv, Gemm, MatMul with a constant weight): by its weight initializer
    ``<module>.weight`` (directly or through a Transpose), else (a Linear on 3-D input, whose
    transposed weight the exporter folds into a new initializer) by the innermost of ``modules``
    in the node's ``pkg.torch.onnx.name_scopes`` metadata."""
    import ast

    inits = {i.name for i in graph.initializer}
    source = {}
    for n in graph.node:  # a transposed weight: follow it back to its initializer
        if n.op_type in ("Transpose", "Identity") and n.input and n.input[0] in inits:
            source[n.output[0]] = n.input[0]
    out = {}
    for n in graph.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        w = source.get(n.input[1], n.input[1])
        if w in inits and w.endswith(".weight"):
            out[w[: -len(".weight")]] = (n.name, n.op_type, n.input[0])
        elif w in inits and modules:
            scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
            try:
                names = [s for s in ast.literal_eval(scopes) if s in modules] if scopes else []
            except (ValueError, SyntaxError):
                names = []
            if names and names[-1] not in out:
                out[names[-1]] = (n.name, n.op_type, n.input[0])
    return out


def int8_layers(effects: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Per layer of a plan with integer weights or activations: "int8" when ORT runs it with its
    integer kernels (:func:`~sensplan.planner._runtime.int8_weights` and 8-bit activations),
    "nbits" when its integer weights are a MatMulNBits node's (:mod:`sensplan.planner._ort_nbits`:
    a Linear's weights of 2, 4 or 8 bits; the graph decides whether the layer is one, and its
    activations then run in float), else why it runs in float."""
    from sensplan.planner._ort_nbits import nbits_problem, weight_only
    from sensplan.planner._runtime import int8_weights

    out = {}
    for layer, e in effects.items():
        integer = e.get("weight_dtype") == "int"
        a = int(e.get("act_bits", 32))
        if not integer and a == 32:
            continue
        if int8_weights(e) and a == 8:
            out[layer] = "int8"
        elif integer and weight_only(e):
            out[layer] = "nbits"
        elif a == 32:
            out[layer] = (f"float: ORT's weight-only kernel (MatMulNBits) does not take these weights: "
                          f"{nbits_problem(e)}")
        elif not integer:
            out[layer] = "float: 8-bit activations without 8-bit weights (ORT's integer kernels need both)"
        else:
            out[layer] = (f"float: no ORT kernel for these weights ({int(e.get('weight_bits', 32))}-bit"
                          f"{', grouped' if int(e.get('group_size') or 0) else ''}"
                          f"{', with zero points' if int(e.get('zero_point_bits') or 0) else ''}) with {a}-bit "
                          f"activations")
    return out


def quant_config(graph: Any, plan_layers: Mapping[str, str], act_params: Mapping[str, Mapping[str, Any]], *,
                 unit_of: Callable[[str], str] = lambda s: s, modules: Collection[str] = ()) -> dict[str, Any]:
    """What ``quantize_static`` must do to ``graph`` so that exactly the layers ``plan_layers`` marks
    "int8" run in int8 (plain data, JSON-able):

    - ``nodes_to_quantize``: those layers' nodes (``layers``: unit -> node), then the operators
      between two int8 layers (Add, Relu, pooling, ...: ``glue``) when every weighted layer around
      them is int8, so the integer kernels are not split by float islands;
    - ``nodes_to_exclude``: the weighted nodes of every other layer (they stay float);
    - ``tensor_overrides``: per int8 layer's input tensor, ``[{"scale", "zero_point"}]`` from
      ``act_params`` (the plan's activation quantization: asymmetric uint8, per tensor);
    - ``float_layers``: the plan's integer layers that stay float, with why; ``notes``.
    """
    nodes = layer_nodes(graph, modules)
    chosen: dict[str, str] = {}  # node -> unit
    float_layers: dict[str, str] = {}
    for layer, (node, _op, _x) in nodes.items():
        unit = unit_of(layer)
        state = plan_layers.get(unit)
        if state == "int8":
            chosen[node] = unit
        elif state and state != "nbits":  # the MatMulNBits layers: see _ort_nbits.nbits_config
            float_layers[unit] = state
    for unit, state in plan_layers.items():
        if state == "int8" and unit not in chosen.values():
            float_layers[unit] = "float: the layer has no weighted node in the exported graph"
    overrides: dict[str, list[dict[str, Any]]] = {}
    by_node = {n: (layer, x) for layer, (n, _op, x) in nodes.items()}
    notes = []
    for node, unit in chosen.items():
        layer, x = by_node[node]
        # the unit's input parameters belong to its first node only (a factorized layer's second
        # factor reads the tensor between them: ORT calibrates that one)
        qp = act_params.get(layer) or (act_params.get(unit) if layer in (unit, f"{unit}.0") else None)
        if not qp:
            continue
        over = [{"scale": float(qp["scale"]), "zero_point": int(qp["zero_point"])}]
        if x in overrides and overrides[x][0]["scale"] != over[0]["scale"]:
            notes.append(f"{layer} reads the same tensor as another int8 layer with other activation "
                         f"parameters; the first one's are used")
        overrides.setdefault(x, over)
    glue = _glue_nodes(graph, set(chosen), set(by_node)) if chosen else []
    return {"nodes_to_quantize": [*chosen, *glue], "nodes_to_exclude": [n for n in by_node if n not in chosen],
            "layers": {unit: node for node, unit in chosen.items()}, "glue": glue,
            "tensor_overrides": overrides, "float_layers": float_layers, "notes": notes}


def quantize_static_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """ORT's ``quantize_static`` keyword arguments (all but the model paths and the calibration
    reader) for a :func:`quant_config` result, or for the ``quantize_static`` section of an
    ``onnxruntime`` export: the enums by name, each override's scale and zero point as the numpy
    scalars ORT takes (float32, uint8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    options = {**STATIC_OPTIONS, **{k: v for k, v in config.items() if k in STATIC_OPTIONS}}
    overrides = {t: [{"scale": np.array(o["scale"], dtype=np.float32),
                      "zero_point": np.array(o["zero_point"], dtype=np.uint8)} for o in over]
                 for t, over in (config.get("tensor_overrides") or {}).items()}
    out: dict[str, Any] = {
        "quant_format": QuantFormat[options["quant_format"]], "per_channel": bool(options["per_channel"]),
        "activation_type": QuantType[options["activation_type"]], "weight_type": QuantType[options["weight_type"]],
        "calibrate_method": CalibrationMethod[options["calibrate_method"]],
        "nodes_to_quantize": list(config.get("nodes_to_quantize") or []),
        "nodes_to_exclude": list(config.get("nodes_to_exclude") or []),
        "extra_options": {"TensorQuantOverrides": overrides}}
    if config.get("op_types_to_quantize"):
        out["op_types_to_quantize"] = list(config["op_types_to_quantize"])
    return out


def run_quantize_static(src: str | os.PathLike[str], dst: str | os.PathLike[str], config: Mapping[str, Any],
                        calib: np.ndarray, *, input_name: str = "input", batch: int = 32) -> None:
    """Write ``dst``: ``src`` quantized by ORT's ``quantize_static`` as ``config`` says, calibrating
    what the overrides do not pin (the glue operators) on ``calib``. A quantizer failure is one
    :class:`IncompatibleModelError`."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{input_name: calib[i:i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    try:
        quantize_static(os.fspath(src), os.fspath(dst), Reader(), **quantize_static_kwargs(config))
    except Exception as e:  # noqa: BLE001 - ORT's quantizer failing on this graph is one message
        raise IncompatibleModelError(f"ONNX Runtime's quantizer could not quantize the exported model "
                                     f"({type(e).__name__}: {first_line(e)[:300]}). Plan with --runtime "
                                     f"onnxruntime without int8 layers, or use --runtime torch.") from e


def _glue_nodes(graph: Any, int8: set[str], weighted: set[str]) -> list[str]:
    """The non-weighted nodes of :data:`GLUE_OPS` whose nearest weighted producers and consumers
    (following the graph through other glue nodes) are all int8 nodes."""
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def ends(node: Any, up: bool, seen: set[str]) -> set[str] | None:
        """The weighted nodes reached from ``node``; None when a non-glue, non-weighted node (or
        the graph's input/output) is reached first."""
        found: set[str] = set()
        nexts = ([producer.get(i) for i in node.input if i in producer or i not in inits] if up
                 else [c for o in node.output for c in consumers.get(o, [None])])
        for m in nexts:
            if m is None:
                return None
            if m.name in weighted:
                found.add(m.name)
            elif m.op_type in GLUE_OPS and m.name not in seen:
                seen.add(m.name)
                more = ends(m, up, seen)
                if more is None:
                    return None
                found |= more
            elif m.op_type not in GLUE_OPS:
                return None
        return found

    out = []
    for n in graph.node:
        if n.op_type not in GLUE_OPS:
            continue
        up, down = ends(n, True, {n.name}), ends(n, False, {n.name})
        if up is not None and down is not None and up and down and up <= int8 and down <= int8:
            out.append(n.name)
    return out
