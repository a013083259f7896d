"""``--to onnxruntime``: the plan's model as a float ONNX file plus the ``quantize_static``
configuration that makes exactly the plan's int8 layers int8 on ONNX Runtime.

The exporter runs what ``sensplan apply --runtime onnxruntime`` runs, without measuring: the
executor (``compress``: channels removed for real, weights on the plan's 8-bit grid, activation
ranges calibrated on the plan's calibration data), torch's ONNX exporter, and
:func:`sensplan.planner._ort_quant.quant_config` on the exported graph: the int8 layers' nodes and
the glue operators between them to quantize, every other weighted node excluded, and each int8
layer's input pinned to the plan's activation scale and zero point (``TensorQuantOverrides``).
Weights are quantized by ORT per output channel, symmetric int8: on the plan's grid already, ORT
finds the same codes. The float ONNX file is written beside ``--out`` (``<out stem>.onnx``).

A Linear layer's weight-only integer weights of 2, 4 or 8 bits (in groups or per channel, with or
without zero points) are listed in ``matmul_nbits``: per unit its node, bits, block size and
symmetry (:func:`sensplan.planner._ort_nbits.nbits_config`, the mapping ``apply`` uses), and
grouped by format as arguments of ORT's own ``MatMulNBitsQuantizer`` (``nodes_to_include``; it
rounds on its own scales). :func:`apply_matmul_nbits` writes the plan's own codes instead, as
``apply --runtime onnxruntime`` does.

What ORT cannot express (``kernel_problem``): a Conv's weights of 2-7 bits, in groups or with zero
points, a Linear's of 3, 5, 6 or 7 bits, 16-bit float weights, sparsity, activations below 8 bits;
and int8 activations without 8-bit per-channel symmetric weights, since ORT's integer kernels need
both.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sensplan.planner._ort_quant import STATIC_OPTIONS, int8_layers
from sensplan.planner._runtime import kernel_problem
from sensplan.planner.export._core import EXPORTERS, Exported, Exporter, ExportRequest, Unsupported, to_json


@EXPORTERS.register
class OnnxRuntimeExporter(Exporter):
    name = "onnxruntime"
    description = ("ONNX Runtime: the compressed float model (<out>.onnx) plus quantize_static's nodes, "
                   "exclusions and TensorQuantOverrides for the plan's int8 layers")
    needs_model = True
    needs_calib = True  # the glue operators between int8 layers are calibrated on the plan's data

    def beside(self, out: Path) -> list[str]:
        return [onnx_name_for(out)]

    def export(self, request: ExportRequest) -> Exported:
        from sensplan.planner import Plan

        items: list[Unsupported] = []
        modules = dict(request.loaded().model.named_modules())
        for unit, spec in request.layers(all_layers=False).items():
            why = kernel_problem("onnxruntime", spec.effect, type(modules.get(unit)).__name__)
            state = int8_layers({unit: spec.effect}).get(unit)
            if why is None and state not in (None, "int8", "nbits"):
                why = str(state).removeprefix("float: ")
            if why:
                items += request.layer_items(spec, why)
        dropped = request.unsupported(items, "plan with --runtime onnxruntime (it offers only what ONNX Runtime "
                                             "runs in int8)")
        plan = request.plan
        if dropped:  # what is dropped is not applied either: the ONNX file holds what the configuration says
            data = copy.deepcopy(dict(plan.data))
            for d in dropped:
                data["plans"][request.variant]["choices"][d.block].update(method=None, setting={}, label="none",
                                                                           effect={})
            plan = Plan(data, plan.sha256, plan.path)
        config, onnx_bytes = compressed_onnx(plan, request)
        nbits = config.get("nbits") or {"layers": {}, "float_layers": {}, "notes": []}
        onnx_name = onnx_name_for(request.out)
        doc = {**request.header(), "onnx_model": onnx_name,
               "quantize_static": {**STATIC_OPTIONS,
                                   "nodes_to_quantize": config["nodes_to_quantize"],
                                   "nodes_to_exclude": config["nodes_to_exclude"],
                                   "op_types_to_quantize": sorted(_op_types(config, onnx_bytes)),
                                   "tensor_overrides": config["tensor_overrides"]},
               "matmul_nbits": {"nodes": nbits["layers"], "groups": matmul_nbits_groups(nbits)},
               "layers": {**{u: {"node": n, "state": "int8"} for u, n in config["layers"].items()},
                          **{u: {"node": v["node"], "state": "nbits"} for u, v in nbits["layers"].items()}},
               "glue_nodes": config["glue"], "float_layers": {**config["float_layers"], **nbits["float_layers"]},
               "notes": [*config["notes"], *nbits["notes"]], "dropped": request.dropped_record(),
               "consume": "from sensplan.planner.export import quantize_static_kwargs, apply_matmul_nbits; "
                          "quantize_static(<this file's folder>/onnx_model, 'model.int8.onnx', reader, "
                          "**quantize_static_kwargs(this['quantize_static'])); "
                          "apply_matmul_nbits('model.int8.onnx', 'model.ort.onnx', this)"}
        notes = [f"{len(config['layers'])} int8 layer(s), {len(nbits['layers'])} MatMulNBits layer(s); the float "
                 f"model is {onnx_name} beside the file"]
        return Exported(to_json(doc), extra_files={onnx_name: onnx_bytes}, notes=notes)


def onnx_name_for(out: Path) -> str:
    """The float model's file name beside ``out``: ``<out stem>.onnx`` (``<out>.onnx`` for an
    ``--out`` that already ends in .onnx)."""
    name = out.with_suffix(".onnx").name
    return out.name + ".onnx" if name == out.name else name


def compressed_onnx(plan: Any, request: ExportRequest) -> tuple[dict[str, Any], bytes]:
    """The executor's model of ``plan``'s allocation, exported to ONNX, and the quantization
    configuration for it (the code path of ``apply --runtime onnxruntime``)."""
    from sensplan.planner._apply import _unit_of, compress, layer_effects
    from sensplan.planner._onnx import export_for_plan

    loaded = request.loaded()
    cm, _ = compress(loaded.model, plan, request.variant, loaded.example_input, calib=loaded.calib)
    effects = layer_effects(plan.variant(request.variant))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        config = export_for_plan(cm.module, loaded.example_input, effects, path,
                                 unit_of=lambda n: _unit_of(n, effects))
        return config, path.read_bytes()


def _op_types(config: Mapping[str, Any], onnx_bytes: bytes) -> set[str]:
    import onnx

    wanted = set(config["nodes_to_quantize"])
    return {n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node if n.name in wanted}


def quantize_static_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``onnxruntime.quantization.quantize_static``'s keyword arguments (all but the two model paths
    and the calibration reader) from an export's ``quantize_static`` section (or the whole export):
    enums by name, the overrides' scales and zero points as ORT's numpy scalars::

        cfg = json.load(open("out/ort.json"))
        model = os.path.join("out", cfg["onnx_model"])  # the float model's name, beside the file
        quantize_static(model, "model.int8.onnx", reader, **quantize_static_kwargs(cfg))
    """
    from sensplan.planner._ort_quant import quantize_static_kwargs as kwargs

    section = config.get("quantize_static", config)
    return kwargs(section)


