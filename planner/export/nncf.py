"""``--to nncf``: the arguments of ``nncf.compress_weights`` (as JSON describing the call).

NNCF compresses weights in one primary ``mode`` (``INT4_SYM``/``INT4_ASYM`` with a ``group_size``,
-1 = per output channel; or ``INT8_SYM``/``INT8_ASYM``, per channel) and puts the rest in a
``backup_mode`` (``INT8_SYM``/``INT8_ASYM``/``NONE``); ``ratio`` is the share of the weights in the
primary mode. A plan that mixes 4- and 8-bit layers maps to ratio = (weights of its 4-bit layers) /
(weights of all its integer layers), counted from the plan's scan when it is found (else by layer
count, and the file says so). NNCF then picks *which* layers get 4 bits by its own sensitivity
metric: the plan's proportion is kept, its per-layer choice is not (the file says so under
``exact``). NNCF's ``ratio`` counts Linear/MatMul (and embedding) weights only: convolutions are
always compressed in the backup mode, so a 4-bit convolution is refused and the ratio leaves the
8-bit convolutions out (which layers are convolutions is read from the plan's scan).

The plan's float layers are listed as ``ignored_modules`` (module names). NNCF's ignored scope names
graph nodes, not modules, and its PyTorch node names are not module names (``stem/0/conv2d/0``; a
decoder layer called from a ``ModuleList`` loses its index: ``model/self_attn/q_proj/linear/1`` is
``model.layers.1.self_attn.q_proj``), so :func:`nncf_arguments` resolves them on the model: it traces
NNCF's graph and ignores every operation that reads a weight of a module the plan does not quantize
(those, and modules the plan never saw, such as embeddings, which NNCF compresses with
``all_layers``).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sensplan.planner.export._core import (
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    LayerSpec,
    Unsupported,
    nothing_quantized,
    out_of_scope,
    plan_scan,
    quantization_only,
    to_json,
)


@EXPORTERS.register
class NncfExporter(Exporter):
    name = "nncf"
    description = "NNCF: compress_weights mode/group_size/ratio/backup_mode and the float layers to ignore"

    def export(self, request: ExportRequest) -> Exported:
        specs = quantization_only(request, "NNCF compress_weights", int_bits=(4, 8), activations=False)
        int4 = {u: s for u, s in specs.items() if s.int_weights and s.weight_bits == 4}
        int8 = {u: s for u, s in specs.items() if s.int_weights and s.weight_bits == 8}
        items: list[Unsupported] = []
        scanned = scan_layers(request)
        convs = {u for u, v in (scanned or {}).items() if _CONV.match(str(v.get("type", "")))}
        for u in convs & set(int4):
            items += request.layer_items(int4[u], "NNCF compresses convolutions only in its 8-bit backup mode (its "
                                                  "4-bit modes take Linear/MatMul and embedding weights)")
        for s in int8.values():
            if s.group_size:
                items += request.layer_items(s, "NNCF's 8-bit weight modes are per output channel, not grouped")
        four = Counter((s.symmetric, s.group_size) for u, s in int4.items() if u not in convs).most_common(1)
        eight = Counter(s.symmetric for s in int8.values() if not s.group_size).most_common(1)
        for u, s in int4.items():
            if u not in convs and (s.symmetric, s.group_size) != four[0][0]:
                items += request.layer_items(s, "NNCF takes one 4-bit scheme (symmetry, group size) per call")
        for s in int8.values():
            if not s.group_size and s.symmetric != eight[0][0]:
                items += request.layer_items(s, "NNCF takes one 8-bit scheme (symmetry) per call")
        dropped = {d.block for d in request.unsupported(items, "plan with one 4-bit and one 8-bit format")}
        int4 = {u: s for u, s in int4.items() if not set(s.blocks) & dropped}
        int8 = {u: s for u, s in int8.items() if not set(s.blocks) & dropped}
        floats = [s.target for u, s in specs.items() if u not in int4 and u not in int8]
        floats += [n for n in out_of_scope(request) if n not in floats]
        # NNCF's ratio is over the weights its 4-bit mode may take: convolutions always get the backup mode
        defining = [u for u in int8 if u not in convs]
        sizes, counted_by = _weights(scanned, [*int4, *defining])
        args: dict[str, Any]
        if int4:
            sym, group = Counter((s.symmetric, s.group_size) for s in int4.values()).most_common(1)[0][0]
            backup = ("INT8_SYM" if eight[0][0] else "INT8_ASYM") if int8 else "NONE"
            total = sum(sizes[u] for u in [*int4, *defining])
            args = {"mode": "INT4_SYM" if sym else "INT4_ASYM", "group_size": group or -1,
                    "ratio": round(sum(sizes[u] for u in int4) / total, 6), "backup_mode": backup}
        elif int8:
            args = {"mode": "INT8_SYM" if eight[0][0] else "INT8_ASYM"}
        else:
            raise nothing_quantized(request, "NNCF compress_weights")
        args["all_layers"] = True
        exact = (not int4 or not defining)
        doc = {**request.header(), "compress_weights": args, "ignored_modules": floats,
               "layers": {s.target: _state(s) for s in specs.values()},
               "ratio_counted_by": counted_by if int4 and defining else None,
               "exact": exact, "exact_note": None if exact else (
                   "NNCF picks which layers get the 4-bit mode by its own sensitivity metric; the plan's share "
                   "of 4-bit weights is kept, its per-layer choice is not"),
               "dropped": request.dropped_record()}
        notes = ([] if exact else [doc["exact_note"]]) + (
            unchecked_note(request, "which layers are convolutions (NNCF's 4-bit modes skip them)") if int4 else [])
        return Exported(to_json(doc), notes=notes)


def _state(spec: LayerSpec) -> str:
    if not spec.int_weights:
        return "float (ignored_modules)"
    return f"int{spec.weight_bits}{'' if spec.symmetric else ' asym'}" + (
        f" g{spec.group_size}" if spec.group_size else "")


_CONV = re.compile(r"^Conv(Transpose)?[123]d$")


def scan_layers(request: ExportRequest) -> dict[str, Any] | None:
    """The ``layers`` of the plan's scan (found at its recorded path with its recorded digest), else None."""
    import json

    path = plan_scan(request.plan)
    if path is None:
        return None
    layers: dict[str, Any] = json.loads(path.read_text()).get("layers") or {}
    return layers


