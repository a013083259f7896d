"""``--to llm-compressor``: an llm-compressor recipe (YAML) with one ``QuantizationModifier``.

Layers with the same scheme share a config group (``group_0``, ``group_1`` ...); its ``targets`` are
the layers' exact module names (compressed-tensors matches a target against a module's name, or as
a regex with the ``re:`` prefix). Integer weights: ``{num_bits, type: int, symmetric, strategy:
channel}`` (one scale per output row) or ``strategy: group`` with ``group_size``; ``symmetric`` is
false where the plan has zero points. 8-bit inputs: ``input_activations: {num_bits: 8, type: int,
symmetric: false, strategy: tensor, dynamic: false}`` (static, per tensor, calibrated by
llm-compressor: the plan's scale is not passed). ``ignore``: the plan's float layers and the layers
its scan left out of scope (e.g. ``lm_head``). The file's comment lines carry sensplan's provenance.
"""

from __future__ import annotations

import json
from typing import Any

from sensplan.planner.export._core import (
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    nothing_quantized,
    out_of_scope,
    quantization_only,
    to_yaml,
)


@EXPORTERS.register
class LlmCompressorExporter(Exporter):
    name = "llm-compressor"
    description = "llm-compressor: recipe YAML, a QuantizationModifier with per-layer config_groups and ignore"
    suffix = ".yaml"

    def export(self, request: ExportRequest) -> Exported:
        specs = quantization_only(request, "llm-compressor")
        groups: dict[str, dict[str, Any]] = {}
        by_scheme: dict[str, str] = {}
        ignore: list[str] = []
        for spec in specs.values():
            scheme = scheme_of(spec)
            if not scheme:
                ignore.append(spec.target)
                continue
            key = json.dumps(scheme, sort_keys=True)
            if key not in by_scheme:
                by_scheme[key] = f"group_{len(by_scheme)}"
                groups[by_scheme[key]] = {"targets": [], **scheme}
            groups[by_scheme[key]]["targets"].append(spec.target)
        if not groups:
            raise nothing_quantized(request, "llm-compressor")
        ignore += [n for n in out_of_scope(request) if n not in ignore]
        recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {
            "ignore": ignore, "config_groups": groups}}}}
        head = request.header()
        path = json.dumps(head["plan"]["path"])  # a JSON string: a newline in it would end the comment
        lines = [f"# llm-compressor recipe exported by sensplan {head['sensplan']} from {path} "
                 f"(sha256 {head['plan']['sha256']}, {request.variant} allocation)",
                 f"# model: {json.dumps(head['model']['spec'])}"]
        lines += [f"# dropped: {' '.join(d.line().splitlines())}" for d in request.dropped]
        notes = [] if request.is_transformer else ["llm-compressor's oneshot expects a Hugging Face model"]
        return Exported("\n".join(lines) + "\n" + to_yaml(recipe), notes=notes)


def scheme_of(spec: Any) -> dict[str, Any]:
    """The compressed-tensors scheme (``weights``, ``input_activations``) of one layer; {} if float."""
    out: dict[str, Any] = {}
    if spec.int_weights:
        w: dict[str, Any] = {"num_bits": spec.weight_bits, "type": "int", "symmetric": spec.symmetric,
                             "strategy": "group" if spec.group_size else "channel"}
        if spec.group_size:
            w["group_size"] = spec.group_size
        out["weights"] = w
    if spec.act_bits < 32:
        out["input_activations"] = {"num_bits": spec.act_bits, "type": "int", "symmetric": False,
                                    "strategy": "tensor", "dynamic": False}
    return out