def matmul_nbits_groups(nbits: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``matmul_nbits`` section's nodes grouped by format, as the arguments of one run of ORT's
    own ``MatMulNBitsQuantizer`` each (``bits``, ``block_size``, ``is_symmetric``,
    ``nodes_to_include``). ORT's quantizer rounds to nearest on its own scales: the same format, not
    the plan's codes (``apply_matmul_nbits`` writes those)."""
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for spec in (nbits.get("layers") or {}).values():
        groups.setdefault((int(spec["bits"]), int(spec["block_size"]), bool(spec["symmetric"])), []).append(
            spec["node"])
    return [{"bits": b, "block_size": bs, "is_symmetric": sym, "nodes_to_include": nodes}
            for (b, bs, sym), nodes in groups.items()]


def apply_matmul_nbits(src: str | Path, dst: str | Path, export: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``dst``: the ONNX model ``src`` (the export's float model, or the model
    ``quantize_static`` made of it) with the export's ``matmul_nbits`` nodes as MatMulNBits nodes
    carrying the plan's codes, scales and zero points: what ``apply --runtime onnxruntime`` does
    (:func:`sensplan.planner._ort_nbits.apply_nbits`)::

        cfg = json.load(open("ort.json"))
        apply_matmul_nbits("model.int8.onnx", "model.ort.onnx", cfg)
    """
    from sensplan.planner._ort_nbits import apply_nbits

    section = export.get("matmul_nbits", export)
    return apply_nbits(src, dst, {"layers": section.get("nodes") or {}})