def unchecked_note(request: ExportRequest, what: str) -> list[str]:
    """A note for the export's output when the plan's scan was not found, so ``what`` could not be
    checked against the model's layers."""
    if scan_layers(request) is not None:
        return []
    path = (request.plan.data.get("scan") or {}).get("path")
    where = (f"the plan's scan ({path}) was not found beside the plan or where it was recorded, with its digest"
             if path else "the plan records no scan file")
    return [f"{where}: {what} were not checked. Keep the scan with the plan to have them checked"]


def _weights(layers: dict[str, Any] | None, units: list[str]) -> tuple[dict[str, float], str]:
    """Each layer's weight count from the plan's scan, else 1 per layer."""
    import math

    if layers is not None and all(u in layers for u in units):
        return {u: float(math.prod(layers[u]["weight_shape"])) for u in units}, "weights (from the scan)"
    return dict.fromkeys(units, 1.0), "layers (the plan's scan was not found: each layer counts 1)"


def nncf_arguments(path: str | os.PathLike[str], model: Any, example_input: Any) -> dict[str, Any]:
    """The keyword arguments of ``nncf.compress_weights(model, **kwargs)`` from an ``nncf`` export:
    the modes as NNCF's enums, ``dataset`` (``example_input`` alone: NNCF's PyTorch backend traces
    the model with it; a dict is passed as keyword inputs) and an ``IgnoredScope`` naming every graph
    operation that reads a weight of a module the plan does not quantize: the file's
    ``ignored_modules``, and those the plan never saw (NNCF with ``all_layers`` also compresses
    embeddings, which sensplan does not scan).

    >>> model = nncf.compress_weights(model, **nncf_arguments("nncf.json", model, x[:1]))  # doctest: +SKIP
    """
    import json

    import nncf
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    doc = json.loads(Path(path).read_text())
    a = dict(doc["compress_weights"])
    planned = {name for name, state in doc["layers"].items() if not str(state).startswith("float")}
    planned -= set(doc.get("ignored_modules") or [])
    # full parameter names: an activation node's name has no "." ("x", "/relu/0"), and its empty
    # "module" would match a parameter of the root module (a ViT's cls_token) and ignore every node
    params = {n for n, _ in model.named_parameters()}
    graph = build_nncf_graph(model, example_input)
    names = []
    for node in graph.get_all_nodes():  # an operation reading "<module>.<parameter>" of a module not planned
        owners = {e.from_node.node_name.rpartition(".")[0] for e in graph.get_input_edges(node)
                  if e.from_node.node_name in params}
        if owners - planned:
            names.append(node.node_name)
    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode[a["mode"]], "all_layers": a["all_layers"],
                              "ignored_scope": nncf.IgnoredScope(names=names, validate=False),
                              "dataset": nncf.Dataset([example_input])}
    if "group_size" in a:
        kwargs["group_size"] = a["group_size"]
        kwargs["ratio"] = a["ratio"]
        kwargs["backup_mode"] = nncf.BackupMode[a["backup_mode"]]
    return kwargs
